"""Perplexity check of the GPTQ engine on a small LLaMA trained for the purpose (plain torch, a few minutes).

Trains a 4-block LLaMA (hidden 256, GLU 768, vocab 4096 BPE) on the shipped Gutenberg corpus, then
quantizes it with quantlm (GPTQ and round-to-nearest) at 8 bits (per channel) and 4 and 3 bits (group 128)
with 128 x 256 calibration tokens from the shipped C4 sample, and measures WikiText-2 (raw test) perplexity
of each (non-overlapping 256-token windows). Expectation (issue 3): 8-bit within 1% of the float model,
4-bit GPTQ better than 4-bit RTN, 3-bit GPTQ clearly better than 3-bit RTN.

Usage: python bench/bench_ppl_cpu.py [--work DIR] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WIKITEXT = Path("/work/shared/data/wikitext2_raw/wiki.test.raw")


def train(work: Path, steps: int, seqlen: int = 256, batch: int = 16) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantlm.checkpoint import load_tokenizer
    from quantlm.tokenizer import train_bpe_tokenizer

    out = work / "trained"
    if (out / "model.safetensors").is_file():
        return out
    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "data" / "corpus").glob("*.txt"))]
    train_bpe_tokenizer(texts, vocab_size=4096, out_dir=out)
    tok = load_tokenizer(out)
    ids = torch.tensor(tok("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seqlen,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - seqlen - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", file=sys.stderr)
    model.save_pretrained(out)
    return out


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 256) -> float:
    n = ids.numel() // seqlen
    windows = ids[: n * seqlen].view(n, seqlen)
    nll, count = 0.0, 0
    for b in range(0, n, 8):
        x = windows[b : b + 8]
        logits = model(input_ids=x).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/quantlm-ppl")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from quantlm.checkpoint import load_causal_lm, load_tokenizer
    from quantlm.formats.loader import load_quantized
    from quantlm.gptq.api import quantize_model
    from quantlm.recipes import QuantRecipe

    model_dir = train(work, args.steps)
    tok = load_tokenizer(model_dir)
    ids = torch.tensor(tok(WIKITEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    ids = ids[: args.eval_tokens]
    rows = {"float": perplexity(load_causal_lm(model_dir), ids)}
    print(f"float: {rows['float']:.3f}", file=sys.stderr)
    for bits, gs in ((8, -1), (4, 128), (3, 128)):
        for rtn in (False, True):
            name = f"{bits}-bit {'rtn' if rtn else 'gptq'}"
            recipe = QuantRecipe(bits=bits, group_size=gs, nsamples=128, seqlen=256, formats=("unpacked",))
            rep = quantize_model(model_dir, recipe, work / name.replace(" ", "-"), overwrite=True, rtn=rtn,
                                 progress=False)
            rows[name] = perplexity(load_quantized(rep["paths"]["unpacked"]), ids)
            print(f"{name}: {rows[name]:.3f} (quantize {rep['seconds']['quantize']:.1f}s)", file=sys.stderr)
    json.dump({"eval_tokens": int(ids.numel()), "steps": args.steps, "ppl": rows},
              open(work / "ppl.json", "w"), indent=1)
    print("| model | WikiText-2 ppl | vs float |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} | {100 * (v / rows['float'] - 1):+.2f}% |")


if __name__ == "__main__":
    main()
