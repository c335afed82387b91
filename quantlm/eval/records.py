"""Result records: one JSON file per evaluation, and all of them as one pandas DataFrame.

One file per record (``<results>/<UTC time>-<model>-<id>.json``), written to a temp file and renamed into
place, rather than lines appended to a shared JSONL: a rename is atomic on every POSIX filesystem, so a
crash leaves either the whole record or nothing, and suite workers running in parallel never interleave
bytes (an O_APPEND write of a multi-kilobyte line is not guaranteed atomic on network filesystems).
Records are never rewritten (a file already at a new record's path is an error, whoever wrote it); removing a
bad run is deleting its file. Readers skip a file that is not a readable record with a warning naming it.

Record layout (``schema: quantlm.eval/1``)::

    model, model_dir, family, preset, bits, params, seed     what was evaluated (extra fields merged in)
    sizes: {paper, exact, entropy}                           total bits under each accounting convention
    metrics: {wikitext2: {ppl, nll, tokens, window, stride, dataset: {path, sha256}, protocol, ...},
              arc_easy: {status, acc, acc_norm, n, ...}, commonsense_avg: {value, missing, definition}}
    recipe, versions, device, wall_time_s, created, id

:func:`load_records` flattens them: one row per record with the identity columns above, ``label`` (the curve
a record belongs to: "FloatLM", "QuantLM 4-bit", "TriLM"), ``size_bits_<convention>``, and one column per
numeric metric named ``<dataset or task>.<metric>`` (``wikitext2.ppl``, ``arc_easy.acc_norm``) plus
``commonsense_avg``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path

from quantlm.atomic import write_json
from quantlm.errors import QuantlmError
from quantlm.outputs import LEDGER, claim_output_file

log = logging.getLogger(__name__)

SCHEMA = "quantlm.eval/1"
IDENTITY = ("id", "created", "model", "model_dir", "family", "preset", "bits", "params", "seed", "device",
            "wall_time_s")


def new_record_id() -> str:
    return uuid.uuid4().hex[:12]


def write_record(record: dict, results_dir: str | os.PathLike) -> Path:
    """Write ``record`` as a new file under ``results_dir`` (atomic; never over an existing file); returns the path."""
    if record.get("schema") != SCHEMA:
        raise ValueError(f"not a quantlm evaluation record (schema {record.get('schema')!r})")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(record.get("model") or "model"))[:60]
    path = Path(results_dir) / f"{stamp}-{slug}-{record['id']}.json"
    claim_output_file(path, overwrite=False, flag="result record",
                      fix="records are never rewritten: give the record a new id (new_record_id())")
    return write_json(path, record)


def curve_label(family: str | None, bits) -> str:
    """The curve a model belongs to in the paper's figures: FloatLM, QuantLM per bitwidth, TriLM."""
    fam = (family or "unknown")
    if fam.lower() == "quantlm":
        return f"QuantLM {int(bits)}-bit" if bits is not None and bits == bits else "QuantLM"
    return {"floatlm": "FloatLM", "trilm": "TriLM"}.get(fam.lower(), fam)


def flatten(record: dict) -> dict:
    """One DataFrame row of a record (see the module doc for the columns)."""
    row = {k: record.get(k) for k in IDENTITY}
    row["label"] = curve_label(record.get("family"), record.get("bits"))
    job = record.get("suite_job") or {}
    row["job_id"], row["job_hash"] = job.get("id"), job.get("hash")
    if record.get("rtn"):  # round-to-nearest baselines are their own curve, not GPTQ's
        row["label"] += " RTN"
    for conv, bits in (record.get("sizes") or {}).items():
        row[f"size_bits_{conv}"] = bits
    for name, metrics in (record.get("metrics") or {}).items():
        if name == "commonsense_avg":
            row["commonsense_avg"] = metrics.get("value")
            continue
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"{name}.{key}"] = value
    return row


def read_record(path: str | os.PathLike) -> dict | None:
    """The record in ``path``, or None when the JSON file is not a quantlm evaluation record."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("skipped %s: not a readable record (%s); delete it or rerun the evaluation that wrote it",
                    path, type(e).__name__)
        return None
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else None


def load_records(results_dir: str | os.PathLike):
    """Every record under ``results_dir`` (searched recursively) as one DataFrame, oldest first."""
    import pandas as pd

    root = Path(results_dir)
    if not root.is_dir():
        raise QuantlmError(f"results directory {root} does not exist; run `quantlm eval` first or pass --results")
    files = [p for p in sorted(root.rglob("*.json")) if p.name != LEDGER]  # not quantlm's list of its own files
    rows = []
    for p in files:
        if (r := read_record(p)) is None:
            continue
        try:
            rows.append(flatten(r))
        except (AttributeError, TypeError, ValueError) as e:  # valid JSON, but not a record's layout
            log.warning("skipped %s: a damaged record (%s); delete it or rerun the evaluation that wrote it", p, e)
    if not rows and files:
        raise QuantlmError(f"no readable result record under {root} ({files[0]} and {len(files) - 1} more JSON "
                           "files are corrupt or not quantlm records); rerun the evaluations")
    df = pd.DataFrame(rows, columns=None if rows else [*IDENTITY, "label"])
    return df.sort_values("created", kind="stable").reset_index(drop=True) if rows else df
