"""GGUF files for llama.cpp, split by concern: tensor names and hyperparameters (``names``), the tokenizer's metadata
(``tokenizer``), exact llama.cpp block types (``blocks``), writing a file (``tensors``), reading its header
(``header``) and the format's declaration in the registry (``format``, registered on import)."""

from quantlm.formats.gguf.blocks import FLOAT_TYPES, LINEAR_TYPES, TERNARY_TYPES
from quantlm.formats.gguf.format import GGUF, GGUF_FILE, GGUFFormat, quantlm_keys
from quantlm.formats.gguf.header import read_gguf_header
from quantlm.formats.gguf.names import gguf_name, hf_name, rope_permutation
from quantlm.formats.gguf.tensors import write_gguf
from quantlm.formats.gguf.tokenizer import tokenizer_metadata

__all__ = ["FLOAT_TYPES", "GGUF", "GGUF_FILE", "GGUFFormat", "LINEAR_TYPES", "TERNARY_TYPES", "gguf_name", "hf_name",
           "quantlm_keys", "read_gguf_header", "rope_permutation", "tokenizer_metadata", "write_gguf"]
