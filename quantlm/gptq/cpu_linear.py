"""fp32 matrix products on the CPU through oneDNN instead of the default BLAS.

Why: torch's CPU ``F.linear`` / ``mm`` call MKL, which on AMD processors runs a slower code path; oneDNN
(also bundled with torch) picks its kernels from the instruction set alone. On the 2-core AMD EPYC
(AVX-512) of bench/quantize_cpu.md, ``torch.ops.mkldnn._linear_pointwise`` runs the block linears and the
Hessian products at ~110-140 GFLOP/s per core against ~50-65 for MKL, with results independent of the
thread count (MKL's change with it). Both are fp32 with fp32 accumulation; they differ only in summation
order (~1e-6 relative). Everything falls back to plain torch when the op is missing, fails its first-use
self-check, or the tensors are not fp32 on the CPU, so results never depend on this module being usable.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@functools.cache
def onednn_available() -> bool:
    """True when torch's oneDNN fp32 linear exists and agrees with ``F.linear`` on a small product."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(3, 5, 24, generator=gen), torch.randn(40, 24, generator=gen)
        b = torch.randn(40, generator=gen)
        with torch.no_grad():
            y = op(x, w, b, "none", [], "")
            ok = y.shape == (3, 5, 40) and torch.allclose(y, F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    except (RuntimeError, TypeError):
        return False
    return bool(ok)


def _usable(*tensors: Tensor | None) -> bool:
    grad = torch.is_grad_enabled()  # the oneDNN op has no backward: inference only
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and not (grad and t.requires_grad))
               for t in tensors) and onednn_available()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` (x [..., in], weight [out, in]); oneDNN for fp32 CPU tensors."""
    if _usable(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def gram_panels(x: Tensor, starts: list[int], *, transposed: bool = False) -> Iterator[tuple[int, int, Tensor]]:
    """The upper triangle of ``x^T x`` (x [n, d]) by row panels: yields (a, b, (x^T x)[a:b, a:]) for the
    panels starting at ``starts``. ``transposed``: ``x`` is given as its contiguous transpose [d, n] (saves
    the copy made here). oneDNN on fp32 CPU tensors, else ``mm``."""
    d = x.shape[0] if transposed else x.shape[1]
    ends = [*starts[1:], d]
    if _usable(x):
        xt = x if transposed else x.t().contiguous()  # [d, n]: linear(xt[a:b], xt[a:]) = xt[a:b] @ xt[a:]^T
        for a, b in zip(starts, ends, strict=True):
            yield a, b, torch.ops.mkldnn._linear_pointwise(xt[a:b], xt[a:], None, "none", [], "")
    elif transposed:
        for a, b in zip(starts, ends, strict=True):
            yield a, b, x[a:b] @ x[a:].t()
    else:
        for a, b in zip(starts, ends, strict=True):
            yield a, b, x[:, a:b].t() @ x[:, a:]


@contextlib.contextmanager
def override_forward(module: nn.Module, forward) -> Iterator[None]:
    """Call ``forward`` instead of ``module.forward`` inside the block (hooks still run), then restore."""
    missing = object()
    saved = module.__dict__.get("forward", missing)
    module.forward = forward
    try:
        yield
    finally:
        if saved is missing:
            del module.forward
        else:
            module.forward = saved


@contextlib.contextmanager
def onednn_linears(root: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Route every ``nn.Linear`` under ``root`` through :func:`linear` (reads the live weight at each call,
    so in-place weight updates take effect). Yields how many linears were rerouted."""
    linears = [m for m in root.modules() if type(m) is nn.Linear] if enabled and onednn_available() else []
    with contextlib.ExitStack() as stack:
        for lin in linears:
            stack.enter_context(override_forward(lin, functools.partial(_linear_forward, lin)))
        yield len(linears)


def _linear_forward(lin: nn.Linear, x: Tensor) -> Tensor:
    return linear(x, lin.weight, lin.bias)
