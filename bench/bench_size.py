"""Benchmark `quantlm size`: the 54-model table, and a 140 GB sharded checkpoint measured from headers only.

Run: python bench/bench_size.py   (writes nothing; prints a Markdown row to paste into bench/size.md)
"""

from __future__ import annotations

import json
import math
import platform
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def fake_checkpoint(path: Path, shards: int = 30) -> int:
    """A Llama-70B-shaped bf16 checkpoint (sparse files: real headers, no data written)."""
    from quantlm.specs import spec_from_config

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
           "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
           "num_hidden_layers": 80, "vocab_size": 128256}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    shapes = spec_from_config(cfg, "big").tensor_shapes()
    names, weight_map, total = list(shapes), {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, off = {}, 0
        for name in names[s::shards]:
            n = math.prod(shapes[name]) * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [off, off + n]}
            weight_map[name] = fname
            off += n
        raw = json.dumps(header).encode()
        with open(path / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + off)
        total += off
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    cli = best_of(5, lambda: subprocess.run([sys.executable, "-m", "quantlm", "size"], check=True,
                                            capture_output=True))
    from quantlm.accounting import budget

    with tempfile.TemporaryDirectory() as tmp:
        payload = fake_checkpoint(Path(tmp) / "big")
        lib = best_of(5, lambda: budget(Path(tmp) / "big").total_bits("exact"))
        ckpt_cli = best_of(3, lambda: subprocess.run([sys.executable, "-m", "quantlm", "size", str(Path(tmp) / "big")],
                                                     check=True, capture_output=True))
    import pandas
    import torch

    print(f"| {time.strftime('%Y-%m-%d')} | {platform.processor() or platform.machine()} | "
          f"python {platform.python_version()}, pandas {pandas.__version__}, torch {torch.__version__} | "
          f"{cli:.2f} s | {payload / 1e9:.0f} GB: {lib * 1e3:.1f} ms (library), {ckpt_cli:.2f} s (CLI) |")


if __name__ == "__main__":
    main()
