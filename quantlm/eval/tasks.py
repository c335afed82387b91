"""Zero-shot task definitions over local data files, with the prompts of lm-evaluation-harness.

Each task turns its local file into :class:`Doc` items: for every answer choice a (context, continuation)
pair whose log-likelihood the model scores, the choice text (its length normalises ``acc_norm``), and the
gold index. Prompts, target delimiter (" ") and preprocessing follow lm-eval's task YAMLs (v0.4):

- arc_easy / arc_challenge: "Question: {q}\\nAnswer:" -> " {choice}"            (acc, acc_norm)
- piqa: "Question: {goal}\\nAnswer:" -> " {sol}"                                 (acc, acc_norm)
- hellaswag: preprocess("{activity}: {ctx_a} {ctx_b.capitalize()}") -> " {preprocess(ending)}" (acc, acc_norm)
- boolq: "{passage}\\nQuestion: {question}?\\nAnswer:" -> " no" / " yes"         (acc)
- winogrande: partial scoring, context "{sentence up to _}{option}" -> " {rest}" (acc)
- lambada_openai: context = text minus its last word -> " {last word}"          (acc = greedy match, ppl)
- logiqa: "Passage: ..\\nQuestion: ..\\nChoices:\\nA. ..\\n..Answer:" -> " {option}" (acc, acc_norm)
- mmlu: "The following are multiple choice questions (with answers) about {subject}.\\n\\n{q}\\nA. ..
  \\nD. ..\\nAnswer:" -> " A".." D", accuracy over all items of the 57 subjects   (acc)

The local copies differ from the hub copies lm-eval reads in ways listed in data/eval/README.md (ARC and
BoolQ come re-formatted by llm-foundry, HellaSwag in llama.cpp's text layout with ``ctx`` pre-joined),
so a score here is close to, not guaranteed identical with, lm-eval's on the hub data.
"""

from __future__ import annotations

import bz2
import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantlm.errors import QuantlmError
from quantlm.eval.datasets import eval_data_roots, find_eval_file, sha256_file


@dataclass(frozen=True)
class Doc:
    """One item: ``contexts[i] + continuations[i]`` is choice i; ``choices[i]`` its text for acc_norm."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Task:
    name: str
    files: tuple[str, ...]            # relative to an eval data root
    build: Callable[[list[Path], int | None], list[Doc]]  # (files, limit) -> docs
    metrics: tuple[str, ...]          # reported metrics, the first is the headline
    kind: str = "multiple_choice"     # or "lambada" (greedy-match accuracy + perplexity)
    split: str = "test"


@dataclass(frozen=True)
class UnavailableTask:
    name: str
    reason: str


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _mc(context: str, choices: list[str], gold: int) -> Doc:
    return Doc((context,) * len(choices), tuple(" " + c for c in choices), tuple(choices), gold)


def _head(rows, limit):
    return rows if limit is None else rows[:limit]


def _arc(files, limit):
    return [_mc(r["query"] + "\nAnswer:", r["choices"], int(r["gold"])) for r in _head(_jsonl(files[0]), limit)]


def _piqa(files, limit):
    rows = _jsonl(files[0])
    labels = [int(x) for x in files[1].read_text().split()]
    if len(labels) != len(rows):
        raise QuantlmError(f"{files[1]}: {len(labels)} labels for {len(rows)} PIQA items; the files do not match")
    return [_mc(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], y)
            for r, y in _head(list(zip(rows, labels, strict=True)), limit)]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning: drop WikiHow bracket markers and doubled spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


_SENTENCE_END = re.compile(r"(?<=[.!?]) ")


def hellaswag_context(line: str) -> str:
    """Undo the pre-joined ``ctx`` of the text layout as far as possible: lm-eval builds
    ``ctx_a + " " + ctx_b.capitalize()``; ctx_b is the trailing fragment, and when it starts in lower case
    (about 3,200 of the 10,042 items) it cannot belong to ctx_a, whose sentences start in upper case."""
    label, sep, body = line.partition(": ")
    parts = _SENTENCE_END.split(body)
    if parts[-1][:1].islower():
        parts[-1] = parts[-1].capitalize()
    return label + sep + " ".join(parts)


def _hellaswag(files, limit):
    lines = bz2.decompress(files[0].read_bytes()).decode("utf-8").split("\n")
    docs = []
    for i in range(0, len(lines) - 5, 6):  # 6 lines per item: context, gold, 4 endings
        ctx, gold, endings = lines[i], int(lines[i + 1]), lines[i + 2: i + 6]
        docs.append(_mc(hellaswag_preprocess(hellaswag_context(ctx)), [hellaswag_preprocess(e) for e in endings],
                        gold))
        if limit is not None and len(docs) >= limit:
            break
    return docs


def _boolq(files, limit):
    docs = []
    for r in _head(_jsonl(files[0]), limit):
        passage, question = r["query"].rsplit("\nQuestion: ", 1)
        passage = passage.removeprefix("Passage: ")
        question = question if question.endswith("?") else question + "?"
        docs.append(_mc(f"{passage}\nQuestion: {question}\nAnswer:", list(r["choices"]), int(r["gold"])))
    return docs


def _winogrande(files, limit):
    docs = []
    for r in _head(_jsonl(files[0]), limit):
        idx = r["sentence"].index("_")
        rest = " " + r["sentence"][idx + 1:].strip()
        options = [r["option1"], r["option2"]]
        contexts = tuple(r["sentence"][:idx] + o for o in options)
        docs.append(Doc(contexts, (rest, rest), tuple(options), int(r["answer"]) - 1))
    return docs


def _lambada(files, limit):
    docs = []
    for r in _head(_jsonl(files[0]), limit):
        context, word = r["text"].rsplit(" ", 1)
        docs.append(Doc((context,), (" " + word,), (word,), 0))
    return docs


_LOGIQA_OPTION = re.compile(r"\n(?=[BCD]\. )")


def _logiqa(files, limit):
    docs = []
    for r in _head(_jsonl(files[0]), limit):
        head, options_text = r["query"].split("\nChoices: ", 1)
        context, question = head.removeprefix("Context: ").split("\nQuestion: ", 1)
        options = [o[3:].strip() for o in _LOGIQA_OPTION.split(options_text.strip())]
        if len(options) != 4:
            raise QuantlmError(f"{files[0]}: a LogiQA item has {len(options)} options, expected 4")
        prompt = f"Passage: {context}\nQuestion: {question}\nChoices:\n"
        prompt += "".join(f"{letter}. {o}\n" for letter, o in zip("ABCD", options, strict=True)) + "Answer:"
        docs.append(_mc(prompt, options, int(r["gold"])))
    return docs


def _mmlu(files, limit):
    docs = []
    for path in files:  # lm-eval's --limit applies per subject
        subject = path.name.removesuffix("_test.csv").replace("_", " ")
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f) if row]
        for q, a, b, c, d, answer in _head(rows, limit):
            prompt = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
                      f"{q.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:")
            docs.append(_mc(prompt, ["A", "B", "C", "D"], "ABCD".index(answer.strip())))
    return docs


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("arc_easy", ("arc/arc_easy_test_llmfoundry.jsonl",), _arc, ("acc", "acc_norm")),
    Task("arc_challenge", ("arc/arc_challenge_test_llmfoundry.jsonl",), _arc, ("acc", "acc_norm")),
    Task("piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa, ("acc", "acc_norm"), split="validation"),
    Task("hellaswag", ("hellaswag/hellaswag_val_full.txt.bz2",), _hellaswag, ("acc", "acc_norm"),
         split="validation"),
    Task("boolq", ("boolq/boolq_dev_llmfoundry.jsonl",), _boolq, ("acc",), split="validation"),
    Task("winogrande", ("winogrande/dev.jsonl",), _winogrande, ("acc",), split="validation"),
    Task("lambada_openai", ("lambada_openai/lambada_test.jsonl",), _lambada, ("acc", "ppl"), kind="lambada"),
    Task("logiqa", ("logiqa/logiqa_test_llmfoundry.jsonl",), _logiqa, ("acc", "acc_norm")),
    Task("mmlu", ("mmlu/test",), _mmlu, ("acc",)),
]}

UNAVAILABLE: dict[str, UnavailableTask] = {t.name: t for t in [
    UnavailableTask("triviaqa", "generation task (greedy answer, exact match) is not implemented; only the "
                    "llm-foundry 3000-question subsample exists locally, not lm-eval's 17,944-question set"),
    UnavailableTask("sciq", "quantlm has no SciQ data (the test split with its distractors and support passages, "
                    "not shipped in data/eval) and no scorer for it"),
]}

# Spectra's commonsense average (DESIGN section 8): acc_norm for these four, acc for the other two.
COMMONSENSE = {"arc_challenge": "acc_norm", "arc_easy": "acc_norm", "hellaswag": "acc_norm",
               "piqa": "acc_norm", "boolq": "acc", "winogrande": "acc"}
ALIASES = {"commonsense": tuple(COMMONSENSE), "spectra": (*COMMONSENSE, "lambada_openai", "logiqa", "mmlu",
                                                         "triviaqa", "sciq")}


def expand_tasks(names) -> list[str]:
    """Expand aliases (``commonsense``, ``spectra``), drop duplicates, reject unknown names."""
    out: list[str] = []
    for name in names:
        for n in ALIASES.get(name, (name,)):
            if n not in TASKS and n not in UNAVAILABLE:
                known = ", ".join([*TASKS, *UNAVAILABLE, *ALIASES])
                raise QuantlmError(f"unknown task {n!r}; choose from {known}")
            if n not in out:
                out.append(n)
    return out


def task_files(task: Task) -> list[Path]:
    """The task's data files, resolved over the eval data roots (a folder entry expands to its CSVs)."""
    files = []
    for rel in task.files:
        if rel.endswith((".jsonl", ".lst", ".bz2", ".csv")):
            files.append(find_eval_file(rel, f"task {task.name}"))
            continue
        folder = next((root / rel for root in eval_data_roots() if (root / rel).is_dir()), None)
        if folder is None or not any(folder.glob("*.csv")):
            raise QuantlmError(f"task {task.name}: data folder {rel} not found under "
                               f"{', '.join(map(str, eval_data_roots()))}; point $QUANTLM_EVAL_DATA at a "
                               f"folder holding {rel}/*.csv")
        files.extend(sorted(folder.glob("*.csv")))
    return files


def load_docs(task: Task, limit: int | None = None) -> tuple[list[Doc], list[dict]]:
    """The task's docs (first ``limit`` per file group) and a description of its files (path, sha256)."""
    files = task_files(task)
    try:
        docs = task.build(files, limit)
    except (KeyError, ValueError, IndexError, json.JSONDecodeError) as e:
        if isinstance(e, QuantlmError):
            raise
        raise QuantlmError(f"task {task.name}: data file {files[0]} is not in the expected format ({e!r})") from None
    if not docs:
        raise QuantlmError(f"task {task.name}: no items in {files[0]}; the data file is empty")
    described = [{"path": str(p), "sha256": sha256_file(p)} for p in files[:8]]
    if len(files) > 8:
        described.append({"path": f"... {len(files) - 8} more files", "sha256": None})
    return docs, described
