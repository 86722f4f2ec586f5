"""From raw examples to the flat varlen streams the model reads.

An `Example` is what a task yields: a list of (modality, data) segments, a target text and a
task name. `Encoder.encode` turns it into an `EncodedExample` (text tokenized, task as an id);
the model embeds each segment and `pack` concatenates the per-example pieces into one stream
with `cu_seqlens` — no padding token ever reaches the model.

Shapes: T packed tokens, B examples, M model dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from generalist.modalities import MODALITIES

MODALITY_NAMES = tuple(MODALITIES)


@dataclass
class Example:
    segments: list[tuple[str, Any]]
    target_text: str = ""
    task: str = "default"
    meta: dict = field(default_factory=dict)  # what a task's metric needs beyond the target (e.g. question type)


@dataclass
class EncodedExample:
    segments: list[tuple[str, Any]]  # text segments hold int64 token ids (L,)
    task_id: int
    target_ids: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (L,), no bos/eos


def segment_problem(i: int, seg) -> str | None:
    """What is wrong with segment `i` of an example, if anything: not a (modality, data) pair, an
    unknown modality, text data that is not a str."""
    if not (isinstance(seg, (tuple, list)) and len(seg) == 2):
        return f"segment {i} must be a (modality, data) pair, got {type(seg).__name__}"
    if seg[0] not in MODALITY_NAMES:
        return f"segment {i} has unknown modality {seg[0]!r}; known: {MODALITY_NAMES}"
    if seg[0] == "text" and not isinstance(seg[1], str):
        return f"text segment {i} must be a str, got {type(seg[1]).__name__}"
    return None


class ExampleEncoder:
    """Tokenizes text segments and targets and maps task names to ids, with clear errors."""

    def __init__(self, tokenizer, tasks: Sequence[str]):
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.task_ids = {t: i for i, t in enumerate(self.tasks)}

    def encode(self, example: Example) -> EncodedExample:
        if not isinstance(example.task, str) or example.task not in self.task_ids:
            raise ValueError(f"unknown task {example.task!r}; this model knows {self.tasks}")
        if not example.segments:
            raise ValueError(f"example of task {example.task!r} has no input segments")
        segments = []
        for i, seg in enumerate(example.segments):
            problem = segment_problem(i, seg)
            if problem:
                raise ValueError(problem)
            modality, data = seg
            if modality == "text":
                ids = self.tokenizer.encode(data)
                if not ids:
                    raise ValueError(f"text segment {i} is empty")
                data = torch.tensor(ids, dtype=torch.long)
            segments.append((modality, data))
        target = torch.tensor(self.tokenizer.encode(example.target_text) if example.target_text else [], dtype=torch.long)
        return EncodedExample(segments, self.task_ids[example.task], target)


def pack(pieces: Sequence[Sequence[Tensor]]) -> tuple[Tensor, Tensor, int]:
    """pieces[b] is the list of (L_i, ...) tensors of example b, in order.

    Returns (flat (T, ...), cu_seqlens int32 (B+1,), max_seqlen)."""
    lens = [sum(p.shape[0] for p in ex) for ex in pieces]
    tensors = [p for ex in pieces for p in ex]
    if not tensors:  # (torch.cat needs one to know the trailing shape and dtype)
        raise ValueError(f"pack needs at least one tensor, got {len(pieces)} examples holding none")
    flat = torch.cat(tensors)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
    return flat, cu.to(flat.device), max(lens, default=0)
