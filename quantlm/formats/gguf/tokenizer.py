"""The tokenizer's vocabulary as GGUF metadata, in a form llama.cpp reproduces exactly (or a clear refusal)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from quantlm.errors import QuantlmError

_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")
_SPACE = "\u2581"  # SentencePiece's visible space
# the files a tokenizer is built from (fast tokenizer, SentencePiece model, GPT-2 style vocabulary)
TOKENIZER_SOURCES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _spm_prefix(tj: dict) -> bool | None:
    """For a SentencePiece-style tokenizer.json: whether it adds the dummy space prefix (None: not that style).

    Two HF forms: a Metaspace pre-tokenizer (transformers 5's conversion of a tokenizer.model) or the older
    normalizer Sequence[Prepend("\u2581"), Replace(" ", "\u2581")] with no pre-tokenizer.
    """
    pre, norm = tj.get("pre_tokenizer") or {}, tj.get("normalizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("replacement", _SPACE) == _SPACE and not norm:
        if pre.get("split", True):
            raise QuantlmError("a Metaspace pre-tokenizer with split=True cuts words apart before BPE, which "
                               "llama.cpp's SentencePiece tokenizer does not; tokens would differ")
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        return scheme in ("first", "always")
    if not pre and norm.get("type") == "Sequence":
        steps = [(n.get("type"), n.get("prepend"), (n.get("pattern") or {}).get("String"), n.get("content"))
                 for n in norm.get("normalizers", [])]
        replace = ("Replace", None, " ", _SPACE)
        if steps == [replace]:
            return False
        if steps == [("Prepend", _SPACE, None, None), replace]:
            return True
    return None


def tokenizer_metadata(tokenizer_dir: str | os.PathLike, vocab_size: int) -> dict:
    """GGUF tokenizer keys for an HF tokenizer directory, the token list padded to ``vocab_size``.

    Two kinds, each in the form llama.cpp reproduces exactly:
    * byte-level BPE (ByteLevel pre-tokenizer with its GPT-2 regex, e.g. GPT-NeoX's and quantlm's own):
      ``tokenizer.ggml.model`` = gpt2, ``pre`` = gpt-2, tokens, merges ("a b");
    * SentencePiece BPE with byte fallback (LLaMA-style; tokenizer.model as transformers converts it, with a
      Metaspace pre-tokenizer, or the older Prepend/Replace normalizer): ``model`` = llama, tokens, scores
      (-rank of the merge that makes each token: llama.cpp merges the best-scored pair, as BPE merges the
      lowest rank), ``add_space_prefix``.
    Both: token_type (1 normal, 2 unknown, 3 control for special added tokens, 4 user-defined for other
    added tokens, 5 unused padding, 6 byte for <0xXX> pieces), the special ids transformers reports, and
    whether it adds bos/eos (found by tokenizing). The tokenizer.json is read from the directory, or
    produced by transformers from tokenizer.model when absent. Other tokenizers: a QuantlmError.
    """
    from transformers import AutoTokenizer

    folder = Path(tokenizer_dir)
    if not any((folder / f).is_file() for f in TOKENIZER_SOURCES):
        raise QuantlmError(f"{folder}: no tokenizer files ({' or '.join(TOKENIZER_SOURCES)}) beside the model; a GGUF "
                           f"file embeds the tokenizer: copy the model's tokenizer files (tokenizer.json, "
                           f"tokenizer_config.json) into {folder}, then run again")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantlmError(f"{folder}: transformers cannot load its tokenizer ({first}); copy the model's complete "
                           "tokenizer files (tokenizer.json, tokenizer_config.json) into it") from None
    path = Path(tokenizer_dir) / "tokenizer.json"
    if path.is_file():
        tj = json.loads(path.read_text(encoding="utf-8"))
    elif getattr(tok, "backend_tokenizer", None) is not None:
        tj = json.loads(tok.backend_tokenizer.to_str())
    else:
        raise QuantlmError(f"{tokenizer_dir}: no tokenizer.json and transformers gives no fast tokenizer for it")
    model = tj.get("model") or {}
    pre = tj.get("pre_tokenizer") or {}
    byte_level = pre.get("type") == "ByteLevel"
    spm_prefix = None if byte_level else _spm_prefix(tj)
    if model.get("type") != "BPE" or not (byte_level or spm_prefix is not None):
        raise QuantlmError(f"{path}: GGUF export takes byte-level BPE or SentencePiece-style BPE tokenizers; this "
                           f"one has model {model.get('type')!r}, pre_tokenizer {pre.get('type')!r} and normalizer "
                           f"{(tj.get('normalizer') or {}).get('type')!r}")
    if byte_level:
        if not pre.get("use_regex", True) or pre.get("add_prefix_space"):
            raise QuantlmError(f"{path}: ByteLevel without its GPT-2 regex or with add_prefix_space=True has no "
                               "llama.cpp gpt2 equivalent; tokens would differ")
        if tj.get("normalizer") is not None:
            raise QuantlmError(f"{path}: a normalizer ({tj['normalizer'].get('type')}) has no llama.cpp gpt2 "
                               "equivalent; tokens would differ")
    elif not model.get("byte_fallback"):
        raise QuantlmError(f"{path}: a SentencePiece-style BPE without byte_fallback maps unknown characters to "
                           "<unk>, which llama.cpp does differently; tokens would differ")

    tokens: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types = {i: 1 for i in tokens}
    for added in tj.get("added_tokens", []):
        tokens[int(added["id"])] = added["content"]
        types[int(added["id"])] = 3 if added.get("special") else 4
    if model.get("unk_token") in model["vocab"]:
        types[int(model["vocab"][model["unk_token"]])] = 2
    n = max(tokens) + 1 if tokens else 0
    if n > vocab_size:
        raise QuantlmError(f"{path}: the tokenizer has {n} tokens, more than the model's vocab_size {vocab_size}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    type_list = [types.get(i, 5) for i in range(vocab_size)]
    if byte_level:
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": token_list,
                "tokenizer.ggml.token_type": type_list, "tokenizer.ggml.merges": merges}
    else:
        rank: dict[str, int] = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", "", 1), r)
        type_list = [6 if _BYTE_PIECE.match(t) and ty != 5 else ty for t, ty in zip(token_list, type_list, strict=True)]
        meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                "tokenizer.ggml.tokens": token_list,
                # a piece no merge makes (single characters, bytes, specials) is never a merge result in
                # transformers: the lowest score keeps llama.cpp from preferring it
                "tokenizer.ggml.scores": [-float(rank[t]) if t in rank else -1e9 for t in token_list],
                "tokenizer.ggml.token_type": type_list, "tokenizer.ggml.add_space_prefix": bool(spm_prefix)}
    for key, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unknown", tok.unk_token_id),
                     ("padding", tok.pad_token_id)):
        if tid is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(tid)
    plain = tok("a b", add_special_tokens=False)["input_ids"]
    full = tok("a b")["input_ids"]
    meta["tokenizer.ggml.add_bos_token"] = bool(len(full) > len(plain) and full[0] == tok.bos_token_id)
    meta["tokenizer.ggml.add_eos_token"] = bool(len(full) > len(plain) and full[-1] == tok.eos_token_id)
    return meta
