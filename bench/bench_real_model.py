"""A real pretrained model through quantlm, scored the same way in transformers and in llama.cpp: WikiText-2 NLL and
perplexity on the first N windows of the test set (the model's own tokenizer, windows of L tokens, tokens 1..L-1
of each window scored), for HF checkpoints (transformers, fp32) and GGUF files (llama.cpp, one thread).

    python bench/bench_real_model.py --tokenizer HF_DIR --hf NAME=DIR ... --gguf NAME=FILE ... --windows 16 --len 512

Run it in an environment with llama_cpp for --gguf (e.g. .venv-llamacpp: `bash .ci/llamacpp.sh` makes it). Prints
one JSON object: per model, mean NLL (nats/token), perplexity, tokens scored, seconds."""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch


def windows_of(tokenizer_dir: str, n: int, length: int) -> list[list[int]]:
    from quantlm.eval.datasets import load_text_source
    from quantlm.hf_checkpoint import load_tokenizer

    ids = load_tokenizer(tokenizer_dir)(load_text_source("wikitext2").text).input_ids
    return [ids[i * length:(i + 1) * length] for i in range(min(n, len(ids) // length))]


def hf_nll(model_dir: str, windows) -> list[float]:
    from quantlm.formats.loader import load_model

    model = load_model(model_dir).eval()
    out = []
    with torch.no_grad():
        for w in windows:
            logits = model(torch.tensor([w])).logits[0, :-1].double()
            out += torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="none").tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--hf", nargs="*", default=[])
    ap.add_argument("--gguf", nargs="*", default=[])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--len", type=int, default=512)
    a = ap.parse_args()
    windows = windows_of(a.tokenizer, a.windows, a.len)
    rows = {}
    for kind, items in (("transformers", a.hf), ("llama.cpp", a.gguf)):
        for item in items:
            name, path = item.split("=", 1)
            t0 = time.perf_counter()
            if kind == "transformers":
                nll = hf_nll(path, windows)
            else:
                from quantlm.deploy import token_nll

                nll = token_nll(path, windows, threads=1).tolist()
            mean = sum(nll) / len(nll)
            rows[f"{name} ({kind})"] = {"nll": mean, "ppl": math.exp(mean), "tokens": len(nll),
                                        "seconds": time.perf_counter() - t0}
    print(json.dumps({"windows": len(windows), "len": a.len, "torch": torch.__version__,
                      "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
                      "results": rows}, indent=2))


if __name__ == "__main__":
    main()
