"""The bad-input matrix (issue 12): every case runs the CLI in-process and must exit 2 with one line on stderr
that names the problem, before any heavy compute, leaving the working directory's tree exactly as it was.

"Heavy compute" is guarded, not timed: loading model weights (``PreTrainedModel.from_pretrained``) and building
a model to train (``quantlm.train.run.build_model``) raise ``ReachedHeavyCompute`` here, so a case whose check
comes too late fails loudly. Cases whose check needs a call in a file another engineer owns are marked
``xfail(strict=True)`` with the call in the reason: they flip to passing (and strict makes the xfail mark fail)
once the call is wired in.

Every case runs in its own workspace (the working directory): a copy of a tiny LLaMA checkpoint ``m/`` with its
tokenizer, a small calibration text ``calib.txt``, and whatever the case sets up.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from checkpoint_edits import copy_model
from safetensors.torch import load_file, save_file

from quantlm.cli import main
from quantlm.outputs import hostname
from quantlm.paths import recipes_dir


class ReachedHeavyCompute(BaseException):
    """Raised where the real work would start: the bad input should have been refused before."""


# ------------------------------------------------------------------------------------------ helpers

def tree(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root`` (hidden ones too) with its type, size, mode and mtime."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        kind = "l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) else "f"
        out[str(p.relative_to(root))] = (kind, st.st_size if kind == "f" else 0, st.st_mode, st.st_mtime_ns
                                         if kind == "f" else 0)
    return out


def assert_tree_unchanged(root: Path, before: dict) -> None:
    after = tree(root)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    assert not (added or removed or changed), f"tree changed: added {added}, removed {removed}, changed {changed}"


def assert_one_line_error(rc: int, err: str, command: str, match: str) -> None:
    import re

    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit code {rc}, stderr: {err}"
    assert len(lines) == 1, f"stderr is not one line: {err}"
    assert lines[0].startswith(f"quantlm {command}: error: "), lines[0]
    assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"


def edit_model(ws: Path, name: str, edit: Callable[[dict], None] | None = None,
               config_edit: Callable[[dict], None] | None = None) -> Path:
    """A copy of ``ws/m`` as ``ws/name`` with its tensors and/or config.json edited."""
    return copy_model(ws / "m", ws / name, edit, config_edit=config_edit)


def _set(name: str, fn):
    def edit(t):
        t[name] = fn(t[name])
    return edit


def _poke(name: str, value: float, dtype=torch.float32):
    def fn(w):
        w = w.to(dtype).clone()
        w.view(-1)[5] = value
        return w
    return _set(name, fn)


def _truncate(ws: Path, name: str) -> Path:
    d = edit_model(ws, name)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    return d


def _corrupt_header(ws: Path, name: str) -> Path:
    d = edit_model(ws, name)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    return d


def _sharded(ws: Path, name: str, *, drop_shard: bool = False, mismatch: bool = False,
             bad_index: bool = False) -> Path:
    d = edit_model(ws, name)
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({n: tensors[n] for n in names[:half]}, d / files[0], metadata={"format": "pt"})
    save_file({n: tensors[n] for n in names[half:]}, d / files[1], metadata={"format": "pt"})
    wmap = {n: files[0] if i < half else files[1] for i, n in enumerate(names)}
    if mismatch:
        wmap[names[0]] = files[1]
    (d / "model.safetensors.index.json").write_text("{broken" if bad_index else json.dumps({"weight_map": wmap}))
    if drop_shard:
        (d / files[1]).unlink()
    return d


def _small_vocab(ws: Path, name: str) -> Path:
    """A model embedding 256 rows beside the 512-token tokenizer of ``m``."""
    return edit_model(ws, name, lambda t: t.update({k: t[k][:256].clone() for k in ("model.embed_tokens.weight",
                                                                                   "lm_head.weight")}),
                      lambda c: c.update(vocab_size=256))


def _write(ws: Path, name: str, data: bytes | str) -> Path:
    p = ws / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


BINARY = bytes(range(256)) * 40
LATIN1 = ("Emma Woodhouse, handsome, clever, and rich.\n" * 50 + "caf\xe9 au lait\n").encode("latin-1")


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def no_heavy_compute(monkeypatch):
    from transformers import modeling_utils

    import quantlm.train.run as train_run

    def refuse(*args, **kwargs):
        raise ReachedHeavyCompute("model weights were about to be loaded")

    monkeypatch.setattr(modeling_utils.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(train_run, "build_model", refuse)


@pytest.fixture(scope="module")
def corpus_small(corpus_text) -> str:
    return corpus_text[:20_000]


@pytest.fixture
def ws(tmp_path, monkeypatch, tiny_model_dir, tiny_tokenizer_dir, corpus_small, tmp_path_factory) -> Path:
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    (tmp_path / "calib.txt").write_text(corpus_small, encoding="utf-8")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(corpus_small, encoding="utf-8")
    cache = tmp_path_factory.mktemp("cache")  # the token cache lives outside the workspace
    (tmp_path / "r.yaml").write_text(
        "kind: train\nmodel: floatlm-micro\n"
        "model_overrides: {hidden_size: 64, intermediate_size: 128, num_attention_heads: 4, num_hidden_layers: 2,"
        " vocab_size: 512, max_position_embeddings: 64}\n"
        f"corpus: [corpus]\ntokenizer: {tmp_path / 'tok'}\ncache_dir: {cache}\nseq_len: 32\nbatch_tokens: 256\n"
        "micro_batch: 4\nsteps: 4\nwarmup_steps: 1\nthreads: 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTLM_CACHE", str(cache))
    return tmp_path


# ----------------------------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    id: str
    command: str
    args: tuple[str, ...]  # after the command; "{ws}" and "{recipes}" are filled in
    match: str  # regex the one stderr line must contain
    setup: Callable[[Path, pytest.MonkeyPatch], None] | None = None
    needs: str = ""  # the integration call this case waits for (xfail until then)
    when: Callable[[], bool] = field(default=lambda: True)  # run only where this holds


def Q(id, *args, match, setup=None, needs="", calib=True, **kw):  # noqa: N802 - a case constructor
    base = ("--nsamples", "2", "--seqlen", "16", "--group-size", "4", "--no-progress")
    extra = ("--calib", "calib.txt") if calib else ()
    model, rest = args[0], args[1:]  # the case's flags come last, so they win over the fast defaults
    return Case(f"quantize-{id}", "quantize", (model, *base, *extra, *rest), match, setup, needs, **kw)


def S(id, *args, match, setup=None, needs="", **kw):  # noqa: N802
    return Case(f"size-{id}", "size", args, match, setup, needs, **kw)


def T(id, *args, match, setup=None, needs="", **kw):  # noqa: N802
    return Case(f"train-{id}", "train", args, match, setup, needs, **kw)


def E(id, *args, match, setup=None, needs="", **kw):  # noqa: N802
    return Case(f"eval-{id}", "eval", (*args, "--no-record") if "--results" not in args else args, match, setup,
                needs, **kw)


def P(id, *args, match, setup=None, needs="", **kw):  # noqa: N802
    return Case(f"plot-{id}", "plot", args, match, setup, needs, **kw)


def SU(id, *args, match, setup=None, needs="", **kw):  # noqa: N802
    return Case(f"suite-{id}", "suite", args, match, setup, needs, **kw)


QUANTIZE_CHECK = "quantize: validate.check_model(model_dir, export_dtype=..., seqlen=recipe.seqlen) before loading"
OUT_CHECK = "quantize: outputs.check_output(out_dir, overwrite, protect=[model_dir], need_bytes=...) in validate_request"
DEVICE_CHECK = "validate.check_device(device) before loading"
TEXT_CHECK = "validate.read_text / iter_lines in the text readers (calibration.load_documents, eval.datasets._read_text)"
SIZE_CHECK = "size: validate.check_checkpoint(model_dir) in accounting.budget_from_checkpoint"
EVAL_CHECK = "eval: validate.check_model(model_dir, seqlen=window) in eval.run._preflight"
RESULTS_CHECK = "outputs.check_dir_writable(results_dir) in eval.run._preflight / plot before computing"
SUITE_PREFLIGHT = "suite: check every given checkpoint (validate.check_checkpoint) and the output root " \
                  "(outputs.check_dir_writable) before the first job"
RECORDS_CHECK = "eval.records.load_records: a corrupt record is named (warning; an error when no record is left)"


def _model(name, edit=None, config_edit=None):
    return lambda ws, mp: edit_model(ws, name, edit, config_edit)


def _file(name, data):
    return lambda ws, mp: _write(ws, name, data)


def _foreign_dir(name):
    def setup(ws, mp):
        (ws / name).mkdir(parents=True, exist_ok=True)
        (ws / name / "thesis.tex").write_text("years of work")
    return setup


def _home(ws, mp):
    (ws / "home" / "me").mkdir(parents=True)
    (ws / "home" / "me" / "notes.txt").write_text("mine")
    mp.setenv("HOME", str(ws / "home" / "me"))


def _in_sub(ws, mp):
    (ws / "sub").mkdir()
    mp.chdir(ws / "sub")


def _readonly(ws, mp):
    import quantlm.outputs as outputs

    (ws / "ro").mkdir()
    real = os.access
    mp.setattr(outputs.os, "access", lambda p, mode, **kw: False if Path(p).resolve() == (ws / "ro").resolve()
               else real(p, mode, **kw))


def _full_disk(ws, mp):
    import collections

    import quantlm.outputs as outputs

    usage = collections.namedtuple("usage", "total used free")
    mp.setattr(outputs.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 0))


def _lock_held(directory):
    def setup(ws, mp):
        from quantlm.locks import lock_path

        lock_path(ws / directory).write_text(json.dumps({"pid": 1, "host": hostname(), "started": "earlier",
                                                         "command": "quantlm suite"}))
    return setup


def _fake_run(recipe_text=None):
    """A run folder ``run/`` with a recipe and one (never loaded) checkpoint."""
    def setup(ws, mp):
        from quantlm import recipes
        from quantlm.train.recipe import TrainRecipe

        (ws / "run" / "checkpoints" / "step-0000001").mkdir(parents=True)
        (ws / "run" / "checkpoints" / "step-0000001" / "state.pt").write_bytes(b"0")
        (ws / "run" / "checkpoints" / "latest").write_text("step-0000001\n")
        r = recipes.load(ws / "r.yaml", expect=TrainRecipe)
        if recipe_text:
            r = recipes.override(r, recipe_text)
        recipes.dump(r, ws / "run" / "recipe.yaml")
    return setup


def _manifest(name="s.yaml", **fields):
    def setup(ws, mp):
        import yaml

        body = {"kind": "suite", "name": "t", "output": "out",
                "models": [{"name": "floatlm-a", "family": "floatlm", "path": "m"}], "bits": [4],
                "quant": {"gptq": {"group_size": 4}, "calibration": {"nsamples": 2, "seqlen": 16, "data": "calib.txt"}},
                "seeds": [0],
                "group_size": {4: 4},
                "eval": {"ppl": ["wikitext2"], "ppl_limit_windows": 1, "window": 16}}
        body.update(fields)
        (ws / name).write_text(yaml.safe_dump(body))
    return setup


def _both(*setups):
    def setup(ws, mp):
        for s in setups:
            s(ws, mp)
    return setup


def _record(ws, mp):
    (ws / "rec").mkdir()
    (ws / "rec" / "a.json").write_text(json.dumps({
        "schema": "quantlm.eval/1", "id": "a", "created": "2024-01-01T00:00:00", "model": "x", "family": "floatlm", "bits": 16,
        "params": 1000, "sizes": {"paper": 16000, "exact": 16000, "entropy": 16000},
        "metrics": {"wikitext2": {"ppl": 10.0, "nll": 2.3, "tokens": 100, "window": 16}}}))


no_cuda = lambda: not torch.cuda.is_available()  # noqa: E731

CASES = [
    # -------------------------------------------------------------------------------------- quantize
    Q("missing-model", "nope", "--out", "q", match="nope: no config.json found"),
    Q("model-is-a-file", "calib.txt", "--out", "q", match="calib.txt: config.json is not valid JSON"),
    Q("empty-model-dir", "empty", "--out", "q", match="no config.json found",
      setup=lambda ws, mp: (ws / "empty").mkdir()),
    Q("config-not-json", "bad", "--out", "q", match="config.json is not valid JSON",
      setup=lambda ws, mp: (edit_model(ws, "bad") / "config.json").write_text("{oops")),
    Q("config-not-llama", "bad", "--out", "q", match="is not supported; quantlm handles llama",
      setup=_model("bad", config_edit=lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]))),
    Q("config-lacks-hidden-size", "bad", "--out", "q", match="lacks 'hidden_size'",
      setup=_model("bad", config_edit=lambda c: c.pop("hidden_size")), needs=QUANTIZE_CHECK),
    Q("no-weights", "bad", "--out", "q", match=r"no \*?\.?safetensors|no weights",
      setup=lambda ws, mp: (edit_model(ws, "bad") / "model.safetensors").unlink()),
    Q("no-tokenizer", "bad", "--out", "q", match="no tokenizer found",
      setup=lambda ws, mp: [(p.unlink()) for p in edit_model(ws, "bad").glob("tok*")]),
    Q("bits-9", "m", "--bits", "9", "--out", "q", match="bits"),
    Q("bits-1", "m", "--bits", "1", "--out", "q", match="bits"),
    Q("group-size-not-dividing", "m", "--out", "q", "--group-size", "7", match="does not divide"),
    Q("group-size-zero", "m", "--out", "q", "--group-size", "0", match="group"),
    Q("format-unknown", "m", "--out", "q", "--format", "onnx", match="onnx"),
    Q("format-empty", "m", "--out", "q", "--format", ",", match="no export format given"),
    Q("format-twice", "m", "--out", "q", "--format", "unpacked,unpacked", match="listed twice"),
    Q("format-cannot-hold-bits", "m", "--out", "q", "--format", "gptq", "--bits", "6", match="6"),
    Q("damp-negative", "m", "--out", "q", "--damp", "-1", match="damp"),
    Q("nsamples-zero", "m", "--out", "q", "--nsamples", "0", match="nsamples"),
    Q("seqlen-zero", "m", "--out", "q", "--seqlen", "0", match="seqlen"),
    Q("seqlen-beyond-context", "m", "--out", "q", "--seqlen", "4096", match="exceeds the model's context",
      needs=QUANTIZE_CHECK),
    Q("recipe-missing", "m", "--out", "q", "--recipe", "nope.yaml", match="does not exist"),
    Q("recipe-not-yaml", "m", "--out", "q", "--recipe", "bad.yaml", match="not valid YAML",
      setup=_file("bad.yaml", "kind: quant\nbits: [4\n")),
    Q("recipe-wrong-kind", "m", "--out", "q", "--recipe", "r.yaml", match="train recipe, but a quant recipe"),
    Q("recipe-unknown-key", "m", "--out", "q", "--recipe", "bad.yaml", match="bitz",
      setup=_file("bad.yaml", "kind: quant\nbitz: 4\n")),
    Q("calib-missing", "m", "--out", "q", "--calib", "nope.txt", match="does not exist", calib=False),
    Q("calib-binary", "m", "--out", "q", "--calib", "bin.txt", match="bin.txt is binary", calib=False,
      setup=_file("bin.txt", BINARY), needs=TEXT_CHECK),
    Q("calib-latin1", "m", "--out", "q", "--calib", "latin.txt", match="latin.txt is not UTF-8", calib=False,
      setup=_file("latin.txt", LATIN1), needs=TEXT_CHECK),
    Q("calib-jsonl-bad-line", "m", "--out", "q", "--calib", "c.jsonl", match="not valid JSON", calib=False,
      setup=_file("c.jsonl", '{"text": "a"}\n{oops\n')),
    Q("calib-jsonl-no-text", "m", "--out", "q", "--calib", "c.jsonl", match="'text'", calib=False,
      setup=_file("c.jsonl", '{"body": "a"}\n')),
    Q("calib-unknown-type", "m", "--out", "q", "--calib", "c.csv", match="unknown file type",
      calib=False, setup=_file("c.csv", "a,b\n")),
    Q("calib-dir-not-dataset", "m", "--out", "q", "--calib", "corpus", match="datasets", calib=False),
    Q("calib-empty", "m", "--out", "q", "--calib", "e.txt", match="e.txt", calib=False, setup=_file("e.txt", "")),
    Q("out-exists", "m", "--out", "q", match="already exists; choose another --out or pass --overwrite",
      setup=lambda ws, mp: (ws / "q").mkdir()),
    Q("out-is-the-model", "m", "--out", "m", "--overwrite", match="is the input|is the model directory"),
    Q("out-is-the-models-parent", "m", "--out", ".", "--overwrite", match="contains the input|working directory",
      needs=OUT_CHECK),
    Q("out-is-an-ancestor-of-the-model", "deep/er/m", "--out", "deep", "--overwrite", match="contains the input",
      setup=lambda ws, mp: shutil.copytree(ws / "m", ws / "deep" / "er" / "m"), needs=OUT_CHECK),
    Q("out-is-the-cwd", "../m", "--out", ".", "--overwrite", "--calib", "../calib.txt",
      match="is the working directory", calib=False, setup=_in_sub, needs=OUT_CHECK),
    Q("out-is-an-ancestor-of-the-cwd", "../m", "--out", "..", "--overwrite", "--calib", "../calib.txt",
      match="ancestor of the working directory|contains the input", calib=False, setup=_in_sub, needs=OUT_CHECK),
    Q("out-is-home", "m", "--out", "home/me", "--overwrite", match="is a home directory", setup=_home,
      needs=OUT_CHECK),
    Q("out-is-a-foreign-dir", "m", "--out", "thesis", "--overwrite", match="is not a quantlm output",
      setup=_foreign_dir("thesis"), needs=OUT_CHECK),
    Q("out-is-a-file-overwrite", "m", "--out", "calib.txt", "--overwrite", match="is not a directory",
      needs=OUT_CHECK),
    Q("out-read-only", "m", "--out", "ro/q", match="is not writable", setup=_readonly, needs=OUT_CHECK),
    Q("out-full-disk", "m", "--out", "q", match="GB free", setup=_full_disk, needs=OUT_CHECK),
    Q("out-inside-install", "m", "--out", str(recipes_dir() / "q"), match="inside quantlm's installed package",
      needs=OUT_CHECK),
    Q("device-tpu", "m", "--out", "q", "--device", "tpu", match="tpu", needs=DEVICE_CHECK),
    Q("device-cuda-absent", "m", "--out", "q", "--device", "cuda", match="no CUDA GPU", when=no_cuda),
    Q("device-cuda-index", "m", "--out", "q", "--device", "cuda:7", match="CUDA", when=no_cuda),
    Q("tensor-missing", "bad", "--out", "q", match="model.layers.1.mlp.down_proj.weight is missing",
      setup=_model("bad", lambda t: t.pop("model.layers.1.mlp.down_proj.weight")), needs=QUANTIZE_CHECK),
    Q("tensor-name-mangled", "bad", "--out", "q", match="a mangled name",
      setup=_model("bad", lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.wieght",
                                                  t.pop("model.layers.0.self_attn.q_proj.weight"))),
      needs=QUANTIZE_CHECK),
    Q("tensor-unexpected", "bad", "--out", "q", match="unexpected tensor model.layers.2",
      setup=_model("bad", lambda t: t.__setitem__("model.layers.2.mlp.up_proj.weight", torch.zeros(4, 4))),
      needs=QUANTIZE_CHECK),
    Q("tensor-wrong-shape", "bad", "--out", "q", match=r"model.norm.weight has shape \[63\]",
      setup=_model("bad", _set("model.norm.weight", lambda w: w[:63].clone())), needs=QUANTIZE_CHECK),
    Q("tensor-nan-embedding", "bad", "--out", "q", match=r"embed_tokens.weight holds NaN or Inf values \(1 NaN",
      setup=_model("bad", _poke("model.embed_tokens.weight", float("nan"))), needs=QUANTIZE_CHECK),
    Q("tensor-inf-norm", "bad", "--out", "q", match=r"model.norm.weight holds NaN or Inf values \(0 NaN, 1 Inf",
      setup=_model("bad", _poke("model.norm.weight", float("inf"))), needs=QUANTIZE_CHECK),
    Q("tensor-beyond-fp16", "bad", "--out", "q", match="beyond float16's range",
      setup=_model("bad", _poke("lm_head.weight", 1e5, torch.bfloat16)), needs=QUANTIZE_CHECK),
    Q("shard-truncated", "bad", "--out", "q", match="truncated",
      setup=lambda ws, mp: _truncate(ws, "bad"), needs=QUANTIZE_CHECK),
    Q("shard-corrupt-header", "bad", "--out", "q", match="corrupt|not valid JSON",
      setup=lambda ws, mp: _corrupt_header(ws, "bad"), needs=QUANTIZE_CHECK),
    Q("shard-missing", "bad", "--out", "q", match="model-00002-of-00002.safetensors .*missing",
      setup=lambda ws, mp: _sharded(ws, "bad", drop_shard=True), needs=QUANTIZE_CHECK),
    Q("shard-index-mismatch", "bad", "--out", "q", match="do not match",
      setup=lambda ws, mp: _sharded(ws, "bad", mismatch=True), needs=QUANTIZE_CHECK),
    Q("tokenizer-larger-than-vocab", "bad", "--out", "q", match="the tokenizer has 512 tokens but the model embeds",
      setup=lambda ws, mp: _small_vocab(ws, "bad"), needs=QUANTIZE_CHECK),

    # ------------------------------------------------------------------------------------------- size
    S("unknown-preset", "floatlm-7b", match="floatlm-7b"),
    S("missing-path", "./nope", match="nope"),
    S("bits-9", "floatlm-99m", "--bits", "9", match="bits=9 is outside 2..8"),
    S("empty-dir", "empty", match="no config.json", setup=lambda ws, mp: (ws / "empty").mkdir()),
    S("config-not-json", "bad", match="not valid JSON",
      setup=lambda ws, mp: (edit_model(ws, "bad") / "config.json").write_text("{oops")),
    S("config-not-llama", "bad", match="is not supported; quantlm handles llama",
      setup=_model("bad", config_edit=lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]))),
    S("bits-with-group-not-dividing", "floatlm-99m", "--bits", "4", "--group-size", "7", match="7"),
    S("shard-truncated", "bad", match="truncated", setup=lambda ws, mp: _truncate(ws, "bad")),
    S("shard-corrupt-header", "bad", match="corrupt|not valid JSON", setup=lambda ws, mp: _corrupt_header(ws, "bad")),
    S("shard-missing", "bad", match="model-00002-of-00002.safetensors.*(not found|missing)",
      setup=lambda ws, mp: _sharded(ws, "bad", drop_shard=True)),
    S("shard-index-not-json", "bad", match="not a valid safetensors index",
      setup=lambda ws, mp: _sharded(ws, "bad", bad_index=True)),
    S("shard-index-mismatch", "bad", match="do not match", setup=lambda ws, mp: _sharded(ws, "bad", mismatch=True),
      needs=SIZE_CHECK),
    S("tensor-missing", "bad", match="is missing",
      setup=_model("bad", lambda t: t.pop("model.layers.1.mlp.down_proj.weight")), needs=SIZE_CHECK),
    S("tensor-name-mangled", "bad", match="a mangled name",
      setup=_model("bad", lambda t: t.__setitem__("model.norm.wieght", t.pop("model.norm.weight"))),
      needs=SIZE_CHECK),
    S("tensor-wrong-shape", "bad", match=r"has shape \[63\]",
      setup=_model("bad", _set("model.norm.weight", lambda w: w[:63].clone())), needs=SIZE_CHECK),
    S("out-is-a-directory", "floatlm-99m", "--out", "m", match="is a directory; name a file"),
    S("out-below-a-file", "floatlm-99m", "--out", "calib.txt/x.txt", match="is a file"),
    S("out-inside-install", "floatlm-99m", "--out", str(recipes_dir() / "x.txt"),
      match="inside quantlm's installed package"),

    # ------------------------------------------------------------------------------------------ train
    T("no-recipe", match="give a train recipe"),
    T("recipe-missing", "nope.yaml", match="does not exist"),
    T("recipe-not-yaml", "bad.yaml", match="not valid YAML", setup=_file("bad.yaml", "kind: train\nsteps: [1\n")),
    T("recipe-wrong-kind", str(recipes_dir() / "quantlm-4bit.yaml"), match="quant recipe, but a train recipe"),
    T("override-unknown-key", "r.yaml", "--stepz", "3", match="stepz"),
    T("override-no-value", "r.yaml", "--steps", match="--steps: expected one argument"),
    T("lr-nan", "r.yaml", "--lr", "[.nan]", match="learning rates must be positive finite"),
    T("lr-negative", "r.yaml", "--lr", "[-0.001]", match="learning rates must be positive finite"),
    T("lr-zero", "r.yaml", "--lr", "[0.0]", match="learning rates must be positive finite"),
    T("weight-decay-negative", "r.yaml", "--weight_decay", "-0.1", match="weight_decay=-0.1 must be"),
    T("weight-decay-nan", "r.yaml", "--weight_decay", ".nan", match="weight_decay=nan must be"),
    T("grad-clip-negative", "r.yaml", "--grad_clip", "-1.0", match="grad_clip=-1.0 must be .*0 disables clipping"),
    T("no-steps", "r.yaml", "--steps", "0", match="set total_tokens or steps"),
    T("batch-not-multiple", "r.yaml", "--batch_tokens", "100", match="not a multiple"),
    T("seq-len-beyond-context", "r.yaml", "--seq_len", "128", "--batch_tokens", "512",
      match="exceeds the model context"),
    T("unknown-preset", "r.yaml", "--model", "floatlm-7b", match="floatlm-7b"),
    T("untrainable-family", "r.yaml", "--family", "quantlm", match="cannot be trained"),
    T("micro-batch-zero", "r.yaml", "--micro_batch", "0", match="micro_batch must be positive"),
    T("heldout-too-large", "r.yaml", "--heldout_fraction", "0.9", match="heldout_fraction"),
    T("betas-one-value", "r.yaml", "--betas", "[0.9]", match="betas"),
    T("threads-negative", "r.yaml", "--threads", "-1", match="threads must be >= 0"),
    T("warmup-negative", "r.yaml", "--warmup_steps", "-1", match="warmup_steps must be >= 0"),
    T("min-lr-ratio", "r.yaml", "--min_lr_ratio", "2", match="min_lr_ratio"),
    T("save-dtype", "r.yaml", "--save_dtype", "int8", match="int8"),
    T("overrides-bad-key", "r.yaml", "--model_overrides", "{hiden_size: 8}", match="hiden_size"),
    T("corpus-missing", "r.yaml", "--corpus", "[nope]", match="corpus path 'nope' does not exist"),
    T("corpus-binary", "r.yaml", "--corpus", "[bin.txt]", match="bin.txt is binary",
      setup=_file("bin.txt", BINARY)),
    T("corpus-latin1", "r.yaml", "--corpus", "[latin.txt]", match="latin.txt is not UTF-8",
      setup=_file("latin.txt", LATIN1)),
    T("corpus-jsonl-bad-line", "r.yaml", "--corpus", "[c.jsonl]", match=r"c.jsonl:2: not valid JSON",
      setup=_file("c.jsonl", '{"text": "a"}\n{oops\n')),
    T("corpus-unsupported", "r.yaml", "--corpus", "[c.csv]", match="unsupported type", setup=_file("c.csv", "a\n")),
    T("corpus-too-small", "r.yaml", "--corpus", "[tiny.txt]", match="fewer than one batch|shorter than one",
      setup=_file("tiny.txt", "A few words only.\n")),
    T("tokenizer-missing", "r.yaml", "--tokenizer", "nope", match="nope"),
    T("out-foreign-dir", "r.yaml", "--out", "thesis", match="is not empty and holds no training run",
      setup=_foreign_dir("thesis")),
    T("out-holds-a-run", "r.yaml", "--out", "run", match="already holds a training run; pass --resume",
      setup=_fake_run()),
    T("resume-other-recipe", "r.yaml", "--out", "run", "--resume", match="different recipe .*seed",
      setup=_fake_run({"seed": "7"})),
    T("out-locked", "r.yaml", "--out", "run", match="in use by another quantlm train run .*pid 1",
      setup=_lock_held("run")),
    T("out-inside-install", "r.yaml", "--out", str(recipes_dir() / "run"),
      match="inside quantlm's installed package"),

    # ------------------------------------------------------------------------------------------- eval
    E("missing-model", "nope", match="does not exist"),
    E("not-a-causal-lm", "bad", match="not a causal LM",
      setup=_model("bad", config_edit=lambda c: c.update(architectures=["BertModel"]))),
    E("no-tokenizer", "bad", "--ppl", "calib.txt", match="no tokenizer found",
      setup=lambda ws, mp: [(p.unlink()) for p in edit_model(ws, "bad").glob("tok*")]),
    E("ppl-unknown", "m", "--ppl", "wikitext3", match="wikitext3"),
    E("ppl-empty-file", "m", "--ppl", "e.txt", match="is empty", setup=_file("e.txt", "")),
    E("ppl-binary", "m", "--ppl", "bin.txt", match="bin.txt is binary", setup=_file("bin.txt", BINARY),
      needs=TEXT_CHECK),
    E("ppl-latin1", "m", "--ppl", "latin.txt", match="latin.txt is not UTF-8", setup=_file("latin.txt", LATIN1),
      needs=TEXT_CHECK),
    E("tasks-unknown", "m", "--tasks", "arc_medium", match="arc_medium"),
    E("limit-zero", "m", "--ppl", "calib.txt", "--limit", "0", match="limit"),
    E("window-one", "m", "--ppl", "calib.txt", "--window", "1", match="window"),
    E("window-beyond-context", "m", "--ppl", "calib.txt", "--window", "4096", match="longer than the model context"),
    E("nothing-to-do", "m", "--ppl", "none", match="neither perplexity corpora nor tasks"),
    E("device-tpu", "m", "--ppl", "calib.txt", "--device", "tpu", match="tpu", needs=DEVICE_CHECK),
    E("device-cuda-absent", "m", "--ppl", "calib.txt", "--device", "cuda", match="CUDA", needs=DEVICE_CHECK,
      when=no_cuda),
    E("tensor-missing", "bad", "--ppl", "calib.txt", match="is missing",
      setup=_model("bad", lambda t: t.pop("model.layers.1.mlp.down_proj.weight")), needs=EVAL_CHECK),
    E("tensor-nan", "bad", "--ppl", "calib.txt", match="holds NaN or Inf",
      setup=_model("bad", _poke("model.layers.0.mlp.up_proj.weight", float("nan"))), needs=EVAL_CHECK),
    E("shard-truncated", "bad", "--ppl", "calib.txt", match="truncated",
      setup=lambda ws, mp: _truncate(ws, "bad"), needs=EVAL_CHECK),
    E("shard-missing", "bad", "--ppl", "calib.txt", match="missing",
      setup=lambda ws, mp: _sharded(ws, "bad", drop_shard=True), needs=EVAL_CHECK),
    E("tokenizer-larger-than-vocab", "bad", "--ppl", "calib.txt", match="the tokenizer has 512 tokens",
      setup=lambda ws, mp: _small_vocab(ws, "bad"), needs=EVAL_CHECK),
    E("results-is-a-file", "m", "--ppl", "calib.txt", "--results", "calib.txt", match="is a file",
      needs=RESULTS_CHECK),
    E("results-read-only", "m", "--ppl", "calib.txt", "--results", "ro", match="not writable", setup=_readonly,
      needs=RESULTS_CHECK),
    E("results-inside-install", "m", "--ppl", "calib.txt", "--results", str(recipes_dir() / "rec"),
      match="inside quantlm's installed package", needs=RESULTS_CHECK),

    # ------------------------------------------------------------------------------------------- plot
    P("results-missing", "--results", "nope", match="results directory nope does not exist"),
    P("results-empty", "--results", "empty", match="no result records", setup=lambda ws, mp: (ws / "empty").mkdir()),
    P("only-a-corrupt-record", "--results", "rec", match=r"rec/bad.json",
      setup=lambda ws, mp: _write(ws, "rec/bad.json", "{trunc"), needs=RECORDS_CHECK),
    P("metric-unknown", "--results", "rec", "--metric", "wikitext9.ppl", "--out", "plots", match="wikitext9.ppl",
      setup=_record),
    P("out-is-a-file", "--results", "rec", "--out", "calib.txt", match="is a file", setup=_record),
    P("out-inside-install", "--results", "rec", "--out", str(recipes_dir() / "plots"),
      match="inside quantlm's installed package", setup=_record),

    # ------------------------------------------------------------------------------------------ suite
    SU("manifest-missing", "nope.yaml", match="does not exist"),
    SU("manifest-not-yaml", "bad.yaml", match="not valid YAML", setup=_file("bad.yaml", "kind: suite\nname: [\n")),
    SU("manifest-wrong-kind", "r.yaml", match="train recipe, but a suite recipe"),
    SU("no-models", "s.yaml", "--dry-run", match="no models", setup=_manifest(models=[])),
    SU("duplicate-models", "s.yaml", "--dry-run", match="unique",
       setup=_manifest(models=[{"name": "a", "family": "floatlm", "path": "m"}] * 2)),
    SU("bits-9", "s.yaml", "--dry-run", match="bits=9 is outside", setup=_manifest(bits=[9])),
    SU("unknown-key", "s.yaml", "--dry-run", match="modles", setup=_manifest(modles=[])),
    SU("family-unknown", "s.yaml", "--dry-run", match="quantlm|family",
       setup=_manifest(models=[{"name": "a", "family": "quantlm", "path": "m"}])),
    SU("train-recipe-missing", "s.yaml", "--dry-run", match="nope.yaml does not exist",
       setup=_manifest(models=[{"name": "a", "family": "floatlm", "train": "nope.yaml"}])),
    SU("only-matches-nothing", "s.yaml", "--only", "quantize/zzz*", match="matches no job", setup=_manifest()),
    SU("eval-task-unknown", "s.yaml", "--dry-run", match="arc_medium",
       setup=_manifest(eval={"tasks": ["arc_medium"]})),
    SU("report-without-records", "s.yaml", "--report", match="no result records", setup=_manifest()),
    SU("checkpoint-missing", "s.yaml", match="nope",
       setup=_manifest(models=[{"name": "floatlm-a", "family": "floatlm", "path": "nope"}]), needs=SUITE_PREFLIGHT),
    SU("checkpoint-truncated", "s.yaml", match="truncated",
       setup=_both(_manifest(models=[{"name": "floatlm-a", "family": "floatlm", "path": "bad"}]),
                   lambda ws, mp: _truncate(ws, "bad")), needs=SUITE_PREFLIGHT),
    SU("output-full-disk", "s.yaml", match="GB free", setup=_both(_manifest(), _full_disk), needs=SUITE_PREFLIGHT),
    SU("output-inside-install", "s.yaml", match="inside quantlm's installed package",
       setup=_manifest(output=str(recipes_dir() / "out")), needs=SUITE_PREFLIGHT),
]


def _params():
    out = []
    for c in CASES:
        marks = []  # every case is wired in (the integration calls named by `needs` are in place)
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case, ws: Path, capsys, monkeypatch):
    if not case.when():
        pytest.skip("not applicable on this machine")
    if case.setup is not None:
        case.setup(ws, monkeypatch)
    before = tree(ws)
    capsys.readouterr()
    try:
        rc = main([case.command, *case.args])
    except SystemExit as e:  # argparse
        rc = e.code
    _, err = capsys.readouterr()
    assert_one_line_error(rc, err, case.command, case.match)
    assert_tree_unchanged(ws, before)


def test_the_matrix_is_large_and_covers_every_command():
    commands = {c.command for c in CASES}
    assert commands == {"quantize", "size", "train", "eval", "plot", "suite"}
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)
