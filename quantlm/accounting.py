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
data. Which tensors a layout stores comes from the format registry (``quantlm.formats.registry``), the same
declaration the writers and the loader use. No tensor is ever loaded; ``to_frames`` builds pandas DataFrames at
the edge.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from quantlm.architectures import ARCHITECTURES, BlockMap
from quantlm.dtypes import DTYPE_BITS
from quantlm.errors import QuantlmError
from quantlm.formats.gguf import GGUF_FILE, hf_name, read_gguf_header
from quantlm.formats.gguf import blocks as gb
from quantlm.formats.gguf.names import EXTRA_ROLES
from quantlm.formats.registry import LOG2_3, Layout, checkpoint_spec, get_format, layout_of_config
from quantlm.hf_checkpoint import HeaderEntry, read_config, read_safetensors_header, safetensors_files
from quantlm.metadata import read_meta
from quantlm.quantized import check_bits, check_group_size
from quantlm.specs import ModelSpec, get_preset, is_preset
from quantlm.validate import check_checkpoint

CONVENTIONS = ("paper", "exact", "entropy")
PAPER_VOCAB = 50304  # the paper counts embedding and head over this vocabulary at every size
PAPER_TRILM_BITS = 1.58
DEPLOYED_FORMAT = {"floatlm": "unpacked", "quantlm": "compressed-tensors", "trilm": "ternary-1.6"}

# Roles: what a tensor belongs to. Parts: what it is within that role.
ROLES = ("block_linear", "bias", "embedding", "lm_head", "norm", "rope", "other")  # rope: GGUF's rope_freqs
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
    storage: str = ""  # the file's own type where ``dtype`` is only its byte view (a GGUF block type: Q4_0, ...)

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
    header_bytes: int = 0  # safetensors or GGUF headers, reported apart from the payload
    file_bytes: int = 0  # the files on disk (payload + headers + alignment padding); 0 when not measured

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
        if self.source in ("checkpoint", "gguf"):
            row["payload_bytes"] = self.total_bits("exact") / 8
            row["header_bytes"] = self.header_bytes
            row["file_bytes"] = self.file_bytes
        return row


# --------------------------------------------------------------------------------------------- presets

def _linear_records(name: str, out_f: int, in_f: int, layout: Layout, kind: str, count: int) -> list[TensorRecord]:
    """The stored tensors of one block linear, as its format declares them."""
    if layout.family == "quantlm":
        check_group_size(layout.group_size, in_f, name.replace(".{i}.", ".N."))
    paper = paper_bits_per_weight(layout.family, layout.bits, None if layout.group_size == -1 else layout.group_size)
    return [TensorRecord(name + s.suffix, s.shape, s.dtype, "block_linear", s.part, s.params, s.code_bits,
                         paper if s.params else 0.0, count)
            for s in get_format(layout.format).linear_tensors(out_f, in_f, layout, kind)]


def preset_layout(spec: ModelSpec, *, quant_format: str | None = None, ternary_format: str | None = None,
                  sym: bool = True, g_idx: bool = False, float_dtype: str = "F16") -> Layout:
    """The layout a preset (or a config-described model) is accounted in: packed by default."""
    if spec.family == "quantlm":
        return Layout("quantlm", quant_format or DEPLOYED_FORMAT["quantlm"], bits=spec.bits,
                      group_size=spec.group_size or -1, sym=sym, g_idx=g_idx, float_dtype=float_dtype)
    if spec.family == "trilm":
        return Layout("trilm", ternary_format or DEPLOYED_FORMAT["trilm"], mp=spec.model_parallel,
                      float_dtype=float_dtype)
    return Layout("floatlm", "unpacked", float_dtype=float_dtype)


def budget_from_spec(spec: ModelSpec, layout: Layout | None = None, *, source: str = "preset",
                     with_reference: bool = True) -> ModelBudget:
    """The bit budget of a preset or config-described model in ``layout`` (default: :func:`preset_layout`).
    Biases of block linears are stored like norms and, like norms, not counted by the paper convention."""
    layout = layout or preset_layout(spec)
    block_map = spec.block_map
    fd = layout.float_dtype
    h, n = spec.hidden_size, spec.num_hidden_layers
    vocab = spec.padded_vocab_size
    # tensor names use {i} for the block index: one record stands for the same tensor in all n blocks
    lp = block_map.layers_path + ".{i}."
    emb_paper = 16.0 * paper_vocab(vocab) / vocab
    records = [TensorRecord(block_map.embed_path + ".weight", (vocab, h), fd, "embedding", "weight", vocab * h,
                            None, emb_paper)]
    nd = get_format(layout.format).norm_dtype(layout)
    records += [TensorRecord(lp + norm + ".weight", (w,), nd, "norm", "weight", w, count=n)
                for norm, w in block_map.norm_shapes(spec.dims).items()]
    biased = set(spec.biased_linears)
    for name, (out_f, in_f) in spec.linear_shapes().items():
        records += _linear_records(lp + name, out_f, in_f, layout, block_map.shard_kind(name), n)
        if name in biased:
            records.append(TensorRecord(lp + name + ".bias", (out_f,), nd, "bias", "weight", out_f, count=n))
    records.append(TensorRecord(block_map.final_norm_path + ".weight", (h,), nd, "norm", "weight", h))
    # what the format adds from the config (GGUF: a Llama 3 rope's factors): no parameters, free in the paper
    records += [TensorRecord(t.name, t.shape, t.dtype, t.role, "meta", 0)
                for t in get_format(layout.format).model_tensors(spec, layout)]
    if not spec.tie_word_embeddings:
        records.append(TensorRecord(block_map.head_path + ".weight", (vocab, h), fd, "lm_head", "weight",
                                    vocab * h, None, emb_paper))
    ref = None
    if with_reference and layout.family != "floatlm":
        ref = budget_from_spec(replace(spec, family="floatlm", bits=None, group_size=None), source=source,
                               with_reference=False)
    return ModelBudget(spec.name, layout.family, tuple(records), layout.bits, layout.describe(), source, ref)


# ----------------------------------------------------------------------------------------- checkpoints

def checkpoint_layout(model_dir: Path, config: dict) -> Layout:
    """The layout of a checkpoint directory: its config.json, and for a dequantized QuantLM its ``quantlm.json``."""
    layout = layout_of_config(config)
    if layout.family == "floatlm":
        meta = read_meta(model_dir)
        if meta is not None and meta.family == "quantlm" and meta.bits:
            layout = replace(layout, family="quantlm", bits=int(meta.bits), group_size=int(meta.group_size or -1),
                             sym=True if meta.sym is None else bool(meta.sym))
    return layout


def budget_from_checkpoint(model_dir: str | os.PathLike, *, name: str | None = None) -> ModelBudget:
    """The bit budget of a checkpoint directory from its config.json and safetensors headers alone.

    Each block-linear tensor is matched to its format's declaration (what it encodes, its code bits); a tensor the
    format does not declare counts at its stored size as ``meta``.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    label = name or model_dir.name
    layout = checkpoint_layout(model_dir, config)
    spec = checkpoint_spec(config, label)
    block_map = spec.block_map
    fmt = get_format(layout.format)
    declared = {lin: {s.suffix: s for s in fmt.linear_tensors(*shape, layout, block_map.shard_kind(lin))}
                for lin, shape in spec.linear_shapes().items()}
    paper = paper_bits_per_weight(layout.family, layout.bits, None if layout.group_size == -1 else layout.group_size)
    entries: list[HeaderEntry] = []
    header_bytes = 0
    by_file = {}
    file_bytes = 0
    for f in safetensors_files(model_dir):
        e, hb = read_safetensors_header(f)
        entries += e
        header_bytes += hb
        by_file[f] = e
        file_bytes += f.stat().st_size

    check_checkpoint(model_dir, config, headers=by_file)  # missing, unexpected or misshapen tensors: one line
    records = []
    for e in entries:
        linear = block_map.block_linear_of(e.name)
        if linear is not None and e.name.endswith(".bias"):
            records.append(TensorRecord(e.name, e.shape, e.dtype, "bias", "weight", math.prod(e.shape)))
        elif linear is not None:
            suffix = "." + e.name.rsplit(".", 1)[-1]
            d = declared[linear].get(suffix)
            if d is None:
                records.append(TensorRecord(e.name, e.shape, e.dtype, "block_linear", "meta", 0))
            else:
                records.append(TensorRecord(e.name, e.shape, e.dtype, "block_linear", d.part, d.params, d.code_bits,
                                            paper if d.params else 0.0))
        elif e.name.startswith(block_map.embed_path + "."):
            records.append(_float_record(e, "embedding"))
        elif e.name.startswith(block_map.head_path + "."):
            records.append(_float_record(e, "lm_head"))
        elif block_map.is_norm(e.name):
            records.append(TensorRecord(e.name, e.shape, e.dtype, "norm", "weight", math.prod(e.shape)))
        else:
            records.append(TensorRecord(e.name, e.shape, e.dtype, "other", "meta", 0))
    ref = budget_from_spec(replace(spec, family="floatlm", bits=None, group_size=None), source="config",
                           with_reference=False)
    return ModelBudget(label, layout.family, tuple(records), layout.bits, layout.describe() + " (as stored)",
                       "checkpoint", ref, header_bytes, file_bytes)


def _float_record(e: HeaderEntry, role: str) -> TensorRecord:
    rows, cols = e.shape
    return TensorRecord(e.name, e.shape, e.dtype, role, "weight", rows * cols, None, 16.0 * paper_vocab(rows) / rows)


# ------------------------------------------------------------------------------------------------ GGUF

_GGUF_FLOATS = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8")


def gguf_file(path: str | os.PathLike) -> Path | None:
    """The GGUF file a path names: a ``.gguf`` file, or a directory holding ``model.gguf`` (a quantlm gguf
    export) and no safetensors; None otherwise."""
    path = Path(path)
    if path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / GGUF_FILE).is_file() and not any(path.glob("*.safetensors")):
        return path / GGUF_FILE
    return None


def budget_from_gguf(path: str | os.PathLike, *, name: str | None = None) -> ModelBudget:
    """The bit budget of a GGUF file from its header alone (metadata and tensor table; no tensor data is read).

    Tensors keep the file's names (``blk.0.attn_q.weight``). A block-type tensor counts as uint8
    ``[rows, bytes per row]`` with its ggml type in ``storage``, so ``exact`` is 8 x the file's tensor payload.
    Family, bitwidth and group size come from the ``quantlm.*`` keys quantlm writes; for a file from elsewhere
    they are inferred from the block linears' types (TQ: TriLM, float: FloatLM, else a per-channel QuantLM of
    the type's code width), which only the ``paper`` and ``entropy`` conventions use.
    """
    path = Path(path)
    if not path.is_file():
        raise QuantlmError(f"{path}: no such GGUF file; check the path")
    header = read_gguf_header(path)
    md, tensors = header["metadata"], header["tensors"]
    arch = md.get("general.architecture", "llama")
    family = next((a for a in ARCHITECTURES.values() if a.gguf_arch == arch), None)
    if family is None:
        raise QuantlmError(f"{path}: GGUF architecture {arch!r} is not one quantlm sizes; supported: "
                           f"{', '.join(sorted({a.gguf_arch for a in ARCHITECTURES.values() if a.gguf_arch}))}")
    block_map = family.block_map
    roles = {t["name"]: EXTRA_ROLES.get(t["name"]) or _gguf_role(hf_name(t["name"], arch), block_map)
             for t in tensors}
    linear_types = [t["type"] for t in tensors if roles[t["name"]] == "block_linear"]
    main = max(set(linear_types), key=linear_types.count) if linear_types else "F16"
    family = md.get("quantlm.family")
    if family not in ("floatlm", "quantlm", "trilm"):
        family = "trilm" if main.startswith("TQ") else "floatlm" if main in _GGUF_FLOATS else "quantlm"
    bits = md.get("quantlm.bits")
    if family == "quantlm" and bits is None:
        bits = int(gb.CODE_FIELD_BITS.get(main, 8))
    group = int(md.get("quantlm.group_size", -1))
    paper = paper_bits_per_weight(family, bits, None if group == -1 else group)
    info = {"quantlm": bits, "trilm": LOG2_3}.get(family)
    records = []
    for t in tensors:
        role, shape, n, typ = roles[t["name"]], tuple(t["shape"]), int(t["n_elements"]), t["type"]
        params, pbits, code_bits = (n, 0.0, None) if role in ("block_linear", "bias", "embedding", "lm_head", "norm") \
            else (0, 0.0, None)
        if role == "block_linear":
            pbits = paper
            if info is not None and typ in gb.CODE_FIELD_BITS:
                code_bits = info + gb.scale_bits_per_weight(typ)
        elif role in ("embedding", "lm_head"):
            pbits = 16.0 * paper_vocab(shape[0]) / shape[0]
        part = "weight" if params else "meta"
        if typ in _GGUF_FLOATS:
            records.append(TensorRecord(t["name"], shape, typ, role, part, params, code_bits, pbits))
        else:
            rows = shape[0] if len(shape) > 1 else 1
            records.append(TensorRecord(t["name"], (rows, t["nbytes"] // rows), "U8", role,
                                        "codes" if params else "meta", params, code_bits, pbits, storage=typ))
    label = name or md.get("general.name") or path.stem
    counts = {ty: linear_types.count(ty) for ty in sorted(set(linear_types), key=linear_types.count, reverse=True)}
    what = ", ".join(f"{ty} x {c}" for ty, c in counts.items()) or "none"
    return ModelBudget(label, family, tuple(records), bits if family == "quantlm" else None,
                       f"GGUF as stored: block linears {what}", "gguf", _gguf_reference(md, tensors, label),
                       header["header_bytes"], header["file_bytes"])


def _gguf_role(hf: str | None, block_map: BlockMap) -> str:
    if hf is None:
        return "other"
    if block_map.block_linear_of(hf) is not None:
        return "bias" if hf.endswith(".bias") else "block_linear"
    if hf.startswith(block_map.embed_path + "."):
        return "embedding"
    if hf.startswith(block_map.head_path + "."):
        return "lm_head"
    return "norm" if block_map.is_norm(hf) else "other"


def _gguf_reference(md: dict, tensors: list[dict], label: str) -> ModelBudget | None:
    """The FloatLM (fp16) of the shape a GGUF header describes, for the ``x FloatLM`` ratios."""
    arch = md.get("general.architecture", "llama")
    emb = next((t for t in tensors if t["name"] == "token_embd.weight"), None)
    try:
        heads = int(md[f"{arch}.attention.head_count"])
        spec = ModelSpec(name=label, family="floatlm", size="custom", hidden_size=int(emb["shape"][1]),
                         intermediate_size=int(md[f"{arch}.feed_forward_length"]), num_attention_heads=heads,
                         num_hidden_layers=int(md[f"{arch}.block_count"]),
                         num_key_value_heads=int(md.get(f"{arch}.attention.head_count_kv", heads)),
                         vocab_size=int(emb["shape"][0]),
                         max_position_embeddings=int(md.get(f"{arch}.context_length", 2048)),
                         tie_word_embeddings=not any(t["name"] == "output.weight" for t in tensors), vocab_multiple=1)
    except (KeyError, TypeError, QuantlmError):
        return None
    return budget_from_spec(spec, source="config", with_reference=False)


# ------------------------------------------------------------------------------------------- front door

def budget(model: str | os.PathLike, *, layout: Layout | None = None, bits: int | None = None,
           group_size: int | None = None, quant_format: str | None = None, ternary_format: str | None = None,
           sym: bool = True, g_idx: bool = False) -> ModelBudget:
    """Bit budget of a preset name, a config.json path, or a checkpoint directory.

    A checkpoint directory, a ``.gguf`` file or a quantlm gguf export directory is measured as stored (a GGUF from
    its header alone). ``bits``/``group_size`` turn a FloatLM preset or config into the
    QuantLM of that bitwidth; ``layout`` (or ``quant_format``, ``ternary_format``, ``sym``, ``g_idx``) chooses the
    storage the ``exact`` convention assumes for a preset or config (default: packed, as deployed).
    """
    if bits is not None:
        check_bits(bits)
    text = str(model)
    path = Path(text)
    gguf = gguf_file(path)
    if gguf is not None:
        if bits is not None or layout is not None:
            raise QuantlmError(f"{path}: a GGUF file is measured as stored; --bits and a layout do not apply to it")
        return budget_from_gguf(gguf)
    if path.is_dir() and any(path.glob("*.safetensors")) and bits is None and layout is None:
        return budget_from_checkpoint(path)
    if path.is_dir() or path.suffix == ".json":

        config = read_config(path)
        spec = checkpoint_spec(config, path.name if path.is_dir() else path.parent.name or text)
        own = layout_of_config(config)
        if bits is not None:
            spec = spec.with_family("quantlm", bits)
        elif layout is None and own.format != "unpacked" and not (quant_format or ternary_format):
            layout = own  # a packed checkpoint's config predicts its own layout
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
    if spec.family == "quantlm" and group_size is not None:
        spec = replace(spec, group_size=None if group_size == -1 else group_size)
    if layout is None:
        layout = preset_layout(spec, quant_format=quant_format, ternary_format=ternary_format, sym=sym, g_idx=g_idx)
    return budget_from_spec(spec, layout, source=source)


def deployed_budget(model: str | os.PathLike, layout: Layout) -> ModelBudget:
    """The budget of the model a checkpoint or config holds, as deployed: packed in the family's default format
    (QuantLM compressed-tensors, TriLM ternary-1.6; a FloatLM in fp16), whatever ``layout`` it is stored in."""
    fmt = DEPLOYED_FORMAT[layout.family]
    target = Layout(layout.family, fmt, bits=layout.bits, group_size=layout.group_size, sym=layout.sym, mp=layout.mp)
    return budget(model, layout=target, bits=layout.bits if layout.family == "quantlm" else None,
                  group_size=layout.group_size if layout.family == "quantlm" else None)


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
                "dtype": r.dtype, "storage": r.storage or r.dtype, "params": r.params * count, "bits_paper": one.bits("paper"),
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
