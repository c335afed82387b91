"""Nothing overwritten that quantlm did not write: `size --out`, `plot --out`, `bench --out`, the suite report and
the eval record writer write a new file, or with --overwrite replace a file quantlm wrote; never an input, never a
file of the user's. A corrupt record makes `suite --report` warn and build the table from the others.

Every refusal is exit 2 with one line on stderr naming the file and the fix, and leaves the foreign file's bytes
(and, before anything is computed, the whole folder) as they were.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from quantlm.cli import main
from quantlm.errors import QuantlmError
from quantlm.outputs import LEDGER, claim_output_file, is_quantlm_file, write_output_text

FOREIGN = b"years of work\n"


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str, command: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stderr is not one line: {err}"
    assert lines[0].startswith(f"quantlm {command}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def model(tmp_path, tiny_model_dir) -> Path:
    m = tmp_path / "m"
    shutil.copytree(tiny_model_dir, m)
    return m


# ------------------------------------------------------------------------------------------------ size --out

@pytest.mark.parametrize("overwrite", [False, True])
def test_size_out_never_writes_into_the_model(model, tmp_path, capsys, monkeypatch, overwrite):
    monkeypatch.chdir(tmp_path)
    before = snapshot(model)
    flags = ["--overwrite"] if overwrite else []
    rc, _, err = run(capsys, "size", "m", "--out", "m/config.json", *flags)
    assert rc == 2
    one_line(err, "size", "--out m/config.json lies inside the input m", "even with --overwrite")
    rc, _, err = run(capsys, "size", "m", "--format", "csv", "--out", "m/sizes.csv", *flags)  # a new file, still
    assert rc == 2
    one_line(err, "size", "--out m/sizes.csv lies inside the input m")
    rc, _, err = run(capsys, "size", "m/config.json", "--out", "m/config.json", *flags)
    assert rc == 2
    one_line(err, "size", "--out m/config.json is the input m/config.json")
    assert snapshot(model) == before


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_size_out_refuses_a_foreign_file_even_with_overwrite(tmp_path, capsys, monkeypatch, fmt):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_bytes(FOREIGN)
    for flags in ([], ["--overwrite"]):
        rc, out, err = run(capsys, "size", "floatlm-micro", "--format", fmt, "--out", "notes.txt", *flags)
        assert rc == 2 and out == ""
        one_line(err, "size", "--out notes.txt exists and was not written by quantlm", "choose another --out")
    assert (tmp_path / "notes.txt").read_bytes() == FOREIGN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no ledger, no temporary left


def test_size_out_new_then_overwrite_only_quantlms_own_unedited_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "size", "floatlm-micro", "--format", "csv", "--out", "t.csv")[0] == 0
    first = (tmp_path / "t.csv").read_bytes()
    assert pd.read_csv(tmp_path / "t.csv")["model"].tolist() == ["floatlm-micro"] * 2  # a plain CSV, no marker
    assert is_quantlm_file(tmp_path / "t.csv") and (tmp_path / LEDGER).is_file()
    # again without --overwrite: refused, the file kept
    rc, _, err = run(capsys, "size", "floatlm-micro", "--format", "csv", "--convention", "entropy", "--out", "t.csv")
    assert rc == 2
    one_line(err, "size", "--out t.csv already exists", "pass --overwrite")
    assert (tmp_path / "t.csv").read_bytes() == first
    # with --overwrite: replaced
    assert run(capsys, "size", "floatlm-micro", "--format", "csv", "--convention", "entropy", "--out", "t.csv",
               "--overwrite")[0] == 0
    assert pd.read_csv(tmp_path / "t.csv")["convention"].tolist() == ["entropy"]
    # edited by hand since: the user's now, refused even with --overwrite
    edited = (tmp_path / "t.csv").read_bytes() + b"my,own,row\n"
    (tmp_path / "t.csv").write_bytes(edited)
    rc, _, err = run(capsys, "size", "floatlm-micro", "--format", "csv", "--out", "t.csv", "--overwrite")
    assert rc == 2
    one_line(err, "size", "exists and was not written by quantlm")
    assert (tmp_path / "t.csv").read_bytes() == edited
    # JSON (a list of rows: no room for a mark) and --list: the same rule, by the ledger
    assert run(capsys, "size", "floatlm-micro", "--format", "json", "--out", "t.json")[0] == 0
    assert json.loads((tmp_path / "t.json").read_text())[0]["model"] == "floatlm-micro"
    assert run(capsys, "size", "--list", "--out", "t.json")[0] == 2
    assert run(capsys, "size", "--list", "--out", "t.json", "--overwrite")[0] == 0
    assert "floatlm-micro" in (tmp_path / "t.json").read_text().split()


# ------------------------------------------------------------------------------------------------ plot --out

def _records(folder: Path) -> Path:
    """Synthetic records: FloatLM and 4-bit QuantLM at 4 sizes (enough for scaling-law fits)."""
    from quantlm.eval.records import SCHEMA, new_record_id, write_record

    for family, bits, shift in (("floatlm", 16, 0.0), ("quantlm", 4, 0.1)):
        for n in (1e8, 3e8, 1e9, 3e9):
            loss = 400 / n ** 0.34 + 1.7 + shift
            write_record({"schema": SCHEMA, "id": new_record_id(), "created": "2026-01-01T00:00:00",
                          "model": f"{family}-{int(n)}", "family": family, "bits": bits, "params": int(n),
                          "seed": 0, "sizes": {"paper": n * bits},
                          "metrics": {"wikitext2": {"nll": loss, "ppl": 2.718 ** loss}}}, folder)
    return folder


@pytest.mark.parametrize("name", ["wikitext2_ppl_vs_params.png", "wikitext2_ppl_vs_size_paper.svg",
                                  "scaling_fits.csv"])
def test_plot_out_refuses_a_foreign_file_and_writes_nothing(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    _records(tmp_path / "rec")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / name).write_bytes(FOREIGN)
    for flags in ([], ["--overwrite"]):
        rc, _, err = run(capsys, "plot", "--results", "rec", "--out", "plots", *flags)
        assert rc == 2
        one_line(err, "plot", f"plots/{name} exists and was not written by quantlm")
        assert snapshot(tmp_path / "plots") == {name: FOREIGN}  # checked before the first file is written


def test_plot_out_rewrites_its_own_files_only_with_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _records(tmp_path / "rec")
    assert run(capsys, "plot", "--results", "rec", "--out", "plots")[0] == 0
    files = snapshot(tmp_path / "plots")
    assert {"wikitext2_ppl_vs_params.png", "wikitext2_ppl_vs_params.svg", "scaling_fits.csv"} <= set(files)
    assert all(is_quantlm_file(tmp_path / "plots" / n) for n in files if n != LEDGER)
    assert set(pd.read_csv(tmp_path / "plots" / "scaling_fits.csv")["label"]) == {"FloatLM", "QuantLM 4-bit"}
    rc, _, err = run(capsys, "plot", "--results", "rec", "--out", "plots")
    assert rc == 2
    one_line(err, "plot", "already exists", "pass --overwrite")
    assert snapshot(tmp_path / "plots") == files
    assert run(capsys, "plot", "--results", "rec", "--out", "plots", "--overwrite")[0] == 0
    assert set(snapshot(tmp_path / "plots")) == set(files)


def test_plot_images_carry_quantlms_mark(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from quantlm.plots import plot_paths

    _records(tmp_path / "rec")
    from quantlm.eval.records import load_records
    from quantlm.plots import plot_quality

    png, svg = plot_quality(load_records(tmp_path / "rec"), "wikitext2.ppl", tmp_path / "p", x="params")
    assert [png, svg] == plot_paths(tmp_path / "p")
    assert b"Software\x00quantlm " in png.read_bytes()[:4096] and b"<dc:title>quantlm " in svg.read_bytes()[:4096]
    assert is_quantlm_file(png) and is_quantlm_file(svg)
    fig, ax = plt.subplots()  # the same images from matplotlib alone are not quantlm's
    ax.plot([1, 2], [3, 4])
    for suffix in (".png", ".svg", ".pdf"):
        fig.savefig(tmp_path / f"mine{suffix}")
        assert not is_quantlm_file(tmp_path / f"mine{suffix}")
    fig.savefig(tmp_path / "ours.pdf", metadata={"Creator": "quantlm 0.1.0"})
    plt.close(fig)
    assert is_quantlm_file(tmp_path / "ours.pdf")


# ----------------------------------------------------------------------------------------------- bench --out

def test_bench_out_is_checked_before_any_model_runs(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_bytes(FOREIGN)
    before = snapshot(model)
    rc, _, err = run(capsys, "bench", "m", "--out", "m/config.json", "--overwrite")
    assert rc == 2
    one_line(err, "bench", "--out m/config.json lies inside the input m")
    rc, _, err = run(capsys, "bench", "m", "--out", "notes.txt", "--overwrite")
    assert rc == 2
    one_line(err, "bench", "--out notes.txt exists and was not written by quantlm")
    assert snapshot(model) == before and (tmp_path / "notes.txt").read_bytes() == FOREIGN


# ------------------------------------------------------------------------------------------------- the helper

def test_claim_output_file_rules(tmp_path):
    (tmp_path / "in.gguf").write_bytes(b"GGUF")
    (tmp_path / "ckpt").mkdir()
    new = claim_output_file(tmp_path / "new.csv")
    assert new == tmp_path / "new.csv" and not new.exists()
    with pytest.raises(QuantlmError, match="is the input"):
        claim_output_file(tmp_path / "in.gguf", overwrite=True, inputs=[tmp_path / "in.gguf"])
    with pytest.raises(QuantlmError, match="lies inside the input"):
        claim_output_file(tmp_path / "ckpt" / "deep" / "x.csv", overwrite=True, inputs=[tmp_path / "ckpt"])
    with pytest.raises(QuantlmError, match="is a directory; name a file"):
        claim_output_file(tmp_path / "ckpt")
    # a symlink is never quantlm's, and one pointing at an input is the input
    write_output_text(tmp_path / "own.txt", "quantlm's\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "own.txt")
    with pytest.raises(QuantlmError, match="was not written by quantlm"):
        claim_output_file(tmp_path / "link.txt", overwrite=True)
    with pytest.raises(QuantlmError, match="is the input"):
        claim_output_file(tmp_path / "link.txt", overwrite=True, inputs=[tmp_path / "own.txt"])
    # a foreign ledger is left alone, and the files it would list count as not quantlm's
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / LEDGER).write_bytes(FOREIGN)
    write_output_text(sub / "t.csv", "a,b\n1,2\n")
    assert (sub / LEDGER).read_bytes() == FOREIGN and not is_quantlm_file(sub / "t.csv")


def test_json_objects_and_markdown_carry_their_own_mark(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"schema": "quantlm.eval/1", "id": "x"}))
    (tmp_path / "other.json").write_text(json.dumps({"schema": "theirs/1"}))
    (tmp_path / "t.md").write_text("<!-- written by quantlm 0.1.0 -->\n# table\n")
    (tmp_path / "mine.md").write_text("# my notes\n<!-- written by quantlm -->\n")
    assert is_quantlm_file(tmp_path / "r.json") and is_quantlm_file(tmp_path / "t.md")
    assert not is_quantlm_file(tmp_path / "other.json") and not is_quantlm_file(tmp_path / "mine.md")


# -------------------------------------------------------------------------------------------- the eval record

def test_a_record_never_replaces_a_file(tmp_path, monkeypatch):
    import datetime as dt

    from quantlm.eval import records

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=tz)

    monkeypatch.setattr(records, "datetime", Frozen)
    rec = {"schema": records.SCHEMA, "id": "abc", "model": "m", "created": "2026-01-02T03:04:05"}
    path = tmp_path / "20260102T030405Z-m-abc.json"
    path.write_bytes(FOREIGN)
    with pytest.raises(QuantlmError, match="result record .* exists and was not written by quantlm"):
        records.write_record(rec, tmp_path)
    assert path.read_bytes() == FOREIGN
    path.unlink()
    assert records.write_record(rec, tmp_path) == path
    with pytest.raises(QuantlmError, match="already exists; records are never rewritten"):
        records.write_record({**rec, "metrics": {}}, tmp_path)
    assert json.loads(path.read_text()) == rec


# -------------------------------------------------------------------------------------------- suite --report

def _suite(ws: Path) -> Path:
    """A manifest (one FloatLM at 4 bits) and its two eval records, written as the suite's jobs would."""
    import yaml

    from quantlm import suite

    (ws / "m").mkdir()
    (ws / "s.yaml").write_text(yaml.safe_dump({
        "kind": "suite", "name": "t", "output": "out", "models": [{"name": "floatlm-a", "family": "floatlm",
                                                                   "path": "m"}],
        "bits": [4], "seeds": [0], "eval": {"ppl": ["wikitext2"], "ppl_limit_windows": 1, "window": 16}}))
    manifest, base = suite.load_manifest(ws / "s.yaml")
    for job in suite.plan(manifest, base):
        if job.kind != "eval":
            continue
        job.out.parent.mkdir(parents=True, exist_ok=True)
        floatlm = job.family == "floatlm"
        job.out.write_text(json.dumps({
            "schema": "quantlm.eval/1", "id": job.id.replace("/", "_"), "created": "2026-01-01T00:00:00",
            "model": job.model, "family": job.family, "bits": job.bits or 16, "seed": job.seed, "params": 1000,
            "wall_time_s": 1.0, "device": "cpu", "versions": {"torch": "x"},
            "sizes": {"paper": 16000.0 if floatlm else 5000.0, "exact": 16000.0 if floatlm else 5200.0},
            "metrics": {"wikitext2": {"ppl": 10.0 if floatlm else 11.0, "nll": 2.3}},
            "suite_job": {"id": job.id, "hash": job.hash}}))
    return ws / "out" / "results"


def test_suite_report_rewrites_its_own_files_without_a_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = _suite(tmp_path)
    assert run(capsys, "suite", "s.yaml", "--report")[0] == 0
    written = {"suite_table.csv", "suite_table.md", "size_vs_wikitext2_ppl.png", "params_vs_wikitext2_ppl.svg"}
    assert written <= {p.name for p in results.iterdir()}
    assert all(is_quantlm_file(results / n) for n in written)
    assert (results / "suite_table.md").read_text().splitlines()[1] == "# Suite `t`"
    assert run(capsys, "suite", "s.yaml", "--report")[0] == 0  # quantlm's own: rewritten, no --overwrite
    assert list(pd.read_csv(results / "suite_table.csv")["model"]) == ["floatlm-a", "quantlm-a-4bit"]


@pytest.mark.parametrize("name", ["suite_table.md", "suite_table.csv", "params_vs_wikitext2_ppl.png"])
def test_suite_report_refuses_a_foreign_file_at_its_paths(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    results = _suite(tmp_path)
    assert run(capsys, "suite", "s.yaml", "--report")[0] == 0
    (results / name).write_bytes(FOREIGN)  # the user's file in the place of one of the report's
    before = snapshot(results)
    rc, _, err = run(capsys, "suite", "s.yaml", "--report")
    assert rc == 2
    one_line(err, "suite", f"suite report file {results / name} exists and was not written by quantlm",
             "move it out of the suite's results folder")
    assert snapshot(results) == before  # refused before the first file is written


def test_suite_report_warns_about_a_corrupt_record_and_builds_the_table(tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    results = _suite(tmp_path)
    broken = results / "floatlm-a.json"  # sorts before the newest record, whose device the table names
    broken.write_bytes(broken.read_bytes()[:60])  # truncated mid-write
    (results / "a-junk.json").write_bytes(b"\xff\xfe not even text")
    with caplog.at_level(logging.WARNING):
        rc, out, err = run(capsys, "suite", "s.yaml", "--report")
    assert rc == 0, err
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(broken) in w and "not a readable record" in w for w in warned), warned
    assert any(str(results / "a-junk.json") in w for w in warned), warned
    assert list(pd.read_csv(results / "suite_table.csv")["model"]) == ["quantlm-a-4bit"]
    assert "quantlm-a-4bit" in out and "cpu" in (results / "suite_table.md").read_text()
