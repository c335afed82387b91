"""The Spectra size table as named presets, and the HF configs they build.

Names: ``floatlm-<size>``, ``trilm-<size>`` and ``quantlm-<size>-<b>bit`` for the nine Spectra sizes
(99m ... 3.9b) and b in 3, 4, 6, 8: 54 presets. A small CPU ladder (``micro``, ``tiny``) with a 4096-token
BPE vocabulary follows the same shape rules; it is what the tests and the default demo train.

This module imports the architecture table and ``quantized``'s bit check (so torch); ``to_hf_config`` imports
transformers when called.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from quantlm.architectures import ARCHITECTURES, Architecture, BlockMap, architecture_for, block_dims
from quantlm.errors import QuantlmError
from quantlm.quantized import check_bits

FAMILIES = ("floatlm", "quantlm", "trilm")
QUANT_BITS = (3, 4, 6, 8)
GPT_NEOX_VOCAB = 50277  # GPT-NeoX-20B tokenizer; HF checkpoints pad it (50304 at MP 1)


@dataclass(frozen=True)
class SizeRow:
    """One row of the Spectra size table (plus the per-size training hyper-parameters)."""

    size: str
    hidden: int
    glu: int
    heads: int
    layers: int
    mp: int
    floatlm_lr: float
    trilm_lr: tuple[float, float]  # peak LR in the first half -> second half of training
    vocab: int = GPT_NEOX_VOCAB
    published_params: float | None = None  # as printed in the Spectra paper (unpadded vocab, norms included)


SPECTRA_SIZES: tuple[SizeRow, ...] = (
    SizeRow("99m", 512, 1280, 8, 16, 1, 4.0e-4, (2.4e-3, 1.5e-3), published_params=99.74e6),
    SizeRow("190m", 768, 2048, 12, 16, 1, 4.0e-4, (2.4e-3, 1.5e-3), published_params=190.0e6),
    SizeRow("390m", 1024, 2560, 16, 24, 1, 3.0e-4, (1.8e-3, 1.2e-3), published_params=392.4e6),
    SizeRow("560m", 1280, 3072, 20, 24, 1, 2.8e-4, (1.6e-3, 1.1e-3), published_params=569.2e6),
    SizeRow("830m", 1536, 4096, 24, 24, 1, 2.5e-4, (1.5e-3, 1.0e-3), published_params=834.0e6),
    SizeRow("1.1b", 1792, 5120, 28, 24, 2, 2.2e-4, (1.3e-3, 9e-4), published_params=1.149e9),
    SizeRow("1.5b", 2048, 6144, 32, 24, 2, 2.0e-4, (1.2e-3, 8e-4), published_params=1.515e9),
    SizeRow("2.4b", 2304, 7680, 36, 30, 3, 2.0e-4, (1.2e-3, 8e-4), published_params=2.461e9),
    SizeRow("3.9b", 3072, 9216, 24, 30, 6, 1.5e-4, (1.2e-3, 8e-4), published_params=3.989e9),
)

# CPU-scale ladder for tests and the default demo: same shape rules, own 4096-token BPE vocabulary.
# Widths are multiples of 128 so group-128 quantization applies to every linear layer.
CPU_SIZES: tuple[SizeRow, ...] = (
    SizeRow("micro", 128, 384, 4, 4, 1, 3.0e-3, (6.0e-3, 4.0e-3), vocab=4096),
    SizeRow("tiny", 256, 768, 8, 4, 1, 2.0e-3, (4.0e-3, 3.0e-3), vocab=4096),
)

SPECTRA_BATCH_TOKENS = {"floatlm": 2 * 1024 * 1024, "trilm": 1024 * 1024}


def spectra_group_size(bits: int) -> int:
    """The Spectra QuantLMs' group size: 128 input columns per scale at <= 4 bits, one scale per output channel
    (-1) above."""
    return 128 if bits <= 4 else -1


@dataclass(frozen=True)
class ModelSpec:
    """A model of the suite: its architecture, family and (for QuantLMs) bitwidth.

    The Spectra models are ``LlamaForCausalLM`` checkpoints: RMSNorm (eps 1e-5), SwiGLU, RoPE (theta 10000), no
    biases, untied embedding and LM head, embedding padded to a multiple of 128 * MP. A spec read from another
    checkpoint's config also carries its ``model_type``, head width and bias flags.
    """

    name: str
    family: str
    size: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    model_parallel: int = 1
    num_key_value_heads: int | None = None
    vocab_size: int = GPT_NEOX_VOCAB
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # a config's rope scaling (rope_type_of); the GGUF export stores llama3's factors
    tie_word_embeddings: bool = False
    bits: int | None = None  # QuantLM bitwidth
    group_size: int | None = None  # QuantLM group size (None: per-channel)
    peak_lr: tuple[float, ...] = field(default=())  # FloatLM: (lr,); TriLM: (first half, second half)
    vocab_multiple: int = 0  # embedding rows padded to a multiple of this; 0: 128 * MP (the Spectra rule)
    model_type: str = "llama"  # a key of architectures.ARCHITECTURES
    attention_head_dim: int | None = None  # None: hidden_size / num_attention_heads
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise QuantlmError(f"{self.name}: model_type {self.model_type!r} is not supported; use one of "
                               f"{', '.join(ARCHITECTURES)}")
        if self.family not in FAMILIES:
            raise QuantlmError(f"unknown family {self.family!r}; use one of {', '.join(FAMILIES)}")
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                     "model_parallel", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise QuantlmError(f"{self.name}: {name} must be positive, got {getattr(self, name)}")
        if self.num_key_value_heads is not None and self.num_key_value_heads <= 0:
            raise QuantlmError(f"{self.name}: num_key_value_heads must be positive, got {self.num_key_value_heads}")
        if self.attention_head_dim is not None and self.attention_head_dim <= 0:
            raise QuantlmError(f"{self.name}: attention_head_dim must be positive, got {self.attention_head_dim}")
        if self.attention_head_dim is None and self.hidden_size % self.num_attention_heads:
            raise QuantlmError(
                f"{self.name}: num_attention_heads={self.num_attention_heads} does not divide "
                f"hidden_size={self.hidden_size}; pick a head count that divides the width (or set head_dim)")
        if self.num_attention_heads % self.kv_heads:
            raise QuantlmError(
                f"{self.name}: num_key_value_heads={self.kv_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}")
        mp = self.model_parallel
        for dim_name, dim in (("hidden_size", self.hidden_size), ("intermediate_size", self.intermediate_size),
                              ("q width", self.num_attention_heads * self.head_dim),
                              ("kv width", self.kv_heads * self.head_dim)):
            if dim % mp:
                raise QuantlmError(
                    f"{self.name}: model_parallel={mp} does not divide {dim_name}={dim}; "
                    "the TriLM scale shards need equal parts")
        if self.family == "quantlm" and self.bits is None:
            raise QuantlmError(f"{self.name}: a QuantLM spec needs bits")
        if self.bits is not None:

            check_bits(self.bits, f"{self.name}: bits")

    # -- derived fields, computed in one place
    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.model_type]

    @property
    def block_map(self) -> BlockMap:
        return self.architecture.block_map

    @property
    def dims(self) -> dict[str, int]:
        """The widths the block map's shape rules name."""
        return block_dims(self.hidden_size, self.intermediate_size, self.num_attention_heads, self.kv_heads,
                          self.head_dim)

    @property
    def biased_linears(self) -> tuple[str, ...]:
        """Block-relative paths of the linears that carry a bias."""
        return self.block_map.biased({"attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias})

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows as stored: the vocabulary padded to a multiple of 128 * MP (50304 at MP 1)."""
        m = self.vocab_multiple or 128 * self.model_parallel
        return -(-self.vocab_size // m) * m

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every linear layer of one block, keyed by block-relative path."""
        return self.block_map.linear_shapes(self.dims)

    def tensor_shapes(self, padded_vocab: bool = True) -> dict[str, tuple[int, ...]]:
        """Every tensor of the unpacked HF checkpoint, by its state-dict name."""
        bm = self.block_map
        biased = set(self.biased_linears)
        vocab = self.padded_vocab_size if padded_vocab else self.vocab_size
        h = (self.hidden_size,)
        shapes: dict[str, tuple[int, ...]] = {bm.embed_path + ".weight": (vocab, self.hidden_size)}
        for i in range(self.num_hidden_layers):
            p = bm.block_prefix(i)
            shapes.update({p + n + ".weight": (w,) for n, w in bm.norm_shapes(self.dims).items()})
            for name, shape in self.linear_shapes().items():
                shapes[p + name + ".weight"] = shape
                if name in biased:
                    shapes[p + name + ".bias"] = (shape[0],)
        shapes[bm.final_norm_path + ".weight"] = h
        if not self.tie_word_embeddings:
            shapes[bm.head_path + ".weight"] = (vocab, self.hidden_size)
        return shapes

    def num_params(self, padded_vocab: bool = True) -> int:
        total = 0
        for shape in self.tensor_shapes(padded_vocab).values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def to_hf_config(self, **overrides):
        """A transformers ``LlamaConfig`` for this spec (TriLMs carry ``pretraining_model_parallel``)."""
        from transformers import LlamaConfig

        kwargs = dict(
            vocab_size=self.padded_vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.kv_heads,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            head_dim=self.head_dim,
            architectures=["LlamaForCausalLM"],
        )
        kwargs.update(overrides)
        config = LlamaConfig(**kwargs)
        if self.family == "trilm":
            config.pretraining_model_parallel = self.model_parallel
        return config

    def with_family(self, family: str, bits: int | None = None) -> ModelSpec:
        row = _row_for(self.size)
        return _make(row, family, bits) if row else replace(self, family=family, bits=bits)


def rope_type_of(config: Mapping) -> str:
    """A config's rope type: ``rope_parameters`` (transformers 5; for per-layer-type parameters, the full-attention
    layers') or the older ``rope_scaling``, its ``rope_type`` or ``type``; "default" for plain RoPE."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(rope.get("full_attention"), Mapping):
        rope = rope["full_attention"]
    return str(rope.get("rope_type") or rope.get("type") or "default")


def spec_from_config(config: dict, name: str, *, family: str = "floatlm", bits: int | None = None,
                     group_size: int | None = None, model_parallel: int = 1) -> ModelSpec:
    """The ModelSpec of an HF ``config.json`` dict: the one reading of its architecture fields (model type, widths,
    heads, head width, bias flags, vocabulary, tying). The family and its bits come from the caller."""
    arch = architecture_for(config, name)

    def whole(key: str, default=None) -> int | None:
        value = config[key] if default is None else config.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise QuantlmError(f"{name}: {key}={value!r} is not a whole number; fix config.json")
        return int(value)

    try:
        hidden = whole("hidden_size")
        heads = whole("num_attention_heads")
        if heads <= 0:
            raise QuantlmError(f"{name}: num_attention_heads must be positive, got {heads}")
        head_dim = whole("head_dim", 0) if config.get("head_dim") is not None else None
        if head_dim is not None and head_dim <= 0:
            raise QuantlmError(f"{name}: head_dim must be positive, got {head_dim}")
        if head_dim == hidden // heads and not hidden % heads:
            head_dim = None  # the default width, spelled out
        kv_heads = whole("num_key_value_heads", heads)
        if kv_heads <= 0:
            raise QuantlmError(f"{name}: num_key_value_heads must be positive, got {kv_heads}")
        kwargs = dict(
            hidden_size=hidden, intermediate_size=whole("intermediate_size"),
            num_attention_heads=heads, num_hidden_layers=whole("num_hidden_layers"),
            num_key_value_heads=kv_heads,
            vocab_size=whole("vocab_size"),
            max_position_embeddings=whole("max_position_embeddings", 0) or 2048,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            vocab_multiple=1,  # a config's vocab_size is the stored (already padded) row count
            model_type=arch.model_type, attention_head_dim=head_dim, rope_type=rope_type_of(config),
            **{flag: bool(config.get(flag, default)) for flag, default in arch.bias_flags},
        )
    except QuantlmError:
        raise
    except KeyError as e:
        raise QuantlmError(f"{name}: config.json lacks {e.args[0]!r}; is this a complete "
                           f"{arch.model_type} config?") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise QuantlmError(f"{name}: config.json has a field of the wrong type or value ({e})") from None
    return ModelSpec(name=name, family=family, size="custom", model_parallel=model_parallel, bits=bits,
                     group_size=group_size, **kwargs)


def _row_for(size: str) -> SizeRow | None:
    for row in SPECTRA_SIZES + CPU_SIZES:
        if row.size == size:
            return row
    return None


def _make(row: SizeRow, family: str, bits: int | None = None) -> ModelSpec:
    if family == "quantlm":
        name = f"quantlm-{row.size}-{bits}bit"
        group = None if bits is None or spectra_group_size(bits) == -1 else spectra_group_size(bits)
    else:
        name = f"{family}-{row.size}"
        group = None
    lr = row.trilm_lr if family == "trilm" else (row.floatlm_lr,)
    return ModelSpec(
        name=name, family=family, size=row.size, hidden_size=row.hidden, intermediate_size=row.glu,
        num_attention_heads=row.heads, num_hidden_layers=row.layers, model_parallel=row.mp,
        vocab_size=row.vocab, bits=bits if family == "quantlm" else None, group_size=group, peak_lr=lr,
    )


def _build_presets(rows: tuple[SizeRow, ...]) -> dict[str, ModelSpec]:
    out: dict[str, ModelSpec] = {}
    for row in rows:
        for spec in [_make(row, "floatlm")] + [_make(row, "quantlm", b) for b in QUANT_BITS] + [_make(row, "trilm")]:
            out[spec.name] = spec
    return out


SPECTRA_PRESETS: dict[str, ModelSpec] = _build_presets(SPECTRA_SIZES)
CPU_PRESETS: dict[str, ModelSpec] = _build_presets(CPU_SIZES)
PRESETS: dict[str, ModelSpec] = {**SPECTRA_PRESETS, **CPU_PRESETS}


def get_preset(name: str) -> ModelSpec:
    """The preset called ``name`` (case-insensitive); an unknown name suggests the nearest ones."""
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    near = difflib.get_close_matches(key, PRESETS, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else "; run `quantlm size --list` to see them all"
    raise QuantlmError(f"unknown preset {name!r}{hint}")


def is_preset(name: str) -> bool:
    return name.strip().lower() in PRESETS
