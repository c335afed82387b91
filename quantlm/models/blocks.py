"""The LLaMA decoder block as data: one row per linear (path, sequential group, shard direction, shape rule) plus
the norms, and where the blocks, embedding, head and final norm live.

The GPTQ pipeline, the TriLM converter, the specs and the bit accounting all read this table, so no code needs
an ``if model_type == ...`` branch and no module spells the LLaMA tensor names again. Another architecture is
another ``BlockMap`` value.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantlm.quantized import COLUMN, ROW

__all__ = ["COLUMN", "ROW", "BlockLinear", "BlockMap", "LLAMA"]

DIMS = ("hidden", "kv", "intermediate")  # the widths a shape rule names


@dataclass(frozen=True)
class BlockLinear:
    """One linear of a block: its path in the block, the sequential group it is quantized in (linears of one
    group read the same input and share a Hessian), its model-parallel shard kind and its (out, in) widths."""

    path: str
    group: int
    shard: str  # COLUMN | ROW
    out_dim: str  # one of DIMS
    in_dim: str


@dataclass(frozen=True)
class BlockMap:
    """Where the decoder blocks live and what is inside one; checks itself on construction."""

    layers_path: str
    linear_rows: tuple[BlockLinear, ...]
    norms: tuple[str, ...]  # block-relative norm paths, in block order
    embed_path: str
    head_path: str
    final_norm_path: str

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

    def linear_shapes(self, hidden: int, kv: int, intermediate: int) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every linear of one block, keyed by block-relative path."""
        dims = {"hidden": hidden, "kv": kv, "intermediate": intermediate}
        return {r.path: (dims[r.out_dim], dims[r.in_dim]) for r in self.linear_rows}

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
        BlockLinear("self_attn.q_proj", 0, COLUMN, "hidden", "hidden"),
        BlockLinear("self_attn.k_proj", 0, COLUMN, "kv", "hidden"),
        BlockLinear("self_attn.v_proj", 0, COLUMN, "kv", "hidden"),
        BlockLinear("self_attn.o_proj", 1, ROW, "hidden", "hidden"),
        BlockLinear("mlp.gate_proj", 2, COLUMN, "intermediate", "hidden"),
        BlockLinear("mlp.up_proj", 2, COLUMN, "intermediate", "hidden"),
        BlockLinear("mlp.down_proj", 3, ROW, "hidden", "intermediate"),
    ),
    norms=("input_layernorm", "post_attention_layernorm"),
    embed_path="model.embed_tokens",
    head_path="lm_head",
    final_norm_path="model.norm",
)

# HF ``architectures`` / ``model_type`` values whose checkpoints follow the LLAMA map.
LLAMA_LIKE_MODEL_TYPES = frozenset({"llama"})
LLAMA_LIKE_ARCHITECTURES = frozenset({"LlamaForCausalLM"})
