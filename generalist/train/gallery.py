"""What the report shows of the answers themselves: a few test examples of every task with their
inputs as one sees or hears them (a picture, a clip as an animated GIF, a sound as its log-mel
spectrogram with a player, a table's cells, a text), the target and the answer; and a confusion
matrix for every task whose targets are a few labels.

Everything is inlined into report.html as data: URIs. An input that cannot be drawn (a file
since moved, a value of an unexpected type) is named in words instead: a report is never lost to
a thumbnail.
"""

from __future__ import annotations

import base64
import html
import io
import math
import wave
from collections import Counter
from typing import Any, Sequence

import numpy as np

from generalist.data.tasks import normalize

SHOWN = 6  # examples per task: the first wrong ones (up to SHOWN_WRONG), then the first right ones
SHOWN_WRONG = 4
THUMB_PX = 96  # the longer side of a picture or clip on the page
MAX_PLAYER_SECONDS = 10.0  # a longer sound gets its spectrogram only
PLAYER_RATE = 16000  # the player's samples a second at most (16-bit: ~43 kB of page a second)
MAX_FRAMES = 16  # a longer clip's GIF shows this many of its frames, evenly spaced
MAX_TEXT = 300
MAX_CELLS = 8
MAX_LABELS = 30  # a task whose test targets are more labels than this (captions) gets no confusion matrix
MANY_LABELS = 12  # a task of more labels than this gets a figure of its own, twice as wide
MAX_LABEL_CHARS = 40  # a longer label is cut short on the confusion matrix's axes
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


def pick(matches: Sequence[bool], shown: int = SHOWN, wrong: int = SHOWN_WRONG) -> list[int]:
    """Indices of the examples to show, in test order: the first `wrong` answers that missed,
    then the first right ones up to `shown` (more wrong ones when too few are right)."""
    misses = [i for i, m in enumerate(matches) if not m]
    hits = [i for i, m in enumerate(matches) if m]
    first = min(wrong, shown)
    chosen = misses[:first]
    chosen += hits[:shown - len(chosen)]
    chosen += misses[first:first + shown - len(chosen)]
    return sorted(chosen)


def _uri(mime: str, raw: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def _img(rgb: np.ndarray, alt: str, px: int = THUMB_PX, frames: list | None = None,
         size: tuple[int, int] | None = None) -> str:
    """An <img> of an (H, W, 3) uint8 picture (or an animated GIF of `frames`, each (H, W, 3)),
    drawn with its longer side `px` pixels wide (or `size`, (width, height)), pixels kept sharp.
    A picture stored larger than twice the size it is drawn at is shrunk first (box filter): the
    page holds no more pixels than a screen shows."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = px / max(h, w, 1)
    width, height = size or (max(1, round(w * scale)), max(1, round(h * scale)))
    stored = (min(w, 2 * width), min(h, 2 * height))
    images = [Image.fromarray(f) for f in (frames or [rgb])]
    if stored != (w, h):
        images = [im.resize(stored, Image.BOX) for im in images]
    buf = io.BytesIO()
    if frames:
        images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=250, loop=0)
    else:
        images[0].save(buf, format="PNG")
    return (f"<img alt='{html.escape(alt)}' src='{_uri('image/gif' if frames else 'image/png', buf.getvalue())}' "
            f"width='{width}' height='{height}' "
            "style='image-rendering:pixelated;border:1px solid #ccc'>")


def _host(x: Any) -> Any:
    """A tensor as the drawing code reads it: detached, on the CPU, a float type numpy holds
    (bf16 and fp16 as fp32); tuples element by element; anything else as it is."""
    import torch

    if isinstance(x, tuple):
        return tuple(_host(v) for v in x)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()
    return x


def _to_uint8(x_CHW) -> np.ndarray:
    """float (C, ..., H, W) in [0, 1] -> uint8 (..., H, W, C)."""
    x = np.clip(np.asarray(x_CHW, dtype=np.float32), 0.0, 1.0)
    return (np.moveaxis(x, 0, -1) * 255 + 0.5).astype(np.uint8)


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def _spectrogram(log_mel_TM: np.ndarray) -> np.ndarray:
    """(T, M) log-mel -> (M, T, 3) uint8, low frequencies at the bottom, viridis."""
    from matplotlib import colormaps

    lo, hi = float(log_mel_TM.min()), float(log_mel_TM.max())
    scaled = (log_mel_TM - lo) / (hi - lo) if hi > lo else np.zeros_like(log_mel_TM)
    return (colormaps["viridis"](scaled.T[::-1])[..., :3] * 255 + 0.5).astype(np.uint8)


def segment_html(modality: str, value: Any) -> str:
    """One input segment as HTML (see the module docstring); in words when it cannot be drawn."""
    from generalist.infer.generalist import read_input

    try:
        if modality == "text":
            if isinstance(value, str) and not value.strip():
                return "<i>(empty text)</i>"
            text = read_input("text", value)  # a .txt file's text, or the text itself
            if not isinstance(text, str):
                raise TypeError("not a text")
            short = text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"
            return f"<div style='max-width:32em;white-space:pre-wrap'>{html.escape(short)}</div>"
        value = _host(read_input(modality, value))
        if modality == "image":
            from generalist.modalities.image import image_to_chw

            return _img(_to_uint8(image_to_chw(value, 3).numpy()), "image")
        if modality == "video":
            from generalist.modalities.video import video_to_cthw

            frames = _to_uint8(video_to_cthw(value, 3).numpy())
            keep = np.unique(np.linspace(0, len(frames) - 1, min(len(frames), MAX_FRAMES)).round().astype(int))
            shown = "" if len(keep) == len(frames) else f", {len(keep)} shown"
            return (_img(frames[0], "video", frames=list(frames[keep]))
                    + f"<br><small>{len(frames)} frames{shown}</small>")
        if modality == "audio":
            return _audio_html(*value)
        if modality == "table":
            columns, values = (np.asarray(v).reshape(-1) for v in value)
            cells = ", ".join(f"{int(c)}: {float(v):.3g}" for c, v in zip(columns[:MAX_CELLS], values[:MAX_CELLS]))
            more = f" … ({len(columns)} cells)" if len(columns) > MAX_CELLS else ""
            return f"<small>table {html.escape(cells)}{more}</small>"
    except Exception:  # noqa: BLE001 - whatever an input holds, the report is written (the input named)
        pass
    from generalist.train.evaluate import input_summary

    return f"<i>{html.escape(input_summary([(modality, value)])[0])}</i>"


def _audio_html(samples: Any, rate: Any) -> str:
    """A sound's log-mel spectrogram, with a player (at most PLAYER_RATE samples a second) when
    it lasts at most MAX_PLAYER_SECONDS."""
    import torch

    from generalist.modalities.audio import AudioConfig, log_mel, resample

    samples = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    spec = _spectrogram(log_mel(samples, rate, AudioConfig(max_seconds=math.inf)).numpy())
    seconds = len(samples) / rate
    # two screen pixels a frame (100 frames a second), at most four thumbnails wide
    out = _img(spec, "log-mel spectrogram", size=(min(4 * THUMB_PX, 2 * spec.shape[1]), THUMB_PX))
    if seconds <= MAX_PLAYER_SECONDS:
        played = rate if float(rate).is_integer() and rate <= PLAYER_RATE else PLAYER_RATE
        if played != rate:
            samples = resample(samples, float(rate), PLAYER_RATE)
        out += f"<br><audio controls preload='none' src='{_uri('audio/wav', _wav(samples.numpy(), int(played)))}'></audio>"
    return out + f"<br><small>{seconds:.2f} s</small>"


def gallery_html(task: str, rows: list[dict], examples: Sequence | None = None) -> str:
    """A task's table of shown examples. rows: predictions.jsonl's records of the task, in test
    order ({"index", "inputs", "target", "answer", "match"}); examples: the task's test examples
    (their inputs are drawn), or None (the inputs are named from the records)."""
    hits = sum(bool(r["match"]) for r in rows)
    parts = [f"<h3>{html.escape(task)}</h3><p>{hits} of {len(rows)} answers are the target (as the task "
             "compares them: by default lower case, single spaces, a final period dropped); shown: the first "
             "wrong answers, then the first right ones.</p>",
             "<table><tr><th>#</th><th>input</th><th>target</th><th>answer</th></tr>"]
    for i in pick([bool(r["match"]) for r in rows]):
        r = rows[i]
        if examples is not None and i < len(examples):
            inputs = "<br>".join(segment_html(m, v) for m, v in examples[i].segments)
        else:
            inputs = "<br>".join(f"<i>{html.escape(str(s))}</i>" for s in r.get("inputs", []))
        colour = "#e6f4e6" if r["match"] else "#fbe4e4"
        parts.append(f"<tr style='background:{colour}'><td>{r['index']}</td><td>{inputs}</td>"
                     f"<td>{html.escape(r['target'])}</td><td>{'✓' if r['match'] else '✗'} "
                     f"{html.escape(r['answer']) or '<i>(empty)</i>'}</td></tr>")
    parts.append("</table>")
    return "".join(parts)


def _label_key(label: str):
    if label in NUMBER_WORDS:
        return (0, NUMBER_WORDS[label], label)
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0, label)


def confusion(rows: list[dict]) -> tuple[list[str], np.ndarray] | None:
    """(labels, counts (n, n + 1)) of a task's records: counts[i, j] test examples of target
    label i answered label j, the last column any answer that is no target label; None when the
    targets are fewer than 2 labels or more than MAX_LABELS."""
    targets = [normalize(r["target"]) for r in rows]
    labels = sorted(Counter(targets), key=_label_key)
    if not 2 <= len(labels) <= MAX_LABELS:
        return None
    where = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels) + 1), dtype=np.int64)
    for target, r in zip(targets, rows):
        counts[where[target], where.get(normalize(r["answer"]), len(labels))] += 1
    return labels, counts


def confusion_figure(tables: dict[str, tuple[list[str], np.ndarray]], cols: int = 3, panel: float = 4.6):
    """One panel per task, `panel` inches a side, `cols` to a row: the fraction of each target's
    examples given each answer, and their count."""
    import matplotlib.pyplot as plt

    names = sorted(tables)
    cols = min(cols, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel * cols, panel * 0.95 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        labels, counts = tables[name]
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        small = min(7, 7 * panel / 4.6 * 10 / max(10, len(labels) + 1))  # labels as dense as the panel allows
        for (i, j), n in np.ndenumerate(counts):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=small,
                        color="white" if share[i, j] > 0.5 else "black")
        shown = [x if len(x) <= MAX_LABEL_CHARS else x[:MAX_LABEL_CHARS - 1] + "…" for x in labels]
        ax.set_xticks(range(len(labels) + 1), [*shown, "(other)"], rotation=90, fontsize=small)
        ax.set_yticks(range(len(labels)), shown, fontsize=small)
        accuracy = np.trace(counts[:, :len(labels)]) / max(counts.sum(), 1)
        ax.set_title(f"{name} (accuracy {accuracy:.2f})", fontsize=9)
        ax.set_xlabel("answer", fontsize=8)
        ax.set_ylabel("target", fontsize=8)
    fig.tight_layout()
    return fig
