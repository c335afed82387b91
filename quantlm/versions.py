"""Library versions recorded with every output (records, reports, checkpoints)."""

from __future__ import annotations

import platform

import quantlm

# Bump when a change alters the numbers quantlm computes (quantized weights, metrics): a suite's finished jobs
# then run again (it is part of every job's identity).
NUMERICS_VERSION = 1


def library_versions() -> dict:
    import tokenizers
    import torch
    import transformers


    return {"quantlm": quantlm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "python": platform.python_version()}
