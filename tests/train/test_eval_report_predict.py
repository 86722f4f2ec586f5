import html
import io
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import toy_tasks  # noqa: E402

from generalist.cli import main  # noqa: E402
from generalist.data.packing import Example  # noqa: E402
from generalist.infer.generalist import Generalist, resolve_device  # noqa: E402
from generalist.train.data import build_data  # noqa: E402
from generalist.train.evaluate import evaluate, format_table  # noqa: E402
from generalist.train.report import write_report  # noqa: E402
from generalist.train.trainer import TrainConfig, Trainer  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "toy"
    data = build_data(toy_tasks.MIXTURE, tasks=toy_tasks.TASKS, progress=False)
    Trainer(TrainConfig(preset="tiny", out=str(out), steps=30, batch_size=12, ckpt_every=30, vocab_size=300,
                        warmup=3, lr=5e-3), data, progress=False).fit()
    return out, data


def test_evaluate_and_report(run, tmp_path):
    out, data = run
    results = evaluate(Generalist.load(out, device="cpu"), data, progress=False)
    assert set(results) == {"bars", "echo", "swatches", "beeps"}
    assert all(0.0 <= v <= 1.0 for m in results.values() for v in m.values())
    assert "bars" in format_table(results)
    from generalist.train.report import read_log

    log = read_log(out / "metrics.jsonl")  # the router losses are logged each step, and plotted
    assert len(log) == 30 and all(0 < r["aux_loss"] < 1 for r in log)
    page = write_report(out, results).read_text()
    assert page.count(" src='data:image/png;base64,") == 4  # loss, signals, routing by task, by modality
    assert "<td rowspan='1'>echo</td><td>accuracy</td>" in page
    assert "<th>steps</th><td>30 of 30, 0 skipped (non-finite)</td>" in page and "<th>preset</th><td>tiny</td>" in page
    assert "Not evaluated" not in page
    shutil.copytree(out, tmp_path / "copy")  # a task with no test examples is named, not silently left out
    page = write_report(tmp_path / "copy", {t: m for t, m in results.items() if t != "beeps"}).read_text()
    assert "<p>Not evaluated: beeps.</p>" in page


def test_report_of_a_log_cut_short_and_results_holding_nan(run, tmp_path):
    """A kill can cut metrics.jsonl's last line in half; the report leaves that line out (as the
    trainer does when it resumes). A NaN metric is written to eval.json as null, still JSON."""
    from generalist.train.evaluate import write_results

    out = tmp_path / "copy"
    shutil.copytree(run[0], out)
    log = out / "metrics.jsonl"
    whole = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text(log.read_text() + '{"step": 31, "task_lo')
    from generalist.train.report import read_log

    assert read_log(log) == whole
    page = write_report(out, {"echo": {"accuracy": float("nan")}}).read_text()
    assert page.count(" src='data:image/png;base64,") == 4 and "<td>accuracy</td><td>—</td>" in page
    path = write_results(out, {"echo": {"accuracy": float("nan"), "bleu": 0.5}})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in eval.json")) == \
        {"echo": {"accuracy": None, "bleu": 0.5}}


def test_predict_from_python_and_cli(run, tmp_path, capsys):
    out, _ = run
    g = Generalist.load(out, device="cpu")
    img = np.zeros((8, 8), dtype=np.uint8)
    img[:, 3] = 255
    answer = g.predict(task="bars", image=img)
    assert isinstance(answer, str)
    path = tmp_path / "bar.png"
    Image.fromarray(img).save(path)
    assert main(["predict", str(out), "--task", "bars", "--image", str(path), "--json", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"task": "bars", "prediction": g.predict(task="bars", image=str(path))}
    assert main(["predict", str(out), "--task", "echo", "--text", "red blue", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == g.predict(task="echo", text="red blue")


def test_an_input_its_task_never_saw_is_warned_of(run, tmp_path, capsys):
    """meta.json records each task's training input modalities; predict answers an input of
    another modality but warns (the CLI in one line), and a run saved before they were recorded
    warns of nothing."""
    import warnings

    out, _ = run
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["modalities"] == {"bars": ["image"], "echo": ["text"], "swatches": ["image"], "beeps": ["audio"]}
    g = Generalist.load(out, device="cpu")
    with pytest.warns(UserWarning, match="task 'echo' was trained on text inputs; it never saw image, so its answer "
                                         "is a guess"):
        g.predict(task="echo", image=_swatch("red"), text="red")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g.predict(task="echo", text="red")  # what it was trained on: no warning
        g.classify(["red", "blue"], task="swatches", image=_swatch("red"))
    with pytest.warns(UserWarning, match="task 'swatches' was trained on image inputs; it never saw text"):
        g.classify(["red", "blue"], task="swatches", text="red")  # labels ranked through the contrastive head
    with pytest.warns(UserWarning, match="task 'bars' was trained on image inputs; it never saw text"):
        g.rank(["red", "blue"], task="bars", text="red")  # and through the text head
    # a task trained on nothing (as zero_shot) is answered through the tasks it requires: theirs count
    through = Generalist.load(out, device="cpu", definitions={"echo": type("ThroughBars", (toy_tasks.Echo,), {
        "requires": ("bars",)})()})
    del through.modalities["echo"]
    with pytest.warns(UserWarning, match="task 'echo' is answered through bars, trained on image inputs; it never saw "
                                         "text"):
        through.predict(task="echo", text="red")
    path = tmp_path / "red.png"
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(path)
    assert main(["predict", str(out), "--task", "echo", "--image", str(path), "--device", "cpu"]) == 0
    assert capsys.readouterr().err == ("generalist predict: warning: task 'echo' was trained on text inputs; it never "
                                       "saw image, so its answer is a guess\n")
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "checkpoint" / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "modalities"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Generalist.load(old, device="cpu").predict(task="echo", image=_swatch("red"))
    (old / "checkpoint" / "meta.json").write_text(json.dumps({**meta, "modalities": {"echo": "text"}}))
    with pytest.raises(ValueError, match="'modalities' must map tasks to lists of modality names"):
        Generalist.load(old, device="cpu")


def _swatch(name: str):
    return torch.tensor(toy_tasks.Swatches.RGB[name], dtype=torch.float32)[:, None, None].expand(3, 8, 8).clone()


def test_a_task_that_does_not_answer_in_text_answers_through_its_definition(run, tmp_path):
    """swatches trains only the contrastive head: predict answers it with Task.answer (the
    nearest colour name), not with text the model was never trained to decode for it."""
    out, _ = run
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["generative"] == ["bars", "beeps", "echo"]
    g = Generalist.load(out, device="cpu", definitions=toy_tasks.TASKS)
    names = sorted(toy_tasks.Swatches.RGB)
    texts = g.embed([Example([("text", n)], "", "swatches") for n in names])
    for colour in ("red", "blue", "white"):
        img = _swatch(colour)
        want = names[int((g.embed([Example([("image", img)], "", "swatches")]) @ texts.t()).argmax())]
        assert g.predict(task="swatches", image=img) == want
    assert g.predict(task="bars", image=_swatch("red")) == g.generate([Example([("image", _swatch("red"))], "",
                                                                               "bars")])[0]
    with pytest.raises(ValueError, match="does not answer by decoding text: beam_size does not apply"):
        g.predict(task="swatches", image=_swatch("red"), beam_size=2)
    # the task files here do not define swatches
    with pytest.raises(ValueError, match="no task file defines it here"):
        Generalist.load(out, device="cpu").predict(task="swatches", image=_swatch("red"))
    # a run saved before meta.json said which tasks are generative: the definitions say
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "checkpoint" / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "generative"}))
    g_old = Generalist.load(old, device="cpu", definitions=toy_tasks.TASKS)
    assert g_old.predict(task="swatches", image=_swatch("blue")) == g.predict(task="swatches", image=_swatch("blue"))
    assert g_old.predict(task="echo", text="red blue") == g.predict(task="echo", text="red blue")
    (old / "checkpoint" / "meta.json").write_text(json.dumps({**meta, "generative": ["nope"]}))
    with pytest.raises(ValueError, match="'generative' must list some of its tasks"):
        Generalist.load(old, device="cpu")


def test_classify_ranks_labels_through_the_contrastive_head(run, tmp_path, capsys):
    out, _ = run
    g = Generalist.load(out, device="cpu")
    labels = ["red", "green", "blue", "white"]
    scores = g.classify(labels, task="swatches", prompt="a {} swatch", image=_swatch("green"))
    assert sorted(scores) == sorted(labels) and abs(sum(scores.values()) - 1) < 1e-5
    assert list(scores.values()) == sorted(scores.values(), reverse=True)
    texts = g.embed([Example([("text", f"a {x} swatch")], "", "swatches") for x in labels])
    sims = (g.embed([Example([("image", _swatch("green"))], "", "swatches")]) @ texts.t())[0]
    want = torch.softmax(g.model.logit_scale.exp().clamp(max=100) * sims, dim=0)
    torch.testing.assert_close(torch.tensor([scores[x] for x in labels]), want.detach())
    assert g.classify(np.array(labels), task="swatches", prompt="a {} swatch", image=_swatch("green")) == scores
    assert all(type(k) is str for k in g.classify(np.array(labels), task="swatches", image=_swatch("red")))
    for bad, match in [([], "labels must be a non-empty list"), ("red", "labels must be a non-empty list"),
                       (3, "labels must be a non-empty list of non-empty strings, got 3"),
                       ([1, 2], "labels must be a non-empty list"),
                       (["red", ""], "labels must be a non-empty list"), (["red", "red"], "labels holds 'red' twice")]:
        with pytest.raises(ValueError, match=match):
            g.classify(bad, task="swatches", image=_swatch("red"))
    with pytest.raises(ValueError, match="prompt must be a string holding"):
        g.classify(labels, task="swatches", prompt="a swatch", image=_swatch("red"))
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        g.classify(labels, task="poetry", image=_swatch("red"))
    with pytest.raises(ValueError, match="needs at least one input"):
        g.classify(labels, task="swatches")
    # the run records which tasks trained the contrastive head: only those rank labels
    assert g.contrastive == {"swatches"}
    with pytest.raises(ValueError, match=r"task 'echo' was not trained through the contrastive head, so its "
                                         r"embeddings rank nothing; classify as one that was \(swatches\)"):
        g.classify(labels, task="echo", text="red")
    # a task answered through one trained contrastively (zero_shot through captions) classifies as that one
    through = Generalist.load(out, device="cpu", definitions={"echo": type("ThroughSwatches", (toy_tasks.Echo,), {
        "requires": ("swatches",)})()})
    assert (through.classify(labels, task="echo", image=_swatch("green"))
            == g.classify(labels, task="swatches", image=_swatch("green")))
    path = tmp_path / "green.npy"
    np.save(path, _swatch("green").numpy())
    assert main(["predict", str(out), "--task", "swatches", "--image", str(path), "--labels", "red, green,blue,white",
                 "--prompt", "a {} swatch", "--json", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["prediction"] == next(iter(scores)) and printed["scores"] == pytest.approx(scores)
    assert printed["by"] == "contrastive"  # (the task trained the contrastive head)
    assert main(["predict", str(out), "--task", "swatches", "--image", str(path), "--labels", "red,green",
                 "--device", "cpu"]) == 0  # plain text: the best label alone
    best = g.classify(["red", "green"], task="swatches", image=np.load(path))
    assert capsys.readouterr().out.strip() == next(iter(best))


def test_rank_scores_each_label_as_the_whole_answer_through_the_text_head(run, tmp_path, capsys, gen):
    """rank: a softmax over the labels of the decoder's log-probability of each label (its tokens
    and the end of text) as the answer, checked against the model's own loss on each label alone;
    labels in any order and in several batches (70 labels) score the same."""
    out, data = run
    g = Generalist.load(out, device="cpu")
    image = data["bars"].test[int(torch.randint(0, len(data["bars"].test), (1,), generator=gen))].segments[0][1]
    words = ["horizontal", "vertical", "diagonal", "red", "blue bars"]
    labels = words + [f"{w} {k}" for k in range(13) for w in words][:65]
    scores = g.rank(labels, task="bars", image=image)
    assert sorted(scores) == sorted(labels) and abs(sum(scores.values()) - 1) < 1e-5
    assert list(scores.values()) == sorted(scores.values(), reverse=True)
    logp = []
    for label in labels:  # one at a time: the loss is the mean over the label's tokens and the end
        encoded = g.encoder.encode(Example([("image", image)], label, "bars"))
        with torch.no_grad():
            logp.append(-g.model([encoded]).lm_loss * (len(encoded.target_ids) + 1))
    torch.testing.assert_close(torch.tensor([scores[x] for x in labels]), torch.softmax(torch.stack(logp), 0))
    # in eval mode whatever mode the caller left the model in, which is restored after
    modes = {"rank": [], "classify": []}
    for what in modes:
        hooks = [m.register_forward_pre_hook(lambda module, args, seen=modes[what]: seen.append(module.training))
                 for m in g.model.modules()]
        g.model.train()
        try:
            if what == "rank":
                want = torch.softmax(torch.stack(logp[:3]), 0).tolist()
                assert g.rank(labels[:3], task="bars", image=image) == pytest.approx(dict(zip(labels[:3], want)))
            else:
                g.classify(["red", "green"], task="swatches", image=_swatch("red"))
            assert g.model.training
        finally:
            for hook in hooks:
                hook.remove()
            g.model.eval()
        assert modes[what] and not any(modes[what]), what
    shuffled = [labels[i] for i in torch.randperm(len(labels), generator=gen).tolist()]
    assert g.rank(shuffled, task="bars", image=image) == pytest.approx(scores, abs=1e-6)
    with pytest.raises(ValueError, match="labels holds 'red' twice"):
        g.rank(["red", "red"], task="bars", image=image)
    with pytest.raises(ValueError, match=r"task 'swatches' does not answer in text, so its text head ranks nothing; "
                                         r"classify as a task trained through the contrastive head \(swatches\)"):
        g.rank(["red", "green"], task="swatches", image=_swatch("red"))
    # the command line: --labels goes through the text head for a task never trained contrastively
    path = tmp_path / "bars.npy"
    np.save(path, np.asarray(image))
    argv = ["predict", str(out), "--task", "bars", "--image", str(path), "--labels", "horizontal,vertical", "--json",
            "--device", "cpu"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["by"] == "text" and printed["scores"] == pytest.approx(
        g.rank(["horizontal", "vertical"], task="bars", image=np.load(path)))
    assert main(argv + ["--by", "contrastive"]) == 2
    assert "task 'bars' was not trained through the contrastive head" in capsys.readouterr().err
    assert main(argv + ["--prompt", "a {}"]) == 2
    assert "--prompt goes with the contrastive head" in capsys.readouterr().err
    assert main(["predict", str(out), "--task", "swatches", "--image", str(path), "--labels", "red,green", "--json",
                 "--by", "text", "--device", "cpu"]) == 2
    assert "does not answer in text" in capsys.readouterr().err
    assert main(["predict", str(out), "--task", "bars", "--image", str(path), "--by", "text", "--device", "cpu"]) == 2
    assert "--by goes with --labels" in capsys.readouterr().err


@pytest.mark.parametrize("args,match", [
    (["--task", "poetry", "--text", "red"], "unknown task 'poetry'"),
    (["--task", "bars", "--image", "missing.png"], "no such file"),
    (["--task", "bars"], "needs at least one input"),
    (["--task", "bars", "--image", "CORRUPT"], "cannot read"),
    (["--task", "bars", "--table", "1,x"], "--table must be comma-separated numbers"),
    (["--task", "bars", "--table", ""], "--table has no value, only missing ones"),
    (["--task", "bars", "--table", "?,?"], "--table has no value, only missing ones"),
    (["--task", "bars", "--table", "1,1e39"], "--table value 1e+39 is beyond float32's range"),
    (["--task", "bars", "--table", "3=1,2"], "--table mixes plain values and COLUMN=VALUE pairs"),
    (["--task", "bars", "--table", "99999999999999999999=2"], "--table column ids must be in [0, 2^31)"),
    (["--task", "bars", "--table=1=0,-1=2"], "--table column ids must be in [0, 2^31)"),
    (["--task", "bars", "--table", "3=1,3=2"], "--table names a column twice"),
    (["--task", "bars", "--image", "EMPTY.npy"], "cannot read EMPTY.npy as a .npy array"),
    (["--task", "bars", "--image", "PICKLED.npy"], "holds pickled Python objects, which are never loaded"),
    (["--task", "bars", "--image", "DIR"], "is a directory, not a file"),
    (["--task", "bars", "--image", "HUGE.npy"], "floating image values must be in [0, 1]; got values from 3e+38"),
    (["--task", "echo", "--text", "missing.txt"], "--text: no such file: missing.txt"),
    (["--task", "bars", "--image", "/dev/null"], "--image: /dev/null is not a regular file"),
    # bars never saw text: the error alone, no warning of that first
    (["--task", "bars", "--image", "OK.npy", "--text", " "], "--text is empty"),
    (["--task", "echo", "--text", "LATIN1.txt"], "is not UTF-8 text"),
    (["--task", "bars", "--audio", "WAVE.npy"], "a .npy file holds no sample rate"),
    (["--task", "bars", "--audio", "EMPTY.wav"], "cannot read EMPTY.wav: the file ends early"),
    (["--task", "bars", "--text", "x", "--beam", "0"], "--beam must be >= 1, got 0"),
    (["--task", "bars", "--text", "x", "--prompt", "a {}"], "--prompt goes with --labels"),
    (["--task", "swatches", "--text", "x", "--labels", "a,b", "--beam", "2"], "--beam does not apply to --labels"),
    (["--task", "swatches", "--text", "x", "--labels", "a,,b"], "labels must be a non-empty list"),
    (["--task", "bars", "--text", "x", "--device", "cpu:3"], "unknown device 'cpu:3'"),
])
def test_predict_user_errors_are_one_line(run, tmp_path, capsys, args, match):
    out, _ = run
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    files = {"EMPTY.npy": b"", "PICKLED.npy": b"\x80\x04K\x01.", "LATIN1.txt": "caf\xe9".encode("latin-1"),
             "EMPTY.wav": b""}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    np.save(tmp_path / "HUGE.npy", np.full((8, 8), 3e38, dtype=np.float32))
    np.save(tmp_path / "WAVE.npy", np.zeros(1600, dtype=np.float32))
    np.save(tmp_path / "OK.npy", np.zeros((8, 8), dtype=np.float32))
    names = {"CORRUPT": str(corrupt), "DIR": str(tmp_path), **{n: str(tmp_path / n) for n in [*files, "HUGE.npy",
                                                                                            "WAVE.npy", "OK.npy"]}}
    args = [names.get(a, a) for a in args]
    match = next((match.replace(n, v) for n, v in names.items() if n in match), match)
    assert main(["predict", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("generalist predict: error:"), err
    assert match in err


def _broken_copy(run_dir, tmp_path, name: str) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / name
    shutil.copytree(run_dir, copy)
    ckpt = copy / "checkpoint"
    weights, config, meta = ckpt / "model.safetensors", ckpt / "config.json", ckpt / "meta.json"
    if name == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif name == "garbage":
        weights.write_bytes(b"\x00" * 20)
    elif name == "nan":
        state = load_file(str(weights))
        next(iter(state.values()))[0] = float("nan")
        save_file(state, str(weights))
    elif name == "bad-json":
        config.write_text("{'d_model': 32")
    elif name == "unknown-key":
        config.write_text(json.dumps({**json.loads(config.read_text()), "bogus": 1}))
    elif name == "wrong-type":
        config.write_text(json.dumps({**json.loads(config.read_text()), "d_model": "32"}))
    elif name == "wrong-shape":
        config.write_text(json.dumps({**json.loads(config.read_text()), "d_model": 64}))
    elif name == "top-k":  # MoE options are the model config's too, so its file is named
        config.write_text(json.dumps({**json.loads(config.read_text()), "top_k": 9}))
    elif name == "meta-tasks":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "tasks": ["bars"]}))
    elif name == "meta-json":
        meta.write_text("{")
    elif name == "meta-list":
        meta.write_text("[]")
    elif name == "meta-no-tasks":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "tasks": []}))
    elif name == "meta-str-tasks":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "tasks": "bars"}))
    elif name == "meta-nested":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "generative": [["bars"]]}))
    elif name == "modality-key":  # fields of the right types that build no embedder
        values = json.loads(config.read_text())
        config.write_text(json.dumps({**values, "modalities": {**values["modalities"], "image": {"bogus": 1}}}))
    elif name == "meta-missing":  # a run's checkpoint without it: the task names are lost, not task0, task1, ...
        meta.unlink()
    return copy


@pytest.mark.parametrize("name,match", [
    ("truncated", "model.safetensors: it is damaged or does not match config.json"),
    ("garbage", "model.safetensors: it is damaged or does not match config.json"),
    ("nan", "model.safetensors holds non-finite weights"),
    ("bad-json", "config.json is not valid JSON"),
    ("unknown-key", "config.json: unknown field 'bogus'"),
    ("wrong-type", "config.json: model config: d_model must be an integer, got '32'"),
    ("wrong-shape", "(size mismatch for"),
    ("top-k", "config.json: model config: MoEConfig.top_k must be in [1, n_routed=4], got 9"),
    ("meta-tasks", "meta.json lists 1 tasks but the model"),
    ("meta-json", "meta.json is not valid JSON"),
    ("meta-missing", "meta.json is missing"),
    ("meta-list", "meta.json is damaged: it lists no tasks"),
    ("meta-no-tasks", "meta.json is damaged: it lists no tasks"),
    ("meta-str-tasks", "meta.json is damaged: it lists no tasks"),
    ("meta-nested", "meta.json: 'generative' must list some of its tasks, got [['bars']]"),
    ("modality-key", "config.json: configs['image']: ImageConfig.__init__() got an unexpected keyword argument"),
])
def test_a_damaged_checkpoint_is_named_in_one_line(run, tmp_path, capsys, name, match):
    copy = _broken_copy(run[0], tmp_path, name)
    assert main(["predict", str(copy), "--task", "echo", "--text", "red", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    with pytest.raises(ValueError, match=re.escape(match)):  # and in Python, a ValueError
        Generalist.load(copy, device="cpu")


def test_non_finite_weights_are_never_saved(run, tmp_path):
    import torch

    g = Generalist.load(run[0], device="cpu")
    with torch.no_grad():
        g.model.boundary.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="refusing to save non-finite weights .*boundary"):
        g.model.save(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_activations_that_overflow_are_named(run):
    """Finite weights can still overflow (here a patch projection scaled to 1e37); the answer is
    then an error naming the example (counted in the caller's list, not in its batch), never text
    decoded from inf."""
    g = Generalist.load(run[0], device="cpu")
    with torch.no_grad():
        g.model.embedders["image"].proj.weight.fill_(1e37)
    with pytest.raises(ValueError, match=r"the model's activations are not finite for example\(s\) \[0\]"):
        g.predict(task="bars", image=np.full((8, 8), 255, dtype=np.uint8))
    examples = [Example([("text", "fine")], "", "bars")] * 3 + [Example([("image", np.full((8, 8), 255, np.uint8))], "", "bars")]
    for method in (g.generate, g.embed):
        with pytest.raises(ValueError, match=r"^the model's activations are not finite for example\(s\) \[3\]"):
            method(examples, batch_size=2)
    with pytest.raises(ValueError, match=r"^example 2: unknown task 'nonesuch'"):
        g.generate(examples[:2] + [Example([("text", "x")], "", "nonesuch")])
    with pytest.raises(ValueError, match=r"^generate, the batch from example 2 \(examples counted from it\): "
                                         r"example 1, segment 0 \(image\)"):
        g.generate(examples[:3] + [Example([("image", np.zeros((0, 8), np.uint8))], "", "bars")], batch_size=2)


def test_generate_arguments_are_checked_by_name(run):
    g = Generalist.load(run[0], device="cpu")
    examples = [Example([("text", "x")], "", "bars")] * 2
    for kwargs, match in [
        (dict(batch_size=-1), "batch_size must be an integer >= 1, got -1"),  # (was: no answers at all)
        (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (dict(batch_size=2.5), "batch_size must be an integer >= 1, got 2.5"),
        (dict(beam_size="2"), "beam_size must be an integer >= 1, got '2'"),
    ]:
        with pytest.raises(ValueError, match=match):
            g.generate(examples, **kwargs)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        g.embed(examples, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0, got None"):
        Generalist(g.model, g.tokenizer, g.tasks, max_new_tokens=None)
    # more new tokens than the decoder has positions for: the entry point asks for what it can read
    short = Generalist(g.model, g.tokenizer, g.tasks, max_new_tokens=10 ** 6)
    assert short.max_new_tokens == g.model.embedders["text"].cfg.max_len


@pytest.mark.filterwarnings("ignore:task .* never saw")  # inputs read, not answers judged
def test_python_inputs_that_hold_no_numbers_are_named(run):
    import torch

    g = Generalist.load(run[0], device="cpu")
    for kwargs, match in [
        (dict(image=torch.zeros(8, 8, device="meta")), "image is on the meta device"),
        (dict(image=torch.zeros(8, 8).to_sparse()), "image must be a dense tensor"),
        (dict(table=([0, 1], [None, 2.0])), "values must be a list of numbers"),
        (dict(text="caf\ud800"), "not valid UTF-8 text"),
        (dict(text="x", beam_size=2.5), "beam_size must be an integer >= 1, got 2.5"),
        (dict(text="x", beam_size=True), "beam_size must be an integer >= 1, got True"),
        (dict(table=([3, 4], [float("nan")] * 2)), "table has no value, only missing ones"),  # as --table refuses it
        (dict(table=(np.arange(2), torch.full((2,), float("nan")))), "table has no value, only missing ones"),
    ]:
        with pytest.raises(ValueError, match=match.replace("(", "\\(")):
            g.predict(task="bars", **kwargs)
    assert isinstance(g.predict(task="bars", table=([3, 4], [float("nan"), 1.0])), str)  # one missing: answered
    with pytest.raises(ValueError, match="examples must be a list of Example, got one Example"):
        g.generate(Example([("text", "x")], "", "bars"))
    for call in (lambda: g.classify(["a", "b"], task="nosuch", text="x"), lambda: g.rank(["a", "b"], task="nosuch",
                                                                                            text="x")):
        with pytest.raises(ValueError, match=r"^unknown task 'nosuch'; this model knows \["):
            call()


@pytest.mark.parametrize("argv,match", [
    (["eval", "RUN", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["check", "--device", "tpu"], "unknown device 'tpu'"),
    (["check", "--device", "meta"], "unknown device 'meta'"),
    (["bench", "--ops", ","], "no op to benchmark"),
    (["bench", "--json", "TMP"], "is a directory"),
    (["data", "prepare", "--sources", ","], "--sources names no source"),
    (["data", "prepare", "--cache", "FILE", "--sources", "mnist5k"], "is a file, not a directory"),
])
def test_other_commands_name_a_bad_argument(run, tmp_path, capsys, argv, match):
    (tmp_path / "file").write_text("x")
    names = {"RUN": str(run[0]), "TMP": str(tmp_path), "FILE": str(tmp_path / "file")}
    assert main([names.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_check_passes_and_a_backend_that_serves_nothing_here_is_one_line(capsys, monkeypatch):
    from generalist.ops import ATTENTION_BACKENDS

    unserved = "attention: backend 'cpu' cannot serve these inputs: (stand-in) no case here"

    def refuse(*args, **kwargs):
        if kwargs.get("backend") == "cpu":
            raise ValueError(unserved)
        return serve(*args, **kwargs)

    import generalist.ops as ops
    serve = ops.flash_attn_varlen_func
    monkeypatch.setattr(ops, "flash_attn_varlen_func", refuse)
    monkeypatch.setattr(ATTENTION_BACKENDS, "available", lambda: ["reference", "cpu"])
    assert main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[3:-2]] == ["reference"] * 15 + ["cpu"]
    assert all(line.endswith("ok") for line in out[3:18])
    assert "every case" in out[18] and out[18].endswith(f"skipped: {unserved}")
    assert out[-1] == "all backends match the float64 semantics"


def test_load_rejects_a_directory_without_checkpoint(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "--task", "bars", "--text", "x"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no checkpoint in"):  # bad input is a ValueError in Python
        Generalist.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):  # and still the OSError it was
        Generalist.load(tmp_path)


@pytest.mark.filterwarnings("ignore:task .* never saw")  # inputs read, not answers judged
def test_predict_accepts_every_modality_from_files_and_arrays(run, tmp_path):
    import wave

    out, _ = run
    g = Generalist.load(out, device="cpu")
    t = np.arange(8000) / 16000
    pcm = (np.sin(2 * np.pi * 440 * t) * 20000).astype(np.int16)
    wav = tmp_path / "tone.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(pcm.tobytes())
    clip = tmp_path / "clip.npy"
    np.save(clip, (np.random.default_rng(0).random((4, 8, 8)) * 255).astype(np.uint8))
    answers = [
        g.predict(task="bars", audio=str(wav)),
        g.predict(task="bars", audio=(pcm.astype(np.float32) / 32768, 16000)),
        g.predict(task="bars", video=str(clip)),
        g.predict(task="bars", table=(np.array([0, 1]), np.array([0.5, np.nan], dtype=np.float32))),
        g.predict(task="echo", text="red", image=np.zeros((8, 8), dtype=np.uint8), beam_size=2),
    ]
    assert all(isinstance(a, str) for a in answers)
    assert answers[0] == answers[1]  # a WAV file and the same samples in memory give the same answer
    batch = [Example([("image", np.zeros((8, 8), dtype=np.uint8))], "", "bars"),
             Example([("text", "red")], "", "echo"), Example([("video", np.load(clip))], "", "bars")]
    assert g.generate(batch) == [g.generate([e])[0] for e in batch]  # mixed modalities batch (packed)


def test_bf16_inference_runs_the_model_in_bf16_close_to_fp32(run, monkeypatch):
    """On a GPU inference runs under bf16 autocast by default, as training does; bf16=True asks
    for it here. The experts' and attention's ops then get bf16 tensors, and the embeddings stay
    fp32 and close to the fp32 model's."""
    import torch

    import generalist.modules.attention as attention_module
    import generalist.modules.moe as moe_module

    out, _ = run
    seen = []
    for module, name in ((moe_module, "grouped_mm"), (attention_module, "flash_attn_varlen_func"),
                         (attention_module, "attention_decode")):
        def spy(*args, _orig=getattr(module, name), _name=name, **kwargs):
            seen.append((_name, args[0].dtype))
            return _orig(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    examples = [Example([("image", np.eye(8, dtype=np.uint8) * 255)], "", "bars"),
                Example([("text", "red blue")], "", "echo")]
    g32, g16 = Generalist.load(out, device="cpu"), Generalist.load(out, device="cpu", bf16=True)
    assert g32.bf16 is None  # the default: bf16 on a GPU only
    results = {}
    for label, g in (("fp32", g32), ("bf16", g16)):
        seen.clear()
        answers, emb = g.generate(examples), g.embed(examples)
        results[label] = (answers, emb, {dtype for _, dtype in seen}, {name for name, _ in seen})
    (_, emb32, dtypes32, names32), (answers16, emb16, dtypes16, names16) = results["fp32"], results["bf16"]
    assert names32 == names16 == {"grouped_mm", "flash_attn_varlen_func", "attention_decode"}
    assert dtypes32 == {torch.float32} and dtypes16 == {torch.bfloat16}
    assert all(isinstance(a, str) for a in answers16)
    assert emb16.dtype == torch.float32 and (emb16 * emb32).sum(-1).min() > 0.99  # unit vectors: cosine


def test_inference_device_option(run, capsys):
    import torch

    out, _ = run
    assert main(["predict", str(out), "--task", "echo", "--text", "red", "--device", "cpu", "--fp32"]) == 0
    assert capsys.readouterr().out.strip() == Generalist.load(out, device="cpu").predict(task="echo", text="red")
    for device in ("tpu", "meta"):
        assert main(["predict", str(out), "--task", "echo", "--text", "red", "--device", device]) == 2
        assert f"unknown device '{device}'" in capsys.readouterr().err
    if torch.cuda.is_available():
        assert resolve_device(None).type == "cuda"
        bad, error = f"cuda:{torch.cuda.device_count()}", "CUDA GPUs"
    else:  # the errors a machine without a GPU gives
        assert resolve_device(None).type == "cpu"
        bad, error = "cuda", "no CUDA GPU is available"
    assert main(["eval", str(out), "--device", bad]) == 2
    assert error in capsys.readouterr().err


def test_eval_of_a_checkpoint_directory_or_of_a_save_cut_short_writes_into_the_run(run, tmp_path):
    """`generalist eval` takes the checkpoint directory itself too, and a run whose last save was
    cut short (only .checkpoint.old left): the results and report land in the run directory."""
    import shutil

    from generalist.cli import _evaluate_run

    out, data = run
    small = {t: type(d)(d.task, [], d.test[:2]) for t, d in data.items()}
    copy = tmp_path / "toy"
    shutil.copytree(out, copy)
    assert _evaluate_run(copy / "checkpoint", data=small) == 0
    assert (copy / "eval.json").is_file() and (copy / "report.html").is_file()
    assert not (copy / "checkpoint" / "eval.json").exists()
    # every test example's answer, in predictions.jsonl and in the report, its inputs drawn
    lines = [json.loads(line) for line in (copy / "predictions.jsonl").read_text().splitlines()]
    tasks = ("bars", "beeps", "echo", "swatches")
    assert [(r["task"], r["index"]) for r in lines] == [(t, i) for t in tasks for i in range(2)]
    assert [r["target"] for r in lines] == [e.target_text for t in tasks for e in small[t].test]
    page = (copy / "report.html").read_text()
    assert all(f"<h3>{t}</h3>" in page for t in small) and page.count("<img alt='image'") == 4  # bars, swatches
    for r in lines:
        shown = html.escape(r["answer"]) or "<i>(empty)</i>"
        assert f"<td>{r['index']}</td>" in page and f"{'✓' if r['match'] else '✗'} {shown}</td>" in page
    # the report rebuilt from predictions.jsonl alone names the inputs in words
    words = write_report(copy).read_text()
    assert "<img alt='image'" not in words and "<i>image 8x8</i>" in words and "<i>3x8x8</i>" not in words
    (copy / "report.html").unlink()
    (copy / "checkpoint").rename(copy / ".checkpoint.old")
    assert _evaluate_run(copy, data=small) == 0 and (copy / "report.html").is_file()
    # --tasks: only those are evaluated, and written apart: the whole evaluation stays
    whole, report = (copy / "eval.json").read_text(), (copy / "report.html").read_text()
    assert _evaluate_run(copy, data=small, tasks=["echo", "swatches"]) == 0
    assert set(json.loads((copy / "eval-partial.json").read_text())) == {"echo", "swatches"}
    assert {json.loads(line)["task"] for line in (copy / "predictions-partial.jsonl").read_text().splitlines()} == \
        {"echo", "swatches"}
    assert (copy / "eval.json").read_text() == whole and (copy / "report.html").read_text() == report
    assert len((copy / "predictions.jsonl").read_text().splitlines()) == 8
    for tasks, match in [(["echo", "poetry"], r"--tasks: unknown tasks \['poetry'\]; this run has bars, beeps, echo"),
                         ([], "--tasks: no task named")]:
        with pytest.raises(ValueError, match=match):
            _evaluate_run(copy, data=small, tasks=tasks)
    # a checkpoint folder of its own (copied out of its run) writes into itself, not beside it
    models = tmp_path / "models"
    shutil.copytree(copy / ".checkpoint.old", models / "mine")
    assert _evaluate_run(models / "mine", data=small) == 0
    assert (models / "mine" / "eval.json").is_file() and not (models / "eval.json").exists()


def test_eval_builds_the_runs_own_tasks_and_names_a_damaged_meta(run, tmp_path, monkeypatch):
    """The test splits are built for the tasks the run was trained on, whatever its mixture holds
    now (here the real demo mixture, which has none of the toy tasks), and a meta.json without
    its tasks or training options is one error naming it, before any data is built."""
    import generalist.data.tasks as tasks_module
    import generalist.train.data as train_data
    from generalist.cli import _evaluate_run

    copy = tmp_path / "toy"
    shutil.copytree(run[0], copy)
    built = []
    monkeypatch.setattr(train_data, "build_data", lambda mixture, seed=0, **k: built.append(mixture) or
                        build_data(mixture, tasks=toy_tasks.TASKS, seed=seed, progress=False))
    monkeypatch.setattr(tasks_module, "discover", lambda: toy_tasks.TASKS)  # (eval checks the run's tasks exist)
    assert _evaluate_run(copy, limit=2, device="cpu") == 0
    assert (copy / "eval-partial.json").is_file()
    assert built == [{t: {"train": 0, "test": 2} for t in ("bars", "echo", "swatches", "beeps")}]
    meta = copy / "checkpoint" / "meta.json"
    good = json.loads(meta.read_text())
    for damaged, match in [({}, "it lists no tasks"), ([], "it lists no tasks"),
                           ({"tasks": good["tasks"]}, "it holds no training options"),
                           ({**good, "train": {"mixture": "demo"}}, "it holds no training options")]:
        meta.write_text(json.dumps(damaged))
        with pytest.raises(ValueError, match=f"meta.json is damaged: {match}"):
            _evaluate_run(copy, limit=2, device="cpu")
    assert len(built) == 1


def test_eval_warns_of_a_test_split_that_changed_since_training(run, tmp_path, capsys):
    """meta.json records a fingerprint of each task's test split; an evaluation on a split that
    no longer begins the same (new task data, a new way of splitting) warns, naming the task."""
    import warnings

    from generalist.cli import _evaluate_run
    from generalist.train.data import split_fingerprint

    out, data = run
    copy = tmp_path / "toy"
    shutil.copytree(out, copy)
    meta_path = copy / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["test_splits"] == {t: split_fingerprint(d.test) for t, d in data.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _evaluate_run(copy, data=data) == 0  # the same splits: no warning
    meta["test_splits"]["echo"]["sha256"] = "0" * 16
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="the test split of echo differs from the one this run recorded"):
        assert _evaluate_run(copy, data=data) == 0
    short = {t: type(d)(d.task, [], d.test[:1]) for t, d in data.items()}  # fewer than it read: not compared
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _evaluate_run(copy, data=short) == 0


def test_report_of_a_hand_edited_log_and_a_checkpoint_without_training_state(run, tmp_path):
    """Log lines whose losses are not numbers lose those entries (a dict, a string, a bool); a step
    past any real count is no record; a checkpoint without state.json (one copied for inference)
    or with routing counts of another shape gets a report without those parts."""
    from generalist.train.report import read_log

    out = tmp_path / "copy"
    shutil.copytree(run[0], out)
    log = out / "metrics.jsonl"
    log.write_text(log.read_text() + json.dumps({"step": 31, "task_loss": {"echo": {"count": 1}, "bars": "n/a",
                                                                            "swatches": True, "x": 0.5}}) + "\n"
                   + json.dumps({"step": 10 ** 400, "task_loss": {"echo": 1.0}}) + "\n")
    records = read_log(log)
    assert records[-1] == {"step": 31, "task_loss": {"x": 0.5}} and all(r["step"] <= 31 for r in records)
    assert write_report(out).read_text().count(" src='data:image/png;base64,") == 4
    state_path = out / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state["routing"]["task"] = [[1, 2]]  # not (layers, tasks, experts)
    state_path.write_text(json.dumps(state))
    page = write_report(out).read_text()
    assert page.count(" src='data:image/png;base64,") == 3 and f"<td>{state['step']} of 30" in page
    state_path.unlink()
    page = write_report(out).read_text()
    assert page.count(" src='data:image/png;base64,") == 2 and "<th>steps</th><td>unknown (no training state)" in page


def test_report_of_awkward_task_names_a_run_without_steps_and_results_from_eval_json(run, tmp_path):
    """Task names are any strings: "$" (math text to matplotlib), a leading "_" (left out of a
    legend by default) and HTML characters are drawn and written as they are. Without results
    the report reads eval.json (a NaN there is null: shown as "—"); without logged steps it says
    so instead of drawing empty plots."""
    from generalist.train.report import loss_figure

    out = tmp_path / "copy"
    shutil.copytree(run[0], out)
    names = ["$5 deals", "_hidden", "<b>&"]
    fig = loss_figure([{"step": s, "task_loss": {n: 1.0 / s for n in names}} for s in range(1, 40)])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == sorted(names)
    fig.savefig(io.BytesIO(), format="png")  # "$5 deals" would fail to render as math text
    (out / "eval.json").write_text(json.dumps({"<b>&": {"accuracy": None, "bleu": 0.25}}))
    page = write_report(out).read_text()
    assert "<td rowspan='2'>&lt;b&gt;&amp;</td><td>accuracy</td><td>—</td>" in page and "<td>0.250</td>" in page
    (out / "metrics.jsonl").write_text("")
    page = write_report(out).read_text()
    assert "No training steps logged" in page and page.count(" src='data:image/png;base64,") == 2


def test_examples_may_name_files_and_an_empty_batch_embeds_to_nothing(run, tmp_path):
    """In an Example, a non-text segment's str (or any Path) is a file, read as predict reads it;
    a text segment's str is the text itself."""
    g = Generalist.load(run[0], device="cpu")
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    img[:, 2] = 255
    Image.fromarray(img).save(tmp_path / "bar.png")
    (tmp_path / "words.txt").write_text("red blue\n")
    from_arrays = [Example([("image", img)], "", "swatches"), Example([("text", "red blue")], "", "swatches")]
    from_files = [Example([("image", str(tmp_path / "bar.png"))], "", "swatches"),
                  Example([("text", tmp_path / "words.txt")], "", "swatches")]
    torch.testing.assert_close(g.embed(from_files), g.embed(from_arrays))
    assert g.generate([Example([("image", tmp_path / "bar.png")], "", "bars")]) == \
        g.generate([Example([("image", img)], "", "bars")])
    # as a str, a text segment is the text, even one naming a file: not the file's "red blue"
    as_str = g.embed([Example([("text", str(tmp_path / "words.txt"))], "", "swatches")])
    assert as_str.shape == (1, g.embed([]).shape[1]) and not torch.allclose(as_str, g.embed(from_files[1:]))
    empty = g.embed([])
    assert empty.shape[0] == 0 and empty.shape[1] > 0 and empty.dtype == torch.float32
    with pytest.raises(ValueError, match="--image: no such file: .*missing.png"):
        g.embed([Example([("image", str(tmp_path / "missing.png"))], "", "swatches")])
    with pytest.raises(ValueError, match="example of task 'swatches' has no input segments"):
        g.embed([Example(None, "", "swatches")])
    with pytest.raises(ValueError, match="expected an Example, got str"):
        g.generate(["red blue"])


@pytest.mark.parametrize("task", [["bars"], 3, None])
def test_a_task_that_is_no_name_is_refused(run, task):
    g = Generalist.load(run[0], device="cpu")
    with pytest.raises(ValueError, match=r"task must be a str, one of \['bars'"):
        g.predict(task=task, text="red")
    with pytest.raises(ValueError, match=r"task must be a str"):
        g.classify(["a", "b"], task=task, text="red")
    with pytest.raises(ValueError, match=r"unknown task .*; this model knows \['bars'"):
        g.embed([Example([("text", "red")], "", task)])
