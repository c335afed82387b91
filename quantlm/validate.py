"""Input checks that run before any compute: the one checkpoint reader of every command, text files, devices.

Checkpoint (``check_model``, or its parts):
1. ``check_checkpoint``: config.json and the safetensors headers only (no tensor data; milliseconds for any
   size). Every tensor the LLaMA architecture expects, by name derived from the config
   (``expected_tensors``), is present with the right shape and a floating dtype; none is unexpected; every
   shard the index names exists, is complete and holds what the index says; no tensor is in two files.
   Packed checkpoints (a ``quantization_config``, or a ``ternary.json``) store their block linears in their
   own layout: those tensors are left to the format's reader.
2. ``check_tokenizer_fits``: the tokenizer's ids fit the model's embedding rows.
3. ``check_seqlen``: a calibration/evaluation length within the model's context.
4. ``check_data``: streams every tensor once (one tensor in memory at a time) for NaN/Inf, and for values beyond
   float16's range when the export is float16.

Text inputs are checked by the one text reader, ``quantlm.textdocs``. ``check_device``: a device string against
the devices present.
"""

from __future__ import annotations

import difflib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from quantlm.dtypes import FLOAT_ST
from quantlm.errors import QuantlmError
from quantlm.formats.registry import layout_of_config
from quantlm.hf_checkpoint import (
    block_map_for,
    read_config,
    read_safetensors_header,
    read_weight_map,
    safetensors_files,
)
from quantlm.specs import spec_from_config
from quantlm.textdocs import read_text_file

FP16_MAX = 65504.0
# Tensors transformers ignores when loading a LLaMA (old checkpoints saved the rotary buffers).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_CHUNK = 1 << 24  # elements per reduction in the data check (64 MB of fp32 temporaries)


# --------------------------------------------------------------------------------------- architecture

def _int(config: dict, key: str, where: str) -> int:
    try:
        value = int(config[key])
    except KeyError:
        raise QuantlmError(f"{where}: config.json lacks {key!r}; is this a complete LLaMA config?") from None
    except (TypeError, ValueError):
        raise QuantlmError(f"{where}: config.json {key}={config[key]!r} is not an integer") from None
    if value <= 0:
        raise QuantlmError(f"{where}: config.json {key}={value} must be positive")
    return value


def expected_tensors(config: dict, where: str = "model") -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint with this config stores (HF names, from its ModelSpec)."""

    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        _int(config, key, where)
    return dict(spec_from_config(config, where).tensor_shapes())


def is_packed(model_dir: Path, config: dict) -> bool:
    """Block linears stored in a packed layout (GPTQ, compressed-tensors, packed ternary), per the registry."""
    return layout_of_config(config).format != "unpacked"


# ---------------------------------------------------------------------------------------- checkpoint

@dataclass(frozen=True)
class CheckpointInfo:
    """What ``check_checkpoint`` read: the config and every tensor's header entry and file."""

    path: Path
    config: dict
    tensors: dict  # name -> hf_checkpoint.HeaderEntry
    files: dict  # name -> Path of the safetensors file holding it
    packed: bool
    problems: tuple[str, ...] = field(default=())  # non-fatal notes (e.g. ignored buffers)

    @property
    def vocab_rows(self) -> int:
        return int(self.tensors["model.embed_tokens.weight"].shape[0])

    @property
    def max_positions(self) -> int | None:
        v = self.config.get("max_position_embeddings")
        return int(v) if v else None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)


def _one_line(where: Path, problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    return f"{where}: {problems[0]}{more}"


def _shard_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files (hf_checkpoint.safetensors_files) and the index's weight map, if the checkpoint is
    sharded; every shard the index names must exist."""
    weight_map = read_weight_map(model_dir)
    if weight_map is not None:
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise QuantlmError(f"{model_dir}: shard {missing[0]} named by model.safetensors.index.json is missing"
                               + (f" ({len(missing)} shards missing)" if len(missing) > 1 else "")
                               + "; re-download or re-export the checkpoint")
    return safetensors_files(model_dir, weight_map), weight_map


def check_checkpoint(model_dir: str | os.PathLike, config: dict | None = None,
                     headers: dict | None = None) -> CheckpointInfo:
    """Headers-only check of a LLaMA checkpoint directory (see the module docstring); returns what it read.

    ``headers``: ``{file: [HeaderEntry, ...]}`` a caller already read with ``hf_checkpoint.read_safetensors_header``
    (so ``quantlm size`` reads every header once); without it the headers are read here.
    """
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise QuantlmError(f"{model_dir}: no such directory; pass a Hugging Face checkpoint directory")
    if config is None:
        config = read_config(model_dir)
    block_map = block_map_for(config, str(model_dir))
    expected = expected_tensors(config, str(model_dir))
    packed = is_packed(model_dir, config)

    def format_owned(name: str) -> bool:  # a packed format stores a block linear's weight as its own tensors
        return packed and block_map.block_linear_of(name) is not None and not name.endswith(".bias")

    files, weight_map = _shard_files(model_dir)
    if headers is not None:
        files = [Path(f) for f in headers]
    tensors, where = {}, {}
    problems: list[str] = []
    for f in files:
        entries = headers[f] if headers is not None else read_safetensors_header(f)[0]
        for e in entries:
            if e.name in tensors:
                problems.append(f"tensor {e.name} is stored twice ({where[e.name].name} and {f.name}); remove the "
                                "stray file")
            tensors[e.name], where[e.name] = e, f
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors or where[name].name != Path(fname).name:
                problems.append(f"the index puts tensor {name} in {fname}, which does not hold it; the index and the "
                                "shards do not match: re-download or re-export the checkpoint")
                break
    missing = [n for n in expected if n not in tensors and not format_owned(n)]
    unexpected = [n for n in tensors if n not in expected and not n.endswith(IGNORED_SUFFIXES)
                  and not format_owned(n)
                  and not (n == "lm_head.weight" and config.get("tie_word_embeddings"))]
    for n in missing:
        close = difflib.get_close_matches(n, unexpected, n=1, cutoff=0.8)
        hint = f" (the file has {close[0]!r}: a mangled name?)" if close else ""
        problems.append(f"tensor {n} is missing{hint}; transformers would initialise it at random: re-export the "
                        "checkpoint with every weight")
    for n in unexpected:
        problems.append(f"unexpected tensor {n} (shape {list(tensors[n].shape)}) that the config's LLaMA "
                        "architecture does not have; fix the checkpoint or its config.json")
    for n, shape in expected.items():
        e = tensors.get(n)
        if e is None:
            continue
        if tuple(e.shape) != shape:
            problems.append(f"tensor {n} has shape {list(e.shape)}, the config implies {list(shape)}; the weights "
                            "and config.json do not match")
        elif e.dtype not in FLOAT_ST:
            problems.append(f"tensor {n} is stored as {e.dtype}; a LLaMA weight is a float tensor (F32, F16, BF16)")
    if (config.get("tie_word_embeddings") and "lm_head.weight" in tensors
            and tuple(tensors["lm_head.weight"].shape) != expected["model.embed_tokens.weight"]):
        problems.append(f"tensor lm_head.weight has shape {list(tensors['lm_head.weight'].shape)}, the config implies "
                        f"{list(expected['model.embed_tokens.weight'])}")
    if problems:
        raise QuantlmError(_one_line(model_dir, problems))
    return CheckpointInfo(model_dir, config, tensors, where, packed)


# ------------------------------------------------------------------------------------------- data

def check_data(model: str | os.PathLike | CheckpointInfo, export_dtype: str | None = None, *,
               fix: str = "--export-dtype bfloat16") -> dict:
    """Stream every tensor once: NaN/Inf anywhere is an error; with ``export_dtype`` float16, so are values whose
    magnitude exceeds float16's 65504 (they would become inf). ``fix`` is the option the error suggests.
    Returns ``{"tensors", "bytes", "seconds", "absmax"}``."""
    import torch
    from safetensors import safe_open

    info = model if isinstance(model, CheckpointInfo) else check_checkpoint(model)
    fp16 = str(export_dtype).replace("torch.", "") in ("float16", "fp16", "half") if export_dtype else False
    t0 = time.perf_counter()
    by_file: dict[Path, list[str]] = {}
    for name, f in info.files.items():
        by_file.setdefault(f, []).append(name)
    nbytes, absmax = 0, 0.0
    for f, names in by_file.items():
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in names:
                    if info.tensors[name].dtype not in FLOAT_ST:
                        continue
                    t = st.get_tensor(name)
                    nbytes += t.numel() * t.element_size()
                    m = _absmax(t)
                    if not m < float("inf"):  # NaN or Inf
                        flat = t.reshape(-1)
                        nan = int(torch.isnan(flat).sum())
                        inf = int(torch.isinf(flat).sum())
                        raise QuantlmError(f"{info.path}: tensor {name} holds NaN or Inf values ({nan} NaN, {inf} "
                                           f"Inf of {flat.numel()}); the checkpoint is broken (a diverged or "
                                           "corrupted run): fix or re-export it")
                    if fp16 and m > FP16_MAX and t.dtype != torch.float16:
                        raise QuantlmError(f"{info.path}: tensor {name} has values up to {m:.4g}, beyond float16's "
                                           f"range ({FP16_MAX:.0f}), which would become inf in the float16 export; "
                                           f"use {fix} or fix the checkpoint")
                    absmax = max(absmax, m)
                    del t
        except QuantlmError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors' own errors on damaged data, as one line
            raise QuantlmError(f"{f}: cannot read tensor data ({type(e).__name__}: {str(e).splitlines()[0]}); "
                               "the file is corrupt: re-download or re-export it") from None
    return {"tensors": len(info.tensors), "bytes": nbytes, "seconds": time.perf_counter() - t0, "absmax": absmax}


def _absmax(t) -> float:
    """max |t| in float (NaN if any NaN, inf if any inf), reduced in chunks to bound the temporaries."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return 0.0
    m = 0.0
    for i in range(0, flat.numel(), _CHUNK):
        v = float(flat[i:i + _CHUNK].abs().amax())
        if v != v:
            return v
        m = max(m, v)
    return m


# ---------------------------------------------------------------------------------- tokenizer, lengths

def tokenizer_size(model_dir: str | os.PathLike) -> int | None:
    """Largest token id + 1 of the directory's ``tokenizer.json`` (vocabulary plus added tokens); None without
    one (e.g. a sentencepiece-only tokenizer: check ``len(tokenizer)`` with ``check_tokenizer_fits``)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(read_text_file(path, "tokenizer file"))
        vocab = (data.get("model") or {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [int(t["id"]) for t in data.get("added_tokens") or []]
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        raise QuantlmError(f"{path}: not a valid tokenizer.json; copy the model's tokenizer files again") from None
    return max(ids) + 1 if ids else 0


def check_tokenizer_fits(n_tokens: int | None, vocab_rows: int, where: str | os.PathLike = "model") -> None:
    """The tokenizer's ids (``n_tokens`` = largest id + 1, or ``len(tokenizer)``) index the embedding rows."""
    if n_tokens is not None and n_tokens > vocab_rows:
        raise QuantlmError(f"{where}: the tokenizer has {n_tokens} tokens but the model embeds only {vocab_rows}; "
                           "this tokenizer belongs to another model: use the model's own tokenizer files")


def check_seqlen(seqlen: int, config: dict, *, flag: str = "--seqlen", allow_flag: str | None = None,
                 allow: bool = False) -> None:
    """``seqlen`` within the model's context (``max_position_embeddings``), unless ``allow``."""
    if seqlen is None or allow:
        return
    if seqlen <= 0:
        raise QuantlmError(f"{flag} {seqlen} must be positive")
    ctx = config.get("max_position_embeddings")
    if ctx and seqlen > int(ctx):
        extra = f", or pass {allow_flag} to go beyond it on purpose" if allow_flag else ""
        raise QuantlmError(f"{flag} {seqlen} exceeds the model's context (max_position_embeddings {ctx}); "
                           f"use {flag} {ctx} or less{extra}")


def check_model(model_dir: str | os.PathLike, *, config: dict | None = None, export_dtype: str | None = None,
                seqlen: int | None = None, allow_long_seqlen: bool = False, data: bool = True,
                fix: str = "--export-dtype bfloat16", seqlen_flag: str = "--seqlen",
                allow_flag: str | None = None) -> CheckpointInfo:
    """Everything above in order (headers, tokenizer, length, then the data pass); what commands call before
    loading a model."""
    info = check_checkpoint(model_dir, config)
    check_tokenizer_fits(tokenizer_size(model_dir), info.vocab_rows, model_dir)
    if seqlen is not None:
        check_seqlen(seqlen, info.config, flag=seqlen_flag, allow_flag=allow_flag, allow=allow_long_seqlen)
    if data:
        check_data(info, export_dtype, fix=fix)
    return info


# -------------------------------------------------------------------------------------------- devices

def check_device(device: str) -> str:
    """``device`` (cpu, cuda, cuda:N, mps) parsed and checked against the devices present; returns it."""
    import torch

    text = str(device).strip()
    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        raise QuantlmError(f"unknown device {device!r}; use cpu or cuda[:N]") from None
    if d.type == "cpu":
        return text
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise QuantlmError(f"device {device!r} requested but no CUDA GPU is visible; use --device cpu")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise QuantlmError(f"device {device!r}: only {n} CUDA GPU(s) visible (cuda:0..cuda:{n - 1}); pick one "
                               "of them")
        return text
    if d.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise QuantlmError(f"device {device!r} requested but MPS is not available; use --device cpu")
        return text
    raise QuantlmError(f"device {device!r} is not supported by quantlm; use cpu or cuda[:N]")
