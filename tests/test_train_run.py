"""The trainer end to end on a very small model: checkpoints, exact resume, bad input, data order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantlm import recipes
from quantlm.errors import QuantlmError
from quantlm.train.data import PackedSequences, heldout_text, heldout_token_ids, load_token_corpus
from quantlm.train.recipe import TrainRecipe
from quantlm.train.run import train

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
         "vocab_size": 512, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, corpus_text) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(corpus_text[:60_000], encoding="utf-8")
    (d / "b.jsonl").write_text("".join(json.dumps({"text": corpus_text[i:i + 5000]}) + "\n"
                                       for i in range(60_000, 80_000, 5000)), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def small_recipe(family: str, corpus: Path, tokenizer: Path, cache: Path, **kw) -> TrainRecipe:
    base = dict(model=f"{family}-micro", model_overrides=SMALL, corpus=(str(corpus),), tokenizer=str(tokenizer),
                cache_dir=str(cache), seq_len=32, batch_tokens=256, micro_batch=4, steps=8, warmup_steps=2,
                checkpoint_interval=3, eval_tokens=512, threads=1, lr=(3e-3,) if family == "floatlm" else (6e-3, 4e-3))
    base.update(kw)
    return TrainRecipe(**base)


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("family", ["floatlm", "trilm"])
def test_train_then_load_with_plain_transformers_and_generate(tmp_path, family, small_corpus, tiny_tokenizer_dir,
                                                              cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = small_recipe(family, small_corpus, tiny_tokenizer_dir, cache, steps=10, hf_interval=5)
    final = train(recipe, tmp_path / "run")
    assert final == tmp_path / "run" / "final"
    losses = [loss for _, loss in _losses(tmp_path / "run")]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.3  # it learns
    config = json.loads((final / "config.json").read_text())
    assert config["quantlm_family"] == family
    assert ("pretraining_model_parallel" in config) == (family == "trilm")
    assert (tmp_path / "run" / "hf" / "step-0000005" / "tokenizer.json").is_file()
    if family == "trilm":  # the final checkpoint is the unpacked export
        w = load_file(final / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
        assert w.abs().unique().numel() <= 2
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok("It was", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    assert isinstance(tok.decode(out[0]), str)


@pytest.mark.parametrize("family", ["floatlm", "trilm"])
def test_killed_and_resumed_run_repeats_the_uninterrupted_loss_curve(tmp_path, family, small_corpus,
                                                                     tiny_tokenizer_dir, cache):
    recipe = small_recipe(family, small_corpus, tiny_tokenizer_dir, cache)
    train(recipe, tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill_at_5(record):  # dies after step 5; the newest checkpoint is step 3
        if record["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        train(recipe, tmp_path / "split", on_step=kill_at_5)
    assert not (tmp_path / "split" / "final").exists()
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    train(recipe, tmp_path / "split", resume=True)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")  # bit-identical, steps 1..8 once each
    a = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    b = load_file(tmp_path / "split" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_are_clear_errors_and_overwrite_nothing(tmp_path, small_corpus, tiny_tokenizer_dir, cache):
    recipe = small_recipe("floatlm", small_corpus, tiny_tokenizer_dir, cache, steps=3, checkpoint_interval=1)
    run = tmp_path / "run"
    train(recipe, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(QuantlmError, match="already holds a training run"):
        train(recipe, run)
    with pytest.raises(QuantlmError, match="different recipe"):
        train(recipe, run, resume=True, overrides={"seed": 1})
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(QuantlmError, match="not empty"):
        train(recipe, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    # a corrupt checkpoint on resume: named, with the fix; nothing rewritten
    broken = tmp_path / "broken"
    with pytest.raises(KeyError):
        train(recipe, broken, on_step=lambda r: (_ for _ in ()).throw(KeyError("stop")) if r["step"] == 2 else None)
    state = broken / "checkpoints" / "step-0000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(QuantlmError, match="corrupt"):
        train(recipe, broken, resume=True)
    assert len(state.read_bytes()) == 1000 and not (broken / "final").exists()
    # the fix the message names: drop the corrupt checkpoint, resume from the one before it
    import shutil

    shutil.rmtree(state.parent)
    train(recipe, broken, resume=True)
    assert _losses(broken) == _losses(run)


def test_recipe_shape_and_corpus_errors(tmp_path, small_corpus, tiny_tokenizer_dir, cache):
    with pytest.raises(QuantlmError, match="does not divide hidden_size"):
        small_recipe("floatlm", small_corpus, tiny_tokenizer_dir, cache,
                     model_overrides={**SMALL, "num_attention_heads": 5})
    with pytest.raises(QuantlmError, match="model_parallel=3 does not divide"):
        small_recipe("trilm", small_corpus, tiny_tokenizer_dir, cache, model_overrides={**SMALL, "model_parallel": 3})
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: train\nmodel: trilm-tiny\nlearning_rate: 0.1\n")
    with pytest.raises(QuantlmError, match="unknown key 'learning_rate'"):
        recipes.load(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("")
    with pytest.raises(QuantlmError, match="empty"):
        train(small_recipe("floatlm", empty, tiny_tokenizer_dir, cache), tmp_path / "r1")
    small = tmp_path / "small"
    small.mkdir()
    (small / "s.txt").write_text("a few words only. " * 20)
    with pytest.raises(QuantlmError, match="fewer than one batch"):
        train(small_recipe("floatlm", small, tiny_tokenizer_dir, cache), tmp_path / "r2")
    with pytest.raises(QuantlmError, match="does not exist"):
        train(small_recipe("floatlm", tmp_path / "nowhere", tiny_tokenizer_dir, cache), tmp_path / "r3")
    assert not (tmp_path / "r3" / "final").exists()


def test_data_order_and_heldout_split(small_corpus, tiny_tokenizer_dir, cache):
    fl = small_recipe("floatlm", small_corpus, tiny_tokenizer_dir, cache)
    tr = small_recipe("trilm", small_corpus, tiny_tokenizer_dir, cache)
    corpus = load_token_corpus(fl)
    assert corpus.path == load_token_corpus(tr).path  # one cached token file for the whole suite
    a = PackedSequences(corpus.train_tokens, 32, seed=0)
    b = PackedSequences(corpus.train_tokens, 32, seed=0)
    c = PackedSequences(corpus.train_tokens, 32, seed=1)
    assert torch.equal(a.batch(0, 40), b.batch(0, 40))
    assert not torch.equal(a.batch(0, 40), c.batch(0, 40))
    # one epoch visits every training sequence once
    epoch = a.batch(0, a.num_sequences)
    assert torch.equal(epoch.flatten().sort().values,
                       torch.as_tensor(corpus.train_tokens[: a.num_sequences * 32].astype("int64")).sort().values)
    held = heldout_token_ids(fl)
    n = len(corpus.tokens)
    assert len(held) == round(n * 0.05) and torch.equal(held, torch.as_tensor(corpus.tokens[-len(held):]
                                                                              .astype("int64")))
    text = heldout_text(fl)
    pieces = [p for p in text.split("<|endoftext|>") if p]
    last_doc = json.loads((small_corpus / "b.jsonl").read_text().splitlines()[-1])["text"]
    assert len(text) > 1000 and last_doc.endswith(pieces[-1])


def test_cli_trains_and_lists_keys(tmp_path, small_corpus, tiny_tokenizer_dir, cache, capsys):
    from quantlm.cli import main

    recipe = small_recipe("trilm", small_corpus, tiny_tokenizer_dir, cache, steps=2)
    path = tmp_path / "r.yaml"
    recipes.dump(recipe, path)
    assert main(["train", str(path), "--steps", "3", "--out", str(tmp_path / "run")]) == 0
    assert len(_losses(tmp_path / "run")) == 3
    assert "train " in capsys.readouterr().err  # the progress bar
    assert main(["train", str(path), "--steps", "2", "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert "train " not in capsys.readouterr().err
    assert main(["train", str(path), "--stepz", "3", "--out", str(tmp_path / "run2")]) == 2
    assert "did you mean --steps" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()


def test_shipped_recipes_load():
    from quantlm.paths import recipes_dir

    names = {p.stem for p in recipes_dir().glob("*.yaml")}
    assert {"floatlm-micro", "trilm-micro", "floatlm-tiny", "trilm-tiny"} <= names
    for name in ("floatlm-micro", "trilm-micro", "floatlm-tiny", "trilm-tiny"):
        r = recipes.load(recipes_dir() / f"{name}.yaml", expect=TrainRecipe)
        assert r.spec().name == name and r.spec().vocab_size == 4096


def test_corpus_inputs_parquet_jsonl_and_datasets_dir(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from quantlm.train.data import corpus_sources, iter_documents

    pq.write_table(pa.table({"body": ["one", "two"]}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"body": "three"}\n\n{"body": "four"}\n')
    datasets.Dataset.from_dict({"body": ["five", "six"]}).save_to_disk(str(tmp_path / "ds"))
    sources = corpus_sources([str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl"), str(tmp_path / "ds")])
    assert list(iter_documents(sources, "body")) == ["one", "two", "three", "four", "five", "six"]
    with pytest.raises(QuantlmError, match="text_field"):
        list(iter_documents(sources, "text"))


@pytest.mark.parametrize("change, match", [
    ({"lr": (float("nan"),)}, "learning rates must be positive finite"),
    ({"lr": (-1e-3,)}, "learning rates must be positive finite"),
    ({"lr": (0.0,)}, "learning rates must be positive finite"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1 must be a finite number >= 0"),
    ({"weight_decay": float("nan")}, "weight_decay=nan"),
    ({"grad_clip": -1.0}, r"grad_clip=-1.0 must be a finite number >= 0 \(0 disables clipping\)"),
])
def test_recipe_refuses_bad_optimizer_settings(small_corpus, tiny_tokenizer_dir, cache, change, match):
    with pytest.raises(QuantlmError, match=match):
        small_recipe("floatlm", small_corpus, tiny_tokenizer_dir, cache, **change)


def test_warmup_longer_than_the_run_is_a_warning(small_corpus, tiny_tokenizer_dir, cache):
    r = small_recipe("floatlm", small_corpus, tiny_tokenizer_dir, cache, steps=5, warmup_steps=10)
    assert "never reaches its peak" in r.schedule_warnings()[0]
    assert small_recipe("floatlm", small_corpus, tiny_tokenizer_dir, cache).schedule_warnings() == []


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_stub(tmp_path, small_corpus, tiny_tokenizer_dir,
                                                                      cache):
    recipe = small_recipe("floatlm", small_corpus, tiny_tokenizer_dir, cache, steps=2, checkpoint_interval=0)

    def boom(record):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        train(recipe, tmp_path / "run", on_step=boom)
    assert not (tmp_path / "run").exists()
    # a stub left by SIGKILL (recipe.yaml, a few metrics, no checkpoint) does not block a rerun either,
    # even with another recipe
    (tmp_path / "run").mkdir()
    recipes.dump(recipe, tmp_path / "run" / "recipe.yaml")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    final = train(recipe, tmp_path / "run", overrides={"seed": 3})
    assert (final / "config.json").is_file() and [s for s, _ in _losses(tmp_path / "run")] == [1, 2]


def test_final_dir_takes_the_checkpoint_and_the_scratch_folder_goes(tmp_path, small_corpus, tiny_tokenizer_dir,
                                                                    cache):
    from quantlm import locks
    from quantlm.outputs import MARKER

    recipe = small_recipe("floatlm", small_corpus, tiny_tokenizer_dir, cache, steps=2, checkpoint_interval=1)
    work, final = tmp_path / ".m.train", tmp_path / "m"
    assert train(recipe, work, final_dir=final) == final
    assert (final / "config.json").is_file() and (final / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no scratch, no lock
    mtime = (final / "model.safetensors").stat().st_mtime_ns
    assert train(recipe, work, resume=work.exists(), final_dir=final) == final  # complete: returned at once
    assert (final / "model.safetensors").stat().st_mtime_ns == mtime and not work.exists()
    train(recipe, work, final_dir=final, overrides={"seed": 1}, keep_scratch=True)  # another recipe: retrained
    assert (work / "checkpoints").is_dir() and (final / "model.safetensors").stat().st_mtime_ns != mtime
    with locks.hold(tmp_path / "other"):
        pass
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(QuantlmError, match="not a quantlm output"):
        train(recipe, tmp_path / ".f.train", final_dir=foreign)
    assert not (tmp_path / ".f.train").exists()


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, small_corpus, tiny_tokenizer_dir, cache):
    import json as _json

    from quantlm import locks
    from quantlm.outputs import hostname

    recipe = small_recipe("floatlm", small_corpus, tiny_tokenizer_dir, cache, steps=2)
    lock = locks.lock_path(tmp_path / "run")
    lock.write_text(_json.dumps({"pid": 1, "host": hostname() + "-x", "started": "now", "command": "quantlm train"}))
    with pytest.raises(QuantlmError, match="in use by another quantlm train run .* delete "):
        train(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_rng_state_resumes_on_fewer_gpus_than_saved(monkeypatch, caplog):
    """One CUDA RNG state per GPU of the saving run; resuming where fewer GPUs are visible restores those it has
    (torch's set_rng_state_all would index past the visible devices)."""
    import torch

    from quantlm.train import checkpoints

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append((device, int(s[0]))))
    state = {"torch": torch.get_rng_state(), "python": __import__("random").getstate(),
             "cuda": [torch.tensor([7], dtype=torch.uint8), torch.tensor([9], dtype=torch.uint8)]}
    with caplog.at_level("WARNING"):
        checkpoints.set_rng_state(state)
    assert restored == [(0, 7)] and "CUDA RNG states of 2 GPUs, this run sees 1" in caplog.text


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_autocast_run_resumes_like_the_uninterrupted_one(tmp_path, device, small_corpus, tiny_tokenizer_dir,
                                                              cache, monkeypatch):
    """precision bf16 (auto on a GPU): every micro-step's forward runs under bf16 autocast on the training device,
    the loss is computed in fp32, and a killed run resumed from its checkpoint repeats the uninterrupted losses
    (bit for bit on the CPU; to bf16 noise on CUDA, whose kernels may reduce in another order)."""
    from quantlm.train import run as run_module

    if device == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU variant also on a GPU machine
    seen = []
    plain_loss = run_module._loss

    def watching(model, ids):
        seen.append((ids.device.type, torch.is_autocast_enabled(ids.device.type),
                     torch.get_autocast_dtype(ids.device.type)))
        loss = plain_loss(model, ids)
        assert loss.dtype == torch.float32
        return loss

    monkeypatch.setattr(run_module, "_loss", watching)
    recipe = small_recipe("floatlm", small_corpus, tiny_tokenizer_dir, cache,
                          precision="bf16" if device == "cpu" else "auto")
    train(recipe, tmp_path / "whole")
    assert seen and set(seen) == {(device, True, torch.bfloat16)}

    class Killed(Exception):
        pass

    def kill_at_5(record):
        if record["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        train(recipe, tmp_path / "split", on_step=kill_at_5)
    train(recipe, tmp_path / "split", resume=True)
    whole, split = _losses(tmp_path / "whole"), _losses(tmp_path / "split")
    assert [s for s, _ in split] == [s for s, _ in whole] == list(range(1, 9))
    if device == "cpu":
        assert split == whole
    else:
        assert all(abs(a - b) <= 2e-2 * abs(a) for (_, a), (_, b) in zip(whole, split, strict=True))
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert ("mfu" in records[-1]) == (device == "cuda")
