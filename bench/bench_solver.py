"""Benchmark of the GPTQ solver on Spectra layer shapes (CPU or GPU), against round-to-nearest and an
unoptimised port of the original GPTQ loop (written here from the paper's Algorithm 1, for reference).

Usage (from the repository root):
    python bench/bench_solver.py                       # 99M shapes, all 16 blocks, 4 bits, group 128
    python bench/bench_solver.py --blocks 2 --reference  # also time the original-style loop
    python bench/bench_solver.py --preset floatlm-3.9b --blocks 1 --tokens 8192 --reference

Inputs are synthetic: per distinct layer input, X [tokens, in] = low-rank part + noise, with uneven
(heavy-tailed) feature scales as in real activations; weights ~ N(0, 0.02^2). The solver never sees
tokens, only H = 2/n X^T X, so its time depends on the shapes alone.
Reported error: trace((W - Q) H (W - Q)^T) / trace(W H W^T), the relative output error of the layer.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlm.gptq.grid import GridSpec, find_params  # noqa: E402
from quantlm.gptq.hessian import HessianAccumulator  # noqa: E402
from quantlm.gptq.solver import gptq_quantize, gptq_quantize_shared, rtn_quantize  # noqa: E402
from quantlm.specs import get_preset  # noqa: E402

# Layers sharing one input, in the order of a LLaMA block.
GROUPS = [("attn_in", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
          ("o_in", ["self_attn.o_proj"]),
          ("mlp_in", ["mlp.gate_proj", "mlp.up_proj"]),
          ("down_in", ["mlp.down_proj"])]


def synthetic_inputs(tokens: int, width: int, gen: torch.Generator, chunk: int = 4096):
    """Yield chunks of X [chunk, width]: rank-width/8 signal + noise, log-normal feature scales."""
    rank = max(1, width // 8)
    mix = torch.randn(rank, width, generator=gen) / math.sqrt(rank)
    feat_scale = torch.exp(0.7 * torch.randn(width, generator=gen))
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        x = torch.randn(n, rank, generator=gen) @ mix + 0.3 * torch.randn(n, width, generator=gen)
        yield x * feat_scale


def rel_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D = W - Q
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum())


def original_gptq(W, H, *, bits, group_size, sym, act_order, static_groups, damp=0.01, blocksize=128):
    """Unoptimised port of the original loop (fasterquant): W [rows, cols] in place, rank-1 update of the
    rest of the block after every column, Cholesky -> Cholesky inverse -> upper Cholesky. Returns Q."""
    spec = GridSpec(bits=bits, sym=sym)
    maxq = spec.maxq
    W = W.clone().float()
    H = H.clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    g = cols if group_size == -1 else group_size
    scale, zero = find_params(W, spec) if group_size == -1 else (None, None)
    groups = [find_params(W[:, i:i + g], spec) for i in range(0, cols, g)] if static_groups else None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    H[torch.arange(cols), torch.arange(cols)] += damp * torch.mean(torch.diag(H))
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if group_size != -1:
                if not static_groups:
                    if (i1 + i) % group_size == 0:
                        scale, zero = find_params(W[:, (i1 + i):(i1 + i + group_size)], spec)
                else:
                    idx = i1 + i
                    if act_order:
                        idx = perm[idx]
                    scale, zero = groups[int(idx) // group_size]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            q = scale * (q - zero)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if act_order:
        Q = Q[:, invperm]
    return Q


def timed(fn, repeat: int, sync):
    """(result, best wall seconds, best process-CPU seconds) over ``repeat`` runs."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return out, min(walls), min(cpus)


def breakdown(spec, args, device, kw) -> None:
    """Per stacked shape: total solver CPU time, its Cholesky/inverse part, and the per-column floor
    (the same call on 8 rows, minus the factorisation), best of ``args.repeat`` (at least 3) runs."""
    import quantlm.gptq.solver as solver_mod

    spent = {"inv": 0.0}
    inner = solver_mod._inverse_cholesky

    def timed_inverse(*a, **k):
        c0 = time.process_time()
        out = inner(*a, **k)
        spent["inv"] += time.process_time() - c0
        return out

    solver_mod._inverse_cholesky = timed_inverse
    shapes = spec.linear_shapes()
    print("| stacked layers | shape | solver CPU ms | of which Cholesky + inverse | per-column floor us |")
    print("|---|---|---|---|---|")
    try:
        for _, names in GROUPS:
            width = shapes[names[0]][1]
            rows = sum(shapes[n][0] for n in names)
            gen = torch.Generator().manual_seed(0)
            acc = HessianAccumulator(width, device)
            for x in synthetic_inputs(max(4096, 2 * width), width, gen):
                acc.add(x.to(device))
            H = acc.H
            W = (torch.randn(rows, width, generator=gen) * 0.02).to(device)
            W8 = W[:8].clone()
            best, best8 = (math.inf, 0.0), math.inf
            for _ in range(max(3, args.repeat)):
                spent["inv"] = 0.0
                c0 = time.process_time()
                gptq_quantize(W, H, **kw)
                best = min(best, (time.process_time() - c0, spent["inv"]))
                spent["inv"] = 0.0
                c0 = time.process_time()
                gptq_quantize(W8, H, **kw)
                best8 = min(best8, time.process_time() - c0 - spent["inv"])
            print(f"| {'+'.join(n.split('.')[-1] for n in names)} | {rows}x{width} | {best[0] * 1e3:.1f} | "
                  f"{best[1] * 1e3:.1f} | {best8 / width * 1e6:.1f} |", flush=True)
    finally:
        solver_mod._inverse_cholesky = inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="floatlm-99m")
    ap.add_argument("--blocks", type=int, default=None, help="blocks to run (default: all of the preset)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--no-act-order", action="store_true")
    ap.add_argument("--tokens", type=int, default=32 * 512, help="calibration tokens per Hessian")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--reference", action="store_true", help="also run the original-style loop")
    ap.add_argument("--separate", action="store_true", help="also quantize shared-input layers one by one")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--breakdown", action="store_true", help="only time each stacked shape, split in parts")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spec = get_preset(args.preset)
    shapes = spec.linear_shapes()
    blocks = args.blocks or spec.num_hidden_layers
    kw = dict(bits=args.bits, group_size=args.group_size, sym=not args.asym, act_order=not args.no_act_order)
    if args.breakdown:
        print(f"# {args.preset} breakdown, {torch.get_num_threads()} thread(s), load {os.getloadavg()}")
        breakdown(spec, args, device, kw)
        return
    widths = {"attn_in": spec.hidden_size, "o_in": spec.hidden_size, "mlp_in": spec.hidden_size,
              "down_in": spec.intermediate_size}

    print(f"# {args.preset}: {blocks} block(s), {args.bits} bits, group {args.group_size}, "
          f"{'asym' if args.asym else 'sym'}, act-order {not args.no_act_order}, {args.tokens} tokens/Hessian")
    print(f"load average at start {os.getloadavg()}; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"device {device}")
    totals = {"hessian": [0.0, 0.0], "solver": [0.0, 0.0], "shared (same layers)": [0.0, 0.0],
              "separate": [0.0, 0.0], "reference": [0.0, 0.0]}
    rows = []
    for blk in range(blocks):
        gen = torch.Generator().manual_seed(1000 + blk)
        for key, names in GROUPS:
            acc = HessianAccumulator(widths[key], device)
            chunks = [x.to(device) for x in synthetic_inputs(args.tokens, widths[key], gen)]

            def accumulate(acc=acc, chunks=chunks):
                acc.__init__(acc.in_features, device)
                for x in chunks:
                    acc.add(x)
                return acc.H

            H, w_h, c_h = timed(accumulate, args.repeat, sync)
            del chunks
            Ws = [torch.randn(shapes[n], generator=gen).mul_(0.02).to(device) for n in names]
            res, w_s, c_s = timed(lambda Ws=Ws, H=H, names=names: gptq_quantize_shared(Ws, H, names=names, **kw),
                                  args.repeat, sync)
            totals["hessian"][0] += w_h
            totals["hessian"][1] += c_h
            totals["solver"][0] += w_s
            totals["solver"][1] += c_s
            if args.separate and len(Ws) > 1:
                _, w_p, c_p = timed(lambda Ws=Ws, H=H: [gptq_quantize(W, H, **kw) for W in Ws], args.repeat, sync)
                totals["separate"][0] += w_p
                totals["separate"][1] += c_p
                totals["shared (same layers)"][0] += w_s
                totals["shared (same layers)"][1] += c_s
            for n, W, r in zip(names, Ws, res, strict=True):
                e = rel_error(W, r.dequantize(), H)
                e_rtn = rel_error(W, rtn_quantize(W, bits=args.bits, group_size=args.group_size,
                                                  sym=not args.asym).dequantize(), H)
                row = dict(block=blk, layer=n, shape=tuple(W.shape), err=e, rtn=e_rtn, loss=r.loss)
                if args.reference:
                    Q, w_r, c_r = timed(lambda W=W, H=H: original_gptq(W, H, static_groups=True, **kw), 1, sync)
                    totals["reference"][0] += w_r
                    totals["reference"][1] += c_r
                    row.update(ref=rel_error(W, Q, H), ref_wall=w_r, ref_cpu=c_r)
                rows.append(row)
            print(f"block {blk} {key:8s} H {w_h:6.3f}s  solver {w_s:6.3f}s (cpu {c_s:6.3f}s)  "
                  + "  ".join(f"{r['layer'].split('.')[-1]} err {r['err']:.4f} rtn {r['rtn']:.4f}"
                              + (f" ref {r['ref']:.4f} ({r['ref_wall']:.2f}s, cpu {r['ref_cpu']:.2f}s)"
                                 if "ref" in r else "")
                              for r in rows if r["block"] == blk and r["layer"] in names), flush=True)

    print()
    print(f"load average at end {os.getloadavg()}")
    print("| part | wall s | process CPU s |")
    print("|---|---|---|")
    for k, (w, c) in totals.items():
        if w:
            print(f"| {k} | {w:.2f} | {c:.2f} |")
    by_layer: dict[str, list] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append(r)
    print()
    print("| layer | shape | GPTQ rel. error | RTN rel. error | GPTQ / RTN |" + (" original-port error |"
                                                                             if args.reference else ""))
    print("|---|---|---|---|---|" + ("---|" if args.reference else ""))
    for n, rs in by_layer.items():
        e = statistics.mean(r["err"] for r in rs)
        t = statistics.mean(r["rtn"] for r in rs)
        line = f"| {n} | {rs[0]['shape'][0]}x{rs[0]['shape'][1]} | {e:.5f} | {t:.5f} | {e / t:.3f} |"
        if args.reference:
            line += f" {statistics.mean(r['ref'] for r in rs):.5f} |"
        print(line)


if __name__ == "__main__":
    main()
