"""Models as deployed: llama.cpp's decode speed and memory for each GGUF, measured one process per model.

:func:`bench` takes GGUF files, quantlm gguf export directories or checkpoint directories (exported to a
temporary GGUF first, through ``quantlm.export``), and runs each file in a child process of its own
(``python -m quantlm.deploy``), so the peak resident memory of a record belongs to that model alone. The child
loads the file with llama-cpp-python, evaluates a prompt of ``prompt_tokens`` at once (prompt tokens/s), then
generates ``decode_tokens`` greedily one at a time at batch 1 (decode tokens/s), ``repeats`` times after a short
warm-up; the medians are reported with every measurement. llama_cpp is imported only in the child, and only
when a benchmark runs: where it is missing, :func:`check_llama_cpp` says how to get it.

On a shared machine, compare types within one run (the same load) and read the load averages in the records.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from quantlm import accounting as acc
from quantlm.accounting import budget_from_gguf, gguf_file
from quantlm.errors import QuantlmError
from quantlm.export import export_model
from quantlm.formats.registry import Layout
from quantlm.hf_checkpoint import read_config
from quantlm.recipes import doc

INSTALL_HINT = ("llama.cpp's Python binding (llama_cpp) is not importable by {python}: run `bash .ci/llamacpp.sh` "
                "(a separate virtualenv, .venv-llamacpp) and use its python, or `pip install llama-cpp-python` "
                "(builds llama.cpp with cmake, several minutes)")
TERNARY_FALLBACK = ("TQ1_0", "TQ2_0", "Q4_0", "Q8_0")  # smallest first: a TriLM's exact homes


@dataclass(frozen=True)
class BenchSettings:
    """How llama.cpp is run for each model."""

    threads: int = doc("CPU threads llama.cpp uses (1 on a shared machine: spinning threads collapse throughput)", 1)
    prompt_tokens: int = doc("prompt length evaluated at once (prompt tokens/s)", 128)
    decode_tokens: int = doc("tokens generated one at a time after the prompt, greedy, batch 1 (decode tokens/s)", 64)
    repeats: int = doc("measurements per model after a warm-up; the medians are reported", 3)
    gguf_type: str = doc("ggml type of the block linears when a checkpoint directory is exported first (empty: F16 "
                         "for a FloatLM, TQ1_0 for a TriLM, the smallest exact type for a packed QuantLM)", "")

    def __post_init__(self):
        for name in ("threads", "prompt_tokens", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise QuantlmError(f"bench {name}={getattr(self, name)}: must be at least 1")


def check_llama_cpp(python: str | None = None) -> str:
    """llama_cpp's version as seen by ``python`` (default: this interpreter); a QuantlmError saying how to get it
    when it is missing. Nothing is imported into this process."""
    python = python or sys.executable
    try:
        probe = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                               text=True)
    except OSError:
        probe = None
    if probe is None or probe.returncode != 0:
        raise QuantlmError(INSTALL_HINT.format(python=python))
    return probe.stdout.strip()


@functools.cache
def llama_cpp_available(python: str | None = None) -> bool:
    """Whether ``python`` can import llama_cpp (asked once per process and interpreter)."""
    try:
        check_llama_cpp(python)
    except QuantlmError:
        return False
    return True


# ------------------------------------------------------------------------------------------ which file

def gguf_type_for(model_dir: str | os.PathLike, requested: str = "") -> tuple[str, str]:
    """(type, note) to export a checkpoint with for llama.cpp: ``requested``, else the export's default; a TriLM
    whose rows no TQ type holds exactly (widths not multiples of 256, or straddling shards) gets the smallest
    type that does (Q4_0, Q8_0), said in the note. Decided from config.json alone."""
    if requested:
        return requested, ""
    config = read_config(model_dir)
    layout = acc.checkpoint_layout(Path(model_dir), config)
    if layout.family != "trilm":
        return "", ""
    why = ""
    for t in TERNARY_FALLBACK:
        try:
            acc.budget(Path(model_dir) / "config.json", layout=Layout("trilm", "gguf", mp=layout.mp, options={"gguf_type": t}))
        except QuantlmError as e:
            why = why or str(e)
            continue
        return t, "" if t == "TQ1_0" else f"exported as {t}: {why}"
    raise QuantlmError(f"{model_dir}: no GGUF type holds this TriLM exactly ({why})")


def resolve(model: str | os.PathLike, workdir: Path, gguf_type: str = "") -> tuple[Path, dict]:
    """The GGUF file to run for ``model`` (a .gguf file, a gguf export directory, or a checkpoint directory that is
    exported into ``workdir`` first) and what was done to get it."""
    path = Path(model)
    found = gguf_file(path)
    if found is not None:
        if not found.is_file():
            raise QuantlmError(f"{found}: no such GGUF file")
        return found, {"source": str(path), "exported": False}
    if not (path / "config.json").is_file():
        raise QuantlmError(f"{path}: neither a .gguf file nor a checkpoint directory (config.json)")

    type_name, note = gguf_type_for(path, gguf_type)
    out = workdir / f"{len(list(workdir.iterdir()))}-{path.name}"
    report = export_model(path, "gguf", out, options={"float_dtype": "F16", "gguf_type": type_name})
    info = {"source": str(path), "exported": True}
    if note:
        info["note"] = note
    if report["changes"]:
        info["changes"] = len(report["changes"])
    return out / "model.gguf", info


# ------------------------------------------------------------------------------------------ measuring

def bench(models: list[str | os.PathLike], settings: BenchSettings = BenchSettings(), *, progress: bool = True,
          python: str | None = None, labels: list[str] | None = None) -> list[dict]:
    """One record per model: file size and bits per weight (from the GGUF header), prompt and decode tokens/s,
    load time, peak resident memory (VmHWM) of the child process, threads, CPU, versions and the load averages around
    the measurement. ``python``: the interpreter that has llama_cpp (default: this one)."""
    from tqdm.auto import tqdm


    python = python or sys.executable
    version = check_llama_cpp(python)
    budgets = {}  # every GGUF file given is checked (its header against the file) before the first one runs
    for model in models:
        found = gguf_file(model)
        if found is not None:
            budgets[str(found)] = budget_from_gguf(found)
    records = []
    with tempfile.TemporaryDirectory(prefix="quantlm-bench-") as tmp:
        bar = tqdm(list(models), desc="llama.cpp bench", unit="model", disable=not progress)
        for i, model in enumerate(bar):
            bar.set_postfix_str(Path(model).name)
            path, info = resolve(model, Path(tmp), settings.gguf_type)
            b = budgets.get(str(path)) or budget_from_gguf(path)
            linear = [r for r in b.records if r.role == "block_linear"]
            linear_params = sum(r.params for r in linear)
            payload = b.total_bits("exact") / 8
            before = os.getloadavg()
            measured = _run_child(python, path, settings)
            rec = {
                "model": labels[i] if labels else b.model, "family": b.family, "bits": b.bits, "file": str(path),
                "file_type": _main_type(linear), "params": b.params, "gguf_bytes": path.stat().st_size,
                "payload_bytes": int(payload), "bits_per_weight": 8 * payload / b.params,
                "linear_bits_per_weight": sum(r.bits("exact") for r in linear) / linear_params if linear_params
                else None,
                **measured, "threads": settings.threads, "prompt_tokens": settings.prompt_tokens,
                "decode_tokens": settings.decode_tokens, "repeats": settings.repeats, "llama_cpp": version,
                "cpu": cpu_name(), "cores": os.cpu_count(), "load_avg_before": list(before),
                "load_avg_after": list(os.getloadavg()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info,
            }
            records.append(rec)
            bar.set_postfix_str(f"{Path(model).name}: {rec['decode_tok_s']:.1f} tok/s")
    return records


def _main_type(linear) -> str:
    types = [r.storage or r.dtype for r in linear]
    return max(set(types), key=types.count) if types else ""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run_child(python: str, path: Path, s: BenchSettings) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # waiting threads must not spin on a shared machine
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    args = {"path": str(path), "threads": s.threads, "prompt_tokens": s.prompt_tokens,
            "decode_tokens": s.decode_tokens, "repeats": s.repeats}
    proc = subprocess.run([python, "-m", "quantlm.deploy", json.dumps(args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise QuantlmError(f"{path}: llama.cpp failed to run it ({tail})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _status_mb(key: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in MiB.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child started from a large
    parent would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise QuantlmError(f"/proc/self/status has no {key}; peak memory is measured on Linux only")


def measure(path: str, threads: int, prompt_tokens: int, decode_tokens: int, repeats: int) -> dict:
    """In the child: load ``path`` with llama.cpp and time a prompt and greedy decoding (the records' fields)."""
    import llama_cpp
    import numpy as np

    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(path, n_ctx=prompt_tokens + decode_tokens, n_batch=max(prompt_tokens, 8),
                          n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    prompt = np.random.default_rng(0).integers(0, n_vocab, prompt_tokens).tolist()

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    def run(n_prompt: int, n_decode: int) -> tuple[float, float]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt[:n_prompt])
        tp = time.perf_counter() - t
        tok = next_token()
        t = time.perf_counter()
        for _ in range(n_decode):
            llm.eval([tok])
            tok = next_token()
        return n_prompt / tp, n_decode / (time.perf_counter() - t)

    run(min(16, prompt_tokens), min(4, decode_tokens))  # warm-up: page faults, thread start
    prompt_s, decode_s = zip(*(run(prompt_tokens, decode_tokens) for _ in range(repeats)), strict=True)
    peak = _status_mb("VmHWM")
    return {"prompt_tok_s": statistics.median(prompt_s), "decode_tok_s": statistics.median(decode_s),
            "prompt_tok_s_all": list(prompt_s), "decode_tok_s_all": list(decode_s), "load_s": load_s,
            "rss_mb": peak, "rss_base_mb": base,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


def token_nll(path: str | os.PathLike, windows, *, threads: int = 1):
    """Per-token negative log-likelihood (nats) llama.cpp gives a GGUF model on each window of token ids: tokens
    1..L-1 of every window, predicted from the ones before (no BOS added), concatenated as float64. Runs in this
    process, so llama_cpp must be importable here."""
    try:
        import llama_cpp
    except ImportError:
        raise QuantlmError(INSTALL_HINT.format(python=sys.executable)) from None
    import numpy as np

    windows = [list(map(int, w)) for w in windows]
    n_ctx = max(len(w) for w in windows)
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    out = []
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        out.append(logz - logits[np.arange(len(w) - 1), w[1:]])
    return np.concatenate(out)


if __name__ == "__main__":  # the child process of bench(): one model, one JSON line on stdout
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
