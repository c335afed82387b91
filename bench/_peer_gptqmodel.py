"""Child process of bench_quantize_cpu.py: quantize MODEL_DIR with GPTQModel on the CPU, time it.

Usage: python _peer_gptqmodel.py MODEL_DIR TOKENS.pt OUT_DIR RESULT.json  (run in a venv with gptqmodel)
"""

import json
import os
import sys
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from _rss import peak_rss_mb  # noqa: E402 - beside this script


def main():
    model_dir, tokens_path, out_dir, result_path = sys.argv[1:5]
    t0 = time.perf_counter()
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    tokens = torch.load(tokens_path)
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in tokens]
    # the quantlm recipe: 4 bits, group 128, symmetric, act-order with static groups, damp 0.01, true-sequential
    qcfg = QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=True, static_groups=True,
                          damp_percent=0.01, true_sequential=True, act_group_aware=False)
    model = GPTQModel.load(model_dir, qcfg, device="cpu")
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    model.quantize(calib, batch_size=1, calibration_sort=None)
    t_quant = time.perf_counter() - t1
    model.save(out_dir)
    json.dump({"tool": "gptqmodel", "version": gptqmodel.__version__, "torch": torch.__version__,
               "quantize_s": t_quant, "load_s": t_load, "total_s": time.perf_counter() - t0,
               "peak_rss_mb": peak_rss_mb(),
               "out_dir": out_dir, "format": "gptq"}, open(result_path, "w"))


if __name__ == "__main__":
    main()
