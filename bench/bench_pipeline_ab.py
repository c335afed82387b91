"""Time quantlm's GPTQ pipeline alone (model already loaded) on the quantize bench's weights and windows, with the
process's CPU and page-fault counts, for the quantlm tree at ``--repo`` (this checkout, or a worktree of an older
commit: both package layouts are handled). Used to find and check the trimming slowdown in
bench/quantize_memory.md ("Trimming"); alternate the trees in one session, each run in its own process:

  python bench/bench_quantize_cpu.py --tools quantlm --work /tmp/q/after     # once: model + tokens
  git worktree add /tmp/before f061207
  for i in 1 2 3; do python bench/bench_pipeline_ab.py --repo /tmp/before --work /tmp/q/after
                     python bench/bench_pipeline_ab.py --work /tmp/q/after; done
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
    args = ap.parse_args()
    sys.path.insert(0, args.repo)
    import torch

    from quantlm.gptq.pipeline import quantize_blocks
    from quantlm.models.blocks import LLAMA

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
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run = quantize_blocks(model, LLAMA, tokens, recipe, progress=False)
    seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"repo": args.repo, "seconds": round(seconds, 2), "user_s": round(r1.ru_utime - r0.ru_utime, 2),
                      "sys_s": round(r1.ru_stime - r0.ru_stime, 2), "minor_faults": r1.ru_minflt - r0.ru_minflt,
                      "own_path_error": round(sum(m.error for m in run.modules), 4),
                      "trim_allocator": (getattr(run, "plan", None) or {}).get("trim_allocator")}))


if __name__ == "__main__":
    main()
