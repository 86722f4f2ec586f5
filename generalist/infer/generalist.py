"""`Generalist`: a trained model, its tokenizer and its task list behind one entry point.

    g = Generalist.load("runs/demo")
    g.predict(task="fashion", image=img)              # -> "trouser"
    g.embed([Example([("image", img)], task="captions")])   # -> (1, E) unit vectors

Inputs may be arrays/tensors or file paths (PNG/JPEG images, WAV audio, .npy arrays; in an
`Example`, a text segment's str is the text and a `Path` is a file to read). Requests
of different tasks and modalities batch together: they are packed, never padded.

`load` puts the model on the GPU when there is one (`device=` to choose; `embed` returns tensors
on the model's device). There it runs under bf16 autocast, as training does (`bf16=False` for
fp32; `bf16=True` asks for it on a CPU too).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from generalist._fields import check_count
from generalist.data.packing import Example, ExampleEncoder
from generalist.data.tasks import Task, discover
from generalist.models.decoding import NonFiniteError, check_finite_stream, generate
from generalist.models.generalist import GeneralistModel
from generalist.train.checkpoint import find_checkpoint, meta_tasks, read_json

MODALITY_ARGS = ("image", "audio", "video", "table", "text")


def read_input(modality: str, value: Any, cfg: Any = None):
    """A path or an in-memory value -> what that modality's embedder accepts. A text that names
    no file is the text itself, unless it ends in .txt or is a Path. `cfg`, the embedder's config
    (ImageConfig, AudioConfig, VideoConfig), if given: a file larger than it accepts (max_size,
    max_frames, max_seconds) is refused from its header, or after decoding one frame or second
    more than it takes, not decoded whole first (a phone's video would need gigabytes)."""
    if isinstance(value, str) and modality == "text":
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("--text: not valid UTF-8 text") from None
        if not value.strip():
            raise ValueError("--text is empty")
    if not isinstance(value, (str, Path)):
        return value
    if not str(value):
        raise ValueError(f"--{modality} is empty: give a file")
    path = Path(value)
    looks_like_file = isinstance(value, Path) or path.suffix.lower() == ".txt"
    try:
        if modality == "text" and not path.suffix and not isinstance(value, Path) and not (
                "/" in str(value) and path.is_dir()):
            return str(value)
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as error:  # e.g. a long text is no file name the filesystem accepts
        if modality == "text" and not looks_like_file:
            return str(value)
        raise ValueError(f"--{modality}: cannot read {path}: {error.strerror or error}") from None
    if is_dir:
        raise ValueError(f"--{modality}: {path} is a directory, not a file")
    if not is_file:
        if modality == "text" and not looks_like_file:
            return str(value)
        if path.exists():  # a device, a FIFO, a socket
            raise ValueError(f"--{modality}: {path} is not a regular file")
        raise ValueError(f"--{modality}: no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if modality == "audio":
            raise ValueError(f"--audio: {path}: a .npy file holds no sample rate; give a WAV file (or, in "
                             "Python, audio=(waveform, sample_rate))")
        return _read_npy(path, modality)
    if modality == "image" and suffix in IMAGE_FILES:
        from PIL import Image

        try:
            with Image.open(path) as im:  # (the header only, so far)
                if (too_large := _too_large(cfg, im.size)) is None:
                    return picture_rgb(im)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"--image: cannot read {path}: {error}") from None
        raise ValueError(f"--image: {path} {too_large}")
    if modality == "audio" and suffix in (".wav", *FFMPEG_AUDIO, *FFMPEG_VIDEO):  # (a video: its sound)
        limit = getattr(cfg, "max_seconds", None)
        cut = [] if limit is None else ["-t", f"{limit + 1:g}"]  # a second more than the model takes: refused below
        data = path.read_bytes() if suffix == ".wav" else _ffmpeg(path, "audio", ["-map", "0:a:0", *cut, "-f", "wav"])
        try:
            waveform, rate = read_wav(data)
        except ValueError as error:
            raise ValueError(f"--audio: cannot read {path}: {error}") from None
        if limit is not None and len(waveform) > limit * rate:
            longer = "more than " if suffix != ".wav" and len(waveform) >= (limit + 0.99) * rate else ""  # (cut)
            raise ValueError(f"--audio: {path} lasts {longer}{len(waveform) / rate:.1f} s; the model hears at most "
                             f"{limit:g} s (max_seconds): cut the clip first")
        return waveform, rate
    if modality == "video" and suffix == ".gif":
        return _read_gif(path, cfg)
    if modality == "video" and suffix in FFMPEG_VIDEO:
        return _read_with_ffmpeg(path, cfg)
    if modality == "text" and suffix == ".txt":
        raw = path.read_bytes()
        bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # a byte-order mark is not part of the text
        try:  # nor is the file's last line break
            text = raw[bom:].decode("utf-8").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError as error:
            raise ValueError(f"--text: {path} is not UTF-8 text ({error.reason} at byte {bom + error.start})") from None
        if not text.strip():
            raise ValueError(f"--text: {path} holds no text")
        return text
    raise ValueError(f"--{modality}: unsupported file type {suffix!r} for {path}")


def _too_large(cfg: Any, size: tuple[int, int], frames: int | None = None, more: bool = False) -> str | None:
    """What is too large about a picture or clip of `size` (width, height) and `frames` (read
    from its file's header, or, with `more`, where reading stopped: the clip has at least that
    many) for `cfg`'s max_size and max_frames, if any: a sentence, or None if it fits."""
    problems = []
    side = getattr(cfg, "max_size", None)
    if side is not None and max(size) > side:
        problems.append(f"is {size[0]}x{size[1]}, and the model reads at most {side} pixels a side (max_size): "
                        f"resize it first (the size it was trained on is best)")
    most = getattr(cfg, "max_frames", None)
    if frames is not None and most is not None and frames > most:
        problems.append(f"has {'more than ' + str(most) if more else frames} frames, and the model reads at most "
                        f"{most} (max_frames): cut it first")
    return "; ".join(problems) or None


def _check_labels(labels) -> list[str]:
    """`classify`'s and `rank`'s labels as a list of str: any iterable of non-empty strings (a
    numpy array's become str), none twice; anything else is a ValueError."""
    given = labels
    try:
        labels = [] if isinstance(labels, str) else [str(x) if isinstance(x, str) else x for x in labels]
    except TypeError:
        labels = []
    if not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        raise ValueError(f"labels must be a non-empty list of non-empty strings, got {given!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels holds {sorted(x for x in set(labels) if labels.count(x) > 1)[0]!r} twice")
    return labels


def picture_rgb(im) -> np.ndarray:
    """A decoded Pillow image -> (H, W, 3) uint8 as training pictures are made: turned upright as
    its EXIF orientation says, transparency composited onto white (the background of the
    training pictures; a plain RGB conversion would put it on black), and 16-bit or 32-bit
    grey samples scaled to 8 bits (a plain conversion would clip them to white)."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        grey = np.asarray(im, dtype=np.float64)
        if im.mode == "F" or grey.min() < 0 or grey.max() > 65535:
            raise ValueError(f"{im.mode} pixels from {grey.min():g} to {grey.max():g} are on no scale this "
                             "reader knows; save the picture with 8 or 16 bits per sample")
        clear = grey == im.info["transparency"] if isinstance(im.info.get("transparency"), int) else None
        if im.mode.startswith("I;16") or grey.max() > 255:  # 16-bit samples ("I" from some decoders)
            grey = grey / 257
        if clear is not None:  # the one transparent grey value, on white
            grey[clear] = 255
        return np.repeat(np.rint(grey).astype(np.uint8)[..., None], 3, axis=-1)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


# WAVE format tags: integer PCM, IEEE float, and the extensible header that names either one
_WAVE_PCM, _WAVE_FLOAT, _WAVE_EXTENSIBLE = 1, 3, 0xFFFE
# Streaming writers (espeak-ng --stdout, ffmpeg to a pipe) cannot go back to write the data
# chunk's size and leave a huge one (0x7ffff000, 0xffffffff): a size this large that runs past
# the end of the file means the samples run to its end; a smaller one, that the file was cut.
_STREAMED_SIZE = 0x7F000000


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """A WAV file's bytes -> (mono float32 waveform in [-1, 1], sample rate): integer PCM of 8,
    16, 24 or 32 bits or IEEE float of 32 or 64 bits, any number of channels (averaged), the
    extensible header too. A ValueError names what is wrong with a damaged or unsupported file."""
    import struct

    if len(data) < 12:
        raise ValueError("the file ends early" if len(data) < 4 or data[:4] == b"RIFF"[:len(data)]
                         else "not a WAV file (no RIFF header)")
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a WAV file (no RIFF/WAVE header)")
    fmt, samples, at = None, None, 12
    while at + 8 <= len(data) and samples is None:
        chunk, size = data[at:at + 4], struct.unpack_from("<I", data, at + 4)[0]
        body = at + 8
        if chunk == b"data":
            past_end = body + size > len(data)
            samples = (data[body:body + size], None) if not past_end else \
                (data[body:], None if size >= _STREAMED_SIZE else size)
            break
        if body + size > len(data):
            raise ValueError(f"a damaged chunk size (its {chunk!r} chunk of {size} bytes runs past the end of the file)")
        if chunk == b"fmt ":
            if size < 16:
                raise ValueError(f"a damaged format chunk ({size} bytes)")
            fmt = struct.unpack_from("<HHIIHH", data, body)
            if fmt[0] == _WAVE_EXTENSIBLE:
                if size < 40:
                    raise ValueError(f"a damaged extensible format chunk ({size} bytes)")
                fmt = (struct.unpack_from("<H", data, body + 24)[0],) + fmt[1:]  # the sub-format's tag
        at = body + size + (size & 1)  # chunks are padded to an even size
    if fmt is None:
        raise ValueError("no format chunk before the samples" if samples is not None else "the file ends early")
    tag, channels, rate, _, block, bits = fmt
    if samples is None:
        raise ValueError("no data chunk (the file ends early)")
    kinds = {(_WAVE_PCM, 8): "u1", (_WAVE_PCM, 16): "<i2", (_WAVE_PCM, 24): "i3", (_WAVE_PCM, 32): "<i4",
             (_WAVE_FLOAT, 32): "<f4", (_WAVE_FLOAT, 64): "<f8"}
    if (tag, bits) not in kinds:
        name = {_WAVE_PCM: "integer PCM", _WAVE_FLOAT: "float"}.get(tag, f"format tag {tag}")
        raise ValueError(f"{name} with {bits} bits per sample is not read here; save it as 8/16/24/32-bit PCM "
                         "or 32/64-bit float")
    if channels < 1 or block != channels * bits // 8:
        raise ValueError(f"a damaged format chunk ({channels} channels of {bits} bits in frames of {block} bytes)")
    if rate <= 0:
        raise ValueError(f"it has a frame rate of {rate}")
    raw, promised = samples
    frames = len(raw) // block
    if promised is not None:
        raise ValueError(f"truncated: its header promises {promised // block} frames, but only {frames} are present")
    if len(raw) % block:
        raise ValueError("truncated: its samples end in the middle of a frame")
    if frames == 0:
        raise ValueError("no samples")
    kind = kinds[(tag, bits)]
    if kind == "i3":  # 24-bit little-endian: widen each sample to the top of an int32
        wide = np.zeros((frames * channels, 4), dtype=np.uint8)
        wide[:, 1:] = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        x = wide.view("<i4")[:, 0].astype(np.float64) / 2.0 ** 31
    elif kind == "u1":
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128) / 128
    elif tag == _WAVE_PCM:
        x = np.frombuffer(raw, dtype=kind).astype(np.float64) / 2.0 ** (bits - 1)
    else:
        x = np.frombuffer(raw, dtype=kind).astype(np.float64)
    return x.reshape(frames, channels).mean(axis=1).astype(np.float32), rate


def _read_npy(path: Path, modality: str) -> np.ndarray:
    """A .npy array; never unpickles (a file of Python objects is refused, not loaded)."""
    from tokenize import TokenError

    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise ValueError(f"--{modality}: {path} is not a .npy array of numbers (it holds pickled Python "
                             "objects, which are never loaded)") from None
        raise ValueError(f"--{modality}: cannot read {path} as a .npy array: {error}") from None
    except TokenError:  # numpy, on a header it cannot parse
        raise ValueError(f"--{modality}: cannot read {path} as a .npy array: a damaged header") from None
    except (OSError, EOFError) as error:
        raise ValueError(f"--{modality}: cannot read {path} as a .npy array: {str(error) or 'the file ends early'}") \
            from None


IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FFMPEG_VIDEO = (".mp4", ".mov", ".avi", ".mkv", ".webm")
FFMPEG_AUDIO = (".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac")


def _ffmpeg(path: Path, modality: str, output: list[str]) -> bytes:
    """What the ffmpeg on PATH writes to its stdout for `path` with the `output` options."""
    import shutil
    import subprocess

    if not shutil.which("ffmpeg"):
        other = "frames as .npy / .gif" if modality == "video" else "a WAV file"
        raise ValueError(f"--{modality}: reading {path.suffix} files needs ffmpeg on PATH "
                         f"(e.g. apt install ffmpeg); or pass {other}")
    run = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), *output, "-"], capture_output=True)
    if run.returncode != 0 or not run.stdout:
        reason = run.stderr.decode(errors="replace").strip()
        if "matches no streams" in reason:  # what -map 0:a:0 / 0:v:0 says of a file without one
            reason = f"it has no {'sound' if modality == 'audio' else 'video'} stream"
        # one line: ffmpeg's last, which says what (its others say where, or how to silence it)
        reason = (reason.splitlines() or [f"no {modality} in it"])[-1].strip().removeprefix(f"{path}: ")
        raise ValueError(f"--{modality}: cannot decode {path}: {reason}")
    return run.stdout


def _read_gif(path: Path, cfg: Any = None) -> np.ndarray:
    """An animated GIF -> (T, H, W, 3) uint8 frames; its size and frame count checked against
    `cfg` (see `read_input`) before any frame is decoded."""
    import struct

    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as im:
            if (too_large := _too_large(cfg, im.size, getattr(im, "n_frames", 1))) is None:
                return np.stack([picture_rgb(f) for f in ImageSequence.Iterator(im)])
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"--video: cannot read {path}: {error}") from None
    except (IndexError, struct.error):  # Pillow, on damaged frames
        raise ValueError(f"--video: cannot read {path}: damaged frames") from None
    raise ValueError(f"--video: {path} {too_large}")


def _read_with_ffmpeg(path: Path, cfg: Any = None) -> np.ndarray:
    """A video file -> (T, H, W, 3) uint8 frames, decoded by the ffmpeg on PATH. ffmpeg turns
    them upright as the file's rotation says (phones store portrait video sideways) and writes
    them as PPM pictures, each naming its own size, so the frames never depend on a guess of
    what the rotation does to the width and height. With `cfg` (see `read_input`) ffmpeg stops
    one frame past max_frames, and the size is checked on the first frame."""
    limit = getattr(cfg, "max_frames", None)
    cut = [] if limit is None else ["-frames:v", str(limit + 1)]
    data = _ffmpeg(path, "video", ["-map", "0:v:0", *cut, "-f", "image2pipe", "-c:v", "ppm", "-pix_fmt", "rgb24"])
    try:
        frames = ppm_frames(data)
    except ValueError as error:
        raise ValueError(f"--video: cannot decode {path}: {error}") from None
    if (too_large := _too_large(cfg, (frames.shape[2], frames.shape[1]), len(frames), more=bool(cut))) is not None:
        raise ValueError(f"--video: {path} {too_large}")
    return frames


def ppm_frames(data: bytes) -> np.ndarray:
    """Concatenated binary PPM pictures (P6, 8-bit) of one size -> (T, H, W, 3) uint8."""
    frames, at = [], 0
    while at < len(data):
        fields = []
        while len(fields) < 4:  # magic, width, height, maxval, each ended by one whitespace byte
            while at < len(data) and data[at:at + 1].isspace():
                at += 1
            end = at
            while end < len(data) and not data[end:end + 1].isspace():
                end += 1
            if end == at or end == len(data):
                raise ValueError(f"frame {len(frames)} is cut short in its header")
            fields.append(data[at:end])
            at = end + 1
        if fields[0] != b"P6" or not all(f.isdigit() for f in fields[1:]) or fields[3] != b"255":
            raise ValueError(f"frame {len(frames)} is not an 8-bit binary PPM picture")
        width, height = int(fields[1]), int(fields[2])
        if frames and frames[0].shape[:2] != (height, width):
            raise ValueError(f"frame {len(frames)} is {width}x{height}, frame 0 "
                             f"{frames[0].shape[1]}x{frames[0].shape[0]}; the frames of a clip share one size")
        size = width * height * 3
        if size == 0:
            raise ValueError(f"frame {len(frames)} is {width}x{height}: it has no pixels")
        if at + size > len(data):
            raise ValueError(f"frame {len(frames)} ({width}x{height}) is cut short")
        frames.append(np.frombuffer(data, dtype=np.uint8, count=size, offset=at).reshape(height, width, 3))
        at += size
    return np.stack(frames)


def _names_file(segment) -> bool:
    """Whether an `Example` segment is a file to read: a path, or a str for a modality other
    than text (whose str is the text itself)."""
    return (isinstance(segment, (tuple, list)) and len(segment) == 2 and segment[0] in MODALITY_ARGS
            and (isinstance(segment[1], Path) or (isinstance(segment[1], str) and segment[0] != "text")))


def resolve_device(device: str | None) -> torch.device:
    """`device`, or the GPU when there is one (None); a clear error for one that cannot be used."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda") or (resolved.type == "cpu" and resolved.index):
        raise ValueError(f"unknown device {device!r}; use cpu or cuda (cuda:N)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available here")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but there are {torch.cuda.device_count()} CUDA GPUs")
    return resolved


class Generalist:
    def __init__(self, model: GeneralistModel, tokenizer, tasks: Sequence[str], max_new_tokens: int = 24,
                 bf16: bool | None = None, generative: Sequence[str] | None = None,
                 definitions: Mapping[str, Task] | None = None, contrastive: Sequence[str] | None = None,
                 modalities: Mapping[str, Sequence[str]] | None = None):
        """`bf16`: run under bf16 autocast; None (the default) does so on a GPU only.
        `generative`: the tasks that answer in generated text (None: as their definitions say);
        `contrastive`: the tasks the contrastive head was trained on (None: as their definitions
        say), the ones `classify` ranks labels as;
        `definitions`: the tasks' `Task` objects by name (None: the task files, read when first
        needed), for the tasks that answer otherwise (`Task.answer`);
        `modalities`: the input modalities each task was trained on (None or a task left out:
        unknown), so that `predict` warns of an input its task never saw."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.encoder = ExampleEncoder(tokenizer, self.tasks)
        self.max_new_tokens = min(check_count("max_new_tokens", max_new_tokens, 0),
                                  model.embedders["text"].cfg.max_len)  # (the decoder reads no more)
        self.bf16 = bf16
        self.generative = None if generative is None else set(generative)
        self.contrastive = None if contrastive is None else set(contrastive)
        self.definitions = None if definitions is None else dict(definitions)
        self.modalities = {} if modalities is None else {t: set(m) for t, m in modalities.items()}

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, bf16: bool | None = None,
             definitions: Mapping[str, Task] | None = None) -> "Generalist":
        """From a run directory or a checkpoint directory; never executes code from it (the task
        files, `definitions` unless given, are the installed ones). `device` defaults to the GPU
        when there is one."""
        ckpt = find_checkpoint(Path(path))
        if not (ckpt / "meta.json").is_file() and (ckpt / "state.json").is_file():
            # written by training, which always writes meta.json (a model saved by
            # GeneralistModel.save has neither file: its tasks are task0, task1, ...)
            raise ValueError(f"{ckpt / 'meta.json'} is missing: {ckpt} is damaged (the names of its tasks are lost)")
        has_meta = (ckpt / "meta.json").is_file()
        meta = read_json(ckpt / "meta.json") if has_meta else {}
        tasks = meta_tasks(meta, ckpt / "meta.json") if has_meta else None
        model = GeneralistModel.load(ckpt, device=resolve_device(device))
        tasks = tasks or [f"task{i}" for i in range(model.cfg.n_tasks)]
        if len(tasks) != model.cfg.n_tasks:
            raise ValueError(f"{ckpt / 'meta.json'} lists {len(tasks)} tasks but the model in {ckpt} was built for "
                             f"{model.cfg.n_tasks}")
        kinds = {}
        for kind in ("generative", "contrastive"):  # absent from runs saved before they were recorded
            kinds[kind] = meta.get(kind)
            if kinds[kind] is not None and (not isinstance(kinds[kind], list) or not all(
                    isinstance(t, str) and t in tasks for t in kinds[kind])):
                raise ValueError(f"{ckpt / 'meta.json'}: {kind!r} must list some of its tasks, got {kinds[kind]!r}")
        modalities = meta.get("modalities")  # absent from runs saved before it was recorded
        if modalities is not None and not (isinstance(modalities, dict) and all(
                isinstance(m, list) and all(isinstance(x, str) for x in m) for m in modalities.values())):
            raise ValueError(f"{ckpt / 'meta.json'}: 'modalities' must map tasks to lists of modality names, "
                             f"got {modalities!r}")
        return cls(model, GeneralistModel.load_tokenizer(ckpt), tasks, bf16=bf16, definitions=definitions,
                   modalities=modalities, **kinds)

    def _definition(self, task: str) -> Task | None:
        """The task's `Task` object: from `definitions`, else the task files (read once)."""
        if self.definitions is None:
            self.definitions = discover()
        return self.definitions.get(task)

    def answers_in_text(self, task: str) -> bool:
        """Whether `predict` answers this task by decoding text (else through `Task.answer`)."""
        if self.generative is not None:
            return task in self.generative
        definition = self._definition(task)
        return definition is None or definition.generative

    def trained_contrastively(self, task: str) -> bool:
        """Whether the contrastive head was trained on `task` (unknown for a task that neither
        the run nor a task file describes: then assumed)."""
        if self.contrastive is not None:
            return task in self.contrastive
        definition = self._definition(task)
        return definition is None or definition.contrastive

    @contextlib.contextmanager
    def _precision(self):
        """The model in eval mode (as `generate` runs it: one a caller set training would route
        with its training-only behaviour, e.g. dropping tokens over an MoE capacity, so a
        score would depend on the batch) under bf16 autocast on its device when asked for (by
        default: on a GPU); its mode is restored after."""
        device = self.model.boundary.device.type
        on = self.bf16 if self.bf16 is not None else device == "cuda"
        training = self.model.training
        self.model.eval()
        try:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=on):
                yield
        finally:
            self.model.train(training)

    def _encode(self, example: Example):
        """An `Example` whose segments may name files -> the encoder's tokens (files read first)."""
        if not isinstance(example, Example):
            raise ValueError(f"expected an Example, got {type(example).__name__}")
        segments = example.segments
        if isinstance(segments, (list, tuple)):  # (anything else is the encoder's to refuse)
            segments = [(s[0], read_input(*s, self._input_config(s[0]))) if _names_file(s) else s for s in segments]
        return self.encoder.encode(Example(segments, example.target_text, example.task, example.meta))

    def _input_config(self, modality: str):
        """The config of the model's embedder of `modality` (None if it has none): the limits a
        file of it is read within (`read_input`)."""
        embedder = self.model.embedders[modality] if modality in self.model.embedders else None
        return getattr(embedder, "cfg", None)

    def _batches(self, examples: Sequence[Example], batch_size: int):
        """(index of its first example, encoded examples) for each batch of `examples`; an
        example that cannot be encoded is named by its index in a list of more than one."""
        if isinstance(examples, Example) or not isinstance(examples, Sequence):
            what = "one Example (pass [example])" if isinstance(examples, Example) else type(examples).__name__
            raise ValueError(f"examples must be a list of Example, got {what}")
        for i in range(0, len(examples), batch_size):
            encoded = []
            for k, example in enumerate(examples[i:i + batch_size], i):
                try:
                    encoded.append(self._encode(example))
                except ValueError as error:
                    raise (ValueError(f"example {k}: {error}") if len(examples) > 1 else error) from None
            yield i, encoded

    @staticmethod
    def _in_batch(error: ValueError, first: int, what: str) -> ValueError:
        """The model's error about a batch that starts at example `first` of the caller's list:
        examples named by their index in that list (non-finite activations), or the batch named."""
        if isinstance(error, NonFiniteError):
            return error.shifted(first)
        return ValueError(f"{what}, the batch from example {first} (examples counted from it): {error}") if first else error

    @torch.no_grad()
    def generate(self, examples: Sequence[Example], batch_size: int = 64, beam_size: int = 1) -> list[str]:
        """The decoded answer to each example (its segments' values or files, its task)."""
        check_count("batch_size", batch_size)
        check_count("beam_size", beam_size)
        out = []
        for i, encoded in self._batches(examples, batch_size):
            try:
                with self._precision():
                    ids_batch = generate(self.model, encoded, self.max_new_tokens, beam_size=beam_size)
            except ValueError as error:
                raise self._in_batch(error, i, "generate") from None
            out.extend(self.tokenizer.decode(ids) for ids in ids_batch)
        return out

    @torch.no_grad()
    def embed(self, examples: Sequence[Example], batch_size: int = 128) -> torch.Tensor:
        """(len(examples), E) unit vectors from the contrastive head, each example embedded as its
        task (one trained contrastively, e.g. "captions"); no examples give (0, E)."""
        check_count("batch_size", batch_size)
        parts = []
        for i, encoded in self._batches(examples, batch_size) if examples else [(0, [])]:
            try:
                with self._precision():
                    parts.append(self.model.embed(encoded).float())
                check_finite_stream(parts[-1], None)
            except ValueError as error:
                raise self._in_batch(error, i, "embed") from None
        return torch.cat(parts)

    def predict(self, task: str, beam_size: int = 1, **inputs) -> str:
        """One request: `task` plus any of image=, audio=, video=, table=, text= (values or paths).
        Audio values are (waveform, sample_rate) pairs; a table is (column_ids, values)."""
        check_count("beam_size", beam_size)
        example = Example(self._segments(task, inputs), "", task)
        if task not in self.tasks or self.answers_in_text(task):
            answer = self.generate([example], beam_size=beam_size)[0]  # (an unknown task is refused there)
        elif beam_size != 1:
            raise ValueError(f"task {task!r} does not answer by decoding text: beam_size does not apply")
        elif (definition := self._definition(task)) is None:
            raise ValueError(f"task {task!r} does not answer in text and no task file defines it here: pass its Task "
                             "to Generalist.load(definitions=...), or rank labels with Generalist.classify")
        else:
            answer = definition.answer(self, [example])[0]
        self._warn_unseen(task, example.segments)  # (once the inputs are known to be good)
        return answer

    def _warn_unseen(self, task: str, segments) -> None:
        """Warns when `segments` hold a modality that `task` was never trained on. A task trained
        on nothing (zero_shot) is answered through the tasks it requires (captions), so theirs
        count."""
        seen, how = self.modalities.get(task), f"task {task!r} was trained"
        if seen is None:
            definition = self._definition(task) if task in self.tasks else None
            through = getattr(definition, "requires", ())
            if through and all(t in self.modalities for t in through):
                seen = set().union(*(self.modalities[t] for t in through))
                how = f"task {task!r} is answered through {' and '.join(through)}, trained"
        unseen = sorted({m for m, _ in segments} - seen) if seen is not None else []
        if unseen:
            warnings.warn(f"{how} on {' and '.join(sorted(seen))} inputs; it never saw {' or '.join(unseen)}, so its "
                          "answer is a guess", stacklevel=3)

    def classify(self, labels: Sequence[str], task: str, prompt: str = "{}", **inputs) -> dict[str, float]:
        """Zero-shot classification through the contrastive head: the inputs (any of image=,
        audio=, video=, table=, text=, as for `predict`) and each label's text (`prompt` with
        its "{}" replaced by the label), both embedded as `task` (one trained contrastively,
        e.g. "captions"; a task answered through one, as zero_shot through captions, embeds as
        that one), scored by cosine similarity at the model's learned temperature. A
        probability per label (a softmax over them), highest first; labels may be any iterable
        of strings (a list, a tuple, a numpy array)."""
        labels = _check_labels(labels)
        if not isinstance(prompt, str) or "{}" not in prompt:
            raise ValueError(f"prompt must be a string holding '{{}}' (where each label goes), got {prompt!r}")
        segments = self._segments(task, inputs)
        as_task = task
        if task in self.tasks and not self.trained_contrastively(task):
            # a task answered through one trained contrastively (zero_shot through captions) embeds as that one
            definition = self._definition(task)
            through = [t for t in getattr(definition, "requires", ()) if t in self.tasks and self.trained_contrastively(t)]
            if not through:
                trained = [t for t in self.tasks if self.trained_contrastively(t)]
                raise ValueError(f"task {task!r} was not trained through the contrastive head, so its embeddings rank "
                                 f"nothing; classify as one that was ({', '.join(trained) or 'none in this run'})")
            as_task = through[0]
        label_E = self.embed([Example([("text", prompt.replace("{}", x))], "", as_task) for x in labels])
        input_E = self.embed([Example(segments, "", as_task)])
        scale = self.model.logit_scale.detach().float().exp().clamp(max=100)
        probs = torch.softmax(scale * (input_E @ label_E.t())[0], dim=0).tolist()
        self._warn_unseen(task, segments)
        return dict(sorted(zip(labels, probs), key=lambda pair: -pair[1]))

    @torch.no_grad()
    def rank(self, labels: Sequence[str], task: str, **inputs) -> dict[str, float]:
        """Closed-set classification through the text head: the probability the decoder gives
        each label as the whole answer of `task` (its tokens, then the end of the text) to the
        inputs (any of image=, audio=, video=, table=, text=, as for `predict`), normalized over
        the labels (a softmax of their log-probabilities). Highest first; labels as for
        `classify`. Works for any task that answers in text, the ones `classify` cannot rank (a
        task never trained contrastively, fashion say); the labels need not be answers the task
        was trained on, but only those it was are likely."""
        labels = _check_labels(labels)
        segments = self._segments(task, inputs)
        if task in self.tasks and not self.answers_in_text(task):
            trained = [t for t in self.tasks if self.trained_contrastively(t)]
            how = (f"classify as a task trained through the contrastive head ({', '.join(trained)})" if trained else
                   "and no task of this run was trained through the contrastive head")
            raise ValueError(f"task {task!r} does not answer in text, so its text head ranks nothing; {how}")
        encoded = self._encode(Example(segments, "", task))  # the inputs, encoded once for every label
        targets = [torch.tensor(self.tokenizer.encode(label), dtype=torch.long) for label in labels]
        with self._precision():
            logp = self.model.answer_logprobs(encoded, targets)
        check_finite_stream(logp[:, None], None)  # (names the labels whose scores overflowed, as examples)
        probs = torch.softmax(logp, dim=0).tolist()
        self._warn_unseen(task, segments)
        return dict(sorted(zip(labels, probs), key=lambda pair: -pair[1]))

    def _segments(self, task: str, inputs: dict) -> list:
        if not isinstance(task, str):
            raise ValueError(f"task must be a str, one of {self.tasks}; got {task!r}")
        unknown = sorted(set(inputs) - set(MODALITY_ARGS))
        if unknown:
            raise ValueError(f"unknown inputs {unknown}; use any of {MODALITY_ARGS}")
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model knows {self.tasks}")
        segments = [(m, read_input(m, inputs[m], self._input_config(m))) for m in MODALITY_ARGS
                    if inputs.get(m) is not None]
        if not segments:
            raise ValueError(f"task {task!r} needs at least one input ({', '.join(MODALITY_ARGS)})")
        table = dict(segments).get("table")
        if isinstance(table, (tuple, list)) and len(table) == 2:  # (anything else is the embedder's to refuse)
            try:
                values = np.asarray(table[1].cpu() if isinstance(table[1], torch.Tensor) else table[1], dtype=np.float64)
            except (TypeError, ValueError):
                values = None
            if values is not None and values.size and np.isnan(values).all():
                raise ValueError("table has no value, only missing ones (NaN): there is nothing to answer from")
        return segments
