"""The answers in the report: which examples are shown, the confusion counts, every modality
drawn (and decoded back to what was given), the evaluation's recorded answers, and
predictions.jsonl."""

import base64
import io
import json
import re
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from generalist.data.packing import Example
from generalist.data.tasks import Task, normalize
from generalist.train.data import TaskData
from generalist.train.evaluate import Answered, answer_records, evaluate, read_predictions, write_predictions
from generalist.train.gallery import MAX_LABELS, confusion, confusion_figure, pick, segment_html


def _numbers(gen, n, high):
    return torch.randint(0, high, (n,), generator=gen).tolist()


def test_pick_shows_the_first_wrong_answers_then_the_first_right_ones(gen):
    for _ in range(200):
        n = int(torch.randint(0, 15, (1,), generator=gen))
        matches = [bool(b) for b in _numbers(gen, n, 2)]
        shown, wrong = int(torch.randint(1, 8, (1,), generator=gen)), int(torch.randint(0, 8, (1,), generator=gen))
        chosen = pick(matches, shown, wrong)
        misses = [i for i, m in enumerate(matches) if not m]
        hits = [i for i, m in enumerate(matches) if m]
        assert chosen == sorted(set(chosen)) and len(chosen) == min(shown, n)
        # the wrong ones shown are the first ones, as many as asked for (or fewer when there are fewer)
        chosen_misses = [i for i in chosen if not matches[i]]
        assert chosen_misses == misses[:len(chosen_misses)]
        assert len(chosen_misses) >= min(wrong, len(misses), shown)
        chosen_hits = [i for i in chosen if matches[i]]
        assert chosen_hits == hits[:len(chosen_hits)]
        # more wrong ones than `wrong` only when there are too few right ones to fill the table
        if len(chosen_misses) > min(wrong, shown):
            assert chosen_hits == hits


def test_confusion_counts_every_answer_once_by_target(gen):
    words = "zero one two three four five six seven eight nine ten eleven".split()
    for _ in range(50):
        k = int(torch.randint(2, 12, (1,), generator=gen))
        labels = [w.upper() if i % 3 == 0 else w for i, w in enumerate(words[:k])]  # normalized before counting
        n = int(torch.randint(1, 60, (1,), generator=gen))
        targets = [labels[i] for i in _numbers(gen, n, k)]
        answers = [labels[i] if i < k else f"not a label {i}" for i in _numbers(gen, n, k + 2)]
        rows = [{"target": t, "answer": a} for t, a in zip(targets, answers)]
        result = confusion(rows)
        present = sorted({normalize(t) for t in targets}, key=words.index)
        if len(present) < 2:
            assert result is None
            continue
        got_labels, counts = result
        assert got_labels == present  # number words in the order of the numbers
        assert counts.shape == (len(present), len(present) + 1) and counts.sum() == n
        for i, t in enumerate(present):
            for j, a in enumerate(present):
                assert counts[i, j] == sum(normalize(x) == t and normalize(y) == a for x, y in zip(targets, answers))
            assert counts[i, -1] == sum(normalize(x) == t and normalize(y) not in present
                                        for x, y in zip(targets, answers))
    many = [{"target": f"label {i}", "answer": "x"} for i in range(MAX_LABELS + 1)]
    assert confusion(many) is None and confusion(many[:MAX_LABELS]) is not None


def _decoded(page: str, kind: str):
    uris = re.findall(rf"src='data:{kind};base64,([^']*)'", page)
    return [base64.b64decode(u) for u in uris]


def test_every_modality_is_drawn_as_it_was_given(gen):
    grey = torch.randint(0, 256, (28, 20), dtype=torch.uint8, generator=gen).numpy()
    page = segment_html("image", grey)
    png = Image.open(io.BytesIO(_decoded(page, "image/png")[0]))
    assert np.array_equal(np.asarray(png.convert("RGB")), np.repeat(grey[:, :, None], 3, axis=2))
    assert "width='69' height='96'" in page  # the longer side 96 pixels, the aspect kept
    colour = torch.rand(3, 5, 7, generator=gen)  # float, channel-first
    png = Image.open(io.BytesIO(_decoded(segment_html("image", colour), "image/png")[0]))
    assert np.abs(np.asarray(png).astype(float) / 255 - colour.permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6

    clip = torch.randint(0, 256, (6, 8, 8), dtype=torch.uint8, generator=gen).numpy()
    gif = Image.open(io.BytesIO(_decoded(segment_html("video", clip), "image/gif")[0]))
    assert gif.n_frames == 6
    for t in range(6):  # grey frames survive the GIF palette exactly
        gif.seek(t)
        assert np.array_equal(np.asarray(gif.convert("L")), clip[t])

    samples = (torch.rand(4000, generator=gen) * 1.6 - 0.8).numpy()
    page = segment_html("audio", (samples, 8000))
    assert "0.50 s" in page and len(_decoded(page, "image/png")) == 1
    with wave.open(io.BytesIO(_decoded(page, "audio/wav")[0])) as w:
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (8000, 1, 4000)
        back = np.frombuffer(w.readframes(4000), dtype="<i2") / 32767
    assert np.abs(back - samples).max() <= 1 / 32767
    long = segment_html("audio", (np.zeros(11 * 8000, dtype=np.float32), 8000))
    assert "<audio" not in long and "11.00 s" in long  # a long sound: its spectrogram alone

    table = segment_html("table", (np.arange(10), np.linspace(-1, 1, 10)))
    assert "table 0: -1, 1: -0.778" in table and "… (10 cells)" in table and "8:" not in table
    assert "&lt;b&gt;" in segment_html("text", "<b>bold</b>") and "<b>" not in segment_html("text", "<b>bold</b>")
    assert segment_html("text", "w" * 1000).count("w") < 400


def test_inputs_as_the_model_takes_them_are_drawn_and_the_page_stays_small(gen, tmp_path):
    """Tensors that need a gradient or are bf16 are drawn; a picture, clip or sound larger than
    its thumbnail is stored at most twice the size it is drawn at (a clip at 16 of its frames, a
    sound's player at 16 kHz); a .txt named by a str shows its text, as the model reads it."""
    image = torch.rand(3, 6, 6, generator=gen, requires_grad=True)
    png = Image.open(io.BytesIO(_decoded(segment_html("image", image.bfloat16()), "image/png")[0]))
    assert png.size == (6, 6)
    png = Image.open(io.BytesIO(_decoded(segment_html("image", image), "image/png")[0]))
    assert np.abs(np.asarray(png).astype(float) / 255 - image.detach().permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
    sound = (torch.rand(16000, generator=gen) - 0.5).requires_grad_()
    assert len(_decoded(segment_html("audio", (sound, 16000)), "audio/wav")) == 1
    assert "table 3: 0.5" in segment_html("table", (torch.tensor([3]), torch.tensor([0.5], requires_grad=True)))

    big = torch.randint(0, 256, (1000, 700), dtype=torch.uint8, generator=gen).numpy()
    page = segment_html("image", big)
    assert Image.open(io.BytesIO(_decoded(page, "image/png")[0])).size == (134, 192) and len(page) < 200_000
    clip = torch.randint(0, 256, (100, 8, 8), dtype=torch.uint8, generator=gen).numpy()
    page = segment_html("video", clip)
    assert Image.open(io.BytesIO(_decoded(page, "image/gif")[0])).n_frames == 16 and "100 frames, 16 shown" in page
    page = segment_html("audio", ((torch.rand(44100 * 9, generator=gen) - 0.5).numpy() * 0.5, 44100))
    with wave.open(io.BytesIO(_decoded(page, "audio/wav")[0])) as w:
        assert (w.getframerate(), w.getnframes()) == (16000, 16000 * 9)
    assert Image.open(io.BytesIO(_decoded(page, "image/png")[0])).size == (768, 64)  # 901 frames, drawn 384 wide

    note = tmp_path / "note.txt"
    note.write_text("what the model read")
    assert "what the model read" in segment_html("text", str(note))
    assert segment_html("text", "") == "<i>(empty text)</i>"


def test_an_input_that_cannot_be_drawn_is_named_instead(tmp_path):
    missing = tmp_path / "gone.png"
    assert "<i>image " + str(missing) in segment_html("image", str(missing))
    assert "<i>image 2x2x5</i>" == segment_html("image", np.zeros((2, 2, 5), dtype=np.uint8))  # 5 channels
    assert "<i>audio no-such.wav</i>" == segment_html("audio", "no-such.wav")  # a str names a file
    assert "<i>video</i>" == segment_html("video", object())


class _Words(Task):
    name = "words"

    def examples(self, split, limit=None, seed=0):
        return [Example([("text", w)], w, self.name) for w in ("red", "green", "blue")]

    def evaluate(self, predictor, examples):
        scores = self.score(predictor.generate(examples), examples)
        scores["again"] = self.score(predictor.generate(list(reversed(examples))), list(reversed(examples)))["accuracy"]
        return scores


class _Nearest(_Words):
    name = "nearest"
    generative = False

    def answer(self, predictor, examples):
        return ["red"] * len(examples)

    def evaluate(self, predictor, examples):
        return self.score(self.answer(predictor, examples), examples)


class _Silent(_Nearest):
    name = "silent"
    answer = Task.answer

    def evaluate(self, predictor, examples):
        return {"accuracy": 0.5}


class _Counting:
    """Answers every example with its text upper-cased, the last one wrong; counts its calls."""

    def __init__(self):
        self.calls = []

    def generate(self, examples, beam_size=1):
        self.calls.append(len(examples))
        out = [e.segments[0][1].upper() for e in examples]
        return out[:-1] + ["purple"]


def test_evaluate_records_the_answers_and_decodes_each_test_split_once(tmp_path):
    tasks = [_Words(), _Nearest(), _Silent()]
    data = {t.name: TaskData(t, [], t.examples("test")) for t in tasks}
    plain = evaluate(_Counting(), data, progress=False)
    predictor, answers = _Counting(), {}
    assert evaluate(predictor, data, progress=False, answers=answers) == plain
    # the test split decoded once (the task's own generate of the same examples got the texts
    # back); its reversed copy is other examples, decoded again
    assert predictor.calls == [3, 3]
    assert answers == {"words": ["RED", "GREEN", "purple"], "nearest": ["red", "red", "red"]}  # silent: no answer()
    path = write_predictions(tmp_path, answer_records(data, answers))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["task"], r["index"], r["answer"], r["match"]) for r in lines] == [
        ("nearest", 0, "red", True), ("nearest", 1, "red", False), ("nearest", 2, "red", False),
        ("words", 0, "RED", True), ("words", 1, "GREEN", True), ("words", 2, "purple", False)]
    assert lines[0]["inputs"] == ["red"] and lines[0]["target"] == "red"
    path.write_text(path.read_text() + '{"task": "words", "ind')  # a line cut short is left out
    assert {t: [r["answer"] for r in rows] for t, rows in read_predictions(path).items()} == {
        "nearest": ["red"] * 3, "words": ["RED", "GREEN", "purple"]}


def test_answers_that_are_not_one_text_per_example_are_named():
    class Short(_Nearest):
        name = "short"

        def answer(self, predictor, examples):
            return ["red"]

    data = {"short": TaskData(Short(), [], Short().examples("test"))}
    with pytest.raises(ValueError, match=r"task 'short': answer\(\) must give one str per example \(3\); got 1 items"):
        evaluate(_Counting(), data, progress=False, answers={})


def test_answered_hands_back_only_the_same_examples_with_no_other_arguments():
    examples = _Words().examples("test")
    inner = _Counting()
    answered = Answered(inner, examples, ["a", "b", "c"])
    assert answered.generate(list(examples)) == ["a", "b", "c"] and inner.calls == []  # another list, same examples
    # once: a task may have changed its examples in place before it generates for them again
    assert answered.generate(examples) == ["RED", "GREEN", "purple"] and inner.calls == [3]
    answered = Answered(inner, examples, ["a", "b", "c"])
    assert answered.generate(_Words().examples("test")) == ["RED", "GREEN", "purple"]  # equal, not the same
    assert answered.generate(examples, beam_size=2) == ["RED", "GREEN", "purple"]
    assert answered.generate(examples[:2]) == ["RED", "purple"]
    assert answered.generate(examples) == ["a", "b", "c"]  # (not yet handed back)
    assert answered.calls is inner.calls  # anything else is the predictor's


def test_a_confusion_matrix_of_long_labels_stays_page_sized():
    """Labels of thousands of characters (free-text answers) are cut short on the axes: the
    figure stays the size of a page, not 12,000 pixels a side."""
    from generalist.train.report import _png

    rows = [{"target": f"label {i} " + "x" * 3000, "answer": f"label {i} " + "x" * 3000} for i in range(5)]
    png = Image.open(io.BytesIO(base64.b64decode(_png(confusion_figure({"t": confusion(rows)})))))
    assert max(png.size) < 2500


def test_eval_builds_the_test_splits_its_mixture_gives():
    """`generalist eval` builds each trained task's test split as the mixture sizes it, capped by
    --limit; a task the mixture gives no test examples keeps none under --limit too."""
    from generalist.cli import eval_mixture

    sizes = {"digits": {"train": 10, "test": 0}, "fashion": {"train": 10, "test": 300}}
    trained = ["digits", "fashion", "vqa"]
    assert eval_mixture(sizes, trained) == {"digits": {"train": 0, "test": 0}, "fashion": {"train": 0, "test": 300},
                                            "vqa": {"train": 0}}
    assert eval_mixture(sizes, trained, limit=50) == {"digits": {"train": 0, "test": 0},
                                                      "fashion": {"train": 0, "test": 50}, "vqa": {"train": 0, "test": 50}}
    assert eval_mixture(sizes, trained, tasks=["fashion"], limit=500) == {"fashion": {"train": 0, "test": 300}}
