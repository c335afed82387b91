"""Time quantlm's GPTQ pipeline alone (model already loaded) on the quantize bench's weights and windows, with the
process's CPU and page-fault counts, for the quantlm tree at ``--repo`` (this checkout, or a worktree of an older
commit: both package layouts are handled). Used to find and check the trimming slowdown in
bench/quantize_memory.md ("Trimming"); alternate the trees in one session, each run in its own process:

  python bench/bench_quantize_cpu.py --tools quantlm --work /tmp/q/after     # once: model + tokens
  git worktree add /tmp/before f061207
  for i in 1 2 3; do python bench/bench_pipeline_ab.py --repo /tmp/before --work /tmp/q/after
                     python bench/bench_pipeline_ab.py --work /tmp/q/after; done

``--random PRESET`` runs a random-init model of that Spectra shape on random token ids instead (``--layers``,
``--nsamples``, ``--seqlen``; seed 0), e.g. one 99M block at the Spectra recipe; ``--heap on|off`` and
``--trim group|block|never`` override the memory plan's allocator choices (bench/quantize_memory.md, "Large
tensors in the heap"), ``--rtn`` rounds to nearest (the forwards and Hessians alone).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--work", default="/tmp/quantlm-bench", help="bench_quantize_cpu.py's work dir (seed 0)")
    ap.add_argument("--random", default="", help="a Spectra preset: random init and random tokens instead of --work")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--nsamples", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--rtn", action="store_true")
    ap.add_argument("--heap", choices=["plan", "on", "off"], default="plan")
    ap.add_argument("--trim", choices=["plan", "group", "block", "never"], default="plan")
    ap.add_argument("--replay-cache-gb", type=float, default=-1.0)
    ap.add_argument("--batch-size", type=int, default=0, help="calibration windows per forward; 0: the plan's")
    args = ap.parse_args()
    sys.path.insert(0, args.repo)
    from quantlm.architectures import LLAMA
    from quantlm.gptq import pipeline
    from quantlm.gptq.pipeline import quantize_blocks

    kwargs = _allocator_overrides(args, pipeline)
    model, tokens, recipe = _random_run(args) if args.random else _bench_run(args)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if args.rtn and hasattr(recipe, "method"):  # a named method since the seams refactor (issue 19)
        import dataclasses

        recipe = dataclasses.replace(recipe, method="rtn")
    elif args.rtn:
        kwargs["rtn"] = True
    run = quantize_blocks(model, LLAMA, tokens, recipe, progress=False, **kwargs)
    _report(args, run, time.perf_counter() - t0, r0)


def _bench_run(args):
    """The quantize bench's model and windows, for the quantlm tree at --repo."""
    import torch

    tokens = torch.load(Path(args.work) / "tokens.pt")
    try:  # since the one-house refactor (issue 10)
        from quantlm.gptq.settings import GPTQSettings
        from quantlm.hf_checkpoint import load_causal_lm

        recipe = GPTQSettings(bits=4, group_size=128)
    except ImportError:
        from quantlm.checkpoint import load_causal_lm

        from quantlm.recipes import QuantRecipe

        recipe = QuantRecipe(bits=4, group_size=128, nsamples=tokens.shape[0], seqlen=tokens.shape[1],
                             formats=("gptq",))
    model = load_causal_lm(Path(args.work) / "floatlm-99m-random", dtype=torch.float32)
    return model, tokens, recipe


def _random_run(args):
    import torch
    from transformers import LlamaForCausalLM

    from quantlm.gptq.settings import GPTQSettings
    from quantlm.specs import get_preset

    torch.manual_seed(0)
    model = LlamaForCausalLM(get_preset(args.random).to_hf_config(num_hidden_layers=args.layers)).float()
    tokens = torch.randint(0, 50000, (args.nsamples, args.seqlen))
    return model, tokens, GPTQSettings(bits=4, group_size=128)


def _allocator_overrides(args, pipeline) -> dict:
    """Monkeypatches for --heap / --trim (bench only); the quantize_blocks keywords for the rest."""
    from quantlm.gptq import memory

    if args.heap == "on":  # the plan's rule: batches above the mmap threshold, and memory ample
        memory.MMAP_THRESHOLD_MAX, memory.TRIM_FRACTION = 0, memory.FIT_FRACTION
    elif args.heap == "off":
        memory.MMAP_THRESHOLD_MAX = 1 << 62
    if args.trim != "plan":
        release, calls = pipeline.release_free_memory, [0]

        def trim():  # called after each of a block's 4 groups and once after the block
            calls[0] += 1
            if args.trim == "group" or (args.trim == "block" and calls[0] % 5 == 0):
                release()

        try:  # since the seams refactor (issue 19) the residency trims, or not, as the plan says
            from quantlm.gptq.residency import Residency

            Residency.trim = lambda self: trim()
        except ImportError:  # the pipeline called one of the two after each group and block
            pipeline.release_free_memory = pipeline._keep_free_memory = trim
    if args.replay_cache_gb < 0 and not args.batch_size:
        return {}
    from quantlm.gptq.memory import MemorySettings

    return {"memory": MemorySettings(replay_cache_gb=args.replay_cache_gb, batch_size=args.batch_size)}


def _report(args, run, seconds: float, r0) -> None:
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    plan = getattr(run, "plan", None) or {}
    measured = getattr(run, "measured", {}) or {}
    print(json.dumps({"repo": args.repo, "seconds": round(seconds, 2), "user_s": round(r1.ru_utime - r0.ru_utime, 2),
                      "sys_s": round(r1.ru_stime - r0.ru_stime, 2), "minor_faults": r1.ru_minflt - r0.ru_minflt,
                      "own_path_error": round(sum(m.error for m in run.modules), 4),
                      "trim_allocator": plan.get("trim_allocator"), "heap": plan.get("large_tensors_in_heap"),
                      "batch_size": plan.get("batch_size"),
                      "measured_peak_gb": round(measured.get("measured_peak_bytes", 0) / 1e9, 3),
                      "predicted_peak_gb": round(plan.get("predicted_peak_bytes", 0) / 1e9, 3),
                      "heap_arg": args.heap, "trim_arg": args.trim}))


if __name__ == "__main__":
    main()
