"""Decoder architectures as data: per ``model_type``, one ``BlockMap``: a row per block linear (path, sequential
group, shard direction, shape rule, the config flag that gives it a bias) plus the norms, and where the blocks,
embedding, head and final norm live.

The GPTQ pipeline, the TriLM converter, the specs, the memory plan, validation and the bit accounting all read
this table (through :func:`architecture_for`), so no code needs an ``if model_type == ...`` branch and no module
spells the tensor names again. Another architecture is another entry of ``ARCHITECTURES``.
Only the standard library is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from quantlm.errors import QuantlmError

__all__ = ["ALWAYS", "ARCHITECTURES", "COLUMN", "ROW", "Architecture", "BlockLinear", "BlockMap", "LLAMA", "QWEN2",
           "architecture_for", "block_dims"]

COLUMN = "column"  # output dimension split across model-parallel ranks (q, k, v, gate, up)
ROW = "row"  # input dimension split across model-parallel ranks (o, down)

# the widths a shape rule names: hidden size, query width (heads x head_dim), key/value width (kv heads x
# head_dim), MLP width, one head's width, and the fused projections' widths (q + 2 kv; gate and up stacked)
DIMS = ("hidden", "q", "kv", "intermediate", "head", "qkv", "gate_up")
ALWAYS = "always"  # a BlockLinear.bias_flag: the linear has a bias in every checkpoint of the family


def block_dims(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, int]:
    """Every width of ``DIMS`` from a config's sizes."""
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"hidden": hidden, "q": q, "kv": kv, "intermediate": intermediate, "head": head_dim, "qkv": q + 2 * kv,
            "gate_up": 2 * intermediate}


@dataclass(frozen=True)
class BlockLinear:
    """One linear of a block: its path in the block, the sequential group it is quantized in (linears of one
    group read the same input and share a Hessian), its model-parallel shard kind, its (out, in) widths and
    the config flag that gives it a bias ("" when it never has one)."""

    path: str
    group: int
    shard: str  # COLUMN | ROW
    out_dim: str  # one of DIMS
    in_dim: str
    bias_flag: str = ""  # ALWAYS: the family always has one


@dataclass(frozen=True)
class BlockMap:
    """Where the decoder blocks live and what is inside one; checks itself on construction."""

    layers_path: str
    linear_rows: tuple[BlockLinear, ...]
    norms: tuple[str, ...]  # block-relative norm paths, in block order
    embed_path: str
    head_path: str
    final_norm_path: str
    norm_dims: tuple[tuple[str, str], ...] = ()  # norms whose width is not ``hidden`` (q/k norms), with theirs

    def __post_init__(self):
        paths = [r.path for r in self.linear_rows]
        if len(set(paths)) != len(paths):
            raise ValueError(f"BlockMap: a linear is listed twice in {paths}")
        groups = [r.group for r in self.linear_rows]
        if groups != sorted(groups) or sorted(set(groups)) != list(range(len(set(groups)))):
            raise ValueError(f"BlockMap: sequential groups must be numbered 0, 1, ... in execution order, got {groups}")
        for r in self.linear_rows:
            if r.shard not in (COLUMN, ROW) or r.out_dim not in DIMS or r.in_dim not in DIMS:
                raise ValueError(f"BlockMap: bad row {r}")
        if set(self.norms) & set(paths):
            raise ValueError("BlockMap: a path is both a norm and a linear")
        if any(n not in self.norms or d not in DIMS for n, d in self.norm_dims):
            raise ValueError(f"BlockMap: bad norm widths {self.norm_dims}")

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(r.path for r in self.linear_rows)

    @property
    def sequential(self) -> tuple[tuple[str, ...], ...]:
        """Groups of linear paths in execution order (true-sequential GPTQ quantizes one group at a time)."""
        n = 1 + max(r.group for r in self.linear_rows)
        return tuple(tuple(r.path for r in self.linear_rows if r.group == g) for g in range(n))

    def row(self, linear: str) -> BlockLinear:
        for r in self.linear_rows:
            if r.path == linear or linear.endswith("." + r.path):
                return r
        raise KeyError(f"{linear} is not a linear layer of this block map")

    def shard_kind(self, linear: str) -> str:
        return self.row(linear).shard

    def linear_shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every linear of one block, keyed by block-relative path; ``dims``
        gives each width of ``DIMS``."""
        return {r.path: (dims[r.out_dim], dims[r.in_dim]) for r in self.linear_rows}

    def norm_shapes(self, dims: Mapping[str, int]) -> dict[str, int]:
        """The width of every norm of one block, keyed by block-relative path."""
        widths = dict(self.norm_dims)
        return {n: dims[widths.get(n, "hidden")] for n in self.norms}

    def biased(self, flags: Mapping[str, bool]) -> tuple[str, ...]:
        """The block linears that carry a bias under the config's bias ``flags`` (e.g. ``attention_bias``)."""
        return tuple(r.path for r in self.linear_rows
                     if r.bias_flag == ALWAYS or (r.bias_flag and flags.get(r.bias_flag)))

    def block_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}."

    def _block_rest(self, tensor_name: str) -> str | None:
        prefix = self.layers_path + "."
        if not tensor_name.startswith(prefix):
            return None
        rest = tensor_name[len(prefix):].split(".", 1)
        if len(rest) != 2 or not rest[0].isdigit():
            return None
        return rest[1]

    def block_linear_of(self, tensor_name: str) -> str | None:
        """The block-relative linear path a tensor name belongs to, e.g. ``self_attn.q_proj``; else None."""
        rest = self._block_rest(tensor_name)
        if rest is None:
            return None
        return next((lin for lin in self.linears if rest.startswith(lin + ".")), None)

    def is_norm(self, tensor_name: str) -> bool:
        rest = self._block_rest(tensor_name)
        if rest is not None:
            return any(rest.startswith(n + ".") for n in self.norms)
        return tensor_name.startswith(self.final_norm_path + ".")


LLAMA = BlockMap(
    layers_path="model.layers",
    linear_rows=(
        BlockLinear("self_attn.q_proj", 0, COLUMN, "q", "hidden", "attention_bias"),
        BlockLinear("self_attn.k_proj", 0, COLUMN, "kv", "hidden", "attention_bias"),
        BlockLinear("self_attn.v_proj", 0, COLUMN, "kv", "hidden", "attention_bias"),
        BlockLinear("self_attn.o_proj", 1, ROW, "hidden", "q", "attention_bias"),
        BlockLinear("mlp.gate_proj", 2, COLUMN, "intermediate", "hidden", "mlp_bias"),
        BlockLinear("mlp.up_proj", 2, COLUMN, "intermediate", "hidden", "mlp_bias"),
        BlockLinear("mlp.down_proj", 3, ROW, "hidden", "intermediate", "mlp_bias"),
    ),
    norms=("input_layernorm", "post_attention_layernorm"),
    embed_path="model.embed_tokens",
    head_path="lm_head",
    final_norm_path="model.norm",
)

# Qwen2 / Qwen2.5: the LLaMA block with biases on q, k and v, always, and none elsewhere (transformers'
# Qwen2Attention)
QWEN2 = replace(LLAMA, linear_rows=tuple(
    replace(r, bias_flag=ALWAYS if r.path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") else "")
    for r in LLAMA.linear_rows))

_QK_HEAD_NORMS = (("self_attn.q_norm", "head"), ("self_attn.k_norm", "head"))  # RMSNorm over each head

# Qwen3: LLaMA's linears (bias on q/k/v/o with attention_bias) and an RMSNorm over each head of q and k
QWEN3 = replace(LLAMA, norms=("input_layernorm", "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm"),
                norm_dims=_QK_HEAD_NORMS)

# OLMo-2: norms after attention and MLP only (no pre-norms), q and k normed over their whole projection width
OLMO2 = replace(LLAMA, norms=("self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm",
                              "post_feedforward_layernorm"),
                norm_dims=(("self_attn.q_norm", "q"), ("self_attn.k_norm", "kv")))

# Gemma 2: norms before and after both attention and MLP (GeGLU MLP, same linear names; the scaled tied embedding
# and soft-capping live in transformers' forward); Gemma 3 adds per-head q/k norms
GEMMA2 = replace(LLAMA, norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                               "post_feedforward_layernorm"))
GEMMA3 = replace(GEMMA2, norms=("input_layernorm", "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm",
                                "pre_feedforward_layernorm", "post_feedforward_layernorm"), norm_dims=_QK_HEAD_NORMS)

# Phi-3: fused projections, quantized as the fused tensors the checkpoint stores (groups run along the input
# width, so no group straddles q/k/v or gate/up: those are split along the output rows)
PHI3 = replace(LLAMA, linear_rows=(
    BlockLinear("self_attn.qkv_proj", 0, COLUMN, "qkv", "hidden"),
    BlockLinear("self_attn.o_proj", 1, ROW, "hidden", "q"),
    BlockLinear("mlp.gate_up_proj", 2, COLUMN, "gate_up", "hidden"),
    BlockLinear("mlp.down_proj", 3, ROW, "hidden", "intermediate"),
))


@dataclass(frozen=True)
class Architecture:
    """A decoder family: its ``model_type``, the HF class names its checkpoints declare, its block map, and the
    config flags (with their defaults) that put biases on block linears."""

    model_type: str
    hf_architectures: tuple[str, ...]
    block_map: BlockMap
    bias_flags: tuple[tuple[str, bool], ...] = ()
    gguf_arch: str = ""  # llama.cpp's architecture name ("": no GGUF export; names, keys: formats/gguf/names.py)


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a for a in (
        Architecture("llama", ("LlamaForCausalLM",), LLAMA, (("attention_bias", False), ("mlp_bias", False)),
                     gguf_arch="llama"),
        Architecture("qwen2", ("Qwen2ForCausalLM",), QWEN2, gguf_arch="qwen2"),
        # no bias flags; sliding windows: transformers' masks; GGUF: llama.cpp's llama (as convert_hf_to_gguf.py)
        Architecture("mistral", ("MistralForCausalLM",), LLAMA, gguf_arch="llama"),
        Architecture("qwen3", ("Qwen3ForCausalLM",), QWEN3, (("attention_bias", False),), gguf_arch="qwen3"),
        Architecture("olmo2", ("Olmo2ForCausalLM",), OLMO2, (("attention_bias", False),), gguf_arch="olmo2"),
        Architecture("gemma2", ("Gemma2ForCausalLM",), GEMMA2, (("attention_bias", False),), gguf_arch="gemma2"),
        Architecture("gemma3_text", ("Gemma3ForCausalLM",), GEMMA3, (("attention_bias", False),),
                     gguf_arch="gemma3"),
        Architecture("granite", ("GraniteForCausalLM",), LLAMA, (("attention_bias", False), ("mlp_bias", False)),
                     gguf_arch="granite"),
        Architecture("phi3", ("Phi3ForCausalLM",), PHI3, gguf_arch="phi3"),
    )
}


def architecture_for(config: Mapping, where: str = "model") -> Architecture:
    """The architecture of an HF ``config.json`` (by ``model_type``, else by its declared class); one line naming
    the supported ones otherwise."""
    arch = ARCHITECTURES.get(config.get("model_type") or "")
    if arch is not None:
        return arch
    declared = set(config.get("architectures") or [])
    for a in ARCHITECTURES.values():
        if declared & set(a.hf_architectures):
            return a
    what = config.get("model_type") or (sorted(declared) or ["(none)"])[0]
    supported = ", ".join(f"{t} ({'/'.join(a.hf_architectures)})" for t, a in ARCHITECTURES.items())
    raise QuantlmError(f"{where}: model_type {what!r} is not supported; quantlm handles {supported}")


def block_map_of(model) -> BlockMap:
    """The block map of a loaded transformers model, from its config."""
    config = getattr(model, "config", None)
    return architecture_for(config.to_dict() if config is not None else {}, type(model).__name__).block_map
