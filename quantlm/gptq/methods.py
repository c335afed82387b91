"""Quantization methods behind one interface: a quantizer per name, and optional per-block transforms.

A **quantizer** takes the linears of one sequential group (their fp32 weights, which read the same input), the
group's shared Hessian ``H = 2/n X^T X`` and the settings, and returns one ``GPTQResult`` (integer codes, scales,
zeros, group index, loss) per linear. GPTQ and round-to-nearest are the two built in.

A **block transform** runs on a decoder block before any of its Hessians are collected. It may rewrite the block's
weights in place (a clipping or scale search, a magnitude reduction) and, for a function-preserving pair, the
block's other tensors (a norm weight and the linears it feeds). It returns a JSON-able record (or None) that the
output's metadata keeps. Transforms must be deterministic: a resumed run applies them again to the blocks it
restores.

Adding a method is one module that calls :func:`register_quantizer` or :func:`register_transform`; a recipe then
names it (``method``, ``transforms``). Only torch and the standard library are imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from quantlm.architectures import BlockMap
from quantlm.errors import QuantlmError
from quantlm.gptq.solver import GPTQResult, gptq_quantize_shared, rtn_quantize

# (weights of one group, their shared Hessian, the recipe's GPTQSettings, full layer names) -> one result per
# weight. The settings are typed Any here: settings.py imports this module to check the names a recipe gives.
SolveGroup = Callable[[Sequence[Tensor], Tensor, Any, Sequence[str]], list[GPTQResult]]
# (block on the CPU in its stored dtype, its block map, block index) -> record for the metadata, or None
TransformBlock = Callable[[nn.Module, BlockMap, int], "dict | None"]


@dataclass(frozen=True)
class Quantizer:
    name: str
    solve: SolveGroup
    doc: str = ""
    # False: the Hessian only measures the reported error (the plan then keeps no per-row solver state)
    uses_hessian: bool = True


@dataclass(frozen=True)
class BlockTransform:
    name: str
    apply: TransformBlock
    doc: str = ""


def _gptq(Ws, H, s, names):
    # the linears of a group share H: one solve over their stacked rows
    return gptq_quantize_shared(Ws, H, names=names, bits=s.bits, group_size=s.group_size, sym=s.sym,
                                act_order=s.act_order, static_groups=s.static_groups, damp=s.damp,
                                block_size=s.block_size, grid=s.grid_spec())


def _rtn(Ws, H, s, names):
    return [rtn_quantize(W, bits=s.bits, group_size=s.group_size, sym=s.sym, grid=s.grid_spec(), name=n)
            for W, n in zip(Ws, names, strict=True)]


_QUANTIZERS: dict[str, Quantizer] = {
    "gptq": Quantizer("gptq", _gptq, "GPTQ (Frantar et al. 2022): columns quantized in turn, each error "
                                     "spread over the columns not yet quantized through the inverse Hessian"),
    "rtn": Quantizer("rtn", _rtn, "round to nearest on the same grid (the Hessian only measures the error)",
                     uses_hessian=False),
}
_TRANSFORMS: dict[str, BlockTransform] = {}


def register_quantizer(quantizer: Quantizer, *, replace: bool = False) -> Quantizer:
    if quantizer.name in _QUANTIZERS and not replace:
        raise QuantlmError(f"a quantizer named {quantizer.name!r} is already registered; pick another name")
    _QUANTIZERS[quantizer.name] = quantizer
    return quantizer


def register_transform(transform: BlockTransform, *, replace: bool = False) -> BlockTransform:
    if transform.name in _TRANSFORMS and not replace:
        raise QuantlmError(f"a block transform named {transform.name!r} is already registered; pick another name")
    _TRANSFORMS[transform.name] = transform
    return transform


def get_quantizer(name: str) -> Quantizer:
    try:
        return _QUANTIZERS[name]
    except KeyError:
        raise QuantlmError(f"unknown quantization method {name!r}; choose from {', '.join(_QUANTIZERS)} "
                           "(a new one is registered with quantlm.gptq.methods.register_quantizer)") from None


def get_transform(name: str) -> BlockTransform:
    try:
        return _TRANSFORMS[name]
    except KeyError:
        known = ", ".join(_TRANSFORMS) or "none registered"
        raise QuantlmError(f"unknown block transform {name!r} ({known}; a new one is registered with "
                           "quantlm.gptq.methods.register_transform)") from None
