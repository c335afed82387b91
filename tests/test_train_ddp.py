"""Two processes on CPU (gloo, through torchrun; DDP, and FSDP as a slow test) match one process with the same
global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantlm import recipes
from quantlm.train.run import train

REPO = Path(__file__).resolve().parent.parent
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
         "vocab_size": 512, "max_position_embeddings": 64}


def _torchrun(recipe_path: Path, out: Path, nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "quantlm", "train", str(recipe_path), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_match_one_process(tmp_path, strategy, corpus_text, tiny_tokenizer_dir):
    family = "trilm"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text[:60_000], encoding="utf-8")
    from quantlm.train.recipe import TrainRecipe

    # global batch 8 sequences: one process does 2 micro-steps of 4, each of two processes one micro-step of 4
    recipe = TrainRecipe(model=f"{family}-micro", model_overrides=SMALL, corpus=(str(corpus),),
                         tokenizer=str(tiny_tokenizer_dir), cache_dir=str(tmp_path / "cache"), seq_len=32,
                         batch_tokens=256, micro_batch=4, steps=4, warmup_steps=1, checkpoint_interval=2,
                         eval_tokens=256, lr=(6e-3, 4e-3), distributed=strategy, threads=1)
    train(recipe, tmp_path / "single")  # also fills the token cache the two processes read
    path = tmp_path / "recipe.yaml"
    recipes.dump(recipe, path)
    _torchrun(path, tmp_path / "ddp")

    single, ddp = _records(tmp_path / "single"), _records(tmp_path / "ddp")
    assert [r["step"] for r in ddp] == [1, 2, 3, 4]
    for a, b in zip(single, ddp, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]  # same sequences, same mean; only summation order differs
        assert a["lr"] == b["lr"]
    # the first step's loss depends only on the initial weights and the data: no reordering at all
    assert abs(single[0]["loss"] - ddp[0]["loss"]) < 1e-6
    wa = load_file(tmp_path / "single" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    for k in wa:
        if "layers" not in k:  # ternary block weights may flip a code at a rounding edge; compare the rest
            assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-2), k
