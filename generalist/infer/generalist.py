"""`Generalist`: a trained model, its tokenizer and its task list behind one entry point.

    g = Generalist.load("runs/demo")
    g.predict(task="fashion", image=img)              # -> "trouser"
    g.embed([Example([("image", img)])])              # -> (1, E) unit vectors

Inputs may be arrays/tensors or file paths (PNG/JPEG images, WAV audio, .npy arrays). Requests
of different tasks and modalities batch together: they are packed, never padded.

`load` puts the model on the GPU when there is one (`device=` to choose; `embed` returns tensors
on the model's device). There it runs under bf16 autocast, as training does (`bf16=False` for
fp32; `bf16=True` asks for it on a CPU too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from generalist.data.packing import Example, ExampleEncoder
from generalist.models.decoding import generate
from generalist.models.generalist import GeneralistModel
from generalist.train.checkpoint import find_checkpoint

MODALITY_ARGS = ("image", "audio", "video", "table", "text")


def read_input(modality: str, value: Any):
    """A path or an in-memory value -> what that modality's embedder accepts."""
    if not isinstance(value, (str, Path)):
        return value
    path = Path(value)
    if modality == "text" and not path.suffix:
        return str(value)
    if not path.is_file():
        if modality == "text":
            return str(value)
        raise ValueError(f"--{modality}: no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if modality == "image" and suffix in (".png", ".jpg", ".jpeg", ".bmp", ".gif"):
        from PIL import Image

        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError as error:
            raise ValueError(f"--image: cannot read {path}: {error}") from None
    if modality == "audio" and suffix == ".wav":
        import wave

        try:
            with wave.open(str(path)) as w:
                if w.getsampwidth() != 2:
                    raise ValueError(f"--audio: {path} must be 16-bit PCM")
                data = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
                return data.reshape(-1, w.getnchannels()).mean(axis=1), w.getframerate()
        except (wave.Error, EOFError) as error:
            raise ValueError(f"--audio: cannot read {path}: {error}") from None
    if modality == "video" and suffix == ".gif":
        return _read_gif(path)
    if modality == "video" and suffix in FFMPEG_VIDEO:
        return _read_with_ffmpeg(path)
    if modality == "text" and suffix == ".txt":
        return path.read_text()
    raise ValueError(f"--{modality}: unsupported file type {suffix!r} for {path}")


FFMPEG_VIDEO = (".mp4", ".mov", ".avi", ".mkv", ".webm")


def _read_gif(path: Path) -> np.ndarray:
    """An animated GIF -> (T, H, W, 3) uint8 frames."""
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as im:
            return np.stack([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in ImageSequence.Iterator(im)])
    except OSError as error:
        raise ValueError(f"--video: cannot read {path}: {error}") from None


def _read_with_ffmpeg(path: Path) -> np.ndarray:
    """A video file -> (T, H, W, 3) uint8 frames, decoded by the ffmpeg/ffprobe on PATH."""
    import shutil
    import subprocess

    if not (shutil.which("ffmpeg") and shutil.which("ffprobe")):
        raise ValueError(f"--video: reading {path.suffix} files needs ffmpeg and ffprobe on PATH "
                         "(e.g. apt install ffmpeg); or pass frames as .npy / .gif")
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                            "stream=width,height", "-of", "csv=p=0", str(path)], capture_output=True, text=True)
    try:
        width, height = (int(v) for v in probe.stdout.strip().split(",")[:2])
    except ValueError:
        raise ValueError(f"--video: cannot read {path}: {probe.stderr.strip() or 'no video stream'}") from None
    run = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True)
    frame = width * height * 3
    if run.returncode != 0 or not run.stdout or len(run.stdout) % frame:
        reason = run.stderr.decode(errors="replace").strip() or f"{len(run.stdout)} bytes of frames"
        raise ValueError(f"--video: cannot decode {path}: {reason}")
    return np.frombuffer(run.stdout, dtype=np.uint8).reshape(-1, height, width, 3)


def resolve_device(device: str | None) -> torch.device:
    """`device`, or the GPU when there is one (None); a clear error for one that cannot be used."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use cpu or cuda (cuda:N)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available here")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but there are {torch.cuda.device_count()} CUDA GPUs")
    return resolved


class Generalist:
    def __init__(self, model: GeneralistModel, tokenizer, tasks: Sequence[str], max_new_tokens: int = 24,
                 bf16: bool | None = None):
        """`bf16`: run under bf16 autocast; None (the default) does so on a GPU only."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.encoder = ExampleEncoder(tokenizer, self.tasks)
        self.max_new_tokens = max_new_tokens
        self.bf16 = bf16

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, bf16: bool | None = None) -> "Generalist":
        """From a run directory or a checkpoint directory; never executes code from it. `device`
        defaults to the GPU when there is one."""
        ckpt = find_checkpoint(Path(path))
        meta = json.loads((ckpt / "meta.json").read_text()) if (ckpt / "meta.json").is_file() else {}
        model = GeneralistModel.load(ckpt, device=resolve_device(device))
        tasks = meta.get("tasks") or [f"task{i}" for i in range(model.cfg.n_tasks)]
        return cls(model, GeneralistModel.load_tokenizer(ckpt), tasks, bf16=bf16)

    def _precision(self):
        """bf16 autocast on the model's device when asked for (by default: on a GPU)."""
        device = self.model.boundary.device.type
        on = self.bf16 if self.bf16 is not None else device == "cuda"
        return torch.autocast(device, dtype=torch.bfloat16, enabled=on)

    @torch.no_grad()
    def generate(self, examples: Sequence[Example], batch_size: int = 64, beam_size: int = 1) -> list[str]:
        out = []
        for i in range(0, len(examples), batch_size):
            encoded = [self.encoder.encode(e) for e in examples[i:i + batch_size]]
            with self._precision():
                ids_batch = generate(self.model, encoded, self.max_new_tokens, beam_size=beam_size)
            out.extend(self.tokenizer.decode(ids) for ids in ids_batch)
        return out

    @torch.no_grad()
    def embed(self, examples: Sequence[Example], batch_size: int = 128) -> torch.Tensor:
        parts = []
        for i in range(0, len(examples), batch_size):
            with self._precision():
                parts.append(self.model.embed([self.encoder.encode(e) for e in examples[i:i + batch_size]]).float())
        return torch.cat(parts)

    def predict(self, task: str, beam_size: int = 1, **inputs) -> str:
        """One request: `task` plus any of image=, audio=, video=, table=, text= (values or paths).
        Audio values are (waveform, sample_rate) pairs; a table is (column_ids, values)."""
        unknown = sorted(set(inputs) - set(MODALITY_ARGS))
        if unknown:
            raise ValueError(f"unknown inputs {unknown}; use any of {MODALITY_ARGS}")
        segments = [(m, read_input(m, inputs[m])) for m in MODALITY_ARGS if inputs.get(m) is not None]
        if not segments:
            raise ValueError(f"task {task!r} needs at least one input ({', '.join(MODALITY_ARGS)})")
        return self.generate([Example(segments, "", task)], beam_size=beam_size)[0]
