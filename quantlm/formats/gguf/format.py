"""The ``gguf`` entry of the format registry: for a linear of a given shape under a layout it declares the one tensor
the file stores (its ggml type: the layout's, or the smallest exact one for the recipe), so ``quantlm.accounting``
predicts a GGUF export's size from config + recipe; it writes a whole model as ``<out>/model.gguf``."""

from __future__ import annotations

from pathlib import Path

from quantlm.errors import QuantlmError
from quantlm.formats.gguf import blocks as gb
from quantlm.formats.gguf.names import EXTRA_ROLES, RTN_TYPES, hparams, rope_tensors
from quantlm.formats.gguf.tensors import write_gguf
from quantlm.formats.gguf.tokenizer import tokenizer_metadata
from quantlm.formats.registry import LOG2_3, Format, Layout, ModelTensor, TensorSpec, register
from quantlm.hf_checkpoint import block_map_for
from quantlm.metadata import model_label
from quantlm.specs import spec_from_config

GGUF_FILE = "model.gguf"
_ALLOWED = {"floatlm": gb.FLOAT_TYPES + RTN_TYPES, "quantlm": gb.FLOAT_TYPES + gb.LINEAR_TYPES,
            "trilm": gb.FLOAT_TYPES + gb.TERNARY_TYPES}


def quantlm_keys(layout: Layout) -> dict:
    """The ``quantlm.*`` header keys: what the file's block linears are (family, bits, group size, shards), so a
    GGUF file alone is accounted under every convention (``quantlm size FILE.gguf``)."""
    keys: dict = {"quantlm.family": layout.family}
    if layout.family == "quantlm":
        keys.update({"quantlm.bits": layout.bits, "quantlm.group_size": layout.group_size, "quantlm.sym": layout.sym})
    if layout.family == "trilm":
        keys["quantlm.model_parallel"] = layout.mp
    return keys


class GGUFFormat(Format):
    """A whole model of a family with a GGUF writer (``names.GGUF_FAMILIES``) as one llama.cpp GGUF file: block
    linears in a ggml block type (bit-exact from GPTQ codes
    or ternary weights), embedding and head in the float type, norms F32, a Llama 3 rope's factors F32."""

    name = "gguf"
    families = ("floatlm", "quantlm", "trilm")
    container = "gguf"
    options = {
        "gguf_type": "",  # ggml type of the block linears ("": the smallest exact one per linear)
        "kquant_grouped": False,  # allow K types for grouped codes (sub-block scales re-quantized)
        "merge_shard_scales": False,  # one merged scale for TriLM blocks straddling two scale shards
    }

    def check(self, layout):
        if layout.float_dtype not in gb.FLOAT_TYPES:
            raise QuantlmError(f"GGUF float type {layout.float_dtype!r}: use one of {', '.join(gb.FLOAT_TYPES)}")
        t = layout.option("gguf_type")
        if t:
            gb.ggml_type(t)
            if t not in _ALLOWED[layout.family]:
                raise QuantlmError(f"a {layout.family}'s block linears cannot be written as {t}; GGUF types for a "
                                   f"{layout.family}: {', '.join(_ALLOWED[layout.family])}")
        if layout.option("kquant_grouped") and layout.family != "quantlm":
            raise QuantlmError("kquant_grouped re-quantizes the group scales of GPTQ codes; it applies to a QuantLM")
        if layout.option("merge_shard_scales") and layout.family != "trilm":
            raise QuantlmError("merge_shard_scales merges TriLM scale shards; it applies to a TriLM")

    def describe(self, layout):
        default = {"floatlm": layout.float_dtype, "quantlm": "the smallest exact type", "trilm": "TQ1_0"}
        opts = [o for o, on in (("K-quant scales re-quantized", layout.option("kquant_grouped")),
                                ("straddling shard scales merged", layout.option("merge_shard_scales"))) if on]
        return (f"GGUF: block linears {layout.option('gguf_type') or default[layout.family]}, embedding and head "
                f"{layout.float_dtype}, norms F32" + "".join(f", {o}" for o in opts))

    def linear_type(self, out: int, in_features: int, layout: Layout, kind: str, name: str = "") -> str:
        """The ggml type of a block linear of this shape: the layout's ``gguf_type`` (checked to hold it exactly,
        or with the layout's opt-ins), else the float type for a FloatLM and the smallest exact type otherwise
        (``gguf_blocks.choose_type``: Q4_0 for <= 4-bit codes, ..., TQ1_0 for a TriLM). From shapes alone."""
        name = name or f"a [{out}, {in_features}] block linear"
        t = layout.option("gguf_type")
        if layout.family == "floatlm":
            t = t or layout.float_dtype
            if t not in gb.FLOAT_TYPES:
                gb.bytes_per_row(t, in_features, name)
            return t
        if t in gb.FLOAT_TYPES:
            return t
        w = gb.shaped((out, in_features), bits=layout.bits if layout.family == "quantlm" else None, sym=layout.sym,
                      group_size=layout.group_size, mp=layout.mp, kind=kind)
        opts = {"kquant_grouped": layout.option("kquant_grouped"), "merge_shard_scales": layout.option("merge_shard_scales")}
        if not t:
            return gb.choose_type(w, name=name, **opts)
        gb.check_fits(w, t, name=name, **opts)
        return t

    def linear_tensors(self, out, in_features, layout, kind):
        t = self.linear_type(out, in_features, layout, kind)
        params = out * in_features
        if t in gb.FLOAT_TYPES:
            code_bits = LOG2_3 + 16.0 * layout.mp / params if layout.family == "trilm" else None
            return [TensorSpec(".weight", t, (out, in_features), "weight", params, code_bits)]
        info = {"quantlm": layout.bits, "trilm": LOG2_3}.get(layout.family)  # a FloatLM's RTN blocks: as stored
        code_bits = None if info is None else info + gb.scale_bits_per_weight(t)
        return [TensorSpec(".weight", "U8", (out, gb.bytes_per_row(t, in_features)), "codes", params, code_bits)]

    def norm_dtype(self, layout):
        return "F32"

    def model_tensors(self, spec, layout):
        """``rope_freqs.weight`` (F32, head_dim / 2) for a rope type llama.cpp applies as per-frequency factors
        (Llama 3), as ``write_gguf`` writes it; nothing for plain RoPE."""
        return [ModelTensor(name, "F32", shape, EXTRA_ROLES[name])
                for name, shape in rope_tensors(spec.model_type, spec.rope_type, spec.head_dim).items()]

    def preflight(self, model_dir, config, layout):
        """Before any compute: a config llama.cpp runs for its family, a type for every linear, a tokenizer it
        reproduces."""

        hparams(config)
        block_map = block_map_for(config, str(model_dir))
        for rel, (out_f, in_f) in spec_from_config(config, str(model_dir)).linear_shapes().items():
            self.linear_type(out_f, in_f, layout, block_map.shard_kind(rel), f"{block_map.layers_path}.N.{rel}")
        tokenizer_metadata(model_dir, int(config["vocab_size"]))

    def write(self, out, config, dense, linears, layout, block_map, meta, tokenizer_dir=None):
        """``out/model.gguf``: every tensor of ``dense`` and ``linears``, each linear in :meth:`linear_type`.
        Returns the payload bytes and what ``quantlm.json`` records about the file (the writer checks the size
        against the accounting and writes ``quantlm.json``)."""
        if tokenizer_dir is None:
            raise QuantlmError("a GGUF file embeds the tokenizer: pass the directory holding the model's tokenizer")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors, types = dict(dense), {}
        for name, value in linears.items():
            out_f, in_f = value.shape
            types[name + ".weight"] = self.linear_type(out_f, in_f, layout, block_map.shard_kind(name), name)
            tensors[name + ".weight"] = value
        label = meta.model
        if meta.producer == "quantize":

            label = model_label(out, meta)
        report = write_gguf(out / GGUF_FILE, config, tensors, tokenizer_dir, float_type=layout.float_dtype,
                            linear_type=types, kquant_grouped=layout.option("kquant_grouped"),
                            merge_shard_scales=layout.option("merge_shard_scales"), metadata=quantlm_keys(layout),
                            model_name=label or None)
        counts: dict[str, int] = {}
        for t in types.values():
            counts[t] = counts.get(t, 0) + 1
        info = {"changes": report["changes"],
                "gguf": {"file": GGUF_FILE, "file_type": report["file_type"], "linear_types": counts,
                         "payload_bytes": report["payload_bytes"], "header_bytes": report["header_bytes"],
                         "file_bytes": report["file_bytes"]}}
        return {"payload_bytes": report["payload_bytes"], "info": info}


GGUF = register(GGUFFormat())
