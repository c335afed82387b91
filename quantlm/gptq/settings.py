"""The quantization math of GPTQ as one frozen settings value (what the solver and the block pipeline read)."""

from __future__ import annotations

from dataclasses import dataclass

from quantlm.errors import QuantlmError
from quantlm.gptq.grid import GridSpec
from quantlm.gptq.methods import get_quantizer, get_transform
from quantlm.quantized import check_bits, check_group_size
from quantlm.recipes import doc


@dataclass(frozen=True)
class GPTQSettings:
    """The quantization method, its grid, solver and block order (the Spectra recipe, GPTQ at 4 bits, by default)."""

    method: str = doc("quantizer of each sequential group: gptq, rtn, or a registered one", "gptq")
    transforms: tuple[str, ...] = doc("registered per-block transforms run, in order, before a block's Hessians",
                                      ())
    bits: int = doc("bit width of the integer codes, 2..8", 4)
    group_size: int = doc("input columns sharing one scale; -1 for one scale per output channel", 128)
    sym: bool = doc("symmetric grid (zero point fixed at the grid's middle)", True)
    act_order: bool = doc("quantize columns in order of decreasing Hessian diagonal", True)
    static_groups: bool = doc("fix group scales before the act-order pass, so g_idx stays contiguous", True)
    true_sequential: bool = doc("quantize q,k,v -> o -> gate,up -> down, each seeing quantized inputs", True)
    damp: float = doc("Hessian damping, as a fraction of the mean diagonal", 0.01)
    block_size: int = doc("columns per lazy-update block", 128)
    mse: bool = doc("search the clipping range that minimises the grid error (MSE grid search)", False)
    mse_grid: int = doc("MSE search: number of shrink factors tried", 100)
    mse_maxshrink: float = doc("MSE search: the smallest range tried is (1 - mse_maxshrink) of the full one", 0.8)
    mse_norm: float = doc("MSE search: exponent p of the error sum |w - q(w)|^p", 2.4)
    signed_absmax: bool = doc("llama.cpp's symmetric grid: the largest-magnitude weight of each group lands exactly "
                              "on the outer level (its sign in the scale), so every level is used", False)
    hessian_tf32: bool = doc("GPU: TF32 tensor cores for the Hessian products x x^T (about 5x faster on an "
                             "H100; off keeps them in full fp32)", False)

    def __post_init__(self):
        check_bits(self.bits)
        check_group_size(self.group_size)
        if not 0 <= self.damp < 1:
            raise QuantlmError(f"damp={self.damp}: damping is a fraction of mean(diag H) in [0, 1)")
        if self.block_size <= 0:
            raise QuantlmError(f"block_size={self.block_size} must be positive")
        self.grid_spec()  # the MSE settings' own checks
        get_quantizer(self.method)
        for name in self.transforms:
            get_transform(name)

    def grid_spec(self) -> GridSpec:
        return GridSpec(bits=self.bits, sym=self.sym, mse=self.mse, mse_grid=self.mse_grid,
                        mse_maxshrink=self.mse_maxshrink, mse_norm=self.mse_norm, signed_absmax=self.signed_absmax)

    @property
    def mse_candidates(self) -> int:
        return self.mse_grid if self.mse else 0
