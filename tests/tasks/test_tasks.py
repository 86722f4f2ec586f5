"""Every built-in task builds examples from real data, its splits never leak, its metric works,
and the tiny model accepts its inputs (a few training steps on every task)."""

import difflib
import hashlib
import re

import numpy as np
import pytest
import torch

from generalist.data import sources as S
from generalist.data.packing import Example
from generalist.data.speech import voice_split
from generalist.data.tasks import discover, normalize, split_indices
from generalist.train.data import build_data, get_mixture, load_mixtures
from generalist.train.trainer import TrainConfig, Trainer
from generalist.train.data import TaskData

TASKS = discover()
EXPECTED = {"fashion", "digits", "spoken_digits", "av_digits", "moving_digits", "captions", "zero_shot", "vqa",
            "text_topic", "tabular", "table_image"}


def test_every_task_is_discovered_and_in_the_mixtures():
    assert set(TASKS) == EXPECTED
    mixtures = load_mixtures()
    assert set(mixtures["demo"]) == EXPECTED and set(mixtures["full"]) == EXPECTED
    for name in mixtures:
        assert get_mixture(name) == mixtures[name]  # each passes its checks


@pytest.mark.parametrize("mixture,message", [
    ({"digits": 100}, "mixture entry 'digits' must be {'train': limit, 'test': limit}, got 100"),
    ({"digits": None}, "mixture entry 'digits' must be {'train': limit, 'test': limit}, got None"),
    ({"digits": {"train": 5, "tets": 3}}, "mixture entry 'digits' must be {'train': limit, 'test': limit}"),
    ({"digits": {"train": -1}}, "mixture entry 'digits', train: limit (None for all) must be an integer >= 0, got -1"),
    ({"digits": {}, "nonesuch": {}}, "the mixture names unknown tasks ['nonesuch']"),
    ({}, "a mixture maps task names to their limits, got {}"),
])
def test_a_malformed_mixture_is_named_before_any_data_is_built(mixture, message):
    with pytest.raises(ValueError) as error:
        build_data(mixture, TASKS, progress=False)
    assert message in str(error.value)


def test_a_task_answered_through_another_needs_it_in_the_mixture(tmp_path):
    """zero_shot is answered as captions: a model trained without captions cannot answer it, which
    the evaluation after training would find out; the trainer refuses the mixture up front."""
    assert TASKS["zero_shot"].requires == ("captions",)
    data = build_data({"digits": {"train": 4, "test": 2}, "zero_shot": {"test": 2}}, TASKS, progress=False)
    with pytest.raises(ValueError, match="task 'zero_shot' is answered through 'captions', which the mixture lacks"):
        Trainer(TrainConfig(preset="tiny", out=str(tmp_path / "run"), steps=2, warmup=1), data, progress=False)
    # evaluating zero_shot alone (generalist eval --tasks zero_shot) builds its data without captions'
    assert len(build_data({"zero_shot": {"train": 0, "test": 2}}, TASKS, progress=False)["zero_shot"].test) == 2


def test_a_task_file_that_fails_to_load_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken.py").write_text("import not_a_module\n")
    monkeypatch.setenv("GENERALIST_TASKS_PATH", str(tmp_path))
    with pytest.raises(ValueError, match=f"task file {tmp_path / 'broken.py'} failed to load: ModuleNotFoundError"):
        discover()
    (tmp_path / "broken.py").write_text("from generalist.data.tasks import Task\n"
                                         "class Nameless(Task):\n    def examples(self, *a, **k): return []\n"
                                         "TASK = Nameless()\n")
    with pytest.raises(ValueError, match="its TASK has no name"):
        discover()
    monkeypatch.setenv("GENERALIST_TASKS_PATH", str(tmp_path / "nonesuch"))
    with pytest.raises(ValueError, match="GENERALIST_TASKS_PATH names .*nonesuch, which is not a directory"):
        discover()
    # an installed wheel has no tasks/ of its own: no tasks then, not an error
    import generalist.data.tasks as tasks_module

    monkeypatch.delenv("GENERALIST_TASKS_PATH")
    monkeypatch.setattr(tasks_module, "TASKS_DIR", tmp_path / "not-installed")
    assert discover() == {}


def test_no_examples_is_no_score():
    with pytest.raises(ValueError, match="task 'digits': no predictions to score"):
        TASKS["digits"].score([], [])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_task_builds_examples(name):
    task = TASKS[name]
    alone = type(task)().examples("test", 6)  # a fresh instance, no training split built first (as eval does)
    train, test = task.examples("train", 6), task.examples("test", 6)
    assert [e.target_text for e in alone] == [e.target_text for e in test]
    assert [_digest(e) for e in alone] == [_digest(e) for e in test]
    assert len(test) == 6 and len(train) == (0 if name == "zero_shot" else 6)
    for ex in train + test:
        assert isinstance(ex, Example) and ex.segments and ex.target_text.strip()
        for modality, data in ex.segments:
            assert modality in ("text", "image", "audio", "video", "table")
    again = task.examples("test", 6)  # deterministic
    assert [e.target_text for e in again] == [e.target_text for e in test]
    assert [_digest(e) for e in again] == [_digest(e) for e in test]
    with pytest.raises(ValueError, match="unknown split"):
        task.examples("validation", 2)
    for bad in (-1, 2.5, True, "3"):  # one meaning of `limit` in every task (some made -1 mean "all but one")
        with pytest.raises(ValueError, match=f"limit \\(None for all\\) must be an integer >= 0, got {bad!r}"):
            task.examples("test", bad)
    assert task.examples("test", 0) == []


def _digest(ex):
    """A hash of the first segment's data (a table's values)."""
    data = ex.segments[0][1]
    data = data[-1] if isinstance(data, tuple) else data
    return hashlib.sha1(str(data).encode() if isinstance(data, str) else np.ascontiguousarray(data).tobytes()).hexdigest()


@pytest.mark.parametrize("name", ["fashion", "digits", "captions"])
def test_image_splits_are_disjoint(name):
    task = TASKS[name]
    train = {_digest(e) for e in task.examples("train", None if name != "fashion" else 3000)}
    test = {_digest(e) for e in task.examples("test", None if name != "fashion" else 3000)}
    assert train and test and not train & test


def test_captions_splits_share_no_caption():
    """Not even one with and one without its article (the emoji's "horse" and the stamp's "a
    horse"), nor one spelt with other punctuation or spacing ("t-shirt" and "a t shirt",
    "hospital" and the stamp's "“hospital”")."""
    task = TASKS["captions"]
    train, test = task.examples("train"), task.examples("test")
    bare = lambda e: "".join(ch for ch in normalize(e.target_text).removeprefix("a ").removeprefix("an ")  # noqa: E731
                             .removeprefix("the ") if ch.isalnum())
    train_caps, test_caps = {bare(e) for e in train}, {bare(e) for e in test}
    assert train_caps and test_caps and not train_caps & test_caps
    assert 0.12 < len(test) / (len(train) + len(test)) < 0.18  # still about 85/15
    assert [e.target_text for e in type(task)().examples("test")] == [e.target_text for e in test]  # deterministic


def test_text_topic_splits_share_no_quote_and_no_quote_has_two_labels():
    """The same quote with other punctuation or another attribution is the same quote: the
    collection has many such pairs (some under two categories), and none may span the splits."""
    quote_key = type(TASKS["text_topic"])._data.__globals__["quote_key"]  # task files are no importable modules
    twice = ["C is quirky, flawed, and an enormous success\n\t\t-- Dennis M. Ritchie",  # filed under linux
             "C is quirky, flawed, and an enormous success.\n    -- Dennis Ritchie (1941-2011), creator of the C\n"
             "    programming language and of UNIX"]  # and under computers
    assert quote_key(twice[0]) == quote_key(twice[1]) == "cisquirkyflawedandanenormoussuccess"
    assert quote_key("Well -- I think so.\nIt -- is.") == "wellithinksoitis"  # a dash in the body is no attribution
    assert quote_key("Bus error -- driver executed.") != quote_key("Bus error -- please leave by the rear door.")
    assert quote_key("He is unbiased\n-- he hates all\n\t\t-- R. A. Heinlein") == "heisunbiasedhehatesall"
    assert quote_key("<>") != quote_key("()")  # no letter or digit: each its own quote
    # a quote inside a longer one (under a title line, in a list) is that quote, from 5 words on
    same_quotes = type(TASKS["text_topic"])._data.__globals__["same_quotes"]
    groups = same_quotes(["Ogden's Law:\n\tThe sooner you fall behind, the more time you have to catch up.",
                          "The sooner you fall behind, the more time you have to catch up.",
                          "Offer void where prohibited by law.", "Void where prohibited by law.",
                          "Void where prohibited.", "Where prohibited by law, offer void."])
    assert groups[0] == groups[1] and groups[2] == groups[3] and len({groups[0], groups[2], groups[4], groups[5]}) == 4
    # a word or two changed, or a heading added, is the same quote; a parody with another point is not
    groups = same_quotes(["A verbal contract isn't worth the paper it's written on.\n\t\t-- Samuel Goldwyn",
                          '"A verbal contract isn\'t worth the paper it\'s printed on." -- Samuel Goldwyn',
                          "Old age and treachery will overcome youth and skill.",
                          "Age and treachery will always overcome youth and skill.",
                          "You will be divorced within a year.", "You will be married within a year.",
                          "Today is the first day of the rest of your life.", "The road to hell is paved with NAND gates."])
    assert groups[0] == groups[1] and groups[2] == groups[3] and groups[4] == groups[5]
    assert len({groups[0], groups[2], groups[4], groups[6], groups[7]}) == 5
    # the same words under a title line ("QOTD:", "X's Law:") and bare, however short
    groups = same_quotes(["O'Toole's commentary on Murphy's Law:\n\tMurphy was an optimist.", "Murphy was an optimist.",
                          "Law of Continuity:\n\tExperiments should be reproducible.  They should all fail the same way.",
                          "Experiments must be reproducible; they should all fail in the same way."])
    assert groups[0] == groups[1] and groups[2] == groups[3]
    task = TASKS["text_topic"]
    train, test = task.examples("train"), task.examples("test")
    words = lambda e: quote_key(e.segments[0][1])  # noqa: E731
    train_texts, test_texts = {words(e) for e in train}, {words(e) for e in test}
    assert train_texts and test_texts and not train_texts & test_texts
    spaced = lambda e: " " + " ".join(re.findall(r"[a-z0-9]+", e.segments[0][1].lower())) + " "  # noqa: E731
    train_all = "\x00".join(spaced(e) for e in train)
    inside = [e for e in test if len(spaced(e).split()) >= 8 and spaced(e) in train_all]
    assert not inside, [e.segments[0][1] for e in inside[:3]]  # no test quote inside a training one
    # nor nearly a training one (difflib, against the training quotes of its first word and length)
    by_start = {}
    for e in train:
        w = spaced(e).split()
        by_start.setdefault((tuple(w[:1]), len(w)), []).append(w)

    def nearly_trained(w):
        alike = [t for n in range(-2, 3) for t in by_start.get((tuple(w[:1]), len(w) + n), [])]
        return any(difflib.SequenceMatcher(None, w, t, autojunk=False).ratio() >= 0.9 for t in alike)

    near = [e for e in test if nearly_trained(spaced(e).split())]
    assert not near, [e.segments[0][1] for e in near[:3]]
    labels = {}
    for e in train + test:
        labels.setdefault(words(e), set()).add(e.target_text)
    assert all(len(v) == 1 for v in labels.values())
    assert len(labels) == len(train) + len(test)  # each quote once
    assert [e.target_text for e in type(task)().examples("test")] == [e.target_text for e in test]  # deterministic


def test_split_indices_and_voices_are_disjoint_partitions():
    tr, te = split_indices(1000, "train", 0.2, 0), split_indices(1000, "test", 0.2, 0)
    assert len(te) == 200 and not set(tr) & set(te) and set(tr) | set(te) == set(range(1000))
    for seed in range(20):
        train, test = voice_split("train", seed), voice_split("test", seed)
        assert not set(train) & set(test) and sorted(train + test) == sorted(S.VOICES) and len(test) == len(S.VOICES) // 4 == 6
        # a variant is one timbre whatever the accent: "en-us+f2" in test, "en-gb-scotland+f2" in training
        # would be one speaker in both
        variant = lambda v: v.partition("+")[2] or "(default)"  # noqa: E731  (no variant: the default timbre)
        assert not {variant(v) for v in train} & {variant(v) for v in test}
    voices = {e.meta["voice"] for e in TASKS["spoken_digits"].examples("test", 50)}
    assert voices <= set(voice_split("test", 0))


def test_captions_leave_out_pictures_no_reader_could_caption():
    """A caption that differs from an earlier one only by size words, on the same picture (every
    picture is cropped to fill the frame), is left out, as are the letters I and l (one bar);
    other pictures stay, a caption's own repeats and other size words on other pictures too."""
    distinct = type(TASKS["captions"])._all.__globals__["distinct_pictures"]
    square, dot = np.full((32, 32, 3), 200, np.uint8), np.zeros((32, 32, 3), np.uint8)
    almost = square.copy()
    almost[0, :8] = 180  # a mean difference of 0.16: the same picture
    captions = ["white large square", "white medium square", "small airplane", "airplane", "the letter i",
                "white large square", "red square", "small red square", "the letter l"]
    images = np.stack([square, almost, square, dot, dot, square, dot, square, square])
    assert distinct(images, captions) == [0, 2, 3, 5, 6, 7]
    images, captions = TASKS["captions"]._all()
    assert not {"the letter i", "the letter l"} & set(captions)
    assert "large blue diamond" in captions and "small blue diamond" not in captions
    kept = {e.target_text for split in ("train", "test") for e in TASKS["captions"].examples(split)}
    for a, b in (("letter o", "number 0"), ("letter v", "number 2"), ("letter w", "number 6"), ("letter f", "number 9")):
        assert not {f"the sign for the {x} in american sign language" for x in (a, b)} & kept  # one ASL handshape


def test_captions_retrieval_counts_a_caption_with_or_without_its_article():
    """Retrieving "horse" for an image captioned "a horse" is a hit, not a miss; so is writing it
    (exact, and a reference of BLEU-4 and CIDEr-D)."""
    task = TASKS["captions"]
    captions = ["a horse", "horse", "a dog", "cat"]
    directions = {c: torch.nn.functional.one_hot(torch.tensor(i), 8).float() for i, c in enumerate(captions)}

    class Retriever:
        def generate(self, examples):
            return [e.target_text for e in examples]

        def embed(self, examples):  # each image points at the caption named in its meta
            return torch.stack([directions[e.segments[0][1] if e.segments[0][0] == "text" else e.meta["looks_like"]]
                                for e in examples])

    examples = [Example([("image", np.zeros((4, 4), np.uint8))], ref, "captions", {"looks_like": looks})
                for ref, looks in [("a horse", "horse"), ("horse", "a horse"), ("a dog", "a dog"), ("cat", "a dog")]]
    scores = task.evaluate(Retriever(), examples)
    assert scores["r_at_1"] == 0.75 and scores["r_at_5"] == 1.0
    assert scores["exact"] == 1.0 and scores["bleu4"] == 1.0

    class Swapper(Retriever):  # writes each caption's other spelling: "horse" for "a horse"
        def generate(self, examples):
            return [{"a horse": "horse", "horse": "a horse."}.get(e.target_text, e.target_text) for e in examples]

    swapped = task.evaluate(Swapper(), examples)
    assert swapped["exact"] == 1.0 and swapped["bleu4"] == 1.0 and swapped["cider_d"] == pytest.approx(scores["cider_d"])
    wrong = task.evaluate(type("Wrong", (Retriever,), {"generate": lambda self, ex: ["a dog"] * len(ex)})(), examples)
    assert wrong["exact"] == 0.25 and wrong["bleu4"] < 0.5
    # predictions.jsonl and the report's right and wrong agree with exact
    from generalist.train.data import TaskData
    from generalist.train.evaluate import answer_records

    for answers, exact in ((Swapper().generate(examples), 1.0), (["a dog"] * len(examples), 0.25)):
        rows = answer_records({"captions": TaskData(task, [], examples)}, {"captions": answers})["captions"]
        assert sum(r["match"] for r in rows) / len(rows) == exact


def test_av_digits_images_keep_at_least_half_their_ink(monkeypatch):
    """The occluder hides at most half of a digit's ink (before: all of it in 1% of test images,
    unanswerable from the image alone); measured without the noise."""
    from generalist.data.synth import degrade_image

    task_globals = type(TASKS["av_digits"]).examples.__globals__  # (task files are not imported by name)
    hidden = []

    def noiseless(img, rng, **kwargs):
        out = degrade_image(img, rng, noise=0.0, **kwargs)
        hidden.append(img[out != img].sum(dtype=np.int64) / img.sum(dtype=np.int64))
        return out

    monkeypatch.setitem(task_globals, "degrade_image", noiseless)
    TASKS["av_digits"].examples("test", 200)
    assert len(hidden) == 200 and max(hidden) <= 0.5 + 1e-9 and np.mean(hidden) > 0.2


class _Oracle:
    """A predictor that answers with the reference (to check metrics reach their maximum)."""

    def __init__(self, answers):
        self.answers = answers

    def generate(self, examples):
        return [self.answers.get(id(e), e.target_text) for e in examples]

    def embed(self, examples):
        return torch.nn.functional.normalize(torch.randn(len(examples), 8), dim=-1)


@pytest.mark.parametrize("name", ["fashion", "vqa", "moving_digits", "tabular", "table_image", "text_topic",
                                  "av_digits"])
def test_metrics_of_a_perfect_and_a_wrong_predictor(name):
    """Every accuracy a task reports (overall, per question type, digit and direction, fused and
    one modality alone) is 1 for the references and 0 for an answer that is never right."""
    task = TASKS[name]
    test = task.examples("test", 8)
    perfect = task.evaluate(_Oracle({}), test)
    assert perfect and all(v == 1.0 for v in perfect.values()), perfect
    # the oracle keys its wrong answers by example, and av_digits makes new examples of one
    # modality: a wrong answer for every example the task asks about
    wrong = task.evaluate(type("Wrong", (_Oracle,), {"generate": lambda self, exs: ["zzz"] * len(exs)})({}), test)
    assert wrong.keys() == perfect.keys() and all(v == 0.0 for v in wrong.values()), wrong


def test_moving_digits_scores_digit_and_direction_apart():
    task = TASKS["moving_digits"]
    test = task.examples("test", 4)
    target = test[0].target_text  # "<digit> moving <direction>"
    digit, direction = target.split(" moving ")
    other = "up" if direction != "up" else "down"
    for answer, want in ((f"{digit} moving", (0, 1, 0)), (f"{digit}, moving {direction}", (0, 1, 1)),
                         (f"{digit} moving {direction} moving {other}", (0, 1, 0)),
                         (f"{digit} moving {other}", (0, 1, 0)), (f"{target}.", (1, 1, 1)), ("", (0, 0, 0))):
        got = task.score([answer], test[:1])
        assert (got["accuracy"], got["digit_accuracy"], got["direction_accuracy"]) == want, answer


@pytest.mark.parametrize("name", ["fashion", "moving_digits", "vqa"])
def test_scores_refuse_mismatched_or_empty_or_non_text_predictions(name):
    task = TASKS[name]
    test = task.examples("test", 2)
    who = "accuracy_by" if name == "vqa" else f"task '{name}'"  # vqa scores through accuracy_by
    with pytest.raises(ValueError, match=f"{who}: got 1 predictions but 2 references"):
        task.score(["zzz"], test)
    with pytest.raises(ValueError, match=f"{who}: no predictions to score"):
        task.score([], [])
    with pytest.raises(ValueError, match=rf"{who}: predictions\[1\] is int 7, expected a str"):
        task.score(["zzz", 7], test)


class _OneHot:
    """Embeds a class prompt as its class's axis and an image as the axis of the class the test
    says it is (`picks`), recording the tasks the examples came as."""

    def __init__(self, picks):
        self.picks, self.tasks = picks, []

    def embed(self, examples):
        from generalist.data.sources import FASHION_CLASSES

        self.tasks += [e.task for e in examples]
        rows = [FASHION_CLASSES.index(e.segments[0][1].removeprefix("a photo of a ")) if e.segments[0][0] == "text"
                else self.picks[i] for i, e in enumerate(examples)]
        return torch.nn.functional.one_hot(torch.tensor(rows), len(FASHION_CLASSES)).float()


def test_zero_shot_answers_the_class_whose_prompt_is_nearest():
    from generalist.data.sources import FASHION_CLASSES

    task = TASKS["zero_shot"]
    test = task.examples("test", 12)
    right = [FASHION_CLASSES.index(e.target_text) for e in test]
    assert task.evaluate(_OneHot(right), test) == {"accuracy": 1.0}
    wrong = [(r + 1) % len(FASHION_CLASSES) for r in right]
    predictor = _OneHot(wrong)
    # predict hands it examples of its own task: they are embedded as captions all the same
    asked = [Example(e.segments, "", "zero_shot") for e in test]
    assert task.answer(predictor, asked) == [FASHION_CLASSES[w] for w in wrong]
    assert set(predictor.tasks) == {"captions"}
    assert task.evaluate(_OneHot(wrong), test) == {"accuracy": 0.0}


def test_tiny_model_trains_a_few_steps_on_every_task(tmp_path):
    data = {n: TaskData(t, t.examples("train", 4), t.examples("test", 2)) for n, t in TASKS.items()}
    trainer = Trainer(TrainConfig(preset="tiny", out=str(tmp_path / "run"), steps=4, batch_size=40, vocab_size=400,
                                  ckpt_every=4, warmup=1, temperature=1e6), data, progress=False)
    trainer.fit()
    tokens_per_task = trainer.routing["task"].sum(axis=(0, 2))
    for name in trainer.tasks:  # 160 uniform draws over 10 tasks: every trainable task is seen
        assert (tokens_per_task[trainer.tasks.index(name)] > 0) == (name != "zero_shot"), name
    # every task answers through the one entry point; zero_shot (never trained) through its prompts
    from generalist.data.sources import FASHION_CLASSES
    from generalist.infer.generalist import Generalist

    g = Generalist.load(tmp_path / "run", device="cpu")
    assert not g.answers_in_text("zero_shot") and g.answers_in_text("captions")
    assert g.predict(task="zero_shot", **dict(data["zero_shot"].test[0].segments)) in FASHION_CLASSES
