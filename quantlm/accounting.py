"""The bit budget of any FloatLM, QuantLM or TriLM, under three conventions.

* ``paper``: the Spectra paper's size table. Only the block linear weights and the untied embedding and
  LM head count. Block linears cost b_eff bits per weight (FloatLM 16, QuantLM-8 8, -6 6, -4 4.25, -3 3.25,
  TriLM 1.58); embedding and LM head 16 bits each over a vocabulary of 50304 for every size. Norms and
  ternary scales are free.
* ``exact``: the true bits of a concrete storage layout: every tensor at its stored dtype and shape
  (padded vocabulary, norms, packed codes, per-group scales, zero points and g_idx as stored, per-shard
  ternary scales). For a checkpoint directory this is 8 x the tensor payload bytes of its safetensors files.
* ``entropy``: information content: ternary codes at log2(3) bits, b-bit codes at b bits, all else exact.

The core is arithmetic over ``TensorRecord`` values; a model description comes from a preset, a config.json
(plus quant settings) or a checkpoint directory, whose safetensors headers are read without touching tensor
data. Only the standard library is used here; ``to_frames`` builds pandas DataFrames at the edge.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from quantlm.errors import QuantlmError
from quantlm.models.blocks import LLAMA, BlockMap
from quantlm.specs import ModelSpec, get_preset, is_preset

CONVENTIONS = ("paper", "exact", "entropy")
PAPER_VOCAB = 50304  # the paper counts embedding and head over this vocabulary at every size
PAPER_TRILM_BITS = 1.58
LOG2_3 = math.log2(3)

# bits per element of each safetensors dtype
DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8,
}
TORCH_DTYPE_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}

# Roles: what a tensor belongs to. Parts: what it is within that role.
ROLES = ("block_linear", "embedding", "lm_head", "norm", "other")
PARTS = ("weight", "codes", "scale", "zero", "g_idx", "meta")


def paper_vocab(rows: int) -> int:
    """Embedding rows the paper convention counts: 50304 for the GPT-NeoX vocabulary (padded or not, any MP),
    the model's own rows for any other tokenizer."""
    gpt_neox = rows == 50277 or (50277 < rows <= 50277 + 128 * 8 and rows % 128 == 0)  # padded for MP <= 8
    return PAPER_VOCAB if gpt_neox else rows


def paper_bits_per_weight(family: str, bits: int | None = None, group_size: int | None = None) -> float:
    """b_eff of a block linear weight in the paper's convention (a group of 128 adds 32 bits: scale and zero)."""
    if family == "floatlm":
        return 16.0
    if family == "trilm":
        return PAPER_TRILM_BITS
    if bits is None:
        raise QuantlmError("a QuantLM needs its bitwidth for the paper convention")
    return bits + (32.0 / group_size if group_size and group_size > 0 else 0.0)


@dataclass(frozen=True)
class QuantLayout:
    """How a QuantLM's block linears are stored (the assumption behind its ``exact`` bits)."""

    format: str = "compressed-tensors"  # compressed-tensors | gptq | unpacked
    bits: int = 4
    group_size: int = 128  # -1: one scale per output channel
    sym: bool = True
    g_idx: bool = False  # store a per-input-column group index (the gptq format always does)
    scale_dtype: str = "F16"

    def __post_init__(self):
        if self.format not in QUANT_FORMATS:
            raise QuantlmError(f"unknown QuantLM layout {self.format!r}; use one of {', '.join(QUANT_FORMATS)}")
        if not 2 <= self.bits <= 8:
            raise QuantlmError(f"bits={self.bits} is outside 2..8; choose a bitwidth from 2 to 8")
        if self.group_size == 0 or self.group_size < -1:
            raise QuantlmError(f"group_size={self.group_size}: use a positive group size or -1 for per-channel")

    def describe(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"group {self.group_size}"
        extras = [self.scale_dtype.lower() + " scales", "sym" if self.sym else "asym"]
        if self.g_idx or self.format == "gptq":
            extras.append("int32 g_idx")
        return f"{self.format} {self.bits}-bit, {group}, {', '.join(extras)}"


@dataclass(frozen=True)
class TernaryLayout:
    """How a TriLM's block linears are stored: fp16 gamma*W_t, or packed trits with per-shard fp16 scales."""

    format: str = "ternary-1.6"  # ternary-1.6 (5 trits per byte) | ternary-2 (4 per byte) | unpacked

    def __post_init__(self):
        if self.format not in TERNARY_FORMATS:
            raise QuantlmError(f"unknown TriLM layout {self.format!r}; use one of {', '.join(TERNARY_FORMATS)}")

    def describe(self) -> str:
        return {"ternary-1.6": "5 trits per byte (1.6 bits/weight), fp16 per-shard scales",
                "ternary-2": "4 trits per byte (2 bits/weight), fp16 per-shard scales",
                "unpacked": "fp16 gamma*W_t (as Spectra released)"}[self.format]


QUANT_FORMATS = ("compressed-tensors", "gptq", "unpacked")
TERNARY_FORMATS = ("ternary-1.6", "ternary-2", "unpacked")


@dataclass(frozen=True)
class TensorRecord:
    """One stored tensor (``count`` identical copies, e.g. the same tensor in every block)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    role: str
    part: str
    params: int  # model parameters this tensor encodes (0 for scales, zero points, g_idx, metadata)
    code_bits: float | None = None  # information per parameter for codes (b, or log2(3) for trits)
    paper_bits_per_param: float = 0.0
    count: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def bits(self, convention: str) -> float:
        if convention == "exact":
            return self.numel * DTYPE_BITS[self.dtype] * self.count
        if convention == "entropy":
            if self.code_bits is not None:
                return self.params * self.code_bits * self.count
            return self.numel * DTYPE_BITS[self.dtype] * self.count
        if convention == "paper":
            return self.params * self.paper_bits_per_param * self.count
        raise QuantlmError(f"unknown convention {convention!r}; use paper, exact or entropy")


@dataclass(frozen=True)
class ModelBudget:
    """A model described by its tensors, ready to be summed under any convention."""

    model: str
    family: str
    records: tuple[TensorRecord, ...]
    bits: int | None = None  # QuantLM bitwidth
    layout: str = ""  # what the exact convention assumes
    source: str = "preset"  # preset | config | checkpoint
    floatlm_equivalent: ModelBudget | None = field(default=None, compare=False)
    header_bytes: int = 0  # safetensors headers, reported apart from the payload

    @property
    def params(self) -> int:
        return sum(r.params * r.count for r in self.records)

    def total_bits(self, convention: str) -> float:
        return sum(r.bits(convention) for r in self.records)

    def role_params(self, role: str) -> int:
        return sum(r.params * r.count for r in self.records if r.role == role)

    def role_bits(self, role: str, convention: str) -> float:
        return sum(r.bits(convention) for r in self.records if r.role == role)

    def summary(self, convention: str) -> dict:
        bits = self.total_bits(convention)
        row = {
            "model": self.model, "family": self.family, "quant_bits": self.bits, "convention": convention,
            "params": self.params, "bits": bits, "bytes": bits / 8, "GB": bits / 8e9,
            "bits_per_param": bits / self.params if self.params else float("nan"),
        }
        for role in ROLES:
            p = self.role_params(role)
            if p:
                row[f"bpp_{role}"] = self.role_bits(role, convention) / p
        ref = self.floatlm_equivalent
        row["ratio_to_floatlm"] = bits / ref.total_bits(convention) if ref is not None else 1.0
        row["layout"] = self.layout
        row["source"] = self.source
        if self.source == "checkpoint":
            row["header_bytes"] = self.header_bytes
        return row


# --------------------------------------------------------------------------------------------- presets

def _linear_records(name: str, out_f: int, in_f: int, *, family: str, quant: QuantLayout | None,
                    ternary: TernaryLayout | None, mp: int, shard: str, count: int,
                    float_dtype: str = "F16") -> list[TensorRecord]:
    """The stored tensors of one block linear under a family's layout."""
    params = out_f * in_f
    if family == "floatlm":
        return [TensorRecord(name + ".weight", (out_f, in_f), float_dtype, "block_linear", "weight", params,
                             None, 16.0, count)]
    if family == "trilm":
        paper = PAPER_TRILM_BITS
        fmt = ternary.format if ternary else "unpacked"
        if fmt == "unpacked":
            # fp16 gamma*W_t; its information is the trits plus one scale per model-parallel shard
            return [TensorRecord(name + ".weight", (out_f, in_f), float_dtype, "block_linear", "weight", params,
                                 LOG2_3 + 16.0 * mp / params, paper, count)]
        per_byte = 5 if fmt == "ternary-1.6" else 4
        return [
            TensorRecord(name + ".weight_trits", (out_f, -(-in_f // per_byte)), "U8", "block_linear", "codes",
                         params, LOG2_3, paper, count),
            TensorRecord(name + ".weight_scale", (mp,), "F16", "block_linear", "scale", 0, None, 0.0, count),
        ]
    assert quant is not None
    b, g = quant.bits, quant.group_size
    if g != -1 and in_f % g:
        raise QuantlmError(
            f"group size {g} does not divide the input dimension {in_f} of {name}; "
            f"use a group size that divides {in_f} or -1 (per-channel)")
    groups = 1 if g == -1 else in_f // g
    paper = paper_bits_per_weight("quantlm", b, None if g == -1 else g)
    if quant.format == "unpacked":
        return [TensorRecord(name + ".weight", (out_f, in_f), float_dtype, "block_linear", "weight", params,
                             None, paper, count)]
    words = lambda n: -(-n * b // 32)  # noqa: E731 - int32 words of a b-bit stream of n values
    if quant.format == "gptq":
        return [
            TensorRecord(name + ".qweight", (words(in_f), out_f), "I32", "block_linear", "codes", params, b, paper, count),
            TensorRecord(name + ".qzeros", (groups, words(out_f)), "I32", "block_linear", "zero", 0, None, 0.0, count),
            TensorRecord(name + ".scales", (groups, out_f), quant.scale_dtype, "block_linear", "scale", 0, None, 0.0, count),
            TensorRecord(name + ".g_idx", (in_f,), "I32", "block_linear", "g_idx", 0, None, 0.0, count),
        ]
    recs = [
        TensorRecord(name + ".weight_packed", (out_f, words(in_f)), "I32", "block_linear", "codes", params, b, paper, count),
        TensorRecord(name + ".weight_scale", (out_f, groups), quant.scale_dtype, "block_linear", "scale", 0, None, 0.0, count),
        TensorRecord(name + ".weight_shape", (2,), "I64", "block_linear", "meta", 0, None, 0.0, count),
    ]
    if not quant.sym:
        recs.append(TensorRecord(name + ".weight_zero_point", (words(out_f), groups), "I32", "block_linear", "zero",
                                 0, None, 0.0, count))
    if quant.g_idx:
        recs.append(TensorRecord(name + ".weight_g_idx", (in_f,), "I32", "block_linear", "g_idx", 0, None, 0.0, count))
    return recs


def default_quant_layout(spec: ModelSpec, fmt: str = "compressed-tensors") -> QuantLayout:
    return QuantLayout(format=fmt, bits=spec.bits or 16, group_size=spec.group_size or -1)


def budget_from_spec(spec: ModelSpec, *, quant: QuantLayout | None = None, ternary: TernaryLayout | None = None,
                     block_map: BlockMap = LLAMA, source: str = "preset", float_dtype: str = "F16",
                     with_reference: bool = True) -> ModelBudget:
    """The bit budget of a preset or config-described model under its (or the given) storage layout."""
    family = spec.family
    if family == "quantlm":
        quant = quant or default_quant_layout(spec)
        layout = quant.describe()
    elif family == "trilm":
        ternary = ternary or TernaryLayout()
        layout = ternary.describe()
    else:
        layout = f"{float_dtype.lower()} weights"
    h, n = spec.hidden_size, spec.num_hidden_layers
    vocab = spec.padded_vocab_size
    # tensor names use {i} for the block index: one record stands for the same tensor in all n blocks
    lp = f"{block_map.layers_path}.{{i}}."
    emb_paper = 16.0 * paper_vocab(vocab) / vocab
    records = [TensorRecord(block_map.embed_path + ".weight", (vocab, h), float_dtype, "embedding", "weight",
                            vocab * h, None, emb_paper)]
    records.append(TensorRecord(lp + "input_layernorm.weight", (h,), float_dtype, "norm", "weight", h, count=n))
    for name, (out_f, in_f) in spec.linear_shapes().items():
        records += _linear_records(lp + name, out_f, in_f, family=family, quant=quant, ternary=ternary,
                                   mp=spec.model_parallel, shard=block_map.shard_kind(name), count=n,
                                   float_dtype=float_dtype)
    records.append(TensorRecord(lp + "post_attention_layernorm.weight", (h,), float_dtype, "norm", "weight", h, count=n))
    records.append(TensorRecord(block_map.final_norm_path + ".weight", (h,), float_dtype, "norm", "weight", h))
    if not spec.tie_word_embeddings:
        records.append(TensorRecord(block_map.head_path + ".weight", (vocab, h), float_dtype, "lm_head", "weight",
                                    vocab * h, None, emb_paper))
    ref = None
    if with_reference and family != "floatlm":
        ref = budget_from_spec(replace(spec, family="floatlm", bits=None, group_size=None),
                               block_map=block_map, source=source, with_reference=False)
    return ModelBudget(spec.name, family, tuple(records), spec.bits, layout, source, ref)


# --------------------------------------------------------------------------------------------- configs

def spec_from_config(config: dict, name: str, *, bits: int | None = None, group_size: int | None = None) -> ModelSpec:
    """A ModelSpec for an HF LLaMA config dict (family from its quantization_config / TriLM marker)."""
    from quantlm.checkpoint import block_map_for, is_trilm

    block_map_for(config, name)
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kwargs = dict(
            hidden_size=hidden, intermediate_size=int(config["intermediate_size"]),
            num_attention_heads=heads, num_hidden_layers=int(config["num_hidden_layers"]),
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            vocab_size=int(config["vocab_size"]),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            vocab_multiple=1,  # a config's vocab_size is the stored (already padded) row count
        )
    except KeyError as e:
        raise QuantlmError(f"{name}: config.json lacks {e.args[0]!r}; is this a complete LLaMA config?") from None
    head_dim = config.get("head_dim")
    if head_dim not in (None, hidden // heads):
        raise QuantlmError(f"{name}: head_dim={head_dim} differs from hidden_size/num_attention_heads; not supported")
    qc = config.get("quantization_config") or {}
    mp = int(config.get("pretraining_model_parallel") or 1)
    if qc and bits is None:
        bits, group_size = _bits_from_quant_config(qc, name)
    if bits is not None:
        family = "quantlm"
    elif is_trilm(config):
        family = "trilm"
    else:
        family = "floatlm"
    # vocab_size in a config is already padded: keep it as is (128*mp divides it for Spectra checkpoints)
    return ModelSpec(name=name, family=family, size="custom", model_parallel=mp if family == "trilm" else 1,
                     bits=bits, group_size=group_size if group_size not in (None, -1) else None, **kwargs)


def _bits_from_quant_config(qc: dict, name: str) -> tuple[int, int]:
    method = qc.get("quant_method")
    if method == "gptq":
        return int(qc["bits"]), int(qc.get("group_size", -1))
    if method == "compressed-tensors":
        try:
            group = next(iter(qc["config_groups"].values()))
            w = group["weights"]
            return int(w["num_bits"]), int(w.get("group_size") or -1)
        except (KeyError, StopIteration, TypeError):
            raise QuantlmError(f"{name}: compressed-tensors quantization_config lacks config_groups.*.weights") from None
    raise QuantlmError(f"{name}: quantization method {method!r} is not one quantlm accounts (gptq, compressed-tensors)")


# ----------------------------------------------------------------------------------------- checkpoints

@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: str | os.PathLike) -> tuple[list[HeaderEntry], int]:
    """Tensor entries and header size of one safetensors file, reading only its header bytes."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QuantlmError(f"{path}: file is too short to be safetensors; re-download or re-export it")
            (n,) = struct.unpack("<Q", head)
            if n <= 1 or n > min(size - 8, 100 * 2**20):
                raise QuantlmError(f"{path}: corrupt safetensors header (length {n}); re-download or re-export it")
            raw = f.read(n)
    except FileNotFoundError:
        raise QuantlmError(f"{path}: file not found; check the checkpoint directory") from None
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QuantlmError(f"{path}: safetensors header is not valid JSON; the file is corrupt") from None
    entries = []
    end = 0
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise QuantlmError(f"{path}: corrupt safetensors header entry {name!r}") from None
        if dtype not in DTYPE_BITS:
            raise QuantlmError(f"{path}: tensor {name} has dtype {dtype} that quantlm does not account")
        nbytes = math.prod(shape) * DTYPE_BITS[dtype] // 8
        if stop - start != nbytes:
            raise QuantlmError(f"{path}: header of {name} says {stop - start} bytes for shape {list(shape)} {dtype} "
                               f"({nbytes} expected); the file is corrupt")
        end = max(end, stop)
        entries.append(HeaderEntry(name, dtype, shape, nbytes))
    if 8 + n + end > size:
        raise QuantlmError(f"{path}: file is truncated ({size} bytes, header promises {8 + n + end}); "
                           "re-download or re-export it")
    return entries, 8 + n


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the sharded index's files, or every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise QuantlmError(f"{index}: not a valid safetensors index (needs a weight_map)") from None
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise QuantlmError(f"{model_dir}: no *.safetensors files; quantlm measures safetensors checkpoints")
    return files


_PART_SUFFIXES = (  # (suffix, part) for packed layouts; order matters (longest first)
    (".weight_packed", "codes"), (".weight_trits", "codes"), (".qweight", "codes"),
    (".weight_scale", "scale"), (".scales", "scale"), (".weight_zero_point", "zero"), (".qzeros", "zero"),
    (".weight_g_idx", "g_idx"), (".g_idx", "g_idx"), (".weight_shape", "meta"), (".weight", "weight"),
)


def budget_from_checkpoint(model_dir: str | os.PathLike, *, name: str | None = None,
                           block_map: BlockMap | None = None) -> ModelBudget:
    """The bit budget of a checkpoint directory from its config.json and safetensors headers alone."""
    from quantlm.checkpoint import block_map_for, read_config

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    label = name or model_dir.name
    block_map = block_map or block_map_for(config, str(model_dir))
    spec = spec_from_config(config, label)
    shapes = spec.linear_shapes()
    qbits = spec.bits
    entries: list[HeaderEntry] = []
    header_bytes = 0
    for f in safetensors_files(model_dir):
        e, hb = read_safetensors_header(f)
        entries += e
        header_bytes += hb
    records = []
    for e in entries:
        linear = block_map.block_linear_of(e.name)
        part = next((p for s, p in _PART_SUFFIXES if e.name.endswith(s)), "meta")
        if linear is not None:
            out_f, in_f = shapes[linear]
            params = out_f * in_f if part in ("weight", "codes") else 0
            if spec.family == "trilm":
                code_bits = LOG2_3 + (16.0 * spec.model_parallel / params if part == "weight" else 0.0)
            else:
                code_bits = float(qbits) if part == "codes" else None
            paper = paper_bits_per_weight(spec.family, qbits, spec.group_size) if params else 0.0
            records.append(TensorRecord(e.name, e.shape, e.dtype, "block_linear", part, params,
                                        code_bits if params else None, paper))
        elif e.name.startswith(block_map.embed_path + "."):
            records.append(_float_record(e, "embedding"))
        elif e.name.startswith(block_map.head_path + "."):
            records.append(_float_record(e, "lm_head"))
        elif "norm" in e.name.rsplit(".", 2)[-2]:
            records.append(TensorRecord(e.name, e.shape, e.dtype, "norm", "weight", math.prod(e.shape)))
        else:
            records.append(TensorRecord(e.name, e.shape, e.dtype, "other", part, math.prod(e.shape)
                                        if part == "weight" else 0))
    if spec.tie_word_embeddings and not any(r.role == "lm_head" for r in records):
        pass  # tied head: stored once, counted once (also in the paper convention)
    if spec.family == "quantlm":
        qc = config.get("quantization_config", {})
        layout = f"{qc.get('quant_method')} {qbits}-bit, group {spec.group_size or -1} (as stored)"
    elif spec.family == "trilm":
        layout = "ternary (as stored)"
    else:
        layout = "as stored"
    ref = budget_from_spec(replace(spec, family="floatlm", bits=None, group_size=None), block_map=block_map,
                           source="config", with_reference=False)
    return ModelBudget(label, spec.family, tuple(records), qbits, layout, "checkpoint", ref, header_bytes)


def _float_record(e: HeaderEntry, role: str) -> TensorRecord:
    rows, cols = e.shape
    return TensorRecord(e.name, e.shape, e.dtype, role, "weight", rows * cols, None, 16.0 * paper_vocab(rows) / rows)


# ------------------------------------------------------------------------------------------- front door

def budget(model: str | os.PathLike, *, quant: QuantLayout | None = None, ternary: TernaryLayout | None = None,
           bits: int | None = None, group_size: int | None = None) -> ModelBudget:
    """Bit budget of a preset name, a config.json path, or a checkpoint directory.

    ``bits``/``group_size`` turn a FloatLM preset or config into the QuantLM of that bitwidth; ``quant`` and
    ``ternary`` choose the storage layout the ``exact`` convention assumes.
    """
    if bits is not None and not 2 <= bits <= 8:
        raise QuantlmError(f"bits={bits} is outside 2..8; choose a bitwidth from 2 to 8")
    text = str(model)
    path = Path(text)
    if path.is_dir() and any(path.glob("*.safetensors")) and bits is None:  # measured as stored
        return budget_from_checkpoint(path)
    if path.is_dir() or path.suffix == ".json":
        from quantlm.checkpoint import read_config

        spec = spec_from_config(read_config(path), path.name if path.is_dir() else path.parent.name or text,
                                bits=bits, group_size=group_size)
        source = "config"
    elif is_preset(text):
        spec = get_preset(text)
        source = "preset"
        if bits is not None:
            spec = spec.with_family("quantlm", bits)
    elif path.exists():
        raise QuantlmError(f"{path}: neither a checkpoint directory nor a config.json")
    elif os.sep in text or text.endswith(".json"):
        raise QuantlmError(f"{path}: no such checkpoint directory or config.json; check the path")
    else:
        get_preset(text)  # raises with the nearest names
        raise AssertionError  # pragma: no cover
    if spec.family == "quantlm":
        if group_size is not None:
            spec = replace(spec, group_size=None if group_size == -1 else group_size)
        # the spec owns bits and group size; the layout adds how they are stored
        quant = replace(quant or QuantLayout(), bits=spec.bits, group_size=spec.group_size or -1)
    return budget_from_spec(spec, quant=quant, ternary=ternary, source=source)


def summarize(budgets: Iterable[ModelBudget], conventions: Iterable[str] = CONVENTIONS) -> list[dict]:
    """One row per (model, convention)."""
    conventions = list(conventions)
    for c in conventions:
        if c not in CONVENTIONS:
            raise QuantlmError(f"unknown convention {c!r}; use paper, exact, entropy or all")
    return [b.summary(c) for b in budgets for c in conventions]


def per_tensor(b: ModelBudget, expand: bool = True) -> list[dict]:
    """One row per stored tensor (``{i}`` records expanded to every block when ``expand``)."""
    rows = []
    n_blocks = max((r.count for r in b.records), default=1)
    for r in b.records:
        names = [r.name.format(i=i) for i in range(n_blocks)] if expand and "{i}" in r.name else [r.name]
        count = 1 if expand and "{i}" in r.name else r.count
        for name in names:
            one = replace(r, name=name, count=count)
            rows.append({
                "model": b.model, "tensor": name, "role": r.role, "part": r.part, "shape": list(r.shape),
                "dtype": r.dtype, "params": r.params * count, "bits_paper": one.bits("paper"),
                "bits_exact": one.bits("exact"), "bits_entropy": one.bits("entropy"),
            })
    return rows


def to_frames(budgets: Iterable[ModelBudget], conventions: Iterable[str] = CONVENTIONS):
    """(per-model DataFrame, per-tensor DataFrame) for the given budgets."""
    import pandas as pd

    budgets = list(budgets)
    models = pd.DataFrame(summarize(budgets, conventions))
    tensors = pd.DataFrame([row for b in budgets for row in per_tensor(b)])
    return models, tensors
