"""Synthetic composite examples built from real digit images, for several tasks.

Every generator is pure numpy, takes its randomness from an explicit `np.random.Generator`
(same generator state -> same output) and never reads files: the caller supplies the digit
images (square 2-D uint8 arrays, e.g. 28 x 28 MNIST digits, white strokes on black) and labels.

Shapes: F frames, S canvas side, s digit side after resizing, H height, W width, C channels,
N audio samples.

Tasks served:
    moving_digit_clip / describe_motion   video: a digit moving in one of 8 compass directions.
    digit_scene / scene_questions         image QA: 1-4 digits on a canvas, questions on them.
    degrade_image / degrade_audio         AV-MNIST-style: noisy, occluded image + noisy audio.
    table_image_case                      image + table: a digit, an operation, the result.

Conventions: image rows grow downward, so "up" means decreasing row; positions are integer
pixels; digits are resized with area averaging (`_area_resize`), which is exact when the size
does not change. All answers are lower-case words ("seven", "yes", "three").
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMBER_WORDS = DIGIT_WORDS + (
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
)  # fmt: skip

DIRECTIONS = ("up", "up-right", "right", "down-right", "down", "down-left", "left", "up-left")
# (d_row, d_col) per direction, rows growing downward.
DIRECTION_STEPS = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
MAX_SPEED = 3  # pixels per frame along each moving axis

QTYPES = ("count", "exists", "left_of", "right_of", "largest", "smallest")

OPS = ("+", "-", "×")
# Inclusive range of the table value per operator (before rejecting answers outside 0..9).
OP_VALUES = {"+": (1, 9), "-": (1, 9), "×": (1, 3)}

# scene_questions: pixels by which a digit must lie further to one side than above or below to be
# on that side (left_of, right_of), and by which it must miss that line to leave no doubt
SIDE_MARGIN = 4
_PLACE_CANDIDATES = 64  # candidate positions drawn at once per digit in `digit_scene`
_PLACE_RESTARTS = 200  # whole-scene restarts before `digit_scene` gives up
_OCCLUDER_TRIES = 100  # sizes degrade_image draws before no size hides little enough ink
_OCCLUDER_ASPECT = 3.0  # occluder height / width lies in [1/3, 3] when the image allows it
_OCCLUDER_GRAY = (64, 192)  # inclusive range of the occluder's constant gray level


# ---------------------------------------------------------------------------------------------
# Validation helpers


def _check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"{name} must lie in {bounds}, got {value}")
    return value


def _check_real(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"{name} must lie in {bounds}, got {value}")
    return value


def _check_range(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> tuple[float, float]:
    """A number v (read as (v, v)) or a pair (a, b) with a <= b, both within [lo, hi]."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = _check_real(name, value, lo, hi)
        return v, v
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a number or a pair (low, high), got {value!r}")
    a = _check_real(f"{name}[0]", value[0], lo, hi)
    b = _check_real(f"{name}[1]", value[1], lo, hi)
    if a > b:
        raise ValueError(f"{name} must satisfy low <= high, got {value!r}")
    return a, b


def _check_rng(rng: Any) -> None:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator (np.random.default_rng), got {type(rng).__name__}")


def _check_digit(name: str, img: Any) -> np.ndarray:
    if not isinstance(img, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {img.dtype}")
    if img.ndim != 2 or img.shape[0] != img.shape[1] or img.shape[0] == 0:
        raise ValueError(f"{name} must be a square 2-D image (S, S), e.g. (28, 28); got shape {img.shape}")
    return img


def _check_label(name: str, label: Any) -> int:
    return _check_int(name, label, 0, 9)


# ---------------------------------------------------------------------------------------------
# Resizing


def _area_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) float64: output pixel i averages the input pixels its footprint
    [i * src/dst, (i+1) * src/dst) overlaps, weighted by the overlap; rows sum to 1."""
    edges = np.arange(dst + 1, dtype=np.float64) * (src / dst)
    j = np.arange(src, dtype=np.float64)
    lo = np.maximum(edges[:-1, None], j[None, :])
    hi = np.minimum(edges[1:, None], j[None, :] + 1.0)
    return np.clip(hi - lo, 0.0, None) * (dst / src)


def _area_resize(img: np.ndarray, side: int) -> np.ndarray:
    """(S, S) uint8 -> (side, side) uint8 by area averaging (identity when side == S)."""
    if img.shape[0] == side:
        return img.copy()
    w = _area_weights(img.shape[0], side)
    out = w @ img.astype(np.float64) @ w.T
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Moving digits (video)


def moving_digit_clip(
    digit: np.ndarray,
    direction: int,
    rng: np.random.Generator,
    frames: int = 8,
    size: int = 32,
    speed: int | None = None,
    digit_size: int | None = None,
) -> np.ndarray:
    """A clip of one digit moving in a straight line in one of the 8 `DIRECTIONS`.

    digit: (S, S) uint8, e.g. a 28 x 28 MNIST digit. direction: index into `DIRECTIONS`
    (0 "up" ... 7 "up-left"; rows grow downward so "up" decreases the row).
    frames: F >= 2. size: canvas side. digit_size: side s the digit is resized to (area
    averaging); default min(28, size // 2), i.e. 16 on the default 32 canvas, which leaves room
    to move. speed: whole pixels per frame along each moving axis (a diagonal step is
    (±speed, ±speed), √2 faster than a straight one); default uniform in
    [1, min(MAX_SPEED, (size - s) // (F - 1))].

    The start position is uniform over all positions for which the whole digit box stays inside
    the canvas in every frame, so nothing is ever cropped: every frame holds exactly the same
    pixels, shifted by whole pixels (no resampling blur between frames).

    Returns (F, size, size) uint8. Random draws, in order: speed (if not given), start row,
    start column. ValueError if the canvas is too small for F frames of motion.
    """
    digit = _check_digit("digit", digit)
    direction = _check_int("direction", direction, 0, len(DIRECTIONS) - 1)
    _check_rng(rng)
    frames = _check_int("frames", frames, 2)
    size = _check_int("size", size, 2)
    if digit_size is None:
        side = min(28, size // 2)
    else:
        side = _check_int("digit_size", digit_size, 1, size - 1)
    room = size - side
    steps = frames - 1
    if speed is None:
        max_speed = min(MAX_SPEED, room // steps)
        if max_speed < 1:
            raise ValueError(
                f"size={size} leaves {room} px around a {side} px digit, too little to move 1 px per frame "
                f"for frames={frames}; use a larger size, a smaller digit_size or fewer frames"
            )
        speed = int(rng.integers(1, max_speed + 1))
    else:
        speed = _check_int("speed", speed, 1)
        if speed * steps > room:
            raise ValueError(
                f"speed={speed} moves the digit {speed * steps} px over frames={frames}, but size={size} leaves "
                f"only {room} px around a {side} px digit"
            )
    d_row, d_col = DIRECTION_STEPS[direction]
    travel = speed * steps
    start = []
    for d in (d_row, d_col):
        lo, hi = (0, room - travel) if d > 0 else (travel, room) if d < 0 else (0, room)
        start.append(int(rng.integers(lo, hi + 1)))
    small = _area_resize(digit, side)
    clip = np.zeros((frames, size, size), dtype=np.uint8)
    for k in range(frames):
        r = start[0] + k * speed * d_row
        c = start[1] + k * speed * d_col
        clip[k, r : r + side, c : c + side] = small
    return clip


def describe_motion(digit_label: int, direction: int) -> str:
    """"seven moving up-left" for digit_label 7 and direction 7 (see `DIRECTIONS`)."""
    label = _check_label("digit_label", digit_label)
    direction = _check_int("direction", direction, 0, len(DIRECTIONS) - 1)
    return f"{DIGIT_WORDS[label]} moving {DIRECTIONS[direction]}"


# ---------------------------------------------------------------------------------------------
# Digit scenes (image question answering)


def digit_scene(
    digits: Sequence[tuple[np.ndarray, int]],
    rng: np.random.Generator,
    canvas: int = 64,
    digit_size: int = 20,
    min_col_gap: int = 6,
    margin: int = 2,
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Place digits on a black canvas without overlap (2-4 digits fit the default canvas easily).

    digits: a sequence of (image (S, S) uint8, label 0..9); every image is resized to
    digit_size x digit_size (area averaging). Placement is rejection sampling: digit k's
    top-left corner is uniform over [0, canvas - digit_size]^2, conditioned on, for every digit
    already placed,
      * no overlap, with at least `margin` background pixels between the boxes
        (|d_row| >= digit_size + margin or |d_col| >= digit_size + margin), and
      * center columns at least `min_col_gap` apart, so the left-to-right order of the digits
        is strict and visible (see `scene_questions`).
    If a digit finds no place among `_PLACE_CANDIDATES` draws, the whole scene is redrawn
    (up to `_PLACE_RESTARTS` times). With the defaults, 4 digits take about a millisecond;
    5 fail about one time in five and 6 never fit.

    Returns (canvas (canvas, canvas) uint8, boxes) with boxes[i] = (label, row, col), the
    integer center of digit i, in the order given: box i covers rows
    [row - digit_size // 2, row - digit_size // 2 + digit_size) and likewise for columns.
    ValueError if the digits cannot be placed (too many for the canvas).
    """
    _check_rng(rng)
    canvas = _check_int("canvas", canvas, 1)
    side = _check_int("digit_size", digit_size, 1, canvas)
    min_col_gap = _check_int("min_col_gap", min_col_gap, 1)
    margin = _check_int("margin", margin, 0)
    if not isinstance(digits, (list, tuple)) or len(digits) == 0:
        raise ValueError("digits must be a non-empty list of (image, label) pairs")
    images, labels = [], []
    for i, item in enumerate(digits):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"digits[{i}] must be an (image, label) pair, got {type(item).__name__}")
        images.append(_area_resize(_check_digit(f"digits[{i}] image", item[0]), side))
        labels.append(_check_label(f"digits[{i}] label", item[1]))

    room = canvas - side
    corners = _place(len(digits), room, side + margin, min_col_gap, rng)
    if corners is None:
        raise ValueError(
            f"could not place {len(digits)} digits of side {side} on a {canvas} x {canvas} canvas with "
            f"margin={margin} and min_col_gap={min_col_gap}; use fewer digits, a larger canvas or smaller digits"
        )
    out = np.zeros((canvas, canvas), dtype=np.uint8)
    boxes = []
    for img, label, (r, c) in zip(images, labels, corners):
        out[r : r + side, c : c + side] = img  # boxes are disjoint, so plain assignment composes
        boxes.append((label, r + side // 2, c + side // 2))
    return out, boxes


def _place(n: int, room: int, sep: int, col_gap: int, rng: np.random.Generator) -> list[tuple[int, int]] | None:
    """n top-left corners in [0, room]^2, pairwise (max |d| >= sep) and (|d_col| >= col_gap)."""
    for _ in range(_PLACE_RESTARTS):
        placed = np.zeros((0, 2), dtype=np.int64)
        for _ in range(n):
            cand = rng.integers(0, room + 1, size=(_PLACE_CANDIDATES, 2))
            d = np.abs(cand[:, None, :] - placed[None, :, :])  # (candidates, placed, 2)
            ok = ((d.max(axis=2) >= sep) & (d[:, :, 1] >= col_gap)).all(axis=1)
            if not ok.any():
                break
            placed = np.concatenate([placed, cand[np.argmax(ok)][None]], axis=0)
        else:
            return [(int(r), int(c)) for r, c in placed]
    return None


def scene_questions(
    boxes: Sequence[tuple[int, int, int]], rng: np.random.Generator
) -> list[tuple[str, str, str]]:
    """Questions about a scene and their one-word answers, as (question, answer, qtype).

    boxes: (label 0..9, center row, center col) per digit, as returned by `digit_scene`
    (1 to 20 digits). One question per type, in `QTYPES` order, each type only when defined:
      count     "how many digits are there?" -> number word of len(boxes) ("three").
      exists    "is there a 7?" -> "yes"/"no". With probability 1/2 the asked digit is drawn
                uniformly from the labels present (answer "yes"), otherwise from the labels
                absent (answer "no"), so the answers are balanced; if all ten labels are
                present it is always "yes".
      left_of   "what digit is left of the 3?" -> the label word of the one digit to the left
                of the reference digit, as a person reads the scene: a digit is left of the
                reference when its center lies in the 90-degree wedge opening to the left
                (further left than above or below: d_col > |d_row| + SIDE_MARGIN pixels).
                Asked only when that has one answer: the reference label occurs once in the
                scene, exactly one digit lies in its wedge, and no digit lies near the wedge's
                edges (d_col within SIDE_MARGIN of |d_row|, where "left" and "below" are both
                fair readings). The reference is drawn uniformly among the digits for which
                it is well defined.
      right_of  the mirror image of left_of (the wedge opening to the right).
      largest   "what is the largest digit?" -> the word of the highest label (by value).
      smallest  "what is the smallest digit?" -> the word of the lowest label.

    Random draws, in order: exists (yes/no, then the digit), left_of reference, right_of reference.
    """
    _check_rng(rng)
    if not isinstance(boxes, (list, tuple)) or not 1 <= len(boxes) <= 20:
        n = len(boxes) if isinstance(boxes, (list, tuple)) else type(boxes).__name__
        raise ValueError(f"boxes must be a list of 1 to 20 (label, row, col) triples, got {n}")
    labels, rows, cols = [], [], []
    for i, box in enumerate(boxes):
        if not isinstance(box, (tuple, list)) or len(box) != 3:
            raise ValueError(f"boxes[{i}] must be a (label, row, col) triple, got {box!r}")
        labels.append(_check_label(f"boxes[{i}] label", box[0]))
        rows.append(_check_int(f"boxes[{i}] row", box[1]))
        cols.append(_check_int(f"boxes[{i}] col", box[2]))

    questions = [("how many digits are there?", number_word(len(boxes)), "count")]

    present = sorted(set(labels))
    absent = [d for d in range(10) if d not in present]
    ask_present = bool(rng.random() < 0.5) or not absent
    pool = present if ask_present else absent
    asked = pool[int(rng.integers(len(pool)))]
    questions.append((f"is there a {asked}?", "yes" if ask_present else "no", "exists"))

    for qtype, word, side in (("left_of", "left", -1), ("right_of", "right", 1)):
        refs = []  # (reference label, the one digit on that side)
        for i, (label, row, col) in enumerate(zip(labels, rows, cols)):
            if labels.count(label) != 1:
                continue
            # each other digit, and how much further to that side than above or below it lies
            others = [(lab, (c - col) * side - abs(r - row))
                      for j, (lab, r, c) in enumerate(zip(labels, rows, cols)) if j != i]
            inside = [lab for lab, lead in others if lead > SIDE_MARGIN]
            if len(inside) == 1 and not any(abs(lead) <= SIDE_MARGIN for _, lead in others):
                refs.append((label, inside[0]))
        if refs:
            ref, answer = refs[int(rng.integers(len(refs)))]
            questions.append((f"what digit is {word} of the {ref}?", DIGIT_WORDS[answer], qtype))

    questions.append(("what is the largest digit?", DIGIT_WORDS[max(labels)], "largest"))
    questions.append(("what is the smallest digit?", DIGIT_WORDS[min(labels)], "smallest"))
    return questions


# ---------------------------------------------------------------------------------------------
# Degradation (audio-visual task)


def degrade_image(
    img: np.ndarray,
    rng: np.random.Generator,
    noise: float = 0.3,
    occlude: bool = True,
    area: tuple[float, float] = (0.2, 0.4),
    max_hidden: float | None = None,
) -> np.ndarray:
    """A noisy, partly occluded copy of `img` (the input is not modified).

    img: (H, W) or (H, W, C) uint8. Steps, in this order (also the order of the random draws):
      1. occlude (if `occlude`): a rectangle (h, w) drawn uniformly among all integer sizes with
         area fraction h * w / (H * W) in `area` (inclusive) and aspect h / w in [1/3, 3]
         (the aspect bound is dropped if no size meets it), placed uniformly inside the image,
         filled with one gray level uniform in [64, 192] (all channels) — visibly neither
         background nor stroke. With `max_hidden` in [0, 1], placed uniformly among the
         positions that cover at most that fraction of the image's ink (the sum of its values),
         so that what it shows stays recognisable; a size with no such position is drawn again
         (up to _OCCLUDER_TRIES sizes);
      2. add Gaussian noise of standard deviation noise * 255 to every value (noise >= 0;
         0 disables it), then round and clip to [0, 255].
    Returns an array of img's shape, uint8. ValueError if the image is too small for any
    rectangle in `area`, or no rectangle drawn hides little enough of its ink.
    """
    if not isinstance(img, np.ndarray):
        raise ValueError(f"img must be a numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise ValueError(f"img must be uint8, got {img.dtype}")
    if img.ndim not in (2, 3) or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"img must have shape (H, W) or (H, W, C) with H, W >= 1; got {img.shape}")
    _check_rng(rng)
    noise = _check_real("noise", noise, 0.0)
    if not isinstance(occlude, (bool, np.bool_)):
        raise ValueError(f"occlude must be a bool, got {type(occlude).__name__}")
    lo, hi = _check_range("area", area, 0.0, 1.0)
    if hi <= 0.0:
        raise ValueError(f"area must include a positive fraction, got {area!r}")

    if max_hidden is not None:
        max_hidden = _check_real("max_hidden", max_hidden, 0.0, 1.0)

    out = img.astype(np.float64)  # a copy: the caller's array is never written
    if occlude:
        height, width = img.shape[:2]
        ink = None if max_hidden is None else _ink_table(out)
        for _ in range(_OCCLUDER_TRIES):
            h, w = _occluder_size(height, width, lo, hi, rng)
            if ink is None:
                r, c = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                break
            rows, cols = np.nonzero(_hidden_fraction(ink, h, w) <= max_hidden + 1e-12)
            if len(rows):
                k = int(rng.integers(len(rows)))
                r, c = int(rows[k]), int(cols[k])
                break
        else:
            raise ValueError(f"no occluder of {_OCCLUDER_TRIES} drawn sizes in area {area!r} hides at most "
                             f"{max_hidden} of the image's ink; raise max_hidden or lower area")
        out[r : r + h, c : c + w] = int(rng.integers(_OCCLUDER_GRAY[0], _OCCLUDER_GRAY[1] + 1))
    if noise > 0:
        out += rng.normal(0.0, noise * 255.0, size=out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _ink_table(img: np.ndarray) -> np.ndarray:
    """(H + 1, W + 1): table[r, c] is the ink (the sum of the values) of img[:r, :c]."""
    ink = img.reshape(img.shape[0], img.shape[1], -1).sum(axis=2)
    table = np.zeros((ink.shape[0] + 1, ink.shape[1] + 1))
    table[1:, 1:] = ink.cumsum(axis=0).cumsum(axis=1)
    return table


def _hidden_fraction(table: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H - h + 1, W - w + 1): the fraction of the ink (`_ink_table`) an h x w rectangle with its
    top-left corner at each position covers (0 everywhere for a blank image)."""
    covered = table[h:, w:] - table[:-h, w:] - table[h:, :-w] + table[:-h, :-w]
    return covered / table[-1, -1] if table[-1, -1] > 0 else np.zeros_like(covered)


def _occluder_size(height: int, width: int, lo: float, hi: float, rng: np.random.Generator) -> tuple[int, int]:
    hs = np.arange(1, height + 1)[:, None]
    ws = np.arange(1, width + 1)[None, :]
    frac = hs * ws / (height * width)
    # A tiny tolerance so that bounds such as 0.2 of a 10 x 10 image (exactly 20 px) count.
    fits = (frac >= lo - 1e-12) & (frac <= hi + 1e-12)
    aspect = (hs <= _OCCLUDER_ASPECT * ws) & (ws <= _OCCLUDER_ASPECT * hs)
    ok = fits & aspect if (fits & aspect).any() else fits
    if not ok.any():
        raise ValueError(
            f"no rectangle of a {height} x {width} image covers an area fraction in [{lo}, {hi}]; "
            f"widen area or use a larger image"
        )
    rows, cols = np.nonzero(ok)
    k = int(rng.integers(len(rows)))
    return int(rows[k]) + 1, int(cols[k]) + 1


def degrade_audio(
    wave: np.ndarray, rng: np.random.Generator, snr_db: float | tuple[float, float] = (0.0, 10.0)
) -> np.ndarray:
    """`wave` plus white Gaussian noise at a signal-to-noise ratio drawn from `snr_db`.

    wave: (N,) float32, finite, not silent. snr_db: a number, or (low, high) for an SNR uniform
    in [low, high] dB. The signal power is P_s = mean(wave ** 2); the drawn noise is rescaled
    so that its own empirical power is exactly P_s / 10 ** (snr / 10), so the achieved SNR
    10 * log10(P_s / mean(noise ** 2)) equals the drawn one (up to float32 rounding), not only
    in expectation. Random draws, in order: the SNR, the noise. Returns (N,) float32 (a new
    array; the input is not modified).
    """
    if not isinstance(wave, np.ndarray):
        raise ValueError(f"wave must be a numpy array, got {type(wave).__name__}")
    if wave.dtype != np.float32:
        raise ValueError(f"wave must be float32, got {wave.dtype}")
    if wave.ndim != 1 or wave.shape[0] == 0:
        raise ValueError(f"wave must have shape (N,) with N >= 1, got {wave.shape}")
    if not np.isfinite(wave).all():
        raise ValueError("wave contains NaN or inf values")
    _check_rng(rng)
    lo, hi = _check_range("snr_db", snr_db)
    signal = wave.astype(np.float64)
    p_signal = float(np.mean(signal**2))
    if p_signal == 0.0:
        raise ValueError("wave is silent (all zeros): its SNR is undefined")
    snr = float(rng.uniform(lo, hi))
    noise = rng.standard_normal(wave.shape[0])
    p_noise = float(np.mean(noise**2))
    if p_noise == 0.0:  # only possible for N == 1 with an exact zero draw
        noise, p_noise = np.ones_like(noise), 1.0
    noise *= np.sqrt(p_signal / 10.0 ** (snr / 10.0) / p_noise)
    return (signal + noise).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Digit image + table row (arithmetic)


def table_image_case(rng: np.random.Generator) -> tuple[int, dict[str, Any], int]:
    """A digit operand, a table row {"op", "value"} and the result, which lies in 0..9.

    Distribution: the operator is uniform over `OPS`; then (operand, value) is uniform over
    the pairs with operand in 0..9, value in `OP_VALUES[op]` ("+" and "-": 1..9, "×": 1..3)
    and result in 0..9 (rejection sampling). That is 45 pairs for "+" (results 1..9, result k
    from k pairs), 45 for "-" (results 0..8, result k from 9 - k pairs) and 19 for "×"
    (operand 0..9 times 1, 0..4 times 2, 0..3 times 3).

    Returns (operand, {"op": op, "value": value}, answer) with answer = operand op value.
    """
    _check_rng(rng)
    op = OPS[int(rng.integers(len(OPS)))]
    lo, hi = OP_VALUES[op]
    while True:
        operand = int(rng.integers(0, 10))
        value = int(rng.integers(lo, hi + 1))
        answer = _apply(operand, op, value)
        if 0 <= answer <= 9:
            return operand, {"op": op, "value": value}, answer


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "×":
        return a * b
    raise ValueError(f"unknown op {op!r}; choose one of {OPS}")


def number_word(n: int) -> str:
    """The English word for n in 0..20: number_word(3) == "three"."""
    return NUMBER_WORDS[_check_int("n", n, 0, len(NUMBER_WORDS) - 1)]
