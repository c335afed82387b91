"""quantlm: quantize, size and compare FloatLMs, QuantLMs and TriLMs (the Spectra suite as a toolkit)."""

__version__ = "0.1.0"
