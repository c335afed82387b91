"""Running GPTQ Hessian H = 2/n * sum_k x_k x_k^T of one linear layer's inputs, in fp32.

Pure tensors: the caller (the pipeline's hooks) feeds the layer inputs. n counts input vectors (tokens).
The original GPTQ code counted sequences instead; a constant factor on H changes neither the codes
nor the scales, only the reported loss.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from quantlm.gptq.cpu_linear import gram_panels


@contextlib.contextmanager
def tf32_matmul(enabled: bool):
    """fp32 matmuls inside the block in full fp32, or in TF32 on CUDA when ``enabled``, whatever the caller set
    globally (``torch.set_float32_matmul_precision("high")`` is common, and oneDNN may be told to use bf16 for fp32
    matmuls on the CPU); the caller's settings come back afterwards (``fp32_precision`` where torch has it, else
    the older ``allow_tf32`` flag).

    Where torch has both APIs (2.9+), the legacy precision and the new per-backend flags are set together (the legacy
    setter first, which sets both): torch raises "you have used mix of the legacy and new APIs" wherever it reads a
    state in which they disagree (``torch.backends.cuda.matmul.allow_tf32``, and kernels that ask the same question),
    so setting only the new flag under a caller's ``"high"`` would leave such a state for the block's duration."""
    cuda, mkldnn = torch.backends.cuda.matmul, getattr(torch.backends, "mkldnn", None)
    if not hasattr(cuda, "fp32_precision"):
        previous = cuda.allow_tf32
        cuda.allow_tf32 = enabled
        try:
            yield
        finally:
            cuda.allow_tf32 = previous
        return
    mkl = getattr(mkldnn, "matmul", None)
    mkl = mkl if mkl is not None and hasattr(mkl, "fp32_precision") else None
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the caller mixed the two APIs itself: its per-backend flags are what it set
        legacy = None
    saved_cuda = cuda.fp32_precision
    saved_mkl = mkl.fp32_precision if mkl is not None else None
    torch.set_float32_matmul_precision("high" if enabled else "highest")  # legacy and CUDA/oneDNN flags together
    if mkl is not None:
        mkl.fp32_precision = "ieee"  # "high" would also allow TF32 in oneDNN: never on the CPU
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        cuda.fp32_precision = saved_cuda  # exactly the caller's flags, even a state the caller left mixed
        if mkl is not None:
            mkl.fp32_precision = saved_mkl


def _panel_starts(width: int) -> list[int]:
    """Row panels of the upper triangle: ~8 panels of at least 64 rows (fewer for narrow layers)."""
    size = max(64, -(-width // 8))
    return list(range(0, width, size))


class HessianAccumulator:
    """Accumulates H = 2/n * X^T X over batches of inputs x [..., in_features].

    Kept as a running mean (H <- n/(n+m) * H + 2/(n+m) * x^T x), so its magnitude stays that of one
    sample's outer product however many batches arrive. Only the upper triangle is computed, by row
    panels (one matrix product per panel, ~56% of the multiply-adds of the full product; through oneDNN on
    the CPU, see ``cpu_linear``), and mirrored when ``H`` is read, so H is exactly symmetric.
    Inputs of any float dtype are upcast per batch: H is always accumulated in fp32. ``allow_tf32`` (CUDA
    only) runs the products in TF32, several times faster on recent GPUs at ~1e-3 relative error of H;
    off by default.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None, *, allow_tf32: bool = False):
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.allow_tf32 = allow_tf32 and self.device.type == "cuda"
        self._upper = torch.zeros(in_features, in_features, dtype=torch.float32, device=self.device)
        self._panels = _panel_starts(in_features)
        self._full: Tensor | None = None
        self.nsamples = 0

    def add(self, x: Tensor) -> None:
        """Add a batch of inputs of shape [..., in_features] (any float dtype, any device)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the accumulator expects {self.in_features}")
        x = x.detach().reshape(-1, self.in_features)
        m = x.shape[0]
        if m == 0:
            return
        total = self.nsamples + m
        beta, alpha = self.nsamples / total, 2.0 / total
        if self.device.type == "cpu":
            xt = torch.empty((self.in_features, m), dtype=torch.float32)
            xt.copy_(x.t())  # one copy: transpose for the panels and upcast (bf16 forwards) together
            del x
            with tf32_matmul(False):
                for a, b, panel in gram_panels(xt, self._panels, transposed=True):  # rows a..b of the upper triangle
                    self._upper[a:b, a:].mul_(beta).add_(panel, alpha=alpha)
        else:
            x = x.to(device=self.device, dtype=torch.float32)
            ends = self._panels[1:] + [self.in_features]
            with tf32_matmul(self.allow_tf32):
                for a, b in zip(self._panels, ends, strict=True):
                    self._upper[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:], beta=beta, alpha=alpha)
        self.nsamples = total
        self._full = None

    def take(self) -> Tensor:
        """The Hessian (as ``H``), built in the accumulator's own buffer: no second [in, in] matrix is kept.
        The accumulator is spent afterwards (no more ``add``)."""
        if self._full is not None:
            full, self._full, self._upper = self._full, None, None
            return full
        if self._upper is None:
            raise RuntimeError("this accumulator's Hessian was already taken")
        u, self._upper = self._upper, None
        u.triu_()
        u += u.triu(1).t()  # the same sums as ``H``: each element is one upper entry plus zero
        return u

    @property
    def H(self) -> Tensor:
        """The current Hessian [in, in], fp32, symmetric (cached until the next ``add``; do not modify it)."""
        if self._full is None:
            full = torch.triu(self._upper)
            full += torch.triu(self._upper, diagonal=1).t()
            self._full = full
        return self._full
