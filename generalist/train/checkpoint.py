"""Training checkpoints, written atomically and read without executing anything.

A checkpoint is a directory: model.safetensors + config.json + tokenizer.json (the model's own
format, see GeneralistModel.save), optimizer.pt (tensors only, loaded with weights_only=True)
and state.json (step, scheduler, sampler, RNG states, metrics so far). It is written into a
temporary sibling directory, every file fsynced, then renamed into place: a run killed at any
moment leaves either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from generalist._fields import MissingFileError, read_json

CHECKPOINT = "checkpoint"
START_OVER = "generalist train --overwrite starts the run over"  # what to do about a damaged one


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, text: str) -> None:
    """Writes `text` over the file at `path` atomically: into a temporary file in the same folder,
    fsynced, then renamed over it, so that a kill at any moment leaves the old file or the new
    one whole (writing in place would empty it first)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict:
    """The global RNGs (torch CPU, Python, NumPy) as JSON-able lists."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state().tolist(), "python": [version, list(internal), gauss],
            "numpy": [keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer_state: dict, state: dict, meta: dict,
                    model_state: dict | None = None) -> Path:
    """meta (tasks in id order, training config) goes to meta.json; state to state.json.
    model_state: the weights to write instead of model's own (the full single-device state
    gathered from expert-parallel ranks)."""
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT
    tmp = run_dir / f".{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save(tmp, tokenizer=tokenizer, state_dict=model_state)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint on a full disk holds the space it lacks
        # a full disk reaches torch.save as a RuntimeError ("unexpected pos"), safetensors as its own error
        if isinstance(error, (OSError, RuntimeError, SafetensorError)):
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise OSError(f"could not write the checkpoint to {final} (disk full?): {reason}; the previous "
                          "checkpoint is unchanged") from error
        raise
    old = run_dir / f".{CHECKPOINT}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    # else a run killed between the two renames left its last checkpoint in `old` alone: it stays
    # until the new one is in place
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


# what a run writes into its directory: all that --overwrite deletes (anything else there stays)
PARTIAL_RESULTS = "eval-partial.json"  # generalist eval --limit / --tasks: beside the whole evaluation's eval.json
PREDICTIONS, PARTIAL_PREDICTIONS = "predictions.jsonl", "predictions-partial.jsonl"  # every test example's answer
RUN_ENTRIES = (CHECKPOINT, f".{CHECKPOINT}.old", f".{CHECKPOINT}.tmp", "metrics.jsonl", ".metrics.jsonl.tmp",
               "tensorboard", "eval.json", ".eval.json.tmp", PARTIAL_RESULTS, f".{PARTIAL_RESULTS}.tmp", PREDICTIONS,
               f".{PREDICTIONS}.tmp", PARTIAL_PREDICTIONS, f".{PARTIAL_PREDICTIONS}.tmp", "report.html",
               ".report.html.tmp")


def clear_run(run_dir: Path) -> None:
    """Deletes the files and folders of the run in `run_dir` (RUN_ENTRIES), nothing else."""
    for name in RUN_ENTRIES:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def meta_tasks(meta, path: Path) -> list[str]:
    """The task names of a checkpoint's meta.json, read as `meta`: a JSON object listing at
    least one task, by distinct names; anything else is a ValueError naming `path`."""
    tasks = meta.get("tasks") if isinstance(meta, dict) else None
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"{path} is damaged: it lists no tasks")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"{path} is damaged: it lists a task twice")
    return tasks


def run_meta(ckpt: Path) -> tuple[list[str], dict]:
    """(task names, training options) from the meta.json of a checkpoint that training wrote; a
    meta.json without them is a ValueError naming it."""
    path = Path(ckpt) / "meta.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing: {ckpt} is damaged (its tasks and training options are lost); "
                         f"{START_OVER}")
    meta = read_json(path)
    tasks = meta_tasks(meta, path)
    train = meta.get("train")
    if not isinstance(train, dict) or not isinstance(train.get("mixture"), str) or \
            not isinstance(train.get("seed"), int):
        raise ValueError(f"{path} is damaged: it holds no training options ('train' with its mixture and seed)")
    return tasks, train


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory from a run directory or the checkpoint itself. A run killed between
    the two renames of save_checkpoint still has its last complete checkpoint in .checkpoint.old."""
    path = Path(path)
    candidates = (path, path / CHECKPOINT, path / f".{CHECKPOINT}.old")
    needed = ("model.safetensors", "config.json")
    for candidate in candidates:
        if all((candidate / name).is_file() for name in needed):
            return candidate
    for candidate in candidates:  # one that holds half of what it needs is damaged, not absent
        missing = [name for name in needed if not (candidate / name).is_file()]
        if len(missing) < len(needed):
            raise MissingFileError(f"{candidate / missing[0]} is missing: {candidate} is damaged; {START_OVER}")
    raise MissingFileError(f"no checkpoint in {path} (expected {path / CHECKPOINT}/model.safetensors)")


def check_run_dir(run_dir: Path) -> None:
    """A ValueError if `run_dir`, where training writes its checkpoint, logs and report, is itself
    a checkpoint folder: training would nest a new checkpoint inside it, and the run's own
    folder would keep the old one."""
    run_dir = Path(run_dir)
    if all((run_dir / name).is_file() for name in ("model.safetensors", "config.json")):
        parent = f" ({run_dir.parent})" if run_dir.name in (CHECKPOINT, f".{CHECKPOINT}.old") else ""
        raise ValueError(f"{run_dir} is a checkpoint folder, not a run folder: train into the run folder that "
                         f"holds it{parent}, or into a new one")


STATE_KEYS = ("step", "skipped", "sampler", "rng", "routing")  # what every state.json holds


def load_training_state(ckpt: Path, optimizer, shard=None) -> dict:
    """Loads optimizer.pt into `optimizer` (through `shard(state_dict)` first, if given: an
    expert-parallel rank keeps its slice) and returns state.json."""
    path = ckpt / "optimizer.pt"
    for name in ("optimizer.pt", "state.json"):
        if not (ckpt / name).is_file():
            raise ValueError(f"{ckpt / name} is missing: {ckpt} cannot resume training (it still loads for "
                             f"inference); {START_OVER}")
    try:
        # on the host first: a run saved on a GPU resumes anywhere (the optimizer moves its state
        # to its parameters' device)
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # a truncated or foreign file: torch's own errors, one line of them
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{path} is damaged and cannot resume training ({reason})") from None
    try:
        optimizer.load_state_dict(shard(saved) if shard is not None else saved)
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"{path} does not match this model's parameters ({error})") from None
    state = read_json(ckpt / "state.json")
    missing = [key for key in STATE_KEYS if key not in state] \
        if isinstance(state, dict) else ["all of them"]
    if missing:
        raise ValueError(f"{ckpt / 'state.json'} is damaged: it lacks {', '.join(missing)}")
    return state
