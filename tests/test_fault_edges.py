"""Fault edges (issue "Nothing lost, nothing stale"): readers that distrust headers, file modes that follow the
umask, the promised one-line refusals, and every check before compute.

Each refusal runs the CLI in-process and must exit 2 with one stderr line naming the problem, writing nothing
(the workspace's tree is compared before and after).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
from pathlib import Path

import numpy as np
import pytest

from quantlm.cli import main

# ------------------------------------------------------------------------------------------ helpers


def tree(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root`` (hidden ones too) with its type, size, mode and mtime."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        kind = "l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) else "f"
        out[str(p.relative_to(root))] = (kind, st.st_size if kind == "f" else 0, st.st_mode,
                                         st.st_mtime_ns if kind == "f" else 0)
    return out


def refused(capsys, root: Path, command: str, *args: str, match: str) -> str:
    """Run ``quantlm command args`` in-process: exit 2, one stderr line matching ``match``, ``root`` unchanged."""
    before = tree(root)
    capsys.readouterr()
    try:
        rc = main([command, *args])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, f"exit code {rc}, stdout: {out[-2000:]}, stderr: {err[-2000:]}"
    assert len(lines) == 1, f"stderr is not one line: {err}"
    assert lines[0].startswith(f"quantlm {command}: error: "), lines[0]
    assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"
    after = tree(root)
    assert after == before, (f"tree changed: added {sorted(set(after) - set(before))}, removed "
                             f"{sorted(set(before) - set(after))}")
    return lines[0]


@pytest.fixture
def ws(tmp_path, monkeypatch, tiny_model_dir, corpus_text) -> Path:
    """A workspace (the working directory): a copy of the tiny LLaMA as ``m/`` and a calibration text."""
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "calib.txt").write_text(corpus_text[:20_000], encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------- 1. readers that distrust headers

def _tiny_gguf(path: Path) -> bytes:
    """A small valid GGUF (llama architecture, an array key, two tensors); returns its bytes."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_array("quantlm.test.array", [1, 2, 3])
    w.add_tensor("token_embd.weight", np.ones((8, 32), np.float16))
    w.add_tensor("blk.0.attn_q.weight", np.ones((32, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _after(data: bytes, name: bytes) -> int:
    """Offset just after the length-prefixed string ``name`` in a GGUF header."""
    i = data.index(struct.pack("<Q", len(name)) + name)
    return i + 8 + len(name)


def _patch(data: bytes, at: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def _gguf_cases(good: bytes) -> dict[str, tuple[bytes, str]]:
    q = _after(good, b"blk.0.attn_q.weight")  # n_dims u32, 2 x u64 dims, type u32, offset u64
    arr = _after(good, b"quantlm.test.array")  # value type u32 (9), item type u32, length u64
    key = good.index(b"general.architecture") - 8
    return {
        "tensor-count": (_patch(good, 8, "<Q", 10**12),
                         r"header declares 1,000,000,000,000 tensors but the file has only [\d,]+ bytes; the file is "
                         r"truncated, corrupt or not a GGUF file"),
        "kv-count": (_patch(good, 16, "<Q", 10**12), r"header declares 1,000,000,000,000 metadata keys"),
        "string-length": (_patch(good, key, "<Q", 10**15),
                          r"metadata key 0 declares a length of 1,000,000,000,000,000 bytes but only"),
        "array-length": (_patch(good, arr + 8, "<Q", 10**13),
                         r"'quantlm.test.array' declares 10,000,000,000,000 items but only"),
        "value-type": (_patch(good, arr, "<I", 77), r"'quantlm.test.array' has unknown value type 77"),
        "dims": (_patch(good, q, "<I", 9), r"blk.0.attn_q.weight declares 9 dimensions \(GGUF allows at most 4\)"),
        "tensor-type": (_patch(good, q + 4 + 16, "<I", 99), r"blk.0.attn_q.weight has unknown ggml type 99"),
        "tensor-past-end": (_patch(good, q + 4 + 16 + 4, "<Q", 10**9),
                            r"tensor blk.0.attn_q.weight \(4,096 bytes at byte [\d,]+\) lies past the end of the file"),
        "tensors-overlap": (_patch(good, q + 4 + 16 + 4, "<Q", 0),
                            r"tensors token_embd.weight and blk.0.attn_q.weight overlap"),
        "truncated-mid-payload": (good[:-100], r"blk.0.attn_q.weight .* lies past the end of the file .* truncated"),
        "not-gguf": (b"GGML" + good[4:], r"not a GGUF file \(bad magic\)"),
    }


GGUF_CASES = ["tensor-count", "kv-count", "string-length", "array-length", "value-type", "dims", "tensor-type",
              "tensor-past-end", "tensors-overlap", "truncated-mid-payload", "not-gguf"]


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_header_lies_are_one_line_in_size_and_bench(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = _tiny_gguf(tmp_path / "good.gguf")
    data, match = _gguf_cases(good)[case]
    (tmp_path / "bad.gguf").write_bytes(data)
    line = refused(capsys, tmp_path, "size", "bad.gguf", match=match)
    assert line.startswith("quantlm size: error: bad.gguf: ")
    # bench reads every GGUF header before the first model runs (llama.cpp taken as present: nothing may run)
    import quantlm.deploy as deploy

    def never(*a, **k):
        raise AssertionError("a model ran before every header was checked")

    monkeypatch.setattr(deploy, "check_llama_cpp", lambda python=None: "test")
    monkeypatch.setattr(deploy, "_run_child", never)
    refused(capsys, tmp_path, "bench", "good.gguf", "bad.gguf", match=match)


def test_a_good_gguf_still_sizes_and_its_header_matches_gguf_py(tmp_path, capsys):
    import gguf

    from quantlm.formats.gguf import read_gguf_header

    path = tmp_path / "good.gguf"
    _tiny_gguf(path)
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    assert header["consistent"] and header["header_bytes"] == reader.data_offset
    assert [(t["name"], t["offset"], t["nbytes"]) for t in header["tensors"]] == \
        [(t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    assert header["metadata"]["quantlm.test.array"] == [1, 2, 3]
    assert header["metadata"]["llama.block_count"] == 1
    assert main(["size", str(path)]) == 0


def _safetensors_edit(model: Path, edit=None, *, length=None, tail: bytes = b"") -> None:
    """Rewrite ``model/model.safetensors`` with its header JSON edited (``edit(header)``), its declared header
    length replaced, and/or ``tail`` bytes appended."""
    f = model / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    if edit is not None:
        edit(header)
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data[8 + n:] + tail)


def _tensors(h):
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def _shift(k: int, by: int):
    def edit(h):
        name = _tensors(h)[k]
        a, b = h[name]["data_offsets"]
        h[name]["data_offsets"] = [a + by, b + by]
    return edit


def _onto_first(h):
    name, first = _tensors(h)[-1], _tensors(h)[0]
    a, b = h[name]["data_offsets"]
    h[name]["data_offsets"] = [h[first]["data_offsets"][0], h[first]["data_offsets"][0] + b - a]


def _set(field, value, k=0):
    def edit(h):
        h[_tensors(h)[k]][field] = value
    return edit


ST_CASES = {
    "header-length-beyond-file": (dict(length=10**12),
                                  r"corrupt safetensors header: it declares 1,000,000,000,000 header bytes but the "
                                  r"file has only [\d,]+ bytes"),
    "offsets-past-end": (dict(edit=_shift(-1, 10**6)),
                         r"file is truncated \([\d,]+ bytes\) or its header is corrupt: tensor \S+ spans bytes"),
    "offsets-overlap": (dict(edit=_onto_first), r"tensors \S+ and \S+ overlap"),
    "offsets-negative": (dict(edit=_shift(1, -10**6)), r"has data_offsets \[-[\d]+, -?[\d]+\] \(negative or reversed\)"),
    "offsets-not-integers": (dict(edit=_set("data_offsets", [0.5, 4])), r"corrupt safetensors header entry"),
    "gap-between-tensors": (dict(edit=_shift(-1, 4), tail=b"\0" * 4), r"4 bytes before tensor \S+ belong to no tensor"),
    "bytes-after-last-tensor": (dict(tail=b"\0" * 16), r"16 bytes after the last tensor belong to no tensor"),
    "unknown-dtype": (dict(edit=_set("dtype", "F12")), r"has unknown dtype 'F12' \(quantlm reads F64"),
    "negative-dimension": (dict(edit=_set("shape", [-1, 64])), r"negative dimension in its shape \[-1, 64\]"),
}


@pytest.mark.parametrize("case", [*ST_CASES, "header-not-an-object"])
def test_safetensors_header_lies_are_one_line(case, ws, capsys):
    bad = ws / "bad"
    shutil.copytree(ws / "m", bad)
    if case == "header-not-an-object":
        (bad / "model.safetensors").write_bytes(struct.pack("<Q", 6) + b"[1, 2]")
        match = r"corrupt safetensors header \(a JSON list, not an object\)"
    else:
        kw, match = ST_CASES[case]
        _safetensors_edit(bad, **kw)
    line = refused(capsys, ws, "size", "bad", match=match)
    assert "bad/model.safetensors: " in line


@pytest.mark.parametrize("case", ["offsets-overlap", "unknown-dtype"])
def test_quantize_refuses_a_lying_safetensors_header_before_compute(case, ws, capsys):
    bad = ws / "bad"
    shutil.copytree(ws / "m", bad)
    kw, match = ST_CASES[case]
    _safetensors_edit(bad, **kw)
    refused(capsys, ws, "quantize", "bad", "--out", "q", "--calib", "calib.txt", "--nsamples", "2", "--seqlen",
            "16", "--group-size", "4", "--no-progress", match=match)


# ------------------------------------------------------------------- 2. file modes follow the umask

@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _wrong_modes(root: Path, mask: int, skip: tuple[str, ...] = ()) -> list[str]:
    """Every file and folder under ``root`` (hidden ones too, symlinks aside) whose mode is not 0666 / 0777 less
    ``mask``, as 'path 0600 (want 0644)'."""
    wrong = []
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink() or rel.split("/")[0] in skip:
            continue
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        have = stat.S_IMODE(p.lstat().st_mode)
        if have != want:
            wrong.append(f"{rel} {have:04o} (want {want:04o})")
    return wrong


def test_every_file_quantlm_writes_follows_the_umask(umask, ws, capsys, monkeypatch, corpus_text, tiny_tokenizer_dir):
    inputs = ("m", "calib.txt", "corpus", "r.yaml")
    (ws / "corpus").mkdir()
    (ws / "corpus" / "a.txt").write_text(corpus_text[:20_000], encoding="utf-8")
    monkeypatch.setenv("QUANTLM_CACHE", str(ws / "cache"))
    (ws / "r.yaml").write_text(
        "kind: train\nmodel: floatlm-micro\n"
        "model_overrides: {hidden_size: 64, intermediate_size: 128, num_attention_heads: 4, num_hidden_layers: 2,"
        " vocab_size: 512, max_position_embeddings: 64}\n"
        f"corpus: [corpus]\ntokenizer: {tiny_tokenizer_dir}\ncache_dir: cache\nseq_len: 32\nbatch_tokens: 256\n"
        "micro_batch: 4\nsteps: 2\nwarmup_steps: 1\nthreads: 1\ncheckpoint_interval: 1\nhf_interval: 1\n"
        "eval_tokens: 64\n")
    quick = ("--calib", "calib.txt", "--nsamples", "2", "--seqlen", "16", "--group-size", "4", "--no-progress")
    steps = [
        ["quantize", "m", "--out", "q", "--format", "unpacked,gptq,compressed-tensors", *quick],
        ["export", "q/gptq", "--format", "compressed-tensors", "--out", "x"],
        ["export", "m", "--format", "gguf", "--out", "g"],
        ["size", "m", "--out", "sizes/m.txt"],
        ["eval", "q/gptq", "--ppl", "calib.txt", "--window", "16", "--ppl-limit-windows", "1", "--results", "rec",
         "--no-progress"],
        ["plot", "--results", "rec", "--metric", "calib.ppl", "--out", "plots", "--no-fit"],
        ["train", "r.yaml", "--out", "run"],
    ]
    for argv in steps:
        assert main(argv) == 0, (argv, capsys.readouterr().err[-3000:])
    capsys.readouterr()
    for folder in ("q", "x", "g", "sizes", "rec", "plots", "run", "cache"):
        assert (ws / folder).exists(), folder
    assert any((ws / "q" / "gptq").glob("model.safetensors")) and (ws / "g" / "model.gguf").is_file()
    assert any((ws / "plots").glob("*.png")) and any((ws / "run" / "checkpoints").glob("step-*/state.pt"))
    assert (ws / "run" / "final" / "model.safetensors").is_file()
    assert _wrong_modes(ws, umask, skip=inputs) == []


# ------------------------------------------------- 3. promised one-line refusals, 4. every check before compute

class ReachedHeavyCompute(BaseException):
    """Raised where the real work would start: the bad input should have been refused before."""


@pytest.fixture
def no_compute(monkeypatch):
    """Loading model weights, a block's quantization or a perplexity pass raises ``ReachedHeavyCompute``."""
    from transformers import modeling_utils

    import quantlm.eval.run as eval_run
    import quantlm.quantize as quantize

    def refuse(*args, **kwargs):
        raise ReachedHeavyCompute("the real work was about to start")

    monkeypatch.setattr(modeling_utils.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(quantize, "quantize_blocks", refuse)
    monkeypatch.setattr(eval_run, "load_model", refuse)


QUICK = ("--calib", "calib.txt", "--nsamples", "2", "--seqlen", "16", "--group-size", "4", "--no-progress")


def _without_tokenizer(ws: Path) -> Path:
    d = ws / "notok"
    shutil.copytree(ws / "m", d)
    for p in d.glob("tokenizer*"):
        p.unlink()
    return d


def test_gguf_export_without_a_tokenizer_names_the_files_and_the_fix(ws, capsys, no_compute):
    _without_tokenizer(ws)
    refused(capsys, ws, "export", "notok", "--format", "gguf", "--out", "g",
            match=r"notok: no tokenizer files \(tokenizer.json or tokenizer.model or vocab.json\) beside the model; "
                  r"a GGUF file embeds the tokenizer: copy the model's tokenizer files .* into notok")


def _gguf_given(ws, given: str) -> str:
    """A GGUF export folder ``g/`` in the workspace; the path a user gives: the file or the folder."""
    (ws / "g").mkdir()
    _tiny_gguf(ws / "g" / "model.gguf")
    return "g/model.gguf" if given == "file" else "g"


@pytest.mark.parametrize("given", ["file", "export-dir"])
def test_export_of_a_gguf_says_it_is_already_gguf(given, ws, capsys, no_compute):
    src = _gguf_given(ws, given)
    refused(capsys, ws, "export", src, "--format", "unpacked", "--out", "x",
            match=rf"{src} is already GGUF; quantlm export takes a Hugging Face checkpoint directory \(config.json "
                  r"and safetensors weights: compressed-tensors, gptq, ternary-1.6, ternary-2, unpacked\)")


@pytest.mark.parametrize("given", ["file", "export-dir"])
def test_eval_of_a_gguf_says_eval_takes_a_checkpoint_directory(given, ws, capsys, no_compute):
    src = _gguf_given(ws, given)
    line = refused(capsys, ws, "eval", src, "--ppl", "calib.txt", "--no-record",
                   match=rf"{src} is a GGUF (file|export); quantlm eval takes a Hugging Face checkpoint directory")
    assert "does not exist" not in line and "quantlm export MODEL --format unpacked" in line


@pytest.mark.parametrize("tasks", ["sciq", "piqa,sciq"])
def test_eval_of_an_unavailable_task_is_refused_before_compute(tasks, ws, capsys, no_compute):
    refused(capsys, ws, "eval", "m", "--tasks", tasks, "--no-record",
            match=r"task sciq cannot run: quantlm has no SciQ data \(the test split with its distractors and support "
                  r"passages, not shipped in data/eval\) and no scorer for it; drop sciq from --tasks")


def test_eval_with_tasks_and_no_ppl_runs_no_perplexity(ws, capsys, monkeypatch):
    import quantlm.eval.run as eval_run

    def no_ppl(*a, **k):
        raise AssertionError("a perplexity pass nobody asked for")

    monkeypatch.setattr(eval_run, "perplexity", no_ppl)
    assert main(["eval", "m", "--tasks", "piqa", "--limit", "1", "--no-record", "--format", "json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert set(rec["metrics"]) == {"piqa", "commonsense_avg"}
    assert rec["recipe"]["ppl"] == []
    # a recipe file that lists ppl keeps it; --ppl with --tasks runs both
    (ws / "e.yaml").write_text("kind: eval\nppl: [calib.txt]\nwindow: 16\nppl_limit_windows: 1\n")
    from quantlm.cli import build_parser
    from quantlm.cli.eval import build_recipe

    args = build_parser("eval").parse_args(["eval", "m", "--recipe", "e.yaml", "--tasks", "piqa"])
    assert build_recipe(args).ppl == ("calib.txt",)
    args = build_parser("eval").parse_args(["eval", "m", "--tasks", "piqa", "--ppl", "calib.txt"])
    assert build_recipe(args).ppl == ("calib.txt",)
    args = build_parser("eval").parse_args(["eval", "m"])
    assert build_recipe(args).ppl == ("wikitext2",)  # naming nothing: the default corpus


def test_offload_dir_that_is_a_file_is_refused_before_compute(ws, capsys, no_compute):
    (ws / "afile").write_text("not a folder")
    refused(capsys, ws, "quantize", "m", "--out", "q", *QUICK, "--offload", "disk", "--offload-dir", "afile",
            match=r"--offload-dir afile is a file, not a folder; name a folder for the disk-offloaded hidden states, "
                  r"e.g. --offload-dir afile-offload")


@pytest.mark.parametrize("offload", ["disk", "auto"])
def test_offload_dir_inside_out_is_refused_before_compute_leaving_no_folder(offload, ws, capsys, no_compute):
    refused(capsys, ws, "quantize", "m", "--out", "q", *QUICK, "--offload", offload, "--offload-dir", "q/off",
            match=r"--offload-dir q/off is inside --out q, which appears only once the run is complete; choose a "
                  r"folder outside it, e.g. --offload-dir \S+/q-offload")
    assert not (ws / "q").exists()


def test_read_only_offload_dir_says_so(ws, capsys, no_compute, monkeypatch):
    import quantlm.quantize as quantize

    (ws / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(quantize.os, "access", lambda p, mode, **kw: False if Path(p).resolve() == (ws / "ro").resolve()
                        else real(p, mode, **kw))
    refused(capsys, ws, "quantize", "m", "--out", "q", *QUICK, "--offload", "disk", "--offload-dir", "ro/off",
            match=r"--offload-dir ro/off is not writable \(\S+/ro is read-only for this user\); choose another "
                  r"--offload-dir on a writable disk")


def test_offload_dir_on_a_full_disk_says_what_it_has_and_needs(ws, capsys, no_compute, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    real = shutil.disk_usage
    full = (ws / "full").resolve()
    full.mkdir()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 0) if Path(p).resolve() == full
                        else real(p))
    line = refused(capsys, ws, "quantize", "m", "--out", "q", *QUICK, "--offload", "disk", "--offload-dir", "full/off",
                   match=r"--offload-dir full/off has 0.0 MB free on its disk \(\S+/full\), and the disk-offloaded "
                         r"hidden states need about \d+\.\d MB; free space there or choose another --offload-dir")
    assert "more memory" not in line


def test_the_plan_blames_only_the_disk_when_only_the_disk_is_short():
    from quantlm.errors import QuantlmError
    from quantlm.gptq.memory import MemorySettings, check_plan, plan_memory

    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 172, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 256}
    plan = plan_memory(config, 2, 16, MemorySettings(offload="disk", offload_dir="/scratch/x"),
                       available_bytes=64 * 2**30, disk_available_bytes=0)
    with pytest.raises(QuantlmError, match=r"^--offload-dir /scratch/x has 0.0 MB free, and the disk-offloaded hidden "
                                           r"states need about \d+\.\d MB; free space there or choose another "
                                           r"--offload-dir$"):
        check_plan(plan)


@pytest.mark.parametrize("dry_run", [False, True])
def test_act_order_without_static_groups_is_refused_before_the_first_block(dry_run, ws, capsys, no_compute):
    refused(capsys, ws, "quantize", "m", "--out", "q", *QUICK, "--act-order", "--no-static-groups",
            *(["--dry-run"] if dry_run else []),
            match=r"act_order without static_groups gives each linear its own group order \(an arbitrary g_idx\), "
                  r"which no export format stores; keep --static-groups \(the default\), or pass --no-act-order or "
                  r"--group-size -1")


def test_act_order_without_static_groups_per_channel_still_runs_to_the_quantizer(ws, capsys, no_compute):
    """Per channel (group size -1) every order is contiguous: nothing to refuse, the run reaches the pipeline."""
    with pytest.raises(ReachedHeavyCompute):
        main(["quantize", "m", "--out", "q", *QUICK, "--act-order", "--no-static-groups", "--group-size", "-1"])


IMPOSSIBLE_CONFIGS = {
    "intermediate-0": ({"intermediate_size": 0}, r"intermediate_size must be positive, got 0"),
    "intermediate-negative": ({"intermediate_size": -172}, r"intermediate_size must be positive, got -172"),
    "intermediate-fraction": ({"intermediate_size": 1.5}, r"intermediate_size=1.5 is not a whole number"),
    "heads-not-dividing": ({"num_attention_heads": 6, "head_dim": None},
                           r"num_attention_heads=6 does not divide hidden_size=64"),
    "kv-heads-0": ({"num_key_value_heads": 0}, r"num_key_value_heads must be positive, got 0"),
    "kv-heads-negative": ({"num_key_value_heads": -2}, r"num_key_value_heads must be positive, got -2"),
    "head-dim-0": ({"head_dim": 0}, r"head_dim must be positive, got 0"),
}


@pytest.mark.parametrize("case", list(IMPOSSIBLE_CONFIGS))
def test_impossible_configs_are_one_line_in_dry_run_and_size(case, ws, capsys, no_compute):
    edit, match = IMPOSSIBLE_CONFIGS[case]
    bad = ws / "bad"
    shutil.copytree(ws / "m", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(edit)
    (bad / "config.json").write_text(json.dumps(cfg))
    refused(capsys, ws, "quantize", "bad", "--out", "q", "--dry-run", match=r"bad/config.json: " + match)
    refused(capsys, ws, "size", "bad", match=r"bad: " + match)
    refused(capsys, ws, "size", "bad/config.json", match=match)
