"""Quality against size, the Spectra way: one curve per family (FloatLM, QuantLM per bitwidth, TriLM) against
model size in bits (log axis) and against parameters, plus scaling-law fits L(N) = A / N^alpha + eps; and, for
deployed models, against llama.cpp's decode speed and peak memory (columns ``decode_tok_s``, ``rss_mb``).

Inputs are the records DataFrame of :func:`quantlm.eval.records.load_records`; the columns used are
``model``, ``label`` (the curve), ``params``, ``size_bits_<convention>`` and the metric column (e.g.
``wikitext2.ppl``, ``arc_easy.acc_norm``, ``commonsense_avg``). Records of one model with different ``seed``
(QuantLM calibration seeds) are averaged and drawn with their standard deviation as error bars; of several
records with the same model and seed, the newest is used (a rerun replaces the older result).

Every image carries quantlm's mark in its metadata (PNG ``Software``, SVG/PDF ``Creator``: ``quantlm VERSION``),
which is how a later run knows the file is quantlm's (:func:`quantlm.outputs.claim_output_file`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from quantlm.atomic import atomic_path
from quantlm.errors import QuantlmError
from quantlm.outputs import claim_output_file, mark_text

log = logging.getLogger(__name__)

X_AXES = {
    "size_bits_paper": "model size (bits, Spectra paper convention)",
    "size_bits_exact": "model size (bits, exact storage)",
    "size_bits_entropy": "model size (bits, entropy convention)",
    "params": "parameters",
    "decode_tok_s": "decode speed (tokens/s, llama.cpp, batch 1)",
    "rss_mb": "peak resident memory (MB, llama.cpp)",
}
_FIXED_COLORS = {"FloatLM": "#1f77b4", "TriLM": "#d62728"}
_QUANT_COLORS = {8: "#2ca02c", 6: "#8c564b", 4: "#9467bd", 3: "#ff7f0e", 2: "#7f7f7f"}


def _label_order(label: str) -> tuple:
    if label == "FloatLM":
        return (0, 0)
    if label.startswith("QuantLM"):
        digits = "".join(ch for ch in label if ch.isdigit())
        return (1, -int(digits) if digits else 0)
    return (2, 0) if label == "TriLM" else (3, label)


def _color(label: str):
    if label in _FIXED_COLORS:
        return _FIXED_COLORS[label]
    digits = "".join(ch for ch in label if ch.isdigit())
    return _QUANT_COLORS.get(int(digits)) if digits else None


def metric_title(metric: str) -> str:
    name, _, key = metric.rpartition(".")
    if not name:
        return "commonsense average (acc)" if metric == "commonsense_avg" else metric
    what = {"ppl": "perplexity (lower is better)", "acc": "accuracy", "acc_norm": "normalised accuracy",
            "nll": "NLL (nats/token)"}.get(key, key)
    return f"{name} {what}"


def curves(df, metric: str, x: str):
    """Points per curve: DataFrame(label, model, x, mean, std, n), sorted for drawing."""
    for col in (metric, x, "label", "model"):
        if col not in df.columns:
            known = ", ".join(c for c in df.columns if "." in c or c.startswith("size_bits") or c in
                              ("params", "commonsense_avg"))
            raise QuantlmError(f"the records have no column {col!r}; available: {known or 'none'} "
                               "(sizes in bits come from quantlm.accounting, or extra={'sizes': ...} in evaluate())")
    cols = ["label", "model", x, metric] + [c for c in ("seed", "created") if c in df.columns]
    data = df[cols].dropna(subset=["label", "model", x, metric])
    if "created" in data.columns:  # a rerun of the same model and seed replaces the older record
        data = data.sort_values("created", kind="stable")
    data = data.drop_duplicates(subset=[c for c in ("label", "model", "seed") if c in data.columns], keep="last")
    if data.empty:
        raise QuantlmError(f"no record has both {x!r} and {metric!r}; evaluate models with that metric first")
    g = data.groupby(["label", "model"], sort=False)
    pts = g.agg(x=(x, "mean"), mean=(metric, "mean"), std=(metric, "std"), n=(metric, "size")).reset_index()
    pts["std"] = pts["std"].fillna(0.0)
    pts["order"] = pts["label"].map(_label_order)
    return pts.sort_values(["order", "x"]).drop(columns="order").reset_index(drop=True)


# --------------------------------------------------------------------------------------------- scaling law

def scaling_law(n, a: float, alpha: float, eps: float):
    """L(N) = A / N^alpha + eps."""
    return a / n ** alpha + eps


@dataclass(frozen=True)
class ScalingFit:
    """Fitted L(N) = A / N^alpha + eps with one-sigma standard errors (from the fit's covariance)."""

    a: float
    alpha: float
    eps: float
    a_err: float
    alpha_err: float
    eps_err: float
    n_points: int
    rmse: float

    def __call__(self, n):
        return scaling_law(n, self.a, self.alpha, self.eps)


def fit_scaling_law(n, loss) -> ScalingFit:
    """Least-squares fit of L(N) = A / N^alpha + eps (scipy ``curve_fit``).

    Fitted as log A (A spans many orders of magnitude; its error is then A * se(log A)), started from a
    log-log line through (N, L - 0.9 min L). Needs at least 3 points; errors are inf with exactly 3.
    """
    import numpy as np
    from scipy.optimize import curve_fit

    n = np.asarray(n, dtype=float)
    y = np.asarray(loss, dtype=float)
    if n.shape != y.shape or n.ndim != 1 or len(n) < 3:
        raise QuantlmError(f"a scaling-law fit needs at least 3 (N, loss) points, got {len(n)}")
    if (n <= 0).any() or not np.isfinite(y).all():
        raise QuantlmError("scaling-law fit: N must be positive and losses finite")
    eps0 = 0.9 * y.min() if y.min() > 0 else y.min() - 1.0
    slope, intercept = np.polyfit(np.log(n), np.log(np.maximum(y - eps0, 1e-12)), 1)
    p0 = (intercept, max(-slope, 1e-3), eps0)

    def model(logn, log_a, alpha, eps):
        return np.exp(log_a - alpha * logn) + eps

    try:
        popt, pcov = curve_fit(model, np.log(n), y, p0=p0, maxfev=20000)
    except RuntimeError as e:
        raise QuantlmError(f"scaling-law fit did not converge ({e}); the points may not follow A/N^alpha + eps") \
            from None
    with np.errstate(invalid="ignore"):
        perr = np.sqrt(np.diag(pcov)) if np.isfinite(pcov).all() else np.full(3, math.inf)
    log_a, alpha, eps = (float(v) for v in popt)
    a = math.exp(log_a)
    rmse = float(np.sqrt(np.mean((model(np.log(n), *popt) - y) ** 2)))
    return ScalingFit(a, alpha, eps, a * float(perr[0]), float(perr[1]), float(perr[2]), len(n), rmse)


def is_loss_like(metric: str) -> bool:
    """Metrics that fall with size towards a floor, the shape L(N) = A / N^alpha + eps describes."""
    return metric.rpartition(".")[2] in ("nll", "ppl", "loss")


def fit_families(df, metric: str, x: str = "params"):
    """One scaling-law fit per curve with at least 3 distinct sizes; DataFrame(label, a, alpha, eps, *_err, ...).

    A curve whose fit does not converge is left out (logged), so one bad family does not hide the others.
    """
    import pandas as pd

    rows = []
    for label, pts in curves(df, metric, x).groupby("label", sort=False):
        if pts["x"].nunique() < 3:
            continue
        try:
            fit = fit_scaling_law(pts["x"].to_numpy(), pts["mean"].to_numpy())
        except QuantlmError as e:
            log.warning("no scaling-law fit for %s on %s: %s", label, metric, e)
            continue
        rows.append({"label": label, "metric": metric, "x": x, **asdict(fit)})
    return pd.DataFrame(rows, columns=["label", "metric", "x", "a", "alpha", "eps", "a_err", "alpha_err",
                                       "eps_err", "n_points", "rmse"])


# ------------------------------------------------------------------------------------------------ drawing

IMAGE_SUFFIXES = (".png", ".svg")


def plot_paths(out: str | os.PathLike) -> list[Path]:
    """The files :func:`plot_quality` writes for ``out``: ``out``.png and ``out``.svg."""
    out = Path(out)
    return [out.with_name(out.name + s) for s in IMAGE_SUFFIXES]


def _save(fig, path: Path, *, overwrite: bool, flag: str, fix: str | None) -> Path:
    """savefig to a temp sibling, then rename: a crash never leaves half an image. The file is claimed first (a new
    file, or with ``overwrite`` one quantlm wrote) and carries quantlm's mark in its metadata."""
    claim_output_file(path, overwrite=overwrite, flag=flag, fix=fix)
    key = "Software" if path.suffix.lower() == ".png" else "Creator"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format=path.suffix.lstrip(".").lower() or None,
                    metadata={key: mark_text()})
    return path


def plot_quality(df, metric: str, out: str | os.PathLike, *, x: str = "size_bits_paper", fit: bool = True,
                 title: str | None = None, overwrite: bool = False, flag: str = "--out",
                 fix: str | None = None) -> list[Path]:
    """Draw ``metric`` against ``x`` (log axis), one curve per family; writes ``out``.png and ``out``.svg.

    With ``fit``, x = params and a loss-like metric (nll, ppl), each curve with at least 4 sizes gets its
    fitted L(N) as a dashed line. An existing image is replaced only with ``overwrite`` and only if quantlm wrote
    it (:func:`quantlm.outputs.claim_output_file`; ``flag`` and ``fix`` go into its messages).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if x not in X_AXES:
        raise QuantlmError(f"unknown x axis {x!r}; use one of {', '.join(X_AXES)}")
    pts = curves(df, metric, x)
    for p in plot_paths(out):  # both images may be written, before either is
        claim_output_file(p, overwrite=overwrite, flag=flag, fix=fix)
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for label, g in pts.groupby("label", sort=False):
        color = _color(label)
        ax.errorbar(g["x"], g["mean"], yerr=g["std"] if (g["std"] > 0).any() else None, marker="o", ms=5,
                    lw=1.6, capsize=3, color=color, label=label)
        if fit and x == "params" and is_loss_like(metric) and g["x"].nunique() >= 4:
            try:
                f = fit_scaling_law(g["x"].to_numpy(), g["mean"].to_numpy())
            except QuantlmError:
                continue
            grid = np.geomspace(g["x"].min(), g["x"].max(), 100)
            ax.plot(grid, f(grid), ls="--", lw=1, color=color, alpha=0.8,
                    label=f"{label} fit: {f.a:.3g}/N^{f.alpha:.3f} + {f.eps:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel(metric_title(metric))
    short = metric_title(metric).replace(" (lower is better)", "")
    ax.set_title(title or f"{short} vs {X_AXES[x].split(' (')[0]}")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(fontsize=8, frameon=False)
    try:
        paths = [_save(fig, p, overwrite=overwrite, flag=flag, fix=fix) for p in plot_paths(out)]
    finally:
        plt.close(fig)
    return paths
