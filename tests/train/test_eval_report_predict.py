import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import toy_tasks  # noqa: E402

from generalist.cli import main  # noqa: E402
from generalist.data.packing import Example  # noqa: E402
from generalist.infer.generalist import Generalist  # noqa: E402
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


def test_evaluate_and_report(run):
    out, data = run
    results = evaluate(Generalist.load(out), data, progress=False)
    assert set(results) == {"bars", "echo", "swatches"}
    assert all(0.0 <= v <= 1.0 for m in results.values() for v in m.values())
    assert "bars" in format_table(results)
    page = write_report(out, results).read_text()
    assert page.count("<img src='data:image/png;base64,") == 3  # loss, routing by task, by modality
    assert "<td>echo</td><td>accuracy</td>" in page


def test_predict_from_python_and_cli(run, tmp_path, capsys):
    out, _ = run
    g = Generalist.load(out)
    img = np.zeros((8, 8), dtype=np.uint8)
    img[:, 3] = 255
    answer = g.predict(task="bars", image=img)
    assert isinstance(answer, str)
    path = tmp_path / "bar.png"
    Image.fromarray(img).save(path)
    assert main(["predict", str(out), "--task", "bars", "--image", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"task": "bars", "prediction": g.predict(task="bars", image=str(path))}
    assert main(["predict", str(out), "--task", "echo", "--text", "red blue"]) == 0
    assert capsys.readouterr().out.strip() == g.predict(task="echo", text="red blue")


@pytest.mark.parametrize("args,match", [
    (["--task", "poetry", "--text", "red"], "unknown task 'poetry'"),
    (["--task", "bars", "--image", "missing.png"], "no such file"),
    (["--task", "bars"], "needs at least one input"),
    (["--task", "bars", "--image", "CORRUPT"], "cannot read"),
    (["--task", "bars", "--table", "1,x"], "--table must be comma-separated numbers"),
])
def test_predict_user_errors_are_one_line(run, tmp_path, capsys, args, match):
    out, _ = run
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    args = [str(corrupt) if a == "CORRUPT" else a for a in args]
    assert main(["predict", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("generalist predict: error:")
    assert match in err


def test_load_rejects_a_directory_without_checkpoint(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "--task", "bars", "--text", "x"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_predict_accepts_every_modality_from_files_and_arrays(run, tmp_path):
    import wave

    out, _ = run
    g = Generalist.load(out)
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
