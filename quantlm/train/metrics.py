"""Throughput figures: model FLOPs per token and MFU against the GPU's dense bf16 peak."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s from the vendors' data sheets, by the exact names CUDA
# reports (``torch.cuda.get_device_name``), matched whole after dropping the vendor prefix: "H100 PCIe" must not
# get the SXM part's peak, and "L40" must not match "L4".
GPU_PEAK_BF16 = (
    (r"H100 80GB HBM3|H100 SXM5?.*|H100", 989.4e12),
    (r"H100 PCIe|H100 80GB PCIe", 756.0e12),
    (r"H100 NVL", 835.0e12),
    (r"H200|H200 141GB HBM3e|H200 SXM.*", 989.4e12),
    (r"H200 NVL", 835.0e12),
    (r"A100[- ].*(SXM|PCIE|PCIe).*|A100 80GB PCIe|A100", 312e12),
    (r"L40S", 362.05e12),
    (r"L40", 181.05e12),
    (r"L4", 121e12),
    (r"A10", 125e12),
    (r"RTX 4090", 165.2e12),
    (r"RTX 3090", 71e12),
)


def peak_bf16_flops(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its CUDA name, or None when the part is not in the table."""
    import re

    short = re.sub(r"^(NVIDIA\s+)?(GeForce\s+)?", "", name.strip())
    for pattern, peak in GPU_PEAK_BF16:
        if re.fullmatch(pattern, short):
            return peak
    return None


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
    peak = peak_bf16_flops(name)
    if peak is None:
        log.warning("no known bf16 peak for GPU %r; MFU is not reported", name)
    return peak
