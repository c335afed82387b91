"""TriLM: a LLaMA whose block linears are ternary (Spectra, DESIGN section 3).

Forward: gamma = eps + mean(|W|) over each model-parallel shard, W_t = round(clip(W / gamma, -1, 1)),
y = x (gamma * W_t)^T. Backward: straight-through, i.e. the latent weight W receives the gradient of the
effective weight unchanged. Shards are MP contiguous chunks along the output dimension of column-parallel
layers (q, k, v, gate, up) and along the input dimension of row-parallel layers (o, down).

The numeric core (``ternarize``, ``TernaryLinear``) needs only torch; building, converting and exporting
models imports transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from quantlm.architectures import COLUMN, BlockMap, block_map_of
from quantlm.errors import QuantlmError
from quantlm.quantized import TernaryWeight, check_shards

EPS = 1e-5


def _check_shards(weight: torch.Tensor, mp: int, kind: str) -> int:
    return check_shards(tuple(weight.shape), mp, kind)


def _shard_view(w: torch.Tensor, mp: int, dim: int) -> torch.Tensor:
    """A view of ``w`` (out, in) with the shard index on axis 0 (COLUMN) or axis 1 (ROW) of a 3-D view."""
    return w.view(mp, -1, w.shape[1]) if dim == 0 else w.view(w.shape[0], mp, -1)


def _scales_and_ratio(weight: torch.Tensor, mp: int, kind: str, eps: float):
    """(gamma (mp,), clip(W / gamma, -1, 1) rounded, in the 3-D shard view, and the broadcastable gamma)."""
    dim = _check_shards(weight, mp, kind)
    w = _shard_view(weight.detach().float().contiguous(), mp, dim)
    reduce = (1, 2) if dim == 0 else (0, 2)
    gamma = w.abs().mean(dim=reduce) + eps
    g = gamma.view(mp, 1, 1) if dim == 0 else gamma.view(1, mp, 1)
    return gamma, (w / g).clamp_(-1, 1).round_(), g


def ternarize(weight: torch.Tensor, mp: int = 1, kind: str = COLUMN, eps: float = EPS
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes and scales of ``weight`` (out, in): (W_t int8 in {-1, 0, 1} same shape, gamma (mp,) fp32)."""
    gamma, codes, _ = _scales_and_ratio(weight, mp, kind, eps)
    return codes.reshape(weight.shape).to(torch.int8), gamma


def dequantize(codes: torch.Tensor, gamma: torch.Tensor, kind: str, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """gamma * W_t as a dense weight (the unpacked TriLM weight)."""
    return TernaryWeight(codes, gamma, kind).dequantize(dtype)


def ternary_weight(weight: torch.Tensor, mp: int = 1, kind: str = COLUMN, eps: float = EPS) -> torch.Tensor:
    """The effective weight gamma * W_t, exactly, with the straight-through gradient to ``weight``."""
    return _StraightThrough.apply(weight, mp, kind, eps)


class _StraightThrough(torch.autograd.Function):
    # A custom function (not ``w + (q - w).detach()``) so the forward value is exactly gamma * W_t and
    # therefore bit-identical to the exported unpacked checkpoint.
    @staticmethod
    def forward(ctx, weight, mp, kind, eps):
        _, codes, g = _scales_and_ratio(weight, mp, kind, eps)
        return codes.mul_(g).reshape(weight.shape).to(weight.dtype)  # == dequantize(ternarize(weight))

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class TernaryLinear(nn.Linear):
    """A bias-free linear layer whose latent fp32 weight is ternarized on every forward."""

    def __init__(self, in_features: int, out_features: int, mp: int = 1, kind: str = COLUMN,
                 bias: bool = False, device=None, dtype=None, eps: float = EPS):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        _check_shards(self.weight, mp, kind)
        self.mp, self.kind, self.eps = mp, kind, eps

    @classmethod
    def from_linear(cls, linear: nn.Linear, mp: int, kind: str) -> TernaryLinear:
        new = cls(linear.in_features, linear.out_features, mp, kind, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, ternary_weight(self.weight, self.mp, self.kind, self.eps), self.bias)

    def ternarize(self) -> tuple[torch.Tensor, torch.Tensor]:
        return ternarize(self.weight, self.mp, self.kind, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mp={self.mp}, kind={self.kind}"


# ------------------------------------------------------------------------------------------- models

def _block_linears(model: nn.Module, block_map: BlockMap | None = None):
    """(full name, parent module, attribute, linear path) of every block linear of ``model``."""
    block_map = block_map or block_map_of(model)
    layers = model.get_submodule(block_map.layers_path)
    for i, layer in enumerate(layers):
        for path in block_map.linears:
            parent_path, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            yield f"{block_map.layers_path}.{i}.{path}", parent, attr, path


def convert_to_trilm(model: nn.Module, mp: int = 1, block_map: BlockMap | None = None) -> nn.Module:
    """Replace every block linear of a (FloatLM) causal LM with a ``TernaryLinear``, in place; returns it.

    The latent weights start from the FloatLM's weights; the config records ``pretraining_model_parallel``.
    """
    block_map = block_map or block_map_of(model)
    for _name, parent, attr, path in _block_linears(model, block_map):
        linear = getattr(parent, attr)
        if isinstance(linear, TernaryLinear):
            continue
        setattr(parent, attr, TernaryLinear.from_linear(linear, mp, block_map.shard_kind(path)))
    if hasattr(model, "config"):
        model.config.pretraining_model_parallel = mp
        model.config.quantlm_family = "trilm"
    return model


def build_trilm(spec_or_config, mp: int | None = None):
    """A freshly initialised TriLM (``LlamaForCausalLM`` with ternary block linears) from a ModelSpec or config."""
    from transformers import LlamaForCausalLM

    config = spec_or_config.to_hf_config() if hasattr(spec_or_config, "to_hf_config") else spec_or_config
    mp = mp or getattr(config, "pretraining_model_parallel", None) or getattr(spec_or_config, "model_parallel", 1)
    model = LlamaForCausalLM(config)
    return convert_to_trilm(model, mp)


def is_ternary_model(model: nn.Module) -> bool:
    return any(isinstance(m, TernaryLinear) for m in model.modules())


def unpacked_state_dict(model: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The plain LLaMA state dict of a TriLM: block weights gamma * W_t, every tensor in ``dtype``."""
    ternary = {name + ".weight": m for name, m in model.named_modules() if isinstance(m, TernaryLinear)}
    out = {}
    for name, tensor in model.state_dict().items():
        if name in ternary:
            m = ternary[name]
            codes, gamma = m.ternarize()
            # Round the scales to the export dtype first: gamma_fp16 * {-1, 0, 1} is then exact.
            out[name] = dequantize(codes, gamma.to(dtype), m.kind, dtype)
        else:
            out[name] = tensor.detach().to(dtype)
    return out


def export_unpacked(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Save a TriLM as an ordinary LLaMA checkpoint (block weights gamma * W_t) that plain transformers loads.

    ``out_dir`` is written directly (callers wrap it in ``outputs.output_dir``).
    """
    from transformers import LlamaForCausalLM

    if not is_ternary_model(model):
        raise QuantlmError("export_unpacked needs a TriLM (a model with TernaryLinear layers); "
                           "convert a FloatLM with convert_to_trilm first")
    config = model.config.__class__.from_dict(model.config.to_dict())
    mp = next(m.mp for m in model.modules() if isinstance(m, TernaryLinear))
    config.pretraining_model_parallel = mp
    config.quantlm_family = "trilm"
    config.architectures = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(config).to(dtype)
    plain.load_state_dict(unpacked_state_dict(model, dtype), strict=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
