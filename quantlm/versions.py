"""Library versions recorded with every output (records, reports, checkpoints)."""

from __future__ import annotations

import platform


def library_versions() -> dict:
    import tokenizers
    import torch
    import transformers

    import quantlm

    return {"quantlm": quantlm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "python": platform.python_version()}
