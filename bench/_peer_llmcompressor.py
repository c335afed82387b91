"""Child process of bench_quantize_cpu.py: quantize MODEL_DIR with llm-compressor's GPTQModifier on the CPU.

Usage: python _peer_llmcompressor.py MODEL_DIR TOKENS.pt OUT_DIR RESULT.json [--dump-weights W.safetensors]
(run in a venv with llmcompressor). --dump-weights: write the decoder blocks' linear weights as llm-compressor left
them in the model (fake-quantized, fp32) instead of saving the compressed checkpoint (bench/bench_gpu.py scores
them); on a GPU the result also records the device's peak memory.
"""

import json
import sys
import time

import torch
from _rss import peak_rss_mb  # noqa: E402 - beside this script


def main():
    model_dir, tokens_path, out_dir, result_path = sys.argv[1:5]
    t0 = time.perf_counter()
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    tokens = torch.load(tokens_path)
    ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    t_load = time.perf_counter() - t0
    # W4A16: 4 bits, group 128, symmetric; act-order static (its default), damp 0.01
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], dampening_frac=0.01,
                          actorder="static")
    t1 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=tokens.shape[1],
            num_calibration_samples=tokens.shape[0])
    t_quant = time.perf_counter() - t1
    extra = {}
    if "--dump-weights" in sys.argv:
        from safetensors.torch import save_file

        layers = {n: m for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)}
        save_file({n: m.weight.detach().float().cpu().contiguous() for n, m in layers.items()},
                  sys.argv[sys.argv.index("--dump-weights") + 1])
        out_dir = None
    else:
        model.save_pretrained(out_dir, save_compressed=True)
    if torch.cuda.is_available():
        extra = {"device_peak_bytes": int(torch.cuda.max_memory_allocated()),
                 "device_reserved_peak_bytes": int(torch.cuda.max_memory_reserved()),
                 "device": torch.cuda.get_device_name(0) if torch.cuda.max_memory_allocated() else "cpu"}
    json.dump({"tool": "llm-compressor", "version": llmcompressor.__version__, "torch": torch.__version__,
               "quantize_s": t_quant, "load_s": t_load, "total_s": time.perf_counter() - t0,
               "peak_rss_mb": peak_rss_mb(), **extra,
               "out_dir": out_dir, "format": "compressed-tensors"}, open(result_path, "w"))


if __name__ == "__main__":
    main()
