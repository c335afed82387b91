"""Storage formats of block linears. Importing the package registers the built-in formats in
``registry.FORMATS`` (each format module registers itself), in this order."""

from quantlm.formats import compressed_tensors, gguf, gptq, ternary, unpacked  # noqa: F401
