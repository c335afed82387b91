"""Where the data shipped with quantlm lives (calibration text, training corpus, evaluation sets, recipes)."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The checkout quantlm runs from (its data folders sit beside the package). ``QUANTLM_HOME`` overrides."""
    env = os.environ.get("QUANTLM_HOME")
    return Path(env) if env else Path(__file__).resolve().parent.parent


def recipes_dir() -> Path:
    return repo_root() / "recipes"


def calibration_dir() -> Path:
    return repo_root() / "calibration"


def data_dir() -> Path:
    return repo_root() / "data"


def results_dir() -> Path:
    return repo_root() / "results"
