"""The registry of storage formats: one declaration per format that the writer, the loader and the accounting read.

A :class:`Layout` says how a checkpoint stores its block linears (family, format, bits, group size, ...). A
:class:`Format` says, for one linear of a given shape under a layout, which tensors it stores
(:meth:`Format.linear_tensors`: suffix, dtype, shape, what each encodes), how to encode a quantized value into
them, how to decode them back, and how its ``quantization_config`` reads and writes. Because the writer writes
exactly what ``linear_tensors`` declares (checked on every write) and the accounting counts the same
declaration, the measured size of a written checkpoint and the size predicted from its config agree by
construction. Only torch and the standard library are imported here; the built-in formats register themselves
when ``quantlm.formats`` is imported (its ``__init__`` imports each format module), so this module imports none
of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from quantlm.dtypes import DTYPE_BITS, st_dtype
from quantlm.errors import QuantlmError
from quantlm.quantized import QuantizedLinear, TernaryWeight, check_bits, check_group_size
from quantlm.specs import ModelSpec, spec_from_config

FAMILIES = ("floatlm", "quantlm", "trilm")
LOG2_3 = math.log2(3)



@dataclass(frozen=True)
class Layout:
    """How a model's block linears are stored: the assumption behind its ``exact`` bits, and what a writer writes."""

    family: str = "floatlm"  # floatlm | quantlm | trilm
    format: str = "unpacked"  # a name in FORMATS
    bits: int | None = None  # QuantLM code width
    group_size: int = -1  # QuantLM: input columns per scale, -1 per channel
    sym: bool = True
    g_idx: bool = False  # compressed-tensors: also store a per-column group index
    mp: int = 1  # TriLM: model-parallel scale shards
    float_dtype: str = "F16"  # dense tensors (embedding, norms, head, unpacked linears)
    scale_dtype: str = "F16"
    # options of this format alone, as (name, value) pairs (a mapping is accepted): the format declares which it
    # takes and their defaults (``Format.options``), e.g. gguf's gguf_type, kquant_grouped, merge_shard_scales
    options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise QuantlmError(f"unknown model family {self.family!r}; use one of {', '.join(FAMILIES)}")
        if self.format not in FORMATS:
            raise QuantlmError(f"unknown format {self.format!r}; choose from {', '.join(FORMATS)}")
        if self.family == "quantlm":
            if self.bits is None:
                raise QuantlmError("a QuantLM layout needs its bitwidth")
            check_bits(self.bits)
            check_group_size(self.group_size)
        fmt = FORMATS[self.format]
        given = dict(self.options)
        for name in given:
            if name not in fmt.options:
                takes = [f.name for f in FORMATS.values() if name in f.options]
                raise QuantlmError(f"option {name} applies to the {' and '.join(takes) or 'no'} format, not "
                                   f"{self.format}; drop it or write {'/'.join(takes) or 'another format'}")
        # the defaults left out, so equal layouts compare equal however they were spelled
        options = tuple(sorted((k, v) for k, v in given.items() if v != fmt.options[k]))
        object.__setattr__(self, "options", options)
        if self.family not in fmt.families:
            raise QuantlmError(f"the {self.format} format does not hold a {self.family}; formats for a "
                               f"{self.family}: {', '.join(formats_for(self.family))}")
        fmt.check(self)

    def describe(self) -> str:
        return FORMATS[self.format].describe(self)

    def option(self, name: str):
        """This layout's value of one of its format's options (the format's default when not given)."""
        return dict(self.options).get(name, FORMATS[self.format].options[name])


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor of a linear: ``<linear>.<suffix>`` with this dtype and shape."""

    suffix: str  # e.g. ".qweight"
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    part: str  # weight | codes | scale | zero | g_idx | meta
    params: int = 0  # model parameters this tensor encodes (out * in for weights and codes, else 0)
    code_bits: float | None = None  # information per parameter (entropy convention); None: as stored

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BITS[self.dtype] // 8


@dataclass(frozen=True)
class ModelTensor:
    """A tensor a format stores for the whole model beyond the model's own weights (GGUF's ``rope_freqs.weight``,
    computed from the config): its name as stored, dtype, shape and accounting role (no model parameters)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    role: str


Reader = Callable[[str], Tensor]  # full tensor name -> tensor


class Format:
    """A storage format for block linears. Subclasses fill in the declaration and the codecs."""

    name: str = ""
    families: tuple[str, ...] = ()
    container: str = "safetensors"  # the file a model in this format is: safetensors checkpoint or gguf
    options: dict = {}  # the layout options this format takes, with their defaults (Layout.option)

    def check(self, layout: Layout) -> None:
        """Refuse a layout this format cannot hold (before any compute)."""

    def describe(self, layout: Layout) -> str:
        return self.name

    def linear_tensors(self, out: int, in_features: int, layout: Layout, kind: str) -> list[TensorSpec]:
        raise NotImplementedError

    def encode(self, name: str, value, layout: Layout) -> dict[str, Tensor]:
        """The tensors (full names) storing ``value``: a QuantizedLinear, a TernaryWeight or a dense Tensor."""
        raise NotImplementedError

    def decode(self, read: Reader, name: str, out: int, in_features: int, layout: Layout, kind: str):
        raise NotImplementedError

    def model_tensors(self, spec: ModelSpec, layout: Layout) -> list[ModelTensor]:
        """The tensors this format adds to a model of ``spec`` (none unless the format says so)."""
        return []

    def norm_dtype(self, layout: Layout) -> str:
        """The dtype the format stores norm weights in (the float dtype, unless the format fixes one)."""
        return layout.float_dtype

    def preflight(self, model_dir, config: dict, layout: Layout) -> None:
        """Checks of a whole model that need no compute (run before a quantization or an export starts)."""

    def write(self, out, config: dict, dense: dict[str, Tensor], linears: dict, layout: Layout, block_map,
              meta, tokenizer_dir=None) -> dict:
        """Write a whole model's file(s) into the directory ``out``: only for formats whose container is not a
        safetensors checkpoint (those ``checkpoint_writer.write_checkpoint`` writes itself). Returns
        ``{"payload_bytes": tensor data bytes, "info": what quantlm.json records}``; the writer then checks the
        payload against the accounting and writes ``quantlm.json`` last."""
        raise NotImplementedError

    def quantization_config(self, layout: Layout, recipe: dict) -> dict | None:
        return None

    def claims(self, config: dict) -> bool:
        """Whether a config.json's quantization_config is this format's."""
        return False

    def layout_from_config(self, config: dict) -> Layout:
        raise NotImplementedError


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise QuantlmError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
    return FORMATS[name]


def formats_for(family: str) -> list[str]:
    return [n for n, f in FORMATS.items() if family in f.families]


def layout_of_config(config: dict) -> Layout:
    """The layout a checkpoint's config.json describes (its quantization_config, or the TriLM marker)."""
    qc = config.get("quantization_config")
    if qc:
        for fmt in FORMATS.values():
            if fmt.claims(config):
                return fmt.layout_from_config(config)
        raise QuantlmError(f"quantization method {qc.get('quant_method')!r} is not one quantlm reads "
                           f"(formats: {', '.join(FORMATS)})")
    return FORMATS["unpacked"].layout_from_config(config)


def check_declared(name: str, tensors: dict[str, Tensor], specs: list[TensorSpec]) -> None:
    """The encoded tensors of a linear are exactly the declared ones (names, dtypes, shapes): the invariant that
    makes accounting of a written checkpoint equal its prediction."""
    want = {name + s.suffix: (s.dtype, tuple(s.shape)) for s in specs}
    got = {k: (st_dtype(t), tuple(t.shape)) for k, t in tensors.items()}
    if want != got:
        raise AssertionError(f"{name}: encoded tensors {got} differ from the format's declaration {want}")


def as_quantized(value, name: str) -> QuantizedLinear:
    if not isinstance(value, QuantizedLinear):
        raise QuantlmError(f"{name}: this format stores quantized (b-bit) linears, got {type(value).__name__}")
    return value


def as_ternary(value, name: str) -> TernaryWeight:
    if not isinstance(value, TernaryWeight):
        raise QuantlmError(f"{name}: this format stores ternary (TriLM) linears, got {type(value).__name__}")
    return value


def checkpoint_spec(config: dict, name: str, *, bits: int | None = None, group_size: int | None = None) -> ModelSpec:
    """The ModelSpec of a checkpoint's HF config dict, its family (and bits, group size, scale shards) from its
    quantization_config / TriLM marker, or a QuantLM of ``bits`` when given."""
    layout = layout_of_config(config)
    if bits is not None:
        layout = Layout("quantlm", "unpacked", bits=bits, group_size=-1 if group_size is None else group_size)
    mp = layout.mp if layout.family == "trilm" else 1
    return spec_from_config(config, name, family=layout.family, bits=layout.bits, model_parallel=mp,
                            group_size=layout.group_size if layout.bits and layout.group_size != -1 else None)
