"""Training throughput of quantlm's trainer: tokens/s (and MFU on a GPU) for FloatLM and TriLM recipes.

Runs the real ``quantlm.train.run.train`` for a few steps per recipe (no checkpoints) and reports the median
tokens/s over the steps after the first ``--skip`` (warm-up of allocator and kernels), the same figure the
metrics log records. On a GPU, pass e.g. ``--recipe`` with a 99M recipe and ``--set seq_len=2048`` to measure
MFU for the Spectra 99M shape.

    python bench/bench_train.py                     # the four CPU recipes, 12 steps each
    python bench/bench_train.py --recipe recipes/floatlm-tiny.yaml --steps 20 --set threads=1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_RECIPES = Path(__file__).resolve().parent.parent / "quantlm" / "resources" / "recipes"
DEFAULT = [str(_RECIPES / f"{name}.yaml") for name in ("floatlm-micro", "trilm-micro", "floatlm-tiny", "trilm-tiny")]


def bench_one(path: str, steps: int, skip: int, sets: dict[str, str]) -> dict:
    from quantlm import recipes
    from quantlm.train.recipe import TrainRecipe
    from quantlm.train.run import train

    recipe = recipes.load(path, expect=TrainRecipe)
    over = {"steps": str(steps), "warmup_steps": "2", "checkpoint_interval": "0", "eval_tokens": "2048", **sets}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(recipe, Path(tmp) / "run", overrides=over)
        wall = time.perf_counter() - t0
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = records[skip:]
    r = recipes.override(recipe, over)
    spec = r.spec()
    out = {
        "recipe": path, "model": spec.name, "params_M": round(spec.num_params() / 1e6, 2),
        "seq_len": r.seq_len, "batch_tokens": r.batch_tokens, "steps_timed": len(timed),
        "tokens_per_s": round(statistics.median(x["tokens_per_s"] for x in timed), 1),
        "wall_s": round(wall, 1), "loss_first": round(records[0]["loss"], 3), "loss_last": round(records[-1]["loss"], 3),
    }
    if "mfu" in timed[0]:
        out["mfu"] = round(statistics.median(x["mfu"] for x in timed), 4)
    # time the shipped recipe would take at this rate (training steps only)
    out["est_recipe_train_s"] = round(recipe.total_steps() * recipe.batch_tokens / out["tokens_per_s"], 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", action="append", help="recipe YAML (repeatable); default: the four CPU recipes")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2, help="leading steps left out of the median")
    ap.add_argument("--set", action="append", default=[], help="recipe override key=value (repeatable)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    import torch
    import transformers

    sets = dict(s.split("=", 1) for s in args.set)
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "default_threads": torch.get_num_threads(), "recipe_overrides": sets, "cpu": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "loadavg_start": os.getloadavg()}
    rows = [bench_one(p, args.steps, args.skip, sets) for p in (args.recipe or DEFAULT)]
    env["loadavg_end"] = os.getloadavg()
    print(json.dumps(env))
    cols = ["model", "params_M", "seq_len", "batch_tokens", "tokens_per_s", "loss_first", "loss_last",
            "est_recipe_train_s"] + (["mfu"] if "mfu" in rows[0] else [])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
