"""Scaling-law fit recovers known constants; plots and the plot CLI write PNG + SVG from records."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from quantlm.cli import main
from quantlm.errors import QuantlmError
from quantlm.eval.records import SCHEMA, load_records, new_record_id, write_record
from quantlm.plots import curves, fit_families, fit_scaling_law, plot_quality, scaling_law

SIZES = np.array([99e6, 190e6, 390e6, 560e6, 830e6, 1.1e9, 1.5e9, 2.4e9, 3.9e9])


def test_fit_recovers_exact_constants():
    fit = fit_scaling_law(SIZES, scaling_law(SIZES, 406.4, 0.34, 1.69))
    assert fit.a == pytest.approx(406.4, rel=1e-4)
    assert fit.alpha == pytest.approx(0.34, rel=1e-5)
    assert fit.eps == pytest.approx(1.69, rel=1e-5)
    assert fit.rmse < 1e-8 and fit.n_points == len(SIZES)


def test_fit_with_noise_within_uncertainty():
    rng = np.random.default_rng(0)
    n = np.geomspace(1e7, 1e10, 24)
    y = scaling_law(n, 406.4, 0.34, 1.69) + rng.normal(0, 0.003, n.size)
    fit = fit_scaling_law(n, y)
    for got, err, true in ((fit.a, fit.a_err, 406.4), (fit.alpha, fit.alpha_err, 0.34), (fit.eps, fit.eps_err, 1.69)):
        assert 0 < err < abs(true) and abs(got - true) < 4 * err


def test_fit_rejects_too_few_points():
    with pytest.raises(QuantlmError, match="at least 3"):
        fit_scaling_law([1e8, 1e9], [3.0, 2.5])


def _records(tmp_path):
    """Synthetic records: 3 families x 5 sizes, QuantLM with 2 seeds each."""
    for family, bits, shift in (("floatlm", 16, 0.0), ("quantlm", 4, 0.05), ("trilm", 1.58, 0.3)):
        for n in SIZES[::2]:
            for seed in (0, 1) if family == "quantlm" else (0,):
                loss = scaling_law(n, 406.4, 0.34, 1.69 + shift) + 0.01 * seed
                write_record({"schema": SCHEMA, "id": new_record_id(), "created": f"2026-01-01T00:00:0{seed}",
                              "model": f"{family}-{int(n)}", "family": family, "bits": bits, "params": int(n),
                              "seed": seed, "sizes": {"paper": n * bits, "exact": n * bits * 1.02},
                              "metrics": {"wikitext2": {"nll": loss, "ppl": float(np.exp(loss))},
                                          "commonsense_avg": {"value": 0.4}}}, tmp_path)
    return tmp_path


def test_curves_average_seeds(tmp_path):
    df = load_records(_records(tmp_path))
    assert set(df["label"]) == {"FloatLM", "QuantLM 4-bit", "TriLM"} and len(df) == 20
    pts = curves(df, "wikitext2.nll", "params")
    q = pts[pts["label"] == "QuantLM 4-bit"]
    assert len(q) == 5 and (q["n"] == 2).all() and (q["std"] > 0).all()
    assert list(pts["label"].drop_duplicates()) == ["FloatLM", "QuantLM 4-bit", "TriLM"]
    # a rerun (same model, same seed, newer) replaces the older record instead of being averaged in
    rerun = df[df["model"] == "floatlm-99000000"].copy()
    rerun["created"] = "2027-01-01"
    rerun["wikitext2.nll"] += 1.0
    pts2 = curves(pd.concat([df, rerun]), "wikitext2.nll", "params")
    first = pts2[pts2["model"] == "floatlm-99000000"]["mean"].item()
    assert first == pytest.approx(pts[pts["model"] == "floatlm-99000000"]["mean"].item() + 1.0)
    fits = fit_families(df, "wikitext2.nll")
    f = fits.set_index("label").loc["FloatLM"]
    assert f["alpha"] == pytest.approx(0.34, rel=1e-4) and f["eps"] == pytest.approx(1.69, rel=1e-4)


def test_plot_files_written(tmp_path):
    df = load_records(_records(tmp_path / "rec"))
    for x in ("size_bits_paper", "params"):
        paths = plot_quality(df, "wikitext2.ppl", tmp_path / "out" / f"ppl_{x}", x=x)
        assert [p.suffix for p in paths] == [".png", ".svg"]
        assert paths[0].read_bytes()[:4] == b"\x89PNG" and b"<svg" in paths[1].read_bytes()[:2000]
    with pytest.raises(QuantlmError, match="no column 'arc_easy.acc'"):
        plot_quality(df, "arc_easy.acc", tmp_path / "x")
    with pytest.raises(QuantlmError, match="unknown x axis"):
        plot_quality(df, "wikitext2.ppl", tmp_path / "x", x="flops")


def test_plot_cli(tmp_path, capsys):
    rec = _records(tmp_path / "rec")
    out = tmp_path / "plots"
    assert main(["plot", "--results", str(rec), "--metric", "wikitext2.ppl,commonsense_avg", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "wikitext2_ppl_vs_size_paper.png" in names and "commonsense_avg_vs_params.svg" in names
    fits = pd.read_csv(out / "scaling_fits.csv")
    assert set(fits["label"]) == {"FloatLM", "QuantLM 4-bit", "TriLM"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", "--results", str(empty)]) == 2
    assert "no result records" in capsys.readouterr().err
