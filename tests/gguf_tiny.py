"""A tiny LLaMA for the GGUF tests: saved HF directory, its tensors, and quantized / ternary versions of them.

Widths are multiples of 256 (hidden 256, FFN 512, head_dim 64, 4 q heads and 2 kv heads) so every GGUF type
fits, K and TQ types included. Shared by tests/test_gguf.py and tests/test_llamacpp.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from quantlm.gptq.solver import rtn_quantize
from quantlm.quantized import COLUMN, ROW, QuantizedLinear, TernaryWeight

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def save_tiny_llama(out: Path, tokenizer_dir: Path, *, tied: bool = False, seed: int = 0, layers: int = 2,
                    vocab_size: int = 512, **config_overrides) -> Path:
    """``config_overrides``: other LlamaConfig fields (``attention_bias``, ``head_dim``, ``hidden_size``, ...)."""
    from transformers import LlamaConfig

    fields = dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied, initializer_range=0.08,
                  architectures=["LlamaForCausalLM"])
    return save_random_model(out, tokenizer_dir, LlamaConfig(**{**fields, **config_overrides}), seed=seed)


def save_random_model(out: Path, tokenizer_dir: Path, config, *, seed: int = 0, norms: bool = True) -> Path:
    """A random causal LM of any transformers ``config`` (seeded) saved with the tokenizer, with non-zero biases
    and, with ``norms``, norm weights in [0.5, 1.5], so a wrong or dropped tensor shows."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norms and name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def load_tensors(model_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    return config, load_file(str(model_dir / "model.safetensors"))


def is_block_linear(name: str) -> bool:
    return name.startswith("model.layers.") and any(f".{lin}.weight" in name for lin in LINEARS)


def quantize_linears(state: dict, bits: int, group_size: int, sym: bool = True) -> dict:
    """Every block linear replaced by its round-to-nearest QuantizedLinear (fp16 scales, the stored form)."""
    out = {}
    for name, t in state.items():
        if is_block_linear(name):
            r = rtn_quantize(t.float(), bits=bits, group_size=group_size, sym=sym, name=name)
            out[name] = QuantizedLinear(r.q, r.scale, r.zero, bits, group_size, sym).stored(name)
        else:
            out[name] = t
    return out


def ternarize_linears(state: dict, mp: int = 2) -> dict:
    """Every block linear as a TriLM weight: codes round(W / gamma) in {-1, 0, 1}, gamma = mean |W| per shard."""
    out = {}
    for name, t in state.items():
        if not is_block_linear(name):
            out[name] = t
            continue
        kind = ROW if any(f".{r}." in name for r in ROW_PARALLEL) else COLUMN
        dim = 0 if kind == COLUMN else 1
        chunks = t.float().chunk(mp, dim=dim)
        gammas = torch.stack([c.abs().mean() for c in chunks]).to(torch.float16)
        codes = torch.cat([torch.round(c / g.float()).clamp(-1, 1) for c, g in zip(chunks, gammas, strict=True)], dim=dim)
        out[name] = TernaryWeight(codes.to(torch.int8), gammas, kind)
    return out


def dequantized_state(tensors: dict, float_dtype=torch.float16) -> dict[str, torch.Tensor]:
    """The fp32 weights a GGUF export holds: quantized linears dequantized, float tensors rounded to fp16
    (norms kept fp32, as GGUF stores them)."""
    out = {}
    for name, w in tensors.items():
        if isinstance(w, (QuantizedLinear, TernaryWeight)):
            out[name] = w.dequantize(torch.float32)
        elif name.endswith("norm.weight"):
            out[name] = w.float()
        else:
            out[name] = w.to(float_dtype).float()
    return out


def hf_model(model_dir: Path, state: dict[str, torch.Tensor]):
    """The transformers model of ``model_dir`` with ``state`` loaded, fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(model_dir)
    model = LlamaForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def train_sentencepiece_dir(out: Path, text: str, vocab_size: int = 512) -> Path:
    """A LLaMA-style SentencePiece BPE (byte fallback, identity normalization, <unk>/<s>/</s> = 0/1/2) trained
    with the sentencepiece library and converted by transformers into a tokenizer directory (adds <s>)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(out / "train.txt"), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    (out / "train.txt").unlink()
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    AutoTokenizer.from_pretrained(out).save_pretrained(out)  # writes the converted tokenizer.json
    return out


def metaspace_bpe_dir(out: Path, text: str, vocab_size: int = 512) -> Path:
    """A SentencePiece-style BPE built with `tokenizers` alone: <unk>/<s>/</s>, the 256 <0xXX> byte pieces,
    Metaspace (prepend first, no split), byte fallback, and a post-processor adding <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False)
    trained.train_from_iterator([text], trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    learned = sorted((i, t) for t, i in model["vocab"].items() if t not in specials)
    vocab = {t: i for i, t in enumerate(specials + byte_pieces + [t for _, t in learned])}
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)
    return out
