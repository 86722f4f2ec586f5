"""Modalities: one embedder per modality, all with the same contract.

Shapes: L tokens of one example, D d_model.

Every embedder is an nn.Module whose `forward(data)` takes ONE example's raw data and returns
`(tokens_LD, positions_L3)`: float (L, D) embeddings without any position embedding, and int64
(L, 3) coordinates (axis 0 time / sequence index, axis 1 row or frequency, axis 2 column; unused
axes are 0). `embedder.max_positions` gives the exclusive bound of each axis under its config,
so the model can size per-axis position tables. Raw data per modality:

    text   1-D int ids (tensor, array or list)                      positions (i, 0, 0)
    image  float (H, W) / (C, H, W), or uint8 (H, W) / (H, W, C)      positions (0, row, col)
    audio  (mono float waveform (N,), sample_rate)                  positions (time, freq, 0)
    video  (T, H, W, C) or (T, H, W), float in [0, 1] or uint8      positions (time, row, col)
    table  (column_ids (F,) int, values (F,) float, NaN = missing)  positions (i, 0, 0)

Every embedder is also split in two, so that a batch's segments of one modality are embedded
together (one projection for all the batch's images, not one each):
    `prepare(data) -> (features, positions_L3)`   the checks and the parameter-free work (patch
                                                   cutting, the log-mel spectrogram), done where
                                                   the data is: on the host for batches from
                                                   the data pipeline;
    `project(features_N) -> tokens_ND`             the learned part, on the weights' device, for
                                                   the features of one segment or of many
                                                   concatenated by `cat_features`.
`forward(data)` is `project(prepare(data)[0])` with the positions moved to the weights' device.
A segment may also come already prepared, as a `Prepared`: the model then skips `prepare` (the
trainer keeps its examples so, and an example seen again costs no checks and no spectrogram).

`build_embedders` returns them as an nn.ModuleDict keyed by modality name; `MODALITIES` maps
each name to its modality id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from generalist.ops import _attention_checks as checks

from .audio import AudioConfig, AudioEmbed, log_mel, resample
from .image import ImageConfig, ImageEmbed
from .table import TableConfig, TableEmbed
from .text import SPECIAL_TOKENS, TextConfig, TextEmbed, TextTokenizer
from .video import VideoConfig, VideoEmbed

MODALITIES: dict[str, int] = {"text": 0, "image": 1, "audio": 2, "video": 3, "table": 4}

# name -> (config class, embedder class)
EMBEDDERS: dict[str, tuple[type, type[nn.Module]]] = {
    "text": (TextConfig, TextEmbed),
    "image": (ImageConfig, ImageEmbed),
    "audio": (AudioConfig, AudioEmbed),
    "video": (VideoConfig, VideoEmbed),
    "table": (TableConfig, TableEmbed),
}


@dataclass(frozen=True)
class Prepared:
    """A segment's `prepare` output, (features, positions_L3), taken by the model in place of the
    segment's raw data. It belongs to embedders of the config that made it (patch sizes, mel
    bins, the weights' dtype for tables): `prepare` of the model that will read it."""

    features: Tensor | tuple[Tensor, ...]
    positions: Tensor


def check_prepared(embedder: nn.Module, prepared: Prepared) -> tuple[Tensor | tuple[Tensor, ...], Tensor]:
    """(features, positions) of a `Prepared` segment, checked against the embedder that will read
    it: positions an int tensor (L, 3), every feature field L rows, patches as wide as the
    embedder's projection, and (on the host, where reading them is free) positions inside
    `max_positions`. A Prepared made by another config would otherwise fail deep in the model
    (a matmul's shapes, an embedding's index)."""
    features, positions = prepared.features, prepared.positions
    fields = features if isinstance(features, tuple) else (features,)
    if not isinstance(positions, Tensor) or positions.dim() != 2 or positions.shape[1] != 3 \
            or positions.dtype not in (torch.int32, torch.int64):
        shape = (f"{positions.dtype} {tuple(positions.shape)}" if isinstance(positions, Tensor)
                 else type(positions).__name__)
        raise ValueError(f"Prepared positions must be an int tensor (L, 3); got {shape}")
    n = positions.shape[0]
    if not all(isinstance(f, Tensor) and f.dim() >= 1 and f.shape[0] == n for f in fields):
        shapes = [tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__ for f in fields]
        raise ValueError(f"Prepared features must be tensors of {n} rows, one per position; got {shapes}")
    proj = getattr(embedder, "proj", None)
    if isinstance(proj, nn.Linear) and (features.dim() != 2 or features.shape[1] != proj.in_features):
        raise ValueError(f"Prepared {embedder.modality} features have shape {tuple(features.shape)}, but this model's "
                         f"{embedder.modality} embedder takes (L, {proj.in_features}) (made by another config?)")
    # the values, where reading them costs no device sync, once per tensor (the trainer's
    # prepared examples come back every epoch)
    bound = embedder.max_positions
    if n and positions.device.type == "cpu" and not checks.checked_before(positions, ("prepared", bound)):
        top = positions.amax(0).tolist()
        if int(positions.min()) < 0 or any(t >= b for t, b in zip(top, bound)):
            raise ValueError(f"Prepared positions reach {tuple(top)}, but this model's {embedder.modality} embedder "
                             f"holds positions below {tuple(bound)} (made by another config?)")
        checks.remember_checked(positions, ("prepared", bound))
    ids = None  # the ids an embedding looks up: text's tokens, a table's columns
    if embedder.modality == "text":
        ids, n_ids, what = features, embedder.cfg.vocab_size, "token ids"
    elif embedder.modality == "table":
        ids, n_ids, what = fields[0], embedder.cfg.n_columns, "column ids"
    if ids is not None and ids.dtype not in (torch.int32, torch.int64):  # what `prepare` makes, and the lookup takes
        raise ValueError(f"Prepared {what} must be int64 (or int32), got {ids.dtype}")
    if ids is not None and n and ids.device.type == "cpu" and not checks.checked_before(ids, ("prepared ids", n_ids)):
        if int(ids.min()) < 0 or int(ids.max()) >= n_ids:
            raise ValueError(f"Prepared {what} must be integers in [0, {n_ids}) for this model (made by another "
                             f"config?)")
        checks.remember_checked(ids, ("prepared ids", n_ids))
    return features, positions


def cat_features(parts: list, device: torch.device) -> Tensor | tuple[Tensor, ...]:
    """The features of many segments of one modality (`prepare`'s first outputs, each a tensor
    or a tuple of tensors) concatenated along their first axis, field by field. Parts on
    different devices all move to `device` first; otherwise they are joined where they are (one
    copy to the weights' device then follows in `project`)."""
    if isinstance(parts[0], tuple):
        return tuple(cat_features(list(field), device) for field in zip(*parts))
    if len({p.device for p in parts}) > 1:
        parts = [p.to(device) for p in parts]
    return torch.cat(parts)


def build_embedders(d_model: int, text_vocab_size: int,
                    configs: dict[str, Any] | None = None) -> nn.ModuleDict:
    """One embedder per modality, keyed by name in `MODALITIES` order.

    configs maps a modality name to its config (overriding the default), to a dict of that
    config's fields (as stored in a checkpoint's JSON), or to None (leaving that modality out). The text config defaults to TextConfig(text_vocab_size); a given one
    must agree with text_vocab_size.
    """
    configs = dict(configs or {})
    unknown = sorted(set(configs) - set(EMBEDDERS))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; known: {list(MODALITIES)}")
    embedders = nn.ModuleDict()
    for name in MODALITIES:
        config_cls, embed_cls = EMBEDDERS[name]
        if name in configs and configs[name] is None:
            continue
        if name in configs:
            cfg = configs[name]
            if isinstance(cfg, dict):
                fields = {"vocab_size": text_vocab_size, **cfg} if name == "text" else cfg
                try:
                    cfg = config_cls(**fields)
                except TypeError as error:
                    raise ValueError(f"configs[{name!r}]: {error}") from None
            if not isinstance(cfg, config_cls):
                raise ValueError(f"configs[{name!r}] must be of type {config_cls.__name__}; "
                                 f"got {type(cfg).__name__}")
        else:
            cfg = TextConfig(text_vocab_size) if name == "text" else config_cls()
        if name == "text" and cfg.vocab_size != text_vocab_size:
            raise ValueError(f"configs['text'].vocab_size is {cfg.vocab_size} but "
                             f"text_vocab_size is {text_vocab_size}")
        embedders[name] = embed_cls(cfg, d_model)
    return embedders


__all__ = [
    "MODALITIES", "EMBEDDERS", "build_embedders", "cat_features", "Prepared", "SPECIAL_TOKENS",
    "TextTokenizer", "TextConfig", "TextEmbed", "ImageConfig", "ImageEmbed",
    "AudioConfig", "AudioEmbed", "log_mel", "resample", "VideoConfig", "VideoEmbed",
    "TableConfig", "TableEmbed",
]
