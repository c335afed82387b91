"""The LLaMA decoder block as data: which linears share an input, in which order they run, how they shard.

The GPTQ pipeline, the TriLM converter and the bit accounting all read this table, so no code needs an
``if model_type == ...`` branch. Another architecture is another ``BlockMap`` value.
"""

from __future__ import annotations

from dataclasses import dataclass

COLUMN = "column"  # output dimension split across model-parallel ranks (q, k, v, gate, up)
ROW = "row"  # input dimension split across model-parallel ranks (o, down)


@dataclass(frozen=True)
class BlockMap:
    """Where the decoder blocks live and what is inside one.

    ``sequential`` lists groups of linear layers (paths relative to a block) in execution order; the
    linears of one group read the same input, so GPTQ builds one Hessian per group and quantizes the
    groups one after another (true-sequential).
    """

    layers_path: str
    sequential: tuple[tuple[str, ...], ...]
    parallel: tuple[tuple[str, str], ...]  # (linear path, COLUMN | ROW)
    embed_path: str
    head_path: str
    final_norm_path: str

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)

    def shard_kind(self, linear: str) -> str:
        for name, kind in self.parallel:
            if name == linear or linear.endswith("." + name):
                return kind
        raise KeyError(f"{linear} is not a linear layer of this block map")

    def block_linear_of(self, tensor_name: str) -> str | None:
        """The block-relative linear path a tensor name belongs to, e.g. ``self_attn.q_proj``; else None."""
        prefix = self.layers_path + "."
        if not tensor_name.startswith(prefix):
            return None
        rest = tensor_name[len(prefix) :].split(".", 1)
        if len(rest) != 2 or not rest[0].isdigit():
            return None
        for linear in self.linears:
            if rest[1].startswith(linear + "."):
                return linear
        return None


LLAMA = BlockMap(
    layers_path="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    parallel=(
        ("self_attn.q_proj", COLUMN),
        ("self_attn.k_proj", COLUMN),
        ("self_attn.v_proj", COLUMN),
        ("self_attn.o_proj", ROW),
        ("mlp.gate_proj", COLUMN),
        ("mlp.up_proj", COLUMN),
        ("mlp.down_proj", ROW),
    ),
    embed_path="model.embed_tokens",
    head_path="lm_head",
    final_norm_path="model.norm",
)

# HF ``architectures`` / ``model_type`` values whose checkpoints follow the LLAMA map.
LLAMA_LIKE_MODEL_TYPES = frozenset({"llama"})
LLAMA_LIKE_ARCHITECTURES = frozenset({"LlamaForCausalLM"})
