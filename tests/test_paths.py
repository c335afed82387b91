"""Shipped data is found inside the package from any directory; outputs default to the working directory."""

from __future__ import annotations

from pathlib import Path

from quantlm import paths


def test_shipped_data_lives_in_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pkg = Path(paths.__file__).resolve().parent
    for d in (paths.recipes_dir(), paths.calibration_dir(), paths.data_dir()):
        assert d.is_dir() and pkg in d.resolve().parents
    assert (paths.recipes_dir() / "suite-tiny.yaml").is_file()
    assert (paths.calibration_dir() / "c4_sample.jsonl").is_file()
    assert (paths.data_dir() / "corpus").is_dir() and (paths.data_dir() / "eval" / "wikitext2").is_dir()
    assert not (pkg.parent / "recipes").exists()  # one copy in the repository


def test_outputs_default_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QUANTLM_CACHE", raising=False)
    assert paths.results_dir() == tmp_path / "results"
    assert paths.cache_dir() == tmp_path / ".cache"
    assert paths.resolve_output("runs/x") == tmp_path / "runs" / "x"
    monkeypatch.setenv("QUANTLM_CACHE", str(tmp_path / "c"))
    assert paths.cache_dir() == tmp_path / "c"
    assert not paths.is_inside_install(tmp_path) and paths.is_inside_install(paths.recipes_dir())


def test_relative_inputs_fall_back_to_the_shipped_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.resolve_input("recipes/floatlm-tiny.yaml") == paths.recipes_dir() / "floatlm-tiny.yaml"
    assert paths.resolve_input("data/corpus") == paths.data_dir() / "corpus"
    assert paths.resolve_input("suite-tiny") == paths.recipes_dir() / "suite-tiny.yaml"
    assert paths.resolve_input("floatlm-99m") == paths.recipes_dir() / "presets" / "floatlm-99m.yaml"
    assert paths.resolve_input("nothing.yaml") == Path("nothing.yaml")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus").mkdir()  # a local folder of the same name wins
    assert paths.resolve_input("data/corpus") == Path("data/corpus")
    assert paths.resolve_input("m.yaml", base=tmp_path / "d") == tmp_path / "d" / "m.yaml"
    assert paths.shipped("../etc/passwd") is None and paths.shipped("/abs") is None
