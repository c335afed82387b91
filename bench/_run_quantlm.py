"""Child process of bench_quantize_cpu.py: quantlm's quantize_model on MODEL_DIR with the bench tokens.

Usage: python _run_quantlm.py MODEL_DIR TOKENS.pt OUT_DIR RESULT.json [--rtn | --layerwise]
                              [--activation-dtype D] [--forward-dtype D] [--tool NAME]
(--layerwise: true_sequential off, every group's Hessian from the block input in one pass, as llm-compressor;
--activation-dtype / --forward-dtype: MemorySettings' storage and forward dtypes, default float32)
The tokens are passed straight to the pipeline (no re-tokenization), so that every
tool sees exactly the same windows.
"""

import json
import sys
import time

import torch
from _rss import peak_rss_mb  # noqa: E402 - beside this script


def _option(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def main():
    model_dir, tokens_path, out_dir, result_path = sys.argv[1:5]
    rtn, layerwise = "--rtn" in sys.argv, "--layerwise" in sys.argv
    activation_dtype, forward_dtype = _option("--activation-dtype", "float32"), _option("--forward-dtype", "float32")
    t0 = time.perf_counter()
    import quantlm
    from quantlm.architectures import LLAMA
    from quantlm.checkpoint_writer import dense_state_dict, write_checkpoint
    from quantlm.formats.registry import Layout
    from quantlm.gptq.memory import MemorySettings
    from quantlm.gptq.pipeline import quantize_blocks
    from quantlm.gptq.settings import GPTQSettings
    from quantlm.hf_checkpoint import load_causal_lm
    from quantlm.metadata import ModelMeta
    from quantlm.recipes import to_dict

    tokens = torch.load(tokens_path)
    recipe = GPTQSettings(bits=4, group_size=128, true_sequential=not layerwise, method="rtn" if rtn else "gptq")
    model = load_causal_lm(model_dir, dtype=torch.float32)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    memory = MemorySettings(activation_dtype=activation_dtype, forward_dtype=forward_dtype)
    run = quantize_blocks(model, LLAMA, tokens, recipe, progress=False, memory=memory)
    t_quant = time.perf_counter() - t1
    from pathlib import Path

    linears = {n: r.stored(n) for n, r in run.results.items()}
    meta = ModelMeta(producer="quantize", family="quantlm", format="gptq", bits=4, group_size=128,
                     settings={"gptq": to_dict(recipe)})
    write_checkpoint(Path(out_dir), model.config.to_dict(), dense_state_dict(model, set(linears)), linears,
                     Layout("quantlm", "gptq", bits=4, group_size=128), LLAMA, meta)
    tool = _option("--tool", "quantlm-rtn" if rtn else "quantlm-layerwise" if layerwise else "quantlm")
    json.dump({"tool": tool, "version": quantlm.__version__,
               "torch": torch.__version__, "quantize_s": t_quant, "load_s": t_load,
               "total_s": time.perf_counter() - t0,
               "activation_dtype": activation_dtype, "forward_dtype": forward_dtype,
               "solve_s": sum(m.seconds for m in run.modules),
               "peak_rss_mb": peak_rss_mb(),
               "out_dir": out_dir, "format": "gptq"}, open(result_path, "w"))


if __name__ == "__main__":
    main()
