"""Where quantlm's files are: the data it ships (inside the package) and the outputs it writes (the cwd).

Shipped with the package, read through ``importlib.resources`` so that a wheel works from any directory:
``quantlm/resources/recipes`` (YAML twins of the presets, quant/train/suite recipes), ``.../calibration``
(the C4 calibration sample) and ``.../data`` (the training corpus and the evaluation sets). Nothing is ever
written there.

Written by quantlm: relative to the working directory, like every command-line tool (``results/``,
``runs/``, ``.cache/``), unless a flag or a recipe names another place. ``QUANTLM_CACHE`` moves the tokenizer
and token cache; ``QUANTLM_EVAL_DATA`` adds folders searched for evaluation files (``quantlm.eval.datasets``).
(``QUANTLM_HOME``, which pointed quantlm at a checkout, is gone: the data lives in the package.)
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from quantlm.errors import QuantlmError

RESOURCE_KINDS = ("recipes", "calibration", "data")


def resources_dir() -> Path:
    """The folder holding the shipped ``recipes/``, ``calibration/`` and ``data/``."""
    root = resources.files("quantlm") / "resources"
    path = Path(str(root))
    if not path.is_dir():  # a zip import or a broken install: the data is not on the file system
        raise QuantlmError(f"quantlm's shipped data is missing ({path}); reinstall quantlm (pip install quantlm) "
                           "from a wheel or a checkout")
    return path


def recipes_dir() -> Path:
    return resources_dir() / "recipes"


def calibration_dir() -> Path:
    return resources_dir() / "calibration"


def data_dir() -> Path:
    return resources_dir() / "data"


def results_dir() -> Path:
    """Default root of result records and plots: ``results/`` in the working directory (never the install)."""
    return Path.cwd() / "results"


def cache_dir() -> Path:
    """Tokenizers and token files: ``$QUANTLM_CACHE``, else ``.cache/`` in the working directory."""
    env = os.environ.get("QUANTLM_CACHE")
    return Path(env).expanduser() if env else Path.cwd() / ".cache"


def shipped(path: str | os.PathLike) -> Path | None:
    """The shipped file a relative path names, or None: ``recipes/X.yaml``, ``calibration/...`` and ``data/...``
    are looked up in the package's resources; a bare ``X.yaml`` or ``X`` among the shipped recipes."""
    p = Path(path)
    if p.is_absolute() or not p.parts or ".." in p.parts:
        return None
    candidates = []
    if p.parts[0] in RESOURCE_KINDS:
        candidates.append(resources_dir() / p)
    elif len(p.parts) == 1:
        candidates += [recipes_dir() / p, recipes_dir() / f"{p}.yaml", recipes_dir() / "presets" / p,
                       recipes_dir() / "presets" / f"{p}.yaml"]
    return next((c for c in candidates if c.exists()), None)


def resolve_input(path: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """An input path as the user means it: absolute; else relative to ``base`` (e.g. a manifest's folder) or
    the working directory when it exists there; else the shipped file of that name (``shipped``); else the
    path as given (the caller reports it missing)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    local = (Path(base) / p) if base is not None else p
    if local.exists():
        return local
    found = shipped(p)
    return found if found is not None else local


def resolve_output(path: str | os.PathLike) -> Path:
    """An output path: absolute, or relative to the working directory (never to a recipe's or the install's
    folder)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path.cwd() / p


def is_inside_install(path: str | os.PathLike) -> bool:
    """Whether ``path`` lies inside the installed package (where quantlm must never write)."""
    pkg = Path(str(resources.files("quantlm"))).resolve()
    p = Path(os.path.abspath(path)).resolve()
    return p == pkg or pkg in p.parents
