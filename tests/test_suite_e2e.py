"""The suite end to end on a small variant: a briefly trained micro FloatLM at 3/4/6/8 bits, one seed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from quantlm import recipes, suite
from quantlm.cli import main
from quantlm.paths import recipes_dir
from quantlm.train.recipe import TrainRecipe
from quantlm.train.run import train

REPO = Path(__file__).resolve().parent.parent
TRAIN_RECIPE = recipes_dir() / "floatlm-micro.yaml"


@pytest.fixture(scope="module")
def trained_micro(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("micro")
    recipe = recipes.load(TRAIN_RECIPE, expect=TrainRecipe)
    return train(recipe, out / "run", overrides={"checkpoint_interval": 0})


def _manifest(folder: Path, model: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    m = {"kind": "suite", "name": "e2e", "output": str(folder / "out"),  # outputs are cwd-relative: be explicit
         "models": [{"name": "floatlm-micro", "family": "floatlm", "preset": "floatlm-micro", "path": str(model)}],
         "bits": [3, 4, 6, 8], "quant": {"calibration": {"nsamples": 16, "seqlen": 64}}, "seeds": [0],
         "eval": {"ppl": ["wikitext2"], "window": 64, "ppl_limit_windows": 24, "ppl_batch_size": 8},
         "heldout_ppl": str(TRAIN_RECIPE)}
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(m))
    return path


def _stable(table: pd.DataFrame) -> pd.DataFrame:
    return table[[c for c in table.columns if not c.startswith("wall")]].reset_index(drop=True)


def test_suite_runs_orders_and_resumes(tmp_path, trained_micro, monkeypatch, capfd):
    # uninterrupted run
    full = _manifest(tmp_path / "a", trained_micro)
    capfd.readouterr()  # drop what the fixtures printed
    assert main(["suite", str(full), "--no-progress"]) == 0
    assert "%|" not in capfd.readouterr().err  # no job shows a progress bar (quantize blocks, eval batches)
    manifest, base = suite.load_manifest(full)
    table = suite.report(manifest, base, plots=False)["table"]
    assert list(table["model"]) == ["floatlm-micro", "quantlm-micro-8bit", "quantlm-micro-6bit",
                                    "quantlm-micro-4bit", "quantlm-micro-3bit"]
    assert {"paper_Mbit", "exact_Mbit", "entropy_Mbit", "corpus-heldout.ppl", "seeds"} <= set(table.columns)
    ppl = list(table["corpus-heldout.ppl"])
    for better, worse in zip(ppl[:-1], ppl[1:], strict=True):
        assert better <= worse * 1.02  # FloatLM <= 8-bit <= 6-bit <= 4-bit <= 3-bit, up to noise
    # 3 bits moves the model further from the FloatLM than 8 bits does (a briefly trained model is robust to
    # quantization, so the gap is small in absolute terms)
    assert abs(ppl[-1] - ppl[0]) > 3 * abs(ppl[1] - ppl[0])
    exact = list(table["exact_Mbit"])
    assert exact == sorted(exact, reverse=True) and len(set(exact)) == len(exact)
    results = base / "out" / "results"
    assert (results / "suite_table.csv").is_file() and (results / "suite_table.md").is_file()

    # interrupted after three jobs, then resumed: only the missing jobs run, and the table is the same
    part = _manifest(tmp_path / "b", trained_micro)
    m2, base2 = suite.load_manifest(part)
    real = suite.run_job
    count = {"n": 0}

    def dies_after_three(job, manifest, progress=True):
        if count["n"] == 3:
            raise KeyboardInterrupt
        count["n"] += 1
        real(job, manifest, progress)

    monkeypatch.setattr("quantlm.suite.runner.run_job", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        suite.run(m2, base2, progress=False)
    monkeypatch.setattr("quantlm.suite.runner.run_job", real)
    done_before = [j.id for j in suite.plan(m2, base2) if suite.job_done(j)]
    assert len(done_before) == 3
    summary = suite.run(m2, base2, progress=False)
    assert sorted(summary.skipped) == sorted(done_before)
    assert len(summary.done) == len(suite.plan(m2, base2)) - 3 and not summary.failed
    resumed = suite.report(m2, base2, plots=False)["table"]
    pd.testing.assert_frame_equal(_stable(resumed), _stable(table))
    status = json.loads((base2 / "out" / "suite-status.json").read_text())
    assert status["pending"] == []
