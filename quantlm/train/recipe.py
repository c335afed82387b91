"""The training recipe: one frozen dataclass (YAML kind ``train``) for FloatLMs and TriLMs alike."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from quantlm.errors import QuantlmError
from quantlm.recipes import doc
from quantlm.specs import ModelSpec, get_preset

TRAINABLE_FAMILIES = ("floatlm", "trilm")


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class TrainRecipe:
    """Train a FloatLM or a TriLM from a preset (DESIGN section 7); every run is reproducible from its seed."""

    model: str = doc("model preset, e.g. trilm-tiny or floatlm-99m (run `quantlm size --list`)", "floatlm-tiny")
    model_overrides: dict[str, Any] = doc("ModelSpec fields to change on the preset, e.g. {num_hidden_layers: 2}",
                                          default_factory=dict)
    family: str = doc("floatlm or trilm; empty: the preset's family", "")
    corpus: tuple[str, ...] = doc("training text: files or folders of .txt/.jsonl/.json/.parquet, or a `datasets` "
                                  "save_to_disk folder; relative paths resolve against the working directory, then the "
                                  "data shipped with quantlm (data/corpus)",
                                  ("data/corpus",))
    text_field: str = doc("column holding the text in jsonl/parquet/datasets inputs", "text")
    tokenizer: str = doc("HF tokenizer folder; empty: train a byte-level BPE on the corpus (cached)", "")
    tokenizer_vocab: int = doc("vocabulary of the BPE trained when `tokenizer` is empty", 4096)
    cache_dir: str = doc("where tokenizers and token files are cached; empty: $QUANTLM_CACHE, else .cache "
                         "in the working directory", "")
    heldout_fraction: float = doc("last fraction of the corpus tokens held out for validation", 0.05)
    seq_len: int = doc("tokens per training sequence", 128)
    batch_tokens: int = doc("tokens per optimizer step, over all processes (a multiple of seq_len)", 4096)
    micro_batch: int = doc("sequences per forward pass on each process (gradient accumulation fills the rest)", 8)
    total_tokens: int = doc("training tokens; 0: use `steps`", 0)
    steps: int = doc("optimizer steps; used when total_tokens is 0", 100)
    warmup_steps: int = doc("linear warm-up steps", 10)
    lr: tuple[float, ...] = doc("peak LR (FloatLM: one value; TriLM: first half, second half); empty: the preset's",
                                ())
    min_lr_ratio: float = doc("final LR as a fraction of the peak (cosine for FloatLM, linear for TriLM)", 0.1)
    weight_decay: float = doc("AdamW weight decay (TriLM: removed at 2/3 of training)", 0.1)
    betas: tuple[float, ...] = doc("AdamW betas (two values)", (0.9, 0.95))
    grad_clip: float = doc("clip the global gradient norm to this; 0 disables", 1.0)
    seed: int = doc("seed of the initialisation and of the data order", 0)
    precision: Literal["auto", "fp32", "bf16"] = doc("auto: bf16 autocast on GPU, fp32 on CPU", "auto")
    log_interval: int = doc("steps between metric records", 1)
    eval_interval: int = doc("steps between validation losses; 0: only at the end", 0)
    eval_tokens: int = doc("held-out tokens per validation (0: all)", 16384)
    checkpoint_interval: int = doc("steps between resumable checkpoints; 0: only at the end", 50)
    keep_checkpoints: int = doc("resumable checkpoints kept (the newest)", 2)
    hf_interval: int = doc("steps between intermediate HF checkpoints under hf/; 0: none", 0)
    save_dtype: Literal["float16", "bfloat16", "float32"] = doc("dtype of the HF checkpoints", "float16")
    distributed: Literal["ddp", "fsdp"] = doc("strategy under torchrun: ddp, or fsdp for models that do not fit",
                                              "ddp")
    threads: int = doc("CPU threads for torch; 0: torch's default", 0)

    def __post_init__(self):
        positive = ("seq_len", "batch_tokens", "micro_batch", "log_interval", "tokenizer_vocab", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise QuantlmError(f"train recipe: {name} must be positive, got {getattr(self, name)}")
        for name in ("total_tokens", "steps", "warmup_steps", "eval_interval", "checkpoint_interval",
                     "hf_interval", "eval_tokens", "threads"):
            if getattr(self, name) < 0:
                raise QuantlmError(f"train recipe: {name} must be >= 0, got {getattr(self, name)}")
        if self.batch_tokens % self.seq_len:
            raise QuantlmError(f"train recipe: batch_tokens={self.batch_tokens} is not a multiple of "
                               f"seq_len={self.seq_len}; use a multiple so every step sees whole sequences")
        if self.total_tokens == 0 and self.steps == 0:
            raise QuantlmError("train recipe: set total_tokens or steps to a positive number")
        if not 0 < self.heldout_fraction < 0.5:
            raise QuantlmError(f"train recipe: heldout_fraction={self.heldout_fraction} must be in (0, 0.5)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise QuantlmError(f"train recipe: min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.family and self.family not in TRAINABLE_FAMILIES:
            raise QuantlmError(f"train recipe: family {self.family!r} cannot be trained; use floatlm or trilm "
                               "(QuantLMs come from `quantlm quantize`)")
        if not self.corpus:
            raise QuantlmError("train recipe: corpus is empty; list at least one file or folder")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise QuantlmError(f"train recipe: betas={self.betas} must be two numbers in [0, 1)")
        if any(not _finite(v) or v <= 0 for v in self.lr):
            raise QuantlmError(f"train recipe: learning rates must be positive finite numbers, got {list(self.lr)}; "
                               "e.g. lr: [0.0004]")
        for name, what in (("weight_decay", "0 disables it"), ("grad_clip", "0 disables clipping")):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise QuantlmError(f"train recipe: {name}={value} must be a finite number >= 0 ({what})")
        spec = self.spec()  # validates the preset, the overrides and the shapes
        need = 2 if spec.family == "trilm" else 1
        if self.lr and len(self.lr) not in (1, need):
            raise QuantlmError(f"train recipe: lr has {len(self.lr)} values; {spec.family} takes {need}")
        if self.seq_len > spec.max_position_embeddings:
            raise QuantlmError(f"train recipe: seq_len={self.seq_len} exceeds the model context "
                               f"{spec.max_position_embeddings}; shorten seq_len")

    def schedule_warnings(self) -> list[str]:
        """Settings that are legal but probably not meant (logged as warnings when a run starts)."""
        out = []
        total = self.total_steps()
        if self.warmup_steps >= total:
            out.append(f"warmup_steps={self.warmup_steps} is not shorter than the run ({total} steps): the learning "
                       "rate never reaches its peak and never decays; lower warmup_steps")
        return out

    # -- derived values, computed in one place
    def spec(self) -> ModelSpec:
        """The model to train: the preset, its overrides, and the family."""
        spec = get_preset(self.model)
        if self.family and self.family != spec.family:
            spec = spec.with_family(self.family)
        if spec.family not in TRAINABLE_FAMILIES:
            raise QuantlmError(f"train recipe: preset {self.model!r} is a {spec.family}; train a floatlm-* or "
                               "trilm-* preset (QuantLMs come from `quantlm quantize`)")
        if self.model_overrides:
            names = {f.name for f in dataclasses.fields(ModelSpec)}
            bad = [k for k in self.model_overrides if k not in names or k in ("family", "name")]
            if bad:
                raise QuantlmError(f"train recipe: model_overrides key {bad[0]!r} is not a changeable ModelSpec "
                                   f"field; use e.g. hidden_size, num_hidden_layers, vocab_size")
            try:
                spec = dataclasses.replace(spec, **self.model_overrides)
            except TypeError as e:
                raise QuantlmError(f"train recipe: bad model_overrides ({e})") from None
        return spec

    @property
    def family_name(self) -> str:
        return self.spec().family

    def peak_lrs(self) -> tuple[float, float]:
        """(first-half, second-half) peak LR; equal for a FloatLM."""
        lrs = self.lr or self.spec().peak_lr
        if not lrs:
            raise QuantlmError("train recipe: no learning rate; set lr")
        return (lrs[0], lrs[-1]) if self.spec().family == "trilm" else (lrs[0], lrs[0])

    @property
    def sequences_per_step(self) -> int:
        return self.batch_tokens // self.seq_len

    def total_steps(self) -> int:
        if self.total_tokens:
            return max(1, self.total_tokens // self.batch_tokens)
        return self.steps
