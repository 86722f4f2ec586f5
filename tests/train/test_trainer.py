import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import toy_tasks  # noqa: E402

from generalist.train.data import build_data  # noqa: E402
from generalist.train.mixture import MixtureSampler  # noqa: E402
from generalist.train.trainer import decay_split, TrainConfig, Trainer, _fused_adamw_serves, lr_at, set_option  # noqa: E402


def _cfg(tmp_path, **over):
    base = dict(preset="tiny", out=str(tmp_path / "run"), steps=6, batch_size=8, ckpt_every=3, log_every=1,
                vocab_size=300, warmup=2, lr=3e-3)
    base.update(over)
    return TrainConfig(**base)


def _data():
    return build_data(toy_tasks.MIXTURE, tasks=toy_tasks.TASKS, progress=False)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_few_steps_log_and_checkpoint(tmp_path):
    trainer = Trainer(_cfg(tmp_path), _data(), progress=False)
    trainer.fit()
    run = tmp_path / "run"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) and r["tokens"] > 0 for r in recs)
    assert {"bars", "echo", "contrastive"} <= set().union(*(r["task_loss"] for r in recs))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "state.json", "meta.json"):
        assert (run / "checkpoint" / name).is_file(), name
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 6
    assert not (run / ".checkpoint.tmp").exists()
    assert trainer.routing["task"].sum() > 0
    # AdamW's fused implementation (plain CPU parameters); not for parameters it cannot take
    assert all(group["fused"] for group in trainer.opt.param_groups)
    assert not _fused_adamw_serves([torch.nn.Parameter(torch.zeros(2, device="meta"))])


def test_contrastive_batch_adds_pairs_and_leaves_the_mixture_as_it_was(tmp_path, monkeypatch):
    """contrastive_batch draws that many pairs per micro-batch from the contrastive tasks, for
    the contrastive loss alone; the mixture's own batches (the main sampler) are unchanged."""
    plain = Trainer(_cfg(tmp_path / "a", steps=4), _data(), progress=False)
    plain.fit()
    extra = Trainer(_cfg(tmp_path / "b", steps=4, contrastive_batch=6), _data(), progress=False)
    pairs = []
    real = extra.model.contrastive_loss
    monkeypatch.setattr(extra.model, "contrastive_loss", lambda a, b: pairs.append(len(a)) or real(a, b))
    extra.fit()
    assert extra.sampler.state_dict() == plain.sampler.state_dict()
    assert len(pairs) == 4 and all(n >= 6 for n in pairs)
    recs = [json.loads(line) for line in (tmp_path / "b/run/metrics.jsonl").read_text().splitlines()]
    assert all("contrastive" in r["task_loss"] for r in recs)
    state = json.loads((tmp_path / "b/run/checkpoint/state.json").read_text())
    assert state["con_sampler"]["names"] == ["swatches"] and "con_sampler" not in json.loads(
        (tmp_path / "a/run/checkpoint/state.json").read_text())
    with pytest.raises(ValueError, match="contrastive_batch is 4, but no task of this mixture trains the contrastive"):
        Trainer(_cfg(tmp_path / "c", contrastive_batch=4), {k: v for k, v in _data().items() if k != "swatches"},
                progress=False)


SCRIPT = """
import os, sys, json
sys.path.insert(0, {test_dir!r})
import toy_tasks
from generalist.train.data import build_data
from generalist.train.trainer import TrainConfig, Trainer
cfg = TrainConfig(**json.loads({cfg!r}))
trainer = Trainer(cfg, build_data(toy_tasks.MIXTURE, tasks=toy_tasks.TASKS, progress=False),
                  resume={resume}, progress=False)
kill_at = {kill_at}
if kill_at:
    step = trainer.train_step
    def killing_step():
        rec = step()
        if rec["step"] == kill_at:
            os.kill(os.getpid(), 9)
        return rec
    trainer.train_step = killing_step
trainer.fit()
"""


def _run(cfg, resume=False, kill_at=0):
    code = SCRIPT.format(test_dir=str(Path(__file__).parent), cfg=json.dumps(cfg.__dict__), resume=resume,
                         kill_at=kill_at)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("contrastive_batch", [0, 4])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, contrastive_batch):
    steps = dict(steps=10, ckpt_every=4, contrastive_batch=contrastive_batch)
    straight = _run(_cfg(tmp_path / "a", **steps))
    assert straight.returncode == 0, straight.stderr
    killed = _run(_cfg(tmp_path / "b", **steps), kill_at=6)  # last checkpoint at step 4
    assert killed.returncode == -9, killed.stderr
    assert json.loads((tmp_path / "b/run/checkpoint/state.json").read_text())["step"] == 4
    resumed = _run(_cfg(tmp_path / "b", **steps), resume=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _losses(tmp_path / "a/run"), _losses(tmp_path / "b/run")
    assert len(a) == len(b) == 10
    assert a == b  # bit-for-bit, step for step


def test_non_finite_loss_skips_the_step_and_stops_after_k(tmp_path, monkeypatch):
    trainer = Trainer(_cfg(tmp_path, max_bad_steps=3), _data(), progress=False)
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real_forward = trainer.model.forward

    def nan_forward(batch):
        out = real_forward(batch)
        out.loss = out.loss * float("nan")
        return out
    monkeypatch.setattr(trainer.model, "forward", nan_forward)
    rec = trainer.train_step()
    assert rec["skipped"] and trainer.skipped == 1
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    trainer.train_step()
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        trainer.train_step()


def test_a_skipped_step_logs_and_counts_none_of_its_micro_batches(tmp_path, monkeypatch):
    """accum=2, the second micro-batch's loss NaN: the step is skipped, and the first micro-batch's
    finite loss and routing counts are dropped with it (they were logged as the step's loss)."""
    trainer = Trainer(_cfg(tmp_path, accum=2), _data(), progress=False)
    trainer.train_step()
    routing = {k: v.copy() for k, v in trainer.routing.items()}
    real_forward, calls = trainer.model.forward, []

    def second_nan(batch):
        out = real_forward(batch)
        calls.append(1)
        if len(calls) == 2:
            out.loss = out.loss * float("nan")
        return out
    monkeypatch.setattr(trainer.model, "forward", second_nan)
    rec = trainer.train_step()
    assert rec["skipped"] and len(calls) == 2
    assert math.isnan(rec["loss"]) and math.isnan(rec["aux_loss"]) and rec["task_loss"] == {}
    assert all(np.array_equal(trainer.routing[k], routing[k]) for k in routing)


def test_sampler_temperature_and_epochs():
    s = MixtureSampler({"a": 100, "b": 1}, temperature=1.0, seed=0)
    assert np.isclose(s.probs[0], 100 / 101)
    s = MixtureSampler({"a": 100, "b": 1}, temperature=1e9, seed=0)
    assert np.allclose(s.probs, [0.5, 0.5], atol=1e-6)
    s = MixtureSampler({"a": 5}, seed=1)
    first = [i for _, i in s.sample(5)]
    assert sorted(first) == list(range(5))  # an epoch visits every example once
    state = json.loads(json.dumps(s.state_dict()))
    s2 = MixtureSampler({"a": 5}, seed=99)
    s2.load_state_dict(state)
    assert s.sample(7) == s2.sample(7)
    # a task whose training split changed size since the checkpoint: named, with the way out
    with pytest.raises(ValueError, match=r"the training data changed since the checkpoint: a \(5 then, 6 now\), "
                                         r"b \(absent then, 2 now\) training examples; .*--overwrite"):
        MixtureSampler({"a": 6, "b": 2}, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="no training examples"):
        MixtureSampler({"a": 0})
    # a temperature near 0 samples the largest task alone (n^(1/T) overflowed into NaNs)
    s = MixtureSampler({"a": 6000, "b": 4000, "c": 6000}, temperature=0.01, seed=0)
    assert np.allclose(s.probs, [0.5, 0.0, 0.5], rtol=0, atol=1e-15) and {t for t, _ in s.sample(50)} == {"a", "c"}
    assert MixtureSampler({"a": 6000, "b": 40}, temperature=1e-4, seed=0).probs.tolist() == [1.0, 0.0]
    # a state no sampler wrote: named, not an IndexError at the first step
    for edit, message in [(lambda st: st["order"].update(a=[0, 1, 2, 3, 9]), r"order\['a'\] is not an order of its 5"),
                          (lambda st: st["cursor"].update(a="2"), r"cursor\['a'\] is '2', not a place in its order"),
                          (lambda st: st["cursor"].update(a=6), r"cursor\['a'\] is 6"),
                          (lambda st: st.update(order={}), "order and cursor must hold one entry per task"),
                          (lambda st: st.update(rng={"state": 1}), "rng is not a PCG64 state"),
                          (lambda st: st.clear(), "not a sampler's state")]:
        bad = json.loads(json.dumps(state))
        edit(bad)
        with pytest.raises(ValueError, match="^state.json: " + message):
            MixtureSampler({"a": 5}, seed=99).load_state_dict(bad, "state.json: ")


def test_lr_schedule_and_options(tmp_path):
    cfg = _cfg(tmp_path, steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1) and lr_at(55, cfg) == pytest.approx(0.55)
    # a time budget that runs out first drives the decay; one that is far from spent changes nothing
    assert lr_at(55, cfg, time_fraction=1.0) == pytest.approx(0.1)
    assert lr_at(10, cfg, time_fraction=0.5) == pytest.approx(0.55)
    assert lr_at(55, cfg, time_fraction=0.01) == pytest.approx(0.55)
    # a time budget spent during the warm-up decays the ramp too: the run still ends at the floor
    assert lr_at(4, cfg, time_fraction=0.5) == pytest.approx(0.5 * 0.55)
    assert lr_at(4, cfg, time_fraction=1.0) == pytest.approx(0.5 * 0.1)
    assert lr_at(99, _cfg(tmp_path, steps=100, warmup=100, lr=1.0)) == pytest.approx(1.0)  # peaks at the last step
    assert lr_at(3, _cfg(tmp_path, steps=100, warmup=0, lr=1.0, min_lr_ratio=0.1)) < 1.0  # no warm-up: decay from 0
    set_option(cfg, "batch_size=4")
    set_option(cfg, "model.d_model=48")
    assert cfg.batch_size == 4 and cfg.model == {"d_model": 48}
    with pytest.raises(ValueError, match="unknown training option 'bach_size'"):
        set_option(cfg, "bach_size=4")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        set_option(cfg, "batch_size=0")
    cfg = _cfg(tmp_path)
    set_option(cfg, "compile=true")
    assert cfg.compile is True
    with pytest.raises(ValueError, match="compile must be true or false, got 'yes'"):
        set_option(cfg, "compile=yes")


@pytest.mark.parametrize("assignment,message", [
    ("grad_clip=NaN", "grad_clip must be a finite number, got nan"),  # JSON's NaN and Infinity parse as floats
    ("lr=Infinity", "lr must be a finite number, got inf"),
    ("lr=abc", "lr must be a finite number, got 'abc'"),
    ("lr=0", "lr must be > 0, got 0"),
    ("steps=true", "steps must be an integer, got True"),
    ("batch_size=2.5", "batch_size must be an integer, got 2.5"),
    ("batch_size=null", "batch_size must be an integer, got None"),
    ("warmup=-5", "warmup must be >= 0, got -5"),
    ("min_lr_ratio=abc", "min_lr_ratio must be a finite number, got 'abc'"),
    ("min_lr_ratio=2", "min_lr_ratio must be in [0, 1], got 2"),
    ("seed=-1", "seed must be >= 0, got -1"),
    ("contrastive_batch=-2", "contrastive_batch must be >= 0, got -2"),
    ("max_minutes=0", "max_minutes must be > 0, got 0"),
    ("model=3", "model must be a mapping, got 3"),
    ("model.bogus=1", "model: unknown field 'bogus'"),
    ("seed=99999999999999999999", "seed must be <= 9,223,372,036,854,775,806, got 99,999,999,999,999,999,999"),
    ("vocab_size=99999999999", "vocab_size must be <= 16,777,216"),  # (the tokenizer library aborted the process)
    ("batch_size=100000000000", "batch_size must be <= 1,048,576"),  # (a MemoryError)
])
def test_every_option_is_checked_when_it_is_set(tmp_path, assignment, message):
    cfg = _cfg(tmp_path)
    with pytest.raises(ValueError) as error:
        set_option(cfg, assignment)
    assert message in str(error.value)


def test_set_reads_numbers_as_python_writes_them_too(tmp_path):
    cfg = _cfg(tmp_path)
    for assignment, name, value in [("lr=.001", "lr", 0.001), ("lr=+0.002", "lr", 0.002), ("lr=1.", "lr", 1.0),
                                    ("temperature=2.", "temperature", 2.0), ("max_minutes=None", "max_minutes", None),
                                    ("max_minutes=1e-1", "max_minutes", 0.1), ("bf16=True", "bf16", True),
                                    ("bf16=false", "bf16", False), ("steps=1_000", "steps", 1000)]:
        assert getattr(set_option(cfg, assignment), name) == value, assignment
    set_option(cfg, "model.attention_backend=cpu")  # a word is a str
    assert cfg.model["attention_backend"] == "cpu"


def test_a_warmup_longer_than_the_run_is_refused_once_every_option_is_in(tmp_path):
    """warmup > steps would never reach lr; the check waits for the whole command line, so
    `--set steps=10 --set warmup=2` works in that order."""
    cfg = _cfg(tmp_path, steps=100, warmup=50)
    set_option(cfg, "steps=10")
    set_option(cfg, "warmup=2")
    cfg.check()
    set_option(cfg, "warmup=11")
    with pytest.raises(ValueError, match=r"warmup \(11 steps\) is longer than the run \(10 steps\)"):
        cfg.check()
    with pytest.raises(ValueError, match="is longer than the run"):
        Trainer(TrainConfig(out=str(tmp_path), steps=20), _data(), progress=False)  # the default warm-up of 50


def test_a_run_saved_with_a_warmup_longer_than_its_steps_resumes_with_more_steps(tmp_path, monkeypatch, capsys):
    """Runs saved before the warm-up was checked against the steps (warmup 50, --steps 2) resume
    once --steps or --set fix it: the check waits for the whole command line."""
    from generalist.cli import main

    train = _toy_cli(monkeypatch)
    out = tmp_path / "run"
    assert train("--out", str(out), "--steps", "2") == 0
    meta_path = out / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["train"]["warmup"] = 50
    del meta["train"]["freq_warp"]  # (saved before the option existed: resumed without it)
    meta_path.write_text(json.dumps(meta))
    resume = ["train", "--out", str(out), "--resume", "--no-eval"]
    assert main([*resume, "--steps", "3"]) == 2
    assert "warmup (50 steps) is longer than the run (3 steps)" in capsys.readouterr().err
    assert main([*resume, "--steps", "3", "--set", "warmup=3"]) == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    assert json.loads(meta_path.read_text())["train"]["freq_warp"] == 0


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "steps must be >= 1, got 0"),
    (["--steps", "20"], "warmup (50 steps) is longer than the run (20 steps)"),
    (["--max-minutes", "-1"], "max_minutes must be > 0, got -1.0"),
    (["--max-minutes", "nan"], "max_minutes must be a finite number or null, got nan"),
    (["--set", "model.d_model=abc"], "model config: d_model must be an integer, got 'abc'"),
    (["--set", "model.n_heads=0"], "model config: n_heads must be >= 1, got 0"),
    (["--preset", "huge"], "unknown preset 'huge'"),
])
def test_train_refuses_bad_options_before_building_any_data(tmp_path, monkeypatch, capsys, args, message):
    from generalist.cli import main
    import generalist.train.data as train_data

    def no_data(*a, **k):
        raise AssertionError("the data was built before the options were checked")
    monkeypatch.setattr(train_data, "build_data", no_data)
    assert main(["train", "--out", str(tmp_path / "run"), "--no-eval", *args]) == 2
    assert message in capsys.readouterr().err


def test_compile_option_trains_the_compiled_blocks_like_eager(tmp_path):
    """compile=true: the trainer's blocks are compiled, and its first steps' losses are the eager
    run's (to float rounding: fused kernels add in another order), with one graph compiled for
    the encoder blocks and one for the decoder blocks over batches of different lengths."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for compile in (False, True):
        trainer = Trainer(_cfg(tmp_path / str(compile), steps=3, compile=compile), _data(), progress=False)
        blocks = [*trainer.model.encoder, *trainer.model.decoder]
        assert all(hasattr(b, "compiled_forward") == compile for b in blocks)
        trainer.fit()
        runs[compile] = _losses(tmp_path / str(compile) / "run")
    assert len(runs[True]) == 3 and counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-4)


def test_time_budget_stops_the_run_and_survives_resume(tmp_path, monkeypatch):
    """With max_minutes, training time (kept across resumes) ends the run with a checkpoint, and
    the learning rate has decayed with the time spent."""
    clock = [0.0]
    monkeypatch.setattr("generalist.train.trainer.time.time", lambda: clock[0])
    trainer = Trainer(_cfg(tmp_path, steps=100, max_minutes=1.0), _data(), progress=False)
    real_step = trainer.train_step

    def slow_step():  # every step "takes" 20 s
        clock[0] += 20.0
        return real_step()
    trainer.train_step = slow_step
    trainer.fit()
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and state["elapsed"] == pytest.approx(80.0)  # stops once past 60 s
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] == pytest.approx(lr_at(3, trainer.cfg, time_fraction=1.0))  # 60 s spent before step 4
    resumed = Trainer(_cfg(tmp_path, steps=100, max_minutes=1.0), _data(), resume=True, progress=False)
    assert resumed.elapsed == pytest.approx(80.0) and resumed.step == 4


def test_training_examples_are_kept_prepared_within_the_cache_budget(tmp_path, monkeypatch):
    """The trainer keeps its training examples with every segment already through its embedder's
    `prepare` (a `Prepared`), which the model takes in place of raw data with the same result,
    contrastive pairs included; past PREPARED_CACHE_BYTES it keeps them tokenized only; a bad
    segment is named."""
    from generalist.modalities import Prepared
    from generalist.train import trainer as trainer_module

    trainer = Trainer(_cfg(tmp_path), _data(), progress=False)
    picks = [("bars", 0), ("bars", 1), ("echo", 0)]
    kept = [trainer._encode(t, i) for t, i in picks]
    raw = [trainer.encoder.encode(trainer.data[t].train[i]) for t, i in picks]
    assert all(isinstance(data, Prepared) for ex in kept for _, data in ex.segments)
    assert trainer._prepared_bytes > 0
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(trainer.model(kept).logits, trainer.model(raw).logits)
    assert trainer._encode("bars", 0) is kept[0]  # prepared once

    # contrastive pairs come from the kept examples: the same embeddings as from the raw ones
    from generalist.data.packing import Example

    con = [("swatches", 0), ("swatches", 3)]
    inputs, texts = trainer._contrastive_pairs(con)
    assert all(isinstance(data, Prepared) for ex in inputs for _, data in ex.segments)
    raw_inputs = [trainer.encoder.encode(Example(trainer.data[t].train[i].segments, "", t)) for t, i in con]
    raw_texts = [trainer.encoder.encode(Example([("text", trainer.data[t].train[i].target_text)], "", t))
                 for t, i in con]
    with torch.no_grad():
        assert torch.equal(trainer.model.embed(inputs), trainer.model.embed(raw_inputs))
        assert torch.equal(trainer.model.embed(texts), trainer.model.embed(raw_texts))

    # every training example is kept before the first step: no step prepares one again
    n_train = sum(len(d.train) for d in trainer.data.values())
    assert len(trainer._encoded) == n_train
    prepare = trainer.model.embedders["image"].prepare
    monkeypatch.setattr(trainer.model.embedders["image"], "prepare", lambda *a: pytest.fail("prepared again"))
    trainer.train_step()
    monkeypatch.setattr(trainer.model.embedders["image"], "prepare", prepare)

    monkeypatch.setattr(trainer_module, "PREPARED_CACHE_BYTES", 0)  # no room: kept tokenized only
    tight = Trainer(_cfg(tmp_path / "tight"), _data(), progress=False)
    assert tight._prepared_bytes == 0 and len(tight._encoded) == n_train
    assert not any(isinstance(data, Prepared) for _, data in tight._encode("bars", 2).segments)

    del trainer._encoded[("bars", 3)]  # one not kept yet (the data changed since): prepared, and named, at first use
    trainer.data["bars"].train[3].segments[0] = ("image", torch.rand(3, 0, 4))
    with pytest.raises(ValueError, match=r"task 'bars', training example 3, segment 0 \(image\): image height 0"):
        trainer._encode("bars", 3)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_bad_segment_is_named_before_the_first_step(tmp_path, split):
    """A picture the model cannot read, anywhere in either split, stops the trainer before it
    trains (it was found when a step first drew it, or at the final evaluation)."""
    from dataclasses import replace

    data = _data()
    examples = getattr(data["bars"], split)
    examples[-1] = replace(examples[-1], segments=[("image", np.zeros((200, 8), np.uint8))])
    which = "training" if split == "train" else "test"
    with pytest.raises(ValueError, match=rf"^task 'bars', {which} example {len(examples) - 1}, segment 0 \(image\): "
                                         r"image height 200 exceeds max_size"):
        Trainer(_cfg(tmp_path), data, progress=False)


def test_a_run_resumed_after_its_time_budget_trains_no_further(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("generalist.train.trainer.time.time", lambda: clock[0])
    trainer = Trainer(_cfg(tmp_path, steps=100, max_minutes=1.0), _data(), progress=False)
    real_step = trainer.train_step
    trainer.train_step = lambda: (clock.__setitem__(0, clock[0] + 20.0), real_step())[1]
    trainer.fit()
    resumed = Trainer(_cfg(tmp_path, steps=100, max_minutes=1.0), _data(), resume=True, progress=False)
    printed = []
    monkeypatch.setattr("generalist.train.trainer.tqdm.write", printed.append)
    resumed.fit()
    assert printed == ["the time budget of 1 min is already spent (1.33 min trained, up to step 4): nothing to train "
                       "(--max-minutes counts the run's whole training time: pass a larger one to train on)"]
    resumed = Trainer(_cfg(tmp_path, steps=4), _data(), resume=True, progress=False)
    resumed.fit()
    assert printed[1] == "the run is already at step 4 of 4: nothing to train (pass more --steps to train on)"
    assert resumed.step == 4 and [json.loads(line)["step"] for line in
                                  (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_log_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    Trainer(_cfg(tmp_path, steps=3), _data(), progress=False).fit()
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 4, "lo')  # the kill came mid-write
    Trainer(_cfg(tmp_path, steps=5), _data(), resume=True, progress=False).fit()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_parallel_options_in_one_process_warn_on_a_fresh_run_only(tmp_path):
    """expert_parallel and fsdp do nothing in one process: a fresh run says so; a run trained under
    torchrun with them (its saved options) and resumed in one process, as the README allows, does not."""
    import warnings

    with pytest.warns(UserWarning, match="expert_parallel and fsdp have no effect in a single process"):
        Trainer(_cfg(tmp_path, steps=3, expert_parallel=True), _data(), progress=False).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(_cfg(tmp_path, steps=4, expert_parallel=True), _data(), resume=True, progress=False).fit()


def test_resume_takes_the_runs_weight_decay(tmp_path):
    """--set weight_decay on --resume is the run's option from then on (meta.json records it), not
    the saved optimizer state's; the other group stays undecayed."""
    data = _data()
    Trainer(_cfg(tmp_path, steps=3), data, progress=False).fit()
    resumed = Trainer(_cfg(tmp_path, steps=6, weight_decay=0.5), data, resume=True, progress=False)
    assert [g["weight_decay"] for g in resumed.opt.param_groups] == [0.5, 0.0]


def test_weight_decay_is_chosen_by_module_type_and_a_run_keeps_its_split(tmp_path, monkeypatch):
    """Matrices decay (the embedders' projections too); embedding tables (the axial position
    tables too), the boundary markers, norms and biases do not. A run saved before that split,
    with the split by name, resumes with its own (its optimizer state holds those groups)."""
    import generalist.train.trainer as trainer_module

    trainer = Trainer(_cfg(tmp_path, steps=3), _data(), progress=False)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decayed = {names[id(p)] for p in trainer.opt.param_groups[0]["params"]}
    kept = {names[id(p)] for p in trainer.opt.param_groups[1]["params"]}
    assert {"embedders.image.proj.weight", "embed_proj.weight", "encoder.0.moe.w1_EDF"} <= decayed
    assert {"axial.image.tables.0.weight", "boundary", "embedders.text.embed.weight", "task_emb.weight",
            "logit_scale", "enc_norm.weight"} <= kept and not decayed & kept
    assert len(decayed | kept) == len(names)
    # a run saved with the split by name (and no record of it), resumed
    monkeypatch.setattr(trainer_module, "decay_split", lambda model, rule: decay_split(model, "names"))
    Trainer(_cfg(tmp_path, steps=3), _data(), progress=False).fit()
    monkeypatch.undo()
    state = tmp_path / "run" / "checkpoint" / "state.json"
    saved = json.loads(state.read_text())
    del saved["decay_rule"]  # (a run of that time recorded none)
    state.write_text(json.dumps(saved))
    resumed = Trainer(_cfg(tmp_path, steps=5), _data(), resume=True, progress=False)
    assert resumed.decay_rule == "names"
    assert [len(g["params"]) for g in resumed.opt.param_groups] == [len(x) for x in decay_split(resumed.model, "names")]
    resumed.fit()
    assert json.loads(state.read_text())["decay_rule"] == "names"


def test_accumulation_weighs_each_example_once(tmp_path):
    """accum=2 of 4 examples gives the gradient of one batch of the 8, however they fall: one
    generative example and three contrastive ones in the first micro-batch, four generative in
    the second (each micro-batch's mean counted alike made the lone example weigh 4x, and the
    contrastive pairs half)."""
    def gradient(accum, micro, name):
        trainer = Trainer(_cfg(tmp_path / name, accum=accum, batch_size=len(micro[0]), grad_clip=1e9, freq_warp=0.0,
                               model={"aux_loss_weight": 0.0, "z_loss_weight": 0.0}), _data(), progress=False)
        queue = list(micro)
        trainer.sampler.sample = lambda n: queue.pop(0)
        trainer.opt.step = lambda *args, **kwargs: None
        trainer.train_step()
        return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])

    a = [("bars", 0), ("swatches", 0), ("swatches", 1), ("swatches", 2)]
    b = [("bars", 1), ("bars", 2), ("echo", 0), ("echo", 1)]
    torch.testing.assert_close(gradient(2, [a, b], "two"), gradient(1, [a + b], "one"), rtol=1e-4, atol=1e-6)


def test_a_fresh_run_starts_fresh_logs(tmp_path):
    """A run killed before its first checkpoint cannot be resumed; the next run in its directory
    must not append to its log."""
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "events.old").write_text("x")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    Trainer(_cfg(tmp_path, steps=2), _data(), progress=False).fit()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (run / "tensorboard" / "events.old").exists()


def test_a_streak_of_non_finite_steps_counts_on_across_a_resume(tmp_path, monkeypatch):
    trainer = Trainer(_cfg(tmp_path, max_bad_steps=3), _data(), progress=False)
    trainer.train_step()
    for t in (trainer,):
        real_forward = t.model.forward
        monkeypatch.setattr(t.model, "forward", lambda batch: setattr(out := real_forward(batch), "loss",
                                                                        out.loss * float("nan")) or out)
    trainer.train_step(), trainer.train_step()
    trainer.save()
    resumed = Trainer(_cfg(tmp_path, max_bad_steps=3), _data(), resume=True, progress=False)
    assert resumed.bad_in_row == 2
    real = resumed.model.forward
    monkeypatch.setattr(resumed.model, "forward", lambda batch: setattr(out := real(batch), "loss",
                                                                          out.loss * float("nan")) or out)
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        resumed.train_step()


def test_a_save_cut_short_never_leaves_the_run_without_a_checkpoint(tmp_path, monkeypatch):
    """Killed between save_checkpoint's two renames, a run has only .checkpoint.old; its next save
    must keep that one until the new one is in place, even if that save is cut short too."""
    import generalist.train.checkpoint as checkpoint

    trainer = Trainer(_cfg(tmp_path, steps=1, warmup=1), _data(), progress=False)
    trainer.fit()
    run = tmp_path / "run"
    os.replace(run / "checkpoint", run / ".checkpoint.old")  # the kill after the first rename
    assert checkpoint.find_checkpoint(run) == run / ".checkpoint.old"
    real_replace = os.replace

    def dies_at_the_final_rename(src, dst):
        if Path(src).name == ".checkpoint.tmp":
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(checkpoint.os, "replace", dies_at_the_final_rename)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert checkpoint.find_checkpoint(run) == run / ".checkpoint.old"
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert trainer.save() == run / "checkpoint" and not (run / ".checkpoint.old").exists()


@pytest.mark.parametrize("damage,message", [
    (lambda ckpt: (ckpt / "optimizer.pt").write_bytes((ckpt / "optimizer.pt").read_bytes()[:100]),
     r"optimizer.pt is damaged and cannot resume training"),
    (lambda ckpt: (ckpt / "optimizer.pt").unlink(), r"optimizer.pt is missing"),
    (lambda ckpt: (ckpt / "state.json").write_text(json.dumps({"step": 3})), r"state.json is damaged: it lacks skipped"),
])
def test_a_damaged_training_state_is_named(tmp_path, damage, message):
    Trainer(_cfg(tmp_path, steps=3), _data(), progress=False).fit()
    damage(tmp_path / "run" / "checkpoint")
    with pytest.raises(ValueError, match=message):
        Trainer(_cfg(tmp_path, steps=6), _data(), resume=True, progress=False)


def _edit_state(edit):
    def damage(ckpt):
        state = json.loads((ckpt / "state.json").read_text())
        edit(state)
        (ckpt / "state.json").write_text(json.dumps(state))
    return damage


@pytest.mark.parametrize("edit,message", [
    (lambda st: st.update(step="3"), "step is '3', not a count"),
    (lambda st: st.update(elapsed="1.5"), "elapsed is '1.5', not a number of seconds"),
    (lambda st: st["rng"].pop("numpy"), "no 'numpy'"),
    (lambda st: st["rng"].update(torch=[1, 2]), ""),
    (lambda st: st["sampler"].pop("names"), r"sampler: not a sampler's state \(rng, order, cursor, names, sizes\)"),
    (lambda st: st["routing"].pop("modality"), "no 'modality'"),
    (lambda st: st["routing"].update(task=[[1, 2]]), r"routing\['task'\] has shape \(1, 2\)"),
    (lambda st: st.update(routing=None), ""),
    (lambda st: st["routing"].update(task="abc"), "routing holds something other than counts"),
    (lambda st: st["sampler"]["order"].update(bars=[0, 0]), r"sampler: order\['bars'\] is not an order of its"),
    (lambda st: st["sampler"]["cursor"].update(bars="1"), r"sampler: cursor\['bars'\] is '1'"),
    (lambda st: st.update(decay_rule="all"), r"decay_rule is 'all', not 'modules' or 'names'"),
], ids=["step", "elapsed", "rng", "torch_rng", "sampler", "routing", "routing_shape", "routing_none", "routing_str",
        "sampler_order", "sampler_cursor", "decay_rule"])
def test_a_hand_edited_state_is_named(tmp_path, edit, message):
    """state.json edited by hand (or by another version) is one ValueError naming it, before any step."""
    Trainer(_cfg(tmp_path, steps=3), _data(), progress=False).fit()
    _edit_state(edit)(tmp_path / "run" / "checkpoint")
    with pytest.raises(ValueError, match=r"state.json is damaged: " + message):
        Trainer(_cfg(tmp_path, steps=6), _data(), resume=True, progress=False)


def test_optimizer_state_loads_to_the_host_first(tmp_path, monkeypatch):
    """A run saved on a GPU holds CUDA tensors in optimizer.pt: read onto the host, they resume
    on a machine without one (the optimizer moves them to its parameters' device)."""
    import generalist.train.checkpoint as checkpoint

    Trainer(_cfg(tmp_path, steps=3), _data(), progress=False).fit()
    calls, real_load = [], torch.load
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    Trainer(_cfg(tmp_path, steps=4), _data(), resume=True, progress=False)
    assert calls and all(str(k.get("map_location")) == "cpu" for k in calls)


def test_log_lines_whose_step_is_no_count_are_dropped_on_resume(tmp_path):
    Trainer(_cfg(tmp_path, steps=3), _data(), progress=False).fit()
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": null}\n{"step": "2"}\n{"step": true}\n')
    Trainer(_cfg(tmp_path, steps=5), _data(), resume=True, progress=False).fit()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]


def _toy_cli(monkeypatch):
    """generalist.cli.main over the toy tasks, whatever mixture is named (but for "nonesuch")."""
    import generalist.train.data as train_data
    from generalist.cli import main

    real_build, real_get = train_data.build_data, train_data.get_mixture
    monkeypatch.setattr(train_data, "get_mixture", lambda name: real_get(name) if name == "nonesuch" else toy_tasks.MIXTURE)
    monkeypatch.setattr(train_data, "build_data",
                        lambda mixture, tasks=None, seed=0, progress=True: real_build(mixture, toy_tasks.TASKS, seed, False))
    return lambda *args: main(["train", "--preset", "tiny", "--no-eval", "--set", "vocab_size=300", "--set",
                               "batch_size=8", "--set", "warmup=2", *args])


def test_cli_resume_keeps_the_runs_time_budget_and_refuses_to_rebuild_it(tmp_path, monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr("generalist.train.trainer.time.time", lambda: clock.__setitem__(0, clock[0] + 10.0) or clock[0])
    train = _toy_cli(monkeypatch)
    out = str(tmp_path / "run")
    assert train("--out", out, "--steps", "40", "--max-minutes", "0.5", "--set", "ckpt_every=2") == 0
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert train("--out", out, "--resume", "--steps", "40") == 0  # no --max-minutes: the run's own
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == state["step"] < 40
    assert train("--out", out, "--resume", "--set", "model.d_model=48") == 2
    assert "d_model" in capsys.readouterr().err and "--resume continues the run as it was built" in \
        (train("--out", out, "--resume", "--set", "seed=3") == 2 and capsys.readouterr().err)


def test_cli_set_cannot_move_the_run_and_a_bad_mixture_deletes_nothing(tmp_path, monkeypatch, capsys):
    train = _toy_cli(monkeypatch)
    out = tmp_path / "run"
    assert train("--out", str(out), "--steps", "2") == 0
    assert train("--out", str(tmp_path / "other"), "--steps", "2", "--set", f"out={out}") == 2
    assert "out is set with --out, not --set" in capsys.readouterr().err
    assert train("--out", str(out), "--steps", "2", "--overwrite", "--mixture", "nonesuch") == 2
    assert "unknown mixture 'nonesuch'" in capsys.readouterr().err
    assert (out / "checkpoint" / "model.safetensors").is_file()


def test_cli_keeps_a_run_whose_last_checkpoint_waits_in_checkpoint_old(tmp_path, monkeypatch, capsys):
    """A kill between save_checkpoint's two renames leaves the last checkpoint in .checkpoint.old:
    the run is still there, and only --resume or --overwrite may touch it."""
    train = _toy_cli(monkeypatch)
    out = tmp_path / "run"
    assert train("--out", str(out), "--steps", "2") == 0
    (out / "checkpoint").rename(out / ".checkpoint.old")
    assert train("--out", str(out), "--steps", "3") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / ".checkpoint.old" / "model.safetensors").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert train("--out", str(out), "--steps", "3", "--resume") == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3


@pytest.mark.parametrize("meta,message", [
    ({"tasks": ["bars"]}, "meta.json is damaged: it holds no training options"),
    ({"tasks": ["bars"], "train": None}, "meta.json is damaged: it holds no training options"),
    ([], "meta.json is damaged: it lists no tasks"),
    ("EXTRA", r"meta.json, training options of another version: unknown field 'old_option'"),
])
def test_cli_resume_names_a_damaged_or_foreign_meta(tmp_path, monkeypatch, capsys, meta, message):
    train = _toy_cli(monkeypatch)
    out = tmp_path / "run"
    assert train("--out", str(out), "--steps", "2") == 0
    path = out / "checkpoint" / "meta.json"
    if meta == "EXTRA":
        meta = json.loads(path.read_text())
        meta["train"]["old_option"] = 1
    path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert train("--out", str(out), "--steps", "3", "--resume") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_cli_refuses_before_overwrite_deletes_and_a_checkpoint_folder_as_the_run(tmp_path, monkeypatch, capsys):
    """An option that the mixture makes impossible is refused before --overwrite deletes the run;
    a checkpoint folder given as --out (to resume, or to train anew) is refused, not nested into."""
    import generalist.train.trainer as trainer_module

    train = _toy_cli(monkeypatch)
    out = tmp_path / "run"
    assert train("--out", str(out), "--steps", "2") == 0
    monkeypatch.setattr(trainer_module, "discover", lambda: {**toy_tasks.TASKS, "swatches": toy_tasks.Bars()})
    capsys.readouterr()
    assert train("--out", str(out), "--steps", "2", "--overwrite", "--set", "contrastive_batch=4") == 2
    assert "contrastive_batch is 4, but no task of mixture 'demo' trains the contrastive head" in capsys.readouterr().err
    assert (out / "checkpoint" / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    for args in (["--resume", "--steps", "3"], ["--steps", "3"]):
        assert train("--out", str(out / "checkpoint"), *args) == 2
        assert (f"{out / 'checkpoint'} is a checkpoint folder, not a run folder: train into the run folder that holds "
                f"it ({out})") in capsys.readouterr().err
    assert not (out / "checkpoint" / "checkpoint").exists()
    with pytest.raises(ValueError, match="is a checkpoint folder, not a run folder"):
        Trainer(_cfg(tmp_path, steps=3, out=str(out / "checkpoint")), _data(), resume=True, progress=False)


def test_cli_overwrite_deletes_the_run_and_nothing_else(tmp_path, monkeypatch, capsys):
    train = _toy_cli(monkeypatch)
    out = tmp_path / "run"
    assert train("--out", str(out), "--steps", "2") == 0
    (out / "notes").mkdir()
    (out / "notes" / "thesis.txt").write_text("precious")
    (out / "results.csv").write_text("data")
    (out / "eval.json").write_text("{}")
    for name in ("predictions.jsonl", ".predictions.jsonl.tmp", "predictions-partial.jsonl"):
        (out / name).write_text("{}")
    assert train("--out", str(out), "--steps", "2", "--overwrite") == 0
    assert (out / "notes" / "thesis.txt").read_text() == "precious" and (out / "results.csv").read_text() == "data"
    assert not (out / "eval.json").exists() and len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not any((out / name).exists() for name in ("predictions.jsonl", ".predictions.jsonl.tmp",
                                                      "predictions-partial.jsonl"))
    (tmp_path / "afile").write_text("x")
    assert train("--out", str(tmp_path / "afile"), "--steps", "2") == 2
    assert "--out" in capsys.readouterr().err


def test_cli_resume_refuses_another_preset_or_mixture_fewer_steps_and_overwrite(tmp_path, monkeypatch, capsys):
    from generalist.cli import main

    train = _toy_cli(monkeypatch)
    out = str(tmp_path / "run")
    assert train("--out", out, "--steps", "3") == 0
    capsys.readouterr()
    for flag, value, saved in (("--preset", "demo", "tiny"), ("--mixture", "full", "demo")):
        assert main(["train", "--out", out, "--resume", "--no-eval", flag, value]) == 2
        assert f"its {flag[2:]} is '{saved}', not '{value}'" in capsys.readouterr().err
    assert train("--out", out, "--resume", "--steps", "2") == 2  # the checkpoint is at step 3
    assert "is at step 3, past the 2 steps asked for" in capsys.readouterr().err
    assert train("--out", out, "--resume", "--steps", "3") == 0  # a finished run, resumed again: nothing to do
    with pytest.raises(SystemExit):  # argparse: not allowed with
        main(["train", "--out", out, "--resume", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("assignment,message", [
    ("model.vocab_size=500", "model: vocab_size is not an option: the tokenizer's size, set with --set vocab_size=N"),
    ("model.n_tasks=2", "model: n_tasks is not an option: the number of the mixture's tasks"),
    ("vocab_size=10", "vocab_size must be >= 269 (the 256 bytes and 13 special tokens), got 10"),
])
def test_options_the_trainer_sets_or_the_tokenizer_cannot_meet_are_refused_up_front(tmp_path, assignment, message):
    with pytest.raises(ValueError) as error:
        set_option(_cfg(tmp_path), assignment)
    assert message in str(error.value)
    with pytest.raises(ValueError, match="model: n_tasks is not an option"):
        _cfg(tmp_path, model={"n_tasks": 3})


def test_a_micro_batch_with_nothing_to_learn_from_still_steps(tmp_path):
    """batch_size=1: a step that draws one contrastive example has no text target and no pair
    (here steps 1 and 4 of seed 4); it logs a zero loss and trains on, as under torchrun."""
    trainer = Trainer(_cfg(tmp_path, batch_size=1, steps=5, seed=4, warmup=1), _data(), progress=False)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    empty = [r for r in records if not r["task_loss"]]
    assert empty and all(r["loss"] == 0.0 for r in empty) and trainer.step == 5 and trainer.skipped == 0, records


def _three_steps_and_a_longer_log(tmp_path):
    """A run checkpointed at step 3 whose log runs on to step 5 (a kill before the next save)."""
    Trainer(_cfg(tmp_path, steps=3), _data(), progress=False).fit()
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text(log.read_text() + "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (4, 5)))
    return log


@pytest.mark.parametrize("where", ["write", "rename"])
def test_a_kill_while_the_log_is_cut_back_on_resume_leaves_it_whole(tmp_path, monkeypatch, where):
    """Resuming drops the log lines past the checkpoint; a kill in the middle of that (here while
    the kept lines are written, or before they replace the log) leaves the log as it was."""
    import generalist.train.checkpoint as checkpoint

    log = _three_steps_and_a_longer_log(tmp_path)
    before, data = log.read_bytes(), _data()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.os, "fsync" if where == "write" else "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(tmp_path, steps=5), data, resume=True, progress=False)
    assert log.read_bytes() == before
    monkeypatch.undo()
    Trainer(_cfg(tmp_path, steps=5), data, resume=True, progress=False)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in log.parent.iterdir()) == ["checkpoint", "metrics.jsonl", "tensorboard"]


def test_the_log_is_on_disk_before_the_checkpoint_that_counts_its_lines(tmp_path, monkeypatch):
    from generalist.train import trainer as trainer_module

    trainer = Trainer(_cfg(tmp_path, steps=4, ckpt_every=2), _data(), progress=False)
    log = tmp_path / "run" / "metrics.jsonl"
    synced = []
    real_fsync, real_save = os.fsync, trainer.save
    monkeypatch.setattr(trainer_module.os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino) or real_fsync(fd))

    def save():
        assert log.stat().st_ino in synced, "the log was not fsynced before the checkpoint"
        assert len(log.read_text().splitlines()) == trainer.step
        synced.clear()
        return real_save()
    trainer.save = save
    trainer.fit()
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 4


@pytest.mark.parametrize("name,message", [
    ("config.json", r"checkpoint/config.json is missing: .*checkpoint is damaged; generalist train --overwrite "
                    r"starts the run over"),
    ("model.safetensors", r"checkpoint/model.safetensors is missing: .*checkpoint is damaged"),
    ("state.json", r"checkpoint/state.json is missing: .*checkpoint cannot resume training \(it still loads for "
                   r"inference\); generalist train --overwrite starts the run over"),
    ("meta.json", r"checkpoint/meta.json is missing: .*checkpoint is damaged \(its tasks and training options are "
                  r"lost\); generalist train --overwrite starts the run over"),
])
def test_cli_resume_names_the_file_a_checkpoint_lacks(tmp_path, monkeypatch, capsys, name, message):
    from generalist.train.checkpoint import find_checkpoint

    train = _toy_cli(monkeypatch)
    out = tmp_path / "run"
    assert train("--out", str(out), "--steps", "2") == 0
    (out / "checkpoint" / name).unlink()
    capsys.readouterr()
    assert train("--out", str(out), "--steps", "3", "--resume") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    if name in ("config.json", "model.safetensors"):
        with pytest.raises(FileNotFoundError, match=message):
            find_checkpoint(out)
    else:
        with pytest.raises(ValueError, match=message):
            Trainer(_cfg(tmp_path, steps=3), _data(), resume=True, progress=False)


def _full_disk(*args, **kwargs):  # what torch.save raises when the disk fills under it
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1216 vs 1088\nframe #0: ...")


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_save_on_a_full_disk_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, writer):
    import safetensors.torch

    import generalist.train.checkpoint as checkpoint

    trainer = Trainer(_cfg(tmp_path, steps=4), _data(), progress=False)
    trainer.fit()  # checkpoints at 3 and 4
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()}
    trainer.train_step()
    if writer == "torch.save":
        monkeypatch.setattr(checkpoint.torch, "save", _full_disk)
    else:
        def full(*args, **kwargs):
            raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        monkeypatch.setattr(safetensors.torch, "save_model", full)
    with pytest.raises(OSError) as error:
        trainer.save()
    assert re.fullmatch(rf"could not write the checkpoint to {re.escape(str(run / 'checkpoint'))} \(disk full\?\): "
                        r".+; the previous checkpoint is unchanged", str(error.value)), error.value
    assert ("unexpected pos 1216 vs 1088" if writer == "torch.save" else "StorageFull") in str(error.value)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "metrics.jsonl", "tensorboard"]  # no .checkpoint.tmp
    assert {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()} == before

    # through the command line: one line, exit 2
    train = _toy_cli(monkeypatch)
    capsys.readouterr()
    assert train("--out", str(run), "--steps", "6", "--resume") == 2
    err = [line for line in re.split(r"[\r\n]+", capsys.readouterr().err) if line.strip()]
    assert err[-1].startswith("generalist train: error: could not write the checkpoint") and \
        not any("Traceback" in line for line in err), err
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 4


class _Terminated(Exception):
    pass


@pytest.fixture
def sigterm_raises():
    """SIGTERM raises _Terminated here rather than ending the test process (a trainer that let a
    SIGTERM through would take pytest down with it)."""
    import signal

    def terminated(signum, frame):
        raise _Terminated
    previous = signal.signal(signal.SIGTERM, terminated)
    yield terminated
    signal.signal(signal.SIGTERM, previous)


def _signal_after(trainer, step, signum):
    """Makes `trainer` send itself `signum` right after its step `step`, as a scheduler would."""
    real = trainer.train_step

    def stepping():
        rec = real()
        if rec["step"] == step:
            os.kill(os.getpid(), signum)
        return rec
    trainer.train_step = stepping


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tmp_path, capsys, sigterm_raises):
    """SIGTERM (sent by SLURM, Kubernetes, docker stop) ends training after the current step with a
    checkpoint at that step; resumed, the run ends with the losses and weights of one that was
    never stopped. The signal handlers in place before training are back afterwards."""
    import signal

    from safetensors.torch import load_file

    steps = dict(steps=8, ckpt_every=3)
    straight = Trainer(_cfg(tmp_path / "a", **steps), _data(), progress=False)
    straight.fit()
    assert straight.stopped_by is None
    handlers = (sigterm_raises, signal.getsignal(signal.SIGINT))
    stopped = Trainer(_cfg(tmp_path / "b", **steps), _data(), progress=False)
    _signal_after(stopped, 5, signal.SIGTERM)
    stopped.fit()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    run = tmp_path / "b" / "run"
    assert stopped.stopped_by == signal.SIGTERM and stopped.step == 5
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 5
    assert len(_losses(run)) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"SIGTERM received: stopped at step 5 of 8 with a checkpoint in {run / 'checkpoint'}; "
                       f"continue with generalist train --out {run} --resume")
    resumed = Trainer(_cfg(tmp_path / "b", **steps), _data(), resume=True, progress=False)
    resumed.fit()
    assert resumed.stopped_by is None and resumed.step == 8
    assert _losses(run) == _losses(tmp_path / "a" / "run")  # bit-for-bit, step for step
    a, b = (load_file(str(tmp_path / x / "run" / "checkpoint" / "model.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signame,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_cli_exits_with_the_signals_code_after_saving(tmp_path, monkeypatch, capsys, sigterm_raises, signame, code):
    import signal

    real_step = Trainer.train_step

    def stepping(self):
        rec = real_step(self)
        if rec["step"] == 2:
            os.kill(os.getpid(), getattr(signal, signame))
        return rec
    monkeypatch.setattr(Trainer, "train_step", stepping)
    train = _toy_cli(monkeypatch)
    out = tmp_path / "run"
    assert train("--out", str(out), "--steps", "5", "--set", "ckpt_every=4") == code
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    err = [line for line in re.split(r"[\r\n]+", capsys.readouterr().err) if line.strip()]
    assert err[-1].startswith(f"{signame} received: stopped at step 2 of 5"), err
    assert not (out / "eval.json").exists()


def test_a_second_signal_while_stopping_ends_training_at_once(tmp_path, monkeypatch):
    """A second SIGINT while the stop's checkpoint is written goes to the handler from before
    training (Python's: KeyboardInterrupt) right away; the checkpoint before stays whole."""
    import signal

    from generalist.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module._StopSignals, "REPEAT_S", 0.0)  # this test's second one comes at once
    trainer = Trainer(_cfg(tmp_path, steps=6, ckpt_every=2), _data(), progress=False)
    _signal_after(trainer, 3, signal.SIGINT)
    real_save, saves = trainer.save, []

    def save():
        saves.append(trainer.step)
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_save()
    trainer.save = save
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert saves == [2, 3]  # the first SIGINT let step 3 end and its save begin
    assert signal.getsignal(signal.SIGINT) is handler
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 2


def test_a_signal_repeated_at_once_is_one_request_to_stop(tmp_path, sigterm_raises):
    """Under torchrun a worker gets the terminal's (or the scheduler's) signal and, a moment
    later, the same one forwarded by torchrun: that is still a stop after the step, not a kill."""
    import signal

    trainer = Trainer(_cfg(tmp_path, steps=6, ckpt_every=4), _data(), progress=False)
    real = trainer.train_step

    def stepping():
        rec = real()
        if rec["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return rec
    trainer.train_step = stepping
    trainer.fit()
    assert trainer.stopped_by == signal.SIGTERM and trainer.step == 2
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 2


def test_freq_warp_draws_a_factor_per_step_and_example(tmp_path, monkeypatch):
    """Training audio is warped by a factor in [1 - w, 1 + w] drawn from (seed, step, task,
    example) alone: the same at the same step, new at the next; other segments and freq_warp=0
    leave the kept example as it is; an example kept raw (past the prepared bytes) is warped too."""
    from dataclasses import replace

    import generalist.train.trainer as trainer_module
    from generalist.modalities import Prepared

    tr = Trainer(_cfg(tmp_path, freq_warp=0.2), _data(), progress=False)
    embed = tr.model.embedders["audio"]
    alphas = []
    real = embed.warp
    monkeypatch.setattr(embed, "warp", lambda prepared, alpha: alphas.append(alpha) or real(prepared, alpha))
    first = tr._encode("beeps", 3)
    kept = tr._encoded[("beeps", 3)]
    assert isinstance(kept.segments[0][1], Prepared) and not torch.equal(first.segments[0][1].features,
                                                                           kept.segments[0][1].features)
    torch.testing.assert_close(first.segments[0][1].features, real(kept.segments[0][1], alphas[0]).features)
    assert torch.equal(tr._encode("beeps", 3).segments[0][1].features, first.segments[0][1].features)
    tr._encode("beeps", 4)
    tr.step = 1
    tr._encode("beeps", 3)
    assert alphas[0] == alphas[1] and len(set(alphas[1:])) == 3 and all(0.8 <= a <= 1.2 for a in alphas)
    assert tr._encode("bars", 0) is tr._encoded[("bars", 0)]  # no audio: untouched
    assert len(alphas) == 4
    # another task name or seed draws another factor; an example's clips share one (one speaker)
    kept = tr._encoded[("beeps", 3)]
    tr._augment("other", 3, kept)
    two = replace(kept, segments=[kept.segments[0], ("text", kept.segments[0][1].features[:0, 0].long()),
                                  kept.segments[0]])
    warped = tr._augment("beeps", 3, two)
    assert alphas[4] != alphas[3] and alphas[5] == alphas[6] == alphas[3]
    assert warped.segments[1][1] is two.segments[1][1] and torch.equal(warped.segments[0][1].features,
                                                                 warped.segments[2][1].features)
    tr.cfg.seed = 1
    tr._encode("beeps", 3)
    assert alphas[7] not in alphas[:7]
    tr.cfg.seed = 0
    # the same factors in another trainer of the same seed (a resumed run, another rank)
    again = Trainer(_cfg(tmp_path / "again", freq_warp=0.2), _data(), progress=False)
    again.step = 1
    assert torch.equal(again._encode("beeps", 3).segments[0][1].features, tr._encode("beeps", 3).segments[0][1].features)

    off = Trainer(_cfg(tmp_path / "off", freq_warp=0.0), _data(), progress=False)
    assert off._encode("beeps", 3) is off._encoded[("beeps", 3)]

    monkeypatch.setattr(trainer_module, "PREPARED_CACHE_BYTES", 0)
    raw = Trainer(_cfg(tmp_path / "raw", freq_warp=0.2), _data(), progress=False)
    raw.step = 1
    warped = raw._encode("beeps", 3)
    assert not isinstance(raw._encoded[("beeps", 3)].segments[0][1], Prepared)
    assert torch.equal(warped.segments[0][1].features, tr._encode("beeps", 3).segments[0][1].features)
    with pytest.raises(ValueError, match=r"freq_warp must be in \[0, 1\), got 1.0"):
        _cfg(tmp_path, freq_warp=1.0)
