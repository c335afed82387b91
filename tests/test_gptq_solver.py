"""GPTQ solver, grid and Hessian: against round-to-nearest, an unoptimised reference, and the error paths."""

from __future__ import annotations

import pytest
import torch

from quantlm.errors import QuantlmError
from quantlm.gptq import grid as grid_mod
from quantlm.gptq.grid import GridSpec, find_params, quantize_codes
from quantlm.gptq.hessian import HessianAccumulator
from quantlm.gptq.solver import (
    GPTQResult,
    gptq_quantize,
    gptq_quantize_shared,
    reconstruction_error,
    rtn_quantize,
)
from quantlm.quantized import QuantizedLinear


def dequantize(q, scale, zero):
    """Per-row grid parameters through the one QuantizedLinear.dequantize (per-channel: one group)."""
    return QuantizedLinear(q, scale[:, None], zero[:, None], 8, -1, False).dequantize()


def correlated_problem(out: int, inp: int, n: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """W [out, inp], inputs X [n, inp] with strong column correlations and uneven scales, H = 2/n X^T X."""
    g = torch.Generator().manual_seed(seed)
    rank = max(1, inp // 8)  # mostly low-rank inputs plus noise: strongly correlated columns
    X = torch.randn(n, rank, generator=g) @ torch.randn(rank, inp, generator=g) / rank**0.5
    X = X + 0.3 * torch.randn(n, inp, generator=g)
    X = X * torch.linspace(0.2, 3.0, inp)  # uneven column scales, so act-order matters
    W = torch.randn(out, inp, generator=g) * 0.05
    return W, X, 2.0 / n * X.T @ X


def output_error(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor) -> float:
    return float(torch.linalg.norm(X @ W.T - X @ Q.T))


def reference_gptq(W, H, *, bits, group_size, sym, act_order, static_groups, damp=0.01, mse=False):
    """Straightforward GPTQ in float64: one column at a time, every update applied at once (no blocks)."""
    spec = GridSpec(bits=bits, sym=sym, mse=mse)
    maxq = spec.maxq
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    g = cols if group_size == -1 else group_size
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = [find_params(W[:, k:k + g].float(), spec) for k in range(0, cols, g)]
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    for j in range(cols):
        if static_groups or group_size == -1:
            s, z = groups[int(perm[j]) // g]
        elif j % g == 0:
            s, z = find_params(W[:, j:j + g].float(), spec)
        s, z = s.double(), z.double()
        codes[:, j] = torch.clamp(torch.round(W[:, j] / s) + z, 0, maxq)
        Q[:, j] = (codes[:, j] - z) * s
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    inv = torch.argsort(perm)
    return codes[:, inv], Q[:, inv].float()


# ------------------------------------------------------------------------------------------------ grid

@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [True, False])
def test_grid_contains_zero_and_round_trips(bits, sym):
    spec = GridSpec(bits=bits, sym=sym)
    W = torch.randn(16, 40)
    W[3] = 0.0  # all-zero row
    W[5] = W[5].abs()  # all-positive row
    scale, zero = find_params(W, spec)
    assert torch.all(scale > 0)
    assert torch.equal(zero, zero.round()) and torch.all((zero >= 0) & (zero <= spec.maxq))
    if sym:
        assert torch.all(zero == (spec.maxq + 1) / 2)
    q = quantize_codes(W, scale, zero, spec.maxq)
    assert q.dtype == torch.uint8 and int(q.max()) <= spec.maxq
    # 0 is on every grid, so exact zeros stay zero
    zeros = quantize_codes(torch.zeros(16, 1), scale, zero, spec.maxq)
    assert torch.all(dequantize(zeros, scale, zero) == 0)
    assert torch.all(dequantize(q[3:4], scale[3:4], zero[3:4]) == 0)
    # round-to-nearest: error at most half a step inside the range (the symmetric top code clips by one step)
    err = (dequantize(q, scale, zero) - W).abs()
    assert torch.all(err <= scale[:, None] * (1.0 if sym else 0.5) + 1e-6)


def _mse_loop_reference(W, spec):
    """The original GPTQ clipping search, one shrink factor at a time."""
    maxq = spec.maxq
    scale, zero = find_params(W, GridSpec(bits=spec.bits, sym=spec.sym))
    xmin, xmax = grid_mod._range(W, spec.sym)
    best = torch.full((W.shape[0],), float("inf"))
    for i in range(int(spec.mse_maxshrink * spec.mse_grid)):
        p = 1 - i / spec.mse_grid
        s1, z1 = grid_mod._scale_zero(p * xmin, p * xmax, maxq, spec.sym)
        q = torch.clamp(torch.round(W / s1[:, None]) + z1[:, None], 0, maxq)
        err = ((q - z1[:, None]) * s1[:, None] - W).abs().pow(spec.mse_norm).sum(1)
        better = err < best
        best[better], scale[better], zero[better] = err[better], s1[better], z1[better]
    return scale, zero


@pytest.mark.parametrize("sym", [True, False])
def test_mse_search_matches_loop_and_never_hurts(sym, monkeypatch):
    W = torch.randn(24, 64)
    W[0, 0] = 8.0  # an outlier worth clipping
    spec = GridSpec(bits=3, sym=sym, mse=True)
    s_ref, z_ref = _mse_loop_reference(W, spec)
    for chunk in (1 << 24, 3 * 24 * 64):  # one chunk, and chunk boundaries every 3 candidates
        monkeypatch.setattr(grid_mod, "_MSE_CHUNK_ELEMENTS", chunk)
        s, z = find_params(W, spec)
        assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
    plain_s, plain_z = find_params(W, GridSpec(bits=3, sym=sym))
    assert s[0] < plain_s[0]  # the outlier row was clipped

    def grid_err(s, z):
        return (grid_mod.fake_quantize(W, s, z, spec.maxq) - W).abs().pow(spec.mse_norm).sum(1)

    assert torch.all(grid_err(s, z) <= grid_err(plain_s, plain_z))


# ------------------------------------------------------------------------------------------------ Hessian

@pytest.mark.parametrize("width", [24, 172, 600])  # one panel; several panels, ragged last one
def test_hessian_accumulator_is_the_mean_outer_product(width):
    X = torch.randn(3, 50, width, dtype=torch.float64)
    acc = HessianAccumulator(width)
    acc.add(X[0, :7].float())
    acc.add(X[0, 7:])  # other dtype, 2-D
    first = acc.H.clone()
    acc.add(X[1:].float())  # 3-D batch
    assert not torch.equal(acc.H, first)  # the cached full matrix follows new batches
    acc.add(torch.empty(0, width))  # empty batch changes nothing
    flat = X.reshape(-1, width)
    assert acc.nsamples == 150
    assert acc.H.dtype == torch.float32
    assert torch.equal(acc.H, acc.H.t())
    torch.testing.assert_close(acc.H.double(), 2 / 150 * flat.T @ flat, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        acc.add(torch.randn(4, width - 1))


def test_hessian_running_mean_is_stable_over_many_batches():
    torch.manual_seed(0)
    acc = HessianAccumulator(16)
    total = torch.zeros(16, 16, dtype=torch.float64)
    for _ in range(2000):
        x = torch.randn(8, 16) * 30
        acc.add(x)
        total += x.double().T @ x.double()
    torch.testing.assert_close(acc.H.double(), 2 / 16000 * total, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------------------------ solver vs RTN

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("act_order,static_groups", [(True, True), (True, False), (False, False)])
def test_identity_hessian_equals_round_to_nearest(bits, sym, group_size, act_order, static_groups):
    W = torch.randn(48, 128)
    res = gptq_quantize(W, torch.eye(128), bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                        static_groups=static_groups, block_size=48)
    rtn = rtn_quantize(W, bits=bits, group_size=group_size, sym=sym)
    assert torch.equal(res.q, rtn.q)
    assert torch.equal(res.scale, rtn.scale) and torch.equal(res.zero, rtn.zero)
    assert torch.equal(res.g_idx, rtn.g_idx)
    assert torch.equal(res.dequantize(), rtn.dequantize())


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [128, -1])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits, sym, group_size, act_order):
    W, X, H = correlated_problem(64, 256)
    res = gptq_quantize(W, H, bits=bits, group_size=group_size, sym=sym, act_order=act_order)
    rtn = rtn_quantize(W, bits=bits, group_size=group_size, sym=sym)
    e_gptq = output_error(W, res.dequantize(), X)
    e_rtn = output_error(W, rtn.dequantize(), X)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    # the helper is the same quantity: 2/n ||X W^T - X Q^T||^2
    torch.testing.assert_close(reconstruction_error(W, res.dequantize(), H), 2 / X.shape[0] * e_gptq**2,
                               rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    "bits,group_size,sym,act_order,static_groups,block_size,mse",
    [
        (4, 32, True, True, True, 128, False),
        (3, 32, False, True, False, 128, False),  # dynamic groups inside a block
        (4, 48, True, True, False, 40, False),  # dynamic groups straddling blocks and sub-blocks
        (2, 64, False, False, False, 16, False),  # groups spanning several blocks
        (3, -1, True, True, True, 50, False),  # per-channel, ragged last block
        (8, 64, False, False, True, 128, False),
        (3, 32, False, True, False, 64, True),  # MSE clipping on dynamic groups
    ],
)
def test_matches_unblocked_reference(bits, group_size, sym, act_order, static_groups, block_size, mse):
    W, X, H = correlated_problem(32, 192, seed=1)
    res = gptq_quantize(W, H, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                        static_groups=static_groups, block_size=block_size, mse=mse)
    codes, Q = reference_gptq(W, H, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                              static_groups=static_groups, mse=mse)
    agree = float((res.q.double() == codes).double().mean())
    assert agree > 0.99, agree
    e, e_ref = output_error(W, res.dequantize(), X), output_error(W, Q, X)
    assert abs(e - e_ref) < 0.01 * e_ref, (e, e_ref)


def test_dequantize_matches_codes_scales_and_g_idx():
    W, _, H = correlated_problem(40, 256)
    for kw in (dict(sym=False, static_groups=False), dict(sym=True), dict(group_size=-1, sym=False)):
        res = gptq_quantize(W, H, bits=3, **kw)
        G = res.scale.shape[1]
        assert res.q.dtype == torch.uint8 and res.q.shape == W.shape and int(res.q.max()) <= 7
        assert res.scale.dtype == res.zero.dtype == torch.float32 and res.zero.shape == (40, G)
        assert res.g_idx.dtype == torch.int32 and res.g_idx.shape == (256,)
        assert torch.equal(res.zero, res.zero.round())
        manual = torch.empty(40, 256)
        for i in range(256):
            g = int(res.g_idx[i])
            manual[:, i] = res.scale[:, g] * (res.q[:, i].float() - res.zero[:, g])
        assert torch.equal(res.dequantize(), manual)
        assert 0 < res.loss
        moved = res.to("cpu")
        assert torch.equal(moved.dequantize(), res.dequantize()) and moved.loss == res.loss


@pytest.mark.parametrize("kw", [dict(), dict(static_groups=False, sym=False), dict(group_size=-1, act_order=False),
                                dict(group_size=32, static_groups=False, block_size=40)])
def test_loss_is_the_damped_reconstruction_error(kw):
    """W - W_hat = Err1 @ Hinv, so the reported loss equals trace((W - W_hat) H_damp (W - W_hat)^T) / 2:
    a check of the whole error propagation, independent of how the pass is blocked."""
    W, _, H = correlated_problem(32, 256)
    res = gptq_quantize(W, H, bits=3, **kw)
    H_damp = H + res.damp * torch.diag(H).mean() * torch.eye(256)
    assert res.loss == pytest.approx(reconstruction_error(W, res.dequantize(), H_damp) / 2, rel=1e-5)


def test_static_groups_give_contiguous_g_idx_and_dynamic_follow_act_order():
    W, _, H = correlated_problem(16, 256)
    static = gptq_quantize(W, H, bits=4, group_size=64, act_order=True, static_groups=True)
    assert torch.equal(static.g_idx, (torch.arange(256) // 64).int())
    dyn = gptq_quantize(W, H, bits=4, group_size=64, act_order=True, static_groups=False)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    expected = torch.empty(256, dtype=torch.int32)
    expected[perm] = (torch.arange(256) // 64).int()
    assert torch.equal(dyn.g_idx, expected)
    assert not torch.equal(dyn.g_idx, static.g_idx)
    assert torch.equal(torch.bincount(dyn.g_idx), torch.full((4,), 64))


def test_dead_columns_are_zeroed():
    W, X, _ = correlated_problem(24, 128)
    dead = torch.tensor([0, 5, 77, 127])
    X[:, dead] = 0
    H = 2 / X.shape[0] * X.T @ X
    for act_order in (True, False):
        res = gptq_quantize(W, H, bits=4, group_size=32, act_order=act_order)
        Q = res.dequantize()
        assert torch.all(Q[:, dead] == 0)
        assert torch.isfinite(Q).all()
    # a fully dead layer quantizes to zeros
    res = gptq_quantize(W, torch.zeros(128, 128), bits=3)
    assert torch.all(res.dequantize() == 0)


def test_cholesky_retry_raises_damping_then_fails_clearly():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 64, generator=g)  # rank 4 < 64: singular H without damping
    H = 2 / 4 * X.T @ X
    W = torch.randn(8, 64, generator=g)
    res = gptq_quantize(W, H, bits=4, group_size=-1, damp=0.0)
    assert res.damp > 0
    assert torch.isfinite(res.dequantize()).all()
    assert gptq_quantize(W, H, bits=4, group_size=-1, damp=0.01).damp == 0.01
    indefinite = torch.tensor([[1.0, 100.0], [100.0, 1.0]])
    with pytest.raises(QuantlmError, match="not positive definite"):
        gptq_quantize(torch.randn(3, 2), indefinite, bits=4, group_size=-1)


@pytest.mark.parametrize("bits", range(2, 9))
def test_odd_width_172_every_bitwidth(bits):
    W, X, H = correlated_problem(20, 172)
    errors = {}
    for group_size in (-1, 4):
        res = gptq_quantize(W, H, bits=bits, group_size=group_size)
        assert res.q.shape == (20, 172) and int(res.q.max()) <= (1 << bits) - 1
        assert res.scale.shape == (20, 1 if group_size == -1 else 43)
        errors[group_size] = output_error(W, res.dequantize(), X)
        rtn = rtn_quantize(W, bits=bits, group_size=group_size)
        assert errors[group_size] <= output_error(W, rtn.dequantize(), X)
    assert errors[4] < errors[-1]  # finer groups, smaller error


def test_error_shrinks_with_bits():
    W, X, H = correlated_problem(32, 128)
    errs = [output_error(W, gptq_quantize(W, H, bits=b, group_size=-1).dequantize(), X) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs


def test_deterministic_and_inputs_untouched():
    W, _, H = correlated_problem(32, 256)
    W0, H0 = W.clone(), H.clone()
    for kw in (dict(), dict(static_groups=False, sym=False), dict(mse=True, group_size=-1)):
        a = gptq_quantize(W, H, bits=3, **kw)
        b = gptq_quantize(W, H, bits=3, **kw)
        for f in ("q", "scale", "zero", "g_idx"):
            assert torch.equal(getattr(a, f), getattr(b, f))
        assert a.loss == b.loss
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_mse_grid_search_runs_in_the_solver():
    W, X, H = correlated_problem(32, 128)
    W[0] = torch.randn(128)
    W[0, 0] = 8.0  # an outlier worth clipping
    plain = gptq_quantize(W, H, bits=3, group_size=-1)
    mse = gptq_quantize(W, H, bits=3, group_size=-1, mse=True)
    assert mse.scale[0, 0] < plain.scale[0, 0]
    assert torch.isfinite(mse.dequantize()).all()


def test_half_precision_weights_are_accepted():
    W, X, H = correlated_problem(16, 64)
    res = gptq_quantize(W.half(), H, bits=4, group_size=32)
    assert res.scale.dtype == torch.float32
    assert output_error(W, res.dequantize(), X) < output_error(W, rtn_quantize(W, bits=4, group_size=32)
                                                               .dequantize(), X)


def test_shared_hessian_equals_separate_runs():
    W, _, H = correlated_problem(96, 128)
    parts = [W[:32], W[32:48], W[48:]]
    shared = gptq_quantize_shared(parts, H, bits=4, group_size=32, names=["q", "k", "v"])
    alone = [gptq_quantize(p, H, bits=4, group_size=32) for p in parts]
    for s, a in zip(shared, alone, strict=True):
        assert isinstance(s, GPTQResult) and s.q.shape == a.q.shape
        assert float((s.q == a.q).float().mean()) > 0.999
        assert torch.equal(s.scale, a.scale) and torch.equal(s.g_idx, a.g_idx)
        assert s.loss == pytest.approx(a.loss, rel=1e-3)
    with pytest.raises(QuantlmError, match="one input width"):
        gptq_quantize_shared([W, W[:, :64]], H, bits=4)


# ------------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("bits", [1, 9, 0, 2.5, True])
def test_bad_bits(bits):
    W, _, H = correlated_problem(8, 64)
    with pytest.raises(QuantlmError, match="outside 2..8"):
        gptq_quantize(W, H, bits=bits)
    with pytest.raises(QuantlmError, match="outside 2..8"):
        rtn_quantize(W, bits=bits)


def test_group_size_must_divide_width():
    W, _, H = correlated_problem(8, 172)
    with pytest.raises(QuantlmError, match="does not divide the input width 172.*-1"):
        gptq_quantize(W, H, bits=4, group_size=128, name="mlp.down_proj")
    with pytest.raises(QuantlmError, match="mlp.down_proj"):
        gptq_quantize(W, H, bits=4, group_size=128, name="mlp.down_proj")
    with pytest.raises(QuantlmError, match="group_size=0: use a positive group size"):
        rtn_quantize(W, bits=4, group_size=0)
    assert gptq_quantize(W, H, bits=4, group_size=172).scale.shape == (8, 1)  # one group = whole row


@pytest.mark.parametrize("where,value", [("W", float("nan")), ("W", float("inf")), ("H", float("nan")),
                                         ("H", float("-inf"))])
def test_non_finite_inputs(where, value):
    W, _, H = correlated_problem(8, 64)
    (W if where == "W" else H)[1, 3] = value
    with pytest.raises(QuantlmError, match="NaN or Inf"):
        gptq_quantize(W, H, bits=4, group_size=-1)


def test_other_bad_arguments():
    W, _, H = correlated_problem(8, 64)
    with pytest.raises(QuantlmError, match="Hessian shape"):
        gptq_quantize(W, H[:32, :32], bits=4, group_size=-1)
    with pytest.raises(QuantlmError, match="block_size"):
        gptq_quantize(W, H, bits=4, group_size=-1, block_size=0)
    with pytest.raises(QuantlmError, match="damp"):
        gptq_quantize(W, H, bits=4, group_size=-1, damp=-0.1)
    with pytest.raises(QuantlmError, match="2-D"):
        gptq_quantize(W[0], H, bits=4, group_size=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(), dict(sym=False, static_groups=False), dict(group_size=-1, mse=True)])
def test_cuda_matches_cpu(kw):
    W, X, H = correlated_problem(96, 256)
    kw = {"group_size": 64, **kw}
    cpu = gptq_quantize(W, H, bits=4, **kw)
    gpu = gptq_quantize(W.cuda(), H.cuda(), bits=4, **kw)
    assert gpu.q.is_cuda and gpu.scale.is_cuda
    assert float((gpu.q.cpu() == cpu.q).float().mean()) > 0.99
    e_cpu, e_gpu = output_error(W, cpu.dequantize(), X), output_error(W, gpu.dequantize().cpu(), X)
    assert abs(e_gpu - e_cpu) < 0.01 * e_cpu
    acc = HessianAccumulator(256, "cuda")
    acc.add(X.cuda())
    torch.testing.assert_close(acc.H.cpu(), H, rtol=1e-4, atol=1e-4)
