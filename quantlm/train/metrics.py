"""Throughput figures: model FLOPs per token and MFU against the GPU's dense bf16 peak."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets (SXM parts).
GPU_PEAK_BF16 = {
    "H200": 989.4e12,
    "H100": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165.2e12,
    "RTX 3090": 71e12,
}


def flops_per_token(spec, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters (blocks + LM head) + attention scores (PaLM appendix B)."""
    blocks = sum(o * i for o, i in spec.linear_shapes().values()) * spec.num_hidden_layers
    head = spec.padded_vocab_size * spec.hidden_size
    attention = 12 * spec.num_hidden_layers * spec.hidden_size * seq_len
    return 6 * (blocks + head) + attention


def device_peak_flops(device) -> float | None:
    """The bf16 peak of a CUDA device, None for the CPU or an unknown GPU (MFU is then not reported)."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_PEAK_BF16.items():
        if key in name:
            return peak
    log.warning("no known bf16 peak for GPU %r; MFU is not reported", name)
    return None
