"""The multi-task training loop.

One step: draw a batch of (task, example) pairs from the temperature-sampled mixture, run the
model on the packed batch (text loss for generative tasks, plus the contrastive loss between
the non-text segments and the target text for contrastive tasks, plus the MoE aux losses),
AdamW with linear warm-up and cosine decay, gradient clipping. A non-finite loss or gradient
skips the step (it never reaches the weights); `max_bad_steps` in a row stop the run.
Checkpoints (atomic, see checkpoint.py) every `ckpt_every` steps and at the end; `resume`
continues exactly where the checkpoint left off: on CPU a killed-and-resumed run gives the same
losses, step for step, as one never interrupted. SIGTERM or SIGINT stops the run after the
current step with a checkpoint (a second one stops it at once).

Under torchrun (WORLD_SIZE > 1) the same loop runs data parallel (see distributed.py): every
rank draws the same global batch and takes its slice, DDP averages the gradients (with
`expert_parallel`, the routed experts are sharded over the ranks instead), and only rank 0 logs,
shows progress and writes checkpoints, holding the global numbers.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from generalist.data.packing import EncodedExample, ExampleEncoder
from generalist.data.tasks import discover
from generalist.modalities import MODALITIES, Prepared, TextTokenizer
from generalist.modalities.text import N_BYTES, SPECIAL_TOKENS
from generalist._fields import check_keys, check_types
from generalist.models.config import GeneralistConfig, preset
from generalist.models.generalist import GeneralistModel
from generalist.train.checkpoint import (check_run_dir, find_checkpoint, load_training_state, replace_file, rng_state,
                                         run_meta, save_checkpoint, set_rng_state, STATE_KEYS)
from generalist.train.data import TaskData, check_requires, split_fingerprint
from generalist.train.distributed import DEFAULT_TIMEOUT_S, DataParallel, Distributed, check_batch
from generalist.train.mixture import MixtureSampler
from generalist.train.report import log_record


@dataclass
class TrainConfig:
    preset: str = "demo"
    mixture: str = "demo"
    out: str = "runs/demo"
    steps: int = 1000
    max_minutes: float | None = None  # stop (with a checkpoint) when this much training time has passed
    # (the time of the steps: checkpoint writes, data building and evaluation come on top); the
    # learning-rate schedule then follows whichever budget, steps or time, runs out first
    batch_size: int = 64  # examples per micro-batch (the demo learns most per minute at 64 on 2 CPU cores)
    accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50  # steps of linear warm-up (at most `steps`)
    weight_decay: float = 0.05  # AdamW's, on the matrices (not embedding tables, norms, biases: decay_split)
    grad_clip: float = 1.0
    temperature: float = 2.0
    contrastive_weight: float = 0.5
    freq_warp: float = 0.15  # training sounds only: the frequencies of an example's audio segments are moved
    # by a random factor in [1 - w, 1 + w], drawn anew at every step that draws the example (vocal tract
    # length perturbation: AudioEmbed.warp), so that a model that heard a few voices understands others. 0: off
    contrastive_batch: int = 0  # pairs drawn for the contrastive loss alone, per micro-batch, from the
    # contrastive tasks (0: only the ones the mixture puts into the batch, a few when such tasks are few)
    vocab_size: int = 1024
    seed: int = 0
    ckpt_every: int = 100
    log_every: int = 10
    max_bad_steps: int = 5
    bf16: bool = True  # autocast on CUDA only
    compile: bool = False  # torch.compile every transformer block (GeneralistModel.compile_blocks): the
    # first step waits for the compiles (about a minute on 2 CPU cores), later ones launch fused kernels;
    # composes with DDP, fsdp and expert_parallel (whose collectives run eagerly between the graphs)
    model: dict = field(default_factory=dict)  # GeneralistConfig overrides, e.g. {"d_model": 96}
    dist_timeout_s: float = DEFAULT_TIMEOUT_S  # torchrun only: a collective waiting longer fails the run
    fsdp: bool = False  # torchrun only: FSDP2 (fully_shard) instead of DDP: each rank holds 1 / N of the weights,
    # gradients and optimizer state (with expert_parallel: of the dense ones; the experts are sharded by expert)
    expert_parallel: bool = False  # torchrun only: each rank holds n_routed / N of every MoE layer's
    # routed experts and tokens travel to them (n_routed must be a multiple of the number of processes)

    def __post_init__(self):
        # the warm-up against the steps waits for Trainer (or the command line) to call check():
        # a run is resumed from its saved options before --steps and --set change them
        self.check(schedule=False)

    def check(self, schedule: bool = True) -> None:
        """Every option's type and range (run again after options are changed in place), and with
        `schedule` the warm-up against the steps (left out while `--set` options come one by one)."""
        check_types(self, "")
        for name in ("steps", "batch_size", "accum", "ckpt_every", "log_every", "max_bad_steps", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "grad_clip", "temperature", "dist_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup", "seed", "weight_decay", "contrastive_weight", "contrastive_batch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, most in (("seed", MAX_SEED), ("vocab_size", MAX_VOCAB), ("batch_size", MAX_BATCH), ("accum", MAX_BATCH),
                           ("contrastive_batch", MAX_BATCH)):
            if getattr(self, name) > most:
                raise ValueError(f"{name} must be <= {most:,}, got {getattr(self, name):,}")
        if not 0 <= self.freq_warp < 1:
            raise ValueError(f"freq_warp must be in [0, 1), got {self.freq_warp}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        check_keys(GeneralistConfig, self.model, "model: ")
        trainer_sets = sorted(set(self.model) & set(TRAINER_SETS))
        if trainer_sets:
            raise ValueError(f"model: {trainer_sets[0]} is not an option: {TRAINER_SETS[trainer_sets[0]]}")
        if self.vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (the {N_BYTES} bytes and {len(SPECIAL_TOKENS)} special "
                             f"tokens), got {self.vocab_size}")
        if schedule and self.warmup > self.steps:
            raise ValueError(f"warmup ({self.warmup} steps) is longer than the run ({self.steps} steps): the "
                             f"learning rate would never reach lr; set warmup <= steps (--set warmup=N)")


PREPARED_CACHE_BYTES = 2 << 30  # the most host memory the trainer keeps prepared training segments in


def prepare_example(model: GeneralistModel, ex: EncodedExample, name: str = "example") -> tuple[EncodedExample, int]:
    """`ex` with every segment through `model`'s embedder `prepare` (a `Prepared`), and the bytes
    its features and positions hold. A bad segment's ValueError is named by `name`, segment and
    modality; a modality the model lacks is left as it is (the model's own check names it)."""
    segments, nbytes = [], 0
    for j, (modality, data) in enumerate(ex.segments):
        if modality in model.embedders:
            try:
                data = Prepared(*model.embedders[modality].prepare(data))
            except ValueError as error:
                raise ValueError(f"{name}, segment {j} ({modality}): {error}") from None
            features = data.features if isinstance(data.features, tuple) else (data.features,)
            nbytes += sum(t.nbytes for t in (*features, data.positions))
        segments.append((modality, data))
    return replace(ex, segments=segments), nbytes


MIN_VOCAB = N_BYTES + len(SPECIAL_TOKENS)  # the tokenizer's fixed symbols, before any merge
# the largest values taken: torch's seeds are 64-bit (and the extra pairs' sampler takes seed + 1);
# beyond these a tokenizer or a batch would fail deep inside, not name its option
MAX_SEED, MAX_VOCAB, MAX_BATCH = 2 ** 63 - 2, 2 ** 24, 2 ** 20

# model options the trainer sets itself, from the tokenizer and the mixture
TRAINER_SETS = {"vocab_size": "the tokenizer's size, set with --set vocab_size=N",
                "n_tasks": "the number of the mixture's tasks", "bos_id": "the tokenizer's <bos>",
                "eos_id": "the tokenizer's <eos>"}


def set_option(cfg: TrainConfig, assignment: str) -> TrainConfig:
    """Applies one `key=value` (`model.key=value` for the model config), values parsed as JSON
    when possible (numbers, true/false, null, lists, objects), else as a Python literal (.001,
    1., +2, True, None), else taken as strings."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            value = raw
    if key.startswith("model."):
        check_keys(GeneralistConfig, {key[6:]: value}, "model: ")
        cfg.model[key[6:]] = value
        cfg.check(schedule=False)
        return cfg
    names = {f.name for f in fields(TrainConfig)}
    if key not in names:
        raise ValueError(f"unknown training option {key!r}; options: {sorted(names)}")
    if key in ("out", "preset", "mixture"):  # where the run lives and what it is made of: the command's own flags
        raise ValueError(f"{key} is set with --{key}, not --set")
    setattr(cfg, key, value)
    cfg.check(schedule=False)  # the warm-up against the steps once every option is in (TrainConfig.check)
    return cfg


def check_mixture_options(cfg: TrainConfig, mixture: dict[str, dict]) -> None:
    """The options that depend on the mixture, from its sizes alone (`get_mixture`'s output):
    before its data is built, and before --overwrite deletes a run. (Trainer checks them on the
    data it gets.)"""
    tasks = discover()
    if any(t not in tasks for t in mixture):  # (get_mixture refuses those; Trainer checks the data it gets)
        return
    contrastive = [t for t, sizes in mixture.items() if tasks[t].contrastive and sizes.get("train") != 0]
    if cfg.contrastive_batch and not contrastive:
        raise ValueError(f"contrastive_batch is {cfg.contrastive_batch}, but no task of mixture {cfg.mixture!r} trains "
                         "the contrastive head")


def lr_at(step: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to min_lr_ratio * lr over the rest of
    the budget: the steps, or the time (`time_fraction` of max_minutes spent) if that runs out
    first. The time decays the warm-up too: a budget spent before the warm-up ends ends at the
    floor times the ramp reached, not mid-ramp at its height."""
    ramp = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    by_steps = max(0, step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, max(by_steps, time_fraction))
    return cfg.lr * ramp * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _fused_adamw_serves(params: list[torch.Tensor]) -> bool:
    """Whether AdamW's fused implementation (one kernel over every tensor, on CPU and CUDA: 4x
    faster than its per-tensor loop on a CPU for the demo preset's 109 tensors) takes `params`:
    not when FSDP's sharded (DTensor) parameters sit next to plain ones (the expert weights under
    expert parallelism)."""
    if not all(p.device.type in ("cpu", "cuda") for p in params):
        return False
    if not torch.distributed.is_available():
        return True
    from torch.distributed.tensor import DTensor

    return sum(isinstance(p, DTensor) for p in params) in (0, len(params))


def train_tokenizer(data: dict[str, TaskData], vocab_size: int) -> TextTokenizer:
    def texts():
        for td in data.values():
            for ex in td.train:
                if ex.target_text:
                    yield ex.target_text
                for modality, seg in ex.segments:
                    if modality == "text":
                        yield seg
    return TextTokenizer.train(texts(), vocab_size=vocab_size)


def decay_split(model, rule: str = "modules") -> tuple[list, list]:
    """(parameters AdamW decays, those it does not). "modules": the matrices decay; embedding
    tables (token, task, modality, axial positions), the boundary markers, norms, biases and the
    logit scale do not. "names", the split of runs saved before that one: matrices whose name
    holds no "emb" (which also left the embedders' projections undecayed, and decayed the axial
    tables and the boundary markers)."""
    if rule == "names":
        kept = [p.dim() >= 2 and "emb" not in n for n, p in model.named_parameters()]
    elif rule == "modules":
        tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        tables.add(id(model.boundary))
        kept = [p.dim() >= 2 and id(p) not in tables for p in model.parameters()]
    else:
        raise ValueError(f"unknown weight-decay rule {rule!r}")
    params = list(model.parameters())
    return [p for p, k in zip(params, kept) if k], [p for p, k in zip(params, kept) if not k]


class Trainer:
    def __init__(self, cfg: TrainConfig, data: dict[str, TaskData], resume: bool = False, progress: bool = True,
                 device: str | None = None):
        self.cfg, self.data = cfg, data
        cfg.check()
        # before hours of training, not at its evaluation
        check_requires(data, {t: d.task for t, d in data.items()}, every_task=False)
        if not any(d.train for d in data.values() if d.task.generative or d.task.contrastive):
            raise ValueError(f"no task of mixture {cfg.mixture!r} gives a training example (every train split is empty "
                             f"or its task trains nothing: {', '.join(sorted(data)) or 'no tasks'}): nothing to train on")
        self.group = Distributed.from_env(cfg.dist_timeout_s, device)  # None: one process, no torchrun
        self.main = self.group is None or self.group.main  # the rank that logs and saves
        self.progress = progress and self.main
        if self.group is not None:
            check_batch(cfg.batch_size, self.group.world, cfg.contrastive_batch)
            self.device = self.group.device
        else:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.run_dir = Path(cfg.out)
        check_run_dir(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tasks = sorted(data)
        # what every checkpoint's meta.json says of the data (with the training options): the
        # tasks, how each answers, the input modalities each trained on (inference warns of
        # others) and its test split's fingerprint (evaluation warns when a split changed)
        self.data_meta = {"tasks": self.tasks, "generative": [t for t in self.tasks if data[t].task.generative],
                          "contrastive": [t for t in self.tasks if data[t].task.contrastive],
                          "modalities": {t: sorted({m for ex in d.train for m, _ in ex.segments})
                                         for t, d in data.items() if d.train},
                          "test_splits": {t: split_fingerprint(d.test) for t, d in data.items() if d.test}}
        ckpt = None
        if resume:
            ckpt = find_checkpoint(self.run_dir)
            trained, _ = run_meta(ckpt)
            if trained != self.tasks:
                raise ValueError(f"{ckpt} was trained on tasks {trained}, this run has {self.tasks}")
            self.model = GeneralistModel.load(ckpt, device=self.device)
            self.tokenizer = GeneralistModel.load_tokenizer(ckpt)
        else:
            torch.manual_seed(cfg.seed)
            if self.group is None:
                self.tokenizer = train_tokenizer(data, cfg.vocab_size)
            else:  # one tokenizer for every rank: rank 0's
                text = train_tokenizer(data, cfg.vocab_size).to_json() if self.main else None
                self.tokenizer = TextTokenizer.from_json(self.group.broadcast_object(text))
            mcfg = preset(cfg.preset, vocab_size=self.tokenizer.vocab_size, n_tasks=len(self.tasks),
                          bos_id=self.tokenizer.token_id("<bos>"), eos_id=self.tokenizer.token_id("<eos>"), **cfg.model)
            self.model = GeneralistModel(mcfg).to(self.device)
        self.encoder = ExampleEncoder(self.tokenizer, self.tasks)
        if cfg.compile:
            self.model.compile_blocks()
        # before the optimizer: expert parallelism and FSDP replace parameters
        self.dp = DataParallel(self, self.group) if self.group is not None else None
        if self.group is not None and self.model.cfg.capacity_factor is not None and self.main:
            warnings.warn("model.capacity_factor caps each expert by the tokens of each rank's own slice, so a run "
                          "under torchrun drops other tokens than one process with the same batch", stacklevel=2)
        if self.group is None and (cfg.expert_parallel or cfg.fsdp) and not resume:  # (resumed: the run's options,
            # set when it ran under torchrun, which one process may resume)
            warnings.warn("expert_parallel and fsdp have no effect in a single process; launch with torchrun "
                          "--nproc-per-node N", stacklevel=2)
        # which parameters decay: by module type; a run saved before that keeps the split it had,
        # by name (its optimizer state holds those two groups)
        self.decay_rule = "modules"
        if ckpt is not None:
            try:
                saved = json.loads((ckpt / "state.json").read_text())
            except (OSError, ValueError):
                saved = None  # (load_training_state names the problem below)
            whole = isinstance(saved, dict) and all(k in saved for k in STATE_KEYS)
            self.decay_rule = saved.get("decay_rule", "names") if whole else "modules"  # (damaged: named below)
            if self.decay_rule not in ("names", "modules"):
                raise ValueError(f"{ckpt / 'state.json'} is damaged: decay_rule is {self.decay_rule!r}, not "
                                 "'modules' or 'names'")
        decay, no_decay = decay_split(self.model, self.decay_rule)
        fused = _fused_adamw_serves(decay + no_decay) or None
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                                     fused=fused)
        trainable = {t: len(d.train) for t, d in data.items() if d.train and (d.task.generative or d.task.contrastive)}
        untrained = sorted(t for t, d in data.items() if not d.train and (d.task.generative or d.task.contrastive))
        if untrained and self.main:  # (zero_shot trains nothing of its own, by design: not generative)
            warnings.warn(f"{', '.join(map(repr, untrained))} trains on no example (the mixture gives it none): it is "
                          "evaluated untrained", stacklevel=2)
        self.sampler = MixtureSampler(trainable, cfg.temperature, cfg.seed)
        # the extra contrastive pairs have a sampler (and random stream) of their own, so the
        # mixture's batches are the same with them as without
        contrastive = {t: n for t, n in trainable.items() if data[t].task.contrastive}
        if cfg.contrastive_batch and not contrastive:
            raise ValueError(f"contrastive_batch is {cfg.contrastive_batch}, but no task of this mixture trains the "
                             "contrastive head")
        self.con_sampler = MixtureSampler(contrastive, cfg.temperature, cfg.seed + 1) if cfg.contrastive_batch else None
        self.step, self.bad_in_row, self.skipped = 0, 0, 0
        self.stopped_by: int | None = None  # the signal that ended fit() early (SIGTERM, SIGINT)
        self.elapsed = 0.0  # seconds of training so far, over every resume
        n_layers = self.model.cfg.enc_layers + self.model.cfg.dec_layers
        self.routing = {"task": np.zeros((n_layers, len(self.tasks), self.model.cfg.n_routed), dtype=np.int64),
                        "modality": np.zeros((n_layers, len(MODALITIES), self.model.cfg.n_routed), dtype=np.int64)}
        self._encoded: dict[tuple[str, int], object] = {}
        self._prepared_bytes = 0  # held by the prepared segments in self._encoded
        self._signals = _StopSignals()  # fit() installs its handlers while it trains
        if ckpt is not None:
            state = load_training_state(ckpt, self.opt, self.dp.shard_optimizer_state if self.dp else None)
            for group, decay_rate in zip(self.opt.param_groups, (cfg.weight_decay, 0.0)):
                group["fused"] = fused  # a checkpoint's own choice was for its own layout
                group["weight_decay"] = decay_rate  # the run's option (--set on resume), not the saved one
            try:
                self._restore(state, ckpt / "state.json")
            except (KeyError, TypeError, AttributeError, IndexError, RuntimeError) as error:
                reason = f"no {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]
                raise ValueError(f"{ckpt / 'state.json'} is damaged: {reason}") from None
            if cfg.steps < self.step:  # (equal: a finished run, resumed again, trains no more)
                raise ValueError(f"{ckpt} is at step {self.step}, past the {cfg.steps} steps asked for: pass more "
                                 "steps to train on (generalist eval evaluates it as it is)")
            if self.main:
                self._truncate_log(self.step)
        elif self.main:  # a fresh run: the logs of one killed before its first checkpoint go
            self._truncate_log(0)
            shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)
        self._prepare_data()  # (after the checks of a resumed state, which take no time)

    def _restore(self, state: dict, path: Path) -> None:
        """The counters, samplers, routing counts and random streams of a saved state (read from
        `path`, which its errors name)."""
        for key in ("step", "skipped", "bad_in_row"):
            value = state.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{path} is damaged: {key} is {value!r}, not a count")
        elapsed = state.get("elapsed", 0.0)
        if not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool) or not 0 <= elapsed < math.inf:
            raise ValueError(f"{path} is damaged: elapsed is {elapsed!r}, not a number of seconds")
        self.step, self.skipped = state["step"], state["skipped"]
        self.bad_in_row = state.get("bad_in_row", 0)  # a streak of non-finite steps goes on counting
        self.elapsed = float(elapsed)
        self.sampler.load_state_dict(state["sampler"], f"{path} is damaged: sampler: ")
        if self.con_sampler is not None and "con_sampler" in state:  # (absent: saved without extra pairs)
            self.con_sampler.load_state_dict(state["con_sampler"], f"{path} is damaged: con_sampler: ")
        try:
            routing = {k: np.array(state["routing"][k], dtype=np.int64) for k in self.routing}
        except (ValueError, OverflowError) as error:
            raise ValueError(f"{path} is damaged: routing holds something other than counts ({error})") from None
        for k, counts in routing.items():
            if counts.shape != self.routing[k].shape:
                raise ValueError(f"{path} is damaged: routing[{k!r}] has shape {counts.shape}, this model's "
                                 f"{self.routing[k].shape}")
        self.routing = routing
        rng = state["rng"]  # rank 0's; a run saved by as many ranks as this one also has each rank's
        if self.group is not None and len(state.get("rng_ranks", [])) == self.group.world:
            rng = state["rng_ranks"][self.group.rank]
        set_rng_state(rng)

    def _prepare_data(self) -> None:
        """Every segment of both splits through its embedder's checks (`prepare`: shapes, sizes,
        values) before the first step: a bad image, clip or table row is named by task, split
        and example now, not when a step first draws it or when the final evaluation reaches it
        (the data's build checked only the examples' form). The training examples are kept as
        `_encode` keeps them, so no step prepares one again; the test examples are only checked."""
        todo = [(t, split, i) for t in self.tasks for split in ("train", "test")
                for i in range(len(getattr(self.data[t], split)))]
        for t, split, i in tqdm(todo, desc="check data", unit="ex", disable=not self.progress, mininterval=1,
                                delay=2, dynamic_ncols=True):  # (shown only when it takes a while)
            if split == "train":
                self._kept(t, i)
            else:
                prepare_example(self.model, self.encoder.encode(self.data[t].test[i]), f"task {t!r}, test example {i}")

    # ---- one step -----------------------------------------------------------------------------
    def _encode(self, task: str, i: int):
        """A training example as `_kept` keeps it, augmented for this step (`_augment`)."""
        return self._augment(task, i, self._kept(task, i))

    def _kept(self, task: str, i: int) -> EncodedExample:
        """A training example tokenized and its segments prepared (`Prepared`), once (all of
        them before the first step, `_prepare_data`): an example seen again costs no checks, no
        patch cutting and no spectrogram. Past PREPARED_CACHE_BYTES of prepared features,
        examples are kept tokenized only (the model prepares them)."""
        key = (task, i)
        if key not in self._encoded:
            ex = self.encoder.encode(self.data[task].train[i])
            kept, nbytes = prepare_example(self.model, ex, f"task {task!r}, training example {i}")
            if self._prepared_bytes + nbytes <= PREPARED_CACHE_BYTES:
                self._prepared_bytes += nbytes
                ex = kept
            self._encoded[key] = ex
        return self._encoded[key]

    def _augment(self, task: str, i: int, ex: EncodedExample) -> EncodedExample:
        """`ex` with its audio segments' frequencies warped (`freq_warp`), all of them by one
        factor (one speaker). The factor is drawn from the run's seed, the step, the task and the
        example's index alone, so a resumed run and a run under torchrun (any number of ranks)
        draw the same factors as one process; an example drawn twice in one step (an epoch ending
        inside the batch, accumulated micro-batches, extra contrastive pairs) is warped alike."""
        embedder = self.model.embedders["audio"] if "audio" in self.model.embedders else None
        if not self.cfg.freq_warp or embedder is None or not any(m == "audio" for m, _ in ex.segments):
            return ex
        rng = np.random.default_rng([self.cfg.seed, self.step, zlib.crc32(task.encode()), i])
        alpha = float(rng.uniform(1 - self.cfg.freq_warp, 1 + self.cfg.freq_warp))
        segments = []
        for modality, data in ex.segments:
            if modality == "audio":
                if not isinstance(data, Prepared):  # kept raw past the prepared cache's bytes (checked by then)
                    data = Prepared(*embedder.prepare(data))
                data = embedder.warp(data, alpha)
            segments.append((modality, data))
        return replace(ex, segments=segments)

    def _contrastive_pairs(self, con: list[tuple[str, int]]) -> tuple[list, list]:
        """Encoded (non-text inputs, target text) pairs of contrastive examples, from the kept
        (prepared) training examples."""
        inputs, texts = [], []
        for t, i in con:
            ex = self._encode(t, i)
            if not len(ex.target_ids):
                raise ValueError(f"task {t!r}, training example {i}: a contrastive example needs a target text")
            segments = [s for s in ex.segments if s[0] != "text"] or ex.segments
            inputs.append(EncodedExample(segments, ex.task_id))
            texts.append(EncodedExample([("text", ex.target_ids)], ex.task_id))
        return inputs, texts

    def _micro_batch_loss(self, picks: list[tuple[str, int]], extra: list[tuple[str, int]] = (),
                          lm_scale: float = 1.0, con_scale: float = 1.0):
        """(loss, pending, tokens). `extra`: contrastive examples for the contrastive loss alone.
        `lm_scale`, `con_scale` weigh the text loss and the contrastive loss (`step_scales`).
        `pending` holds the per-example losses and the routing counts on the device; _collect
        reads them back after the backward is queued, in one transfer each, rather than syncing
        with the device once per example before it."""
        gen = [(t, i) for t, i in picks if self.data[t].task.generative]
        con = [(t, i) for t, i in picks if self.data[t].task.contrastive] + list(extra)
        total = torch.zeros((), device=self.device)
        pending = {"names": [], "losses": [], "task": None, "modality": None, "aux": None}
        tokens = 0
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16 and self.device.type == "cuda"):
            if gen:
                batch = [self._encode(t, i) for t, i in gen]
                out = self.model(batch)
                total = total + out.loss + (lm_scale - 1) * out.lm_loss  # (out.loss: lm_loss + aux_loss)
                pending["aux"] = out.aux_loss.detach()
                lens = [len(ex.target_ids) + 1 for ex in batch]
                ce = F.cross_entropy(out.logits.float(), out.labels, reduction="none").detach()
                pending["names"] += [t for t, _ in gen]
                pending["losses"].append(torch.stack([part.mean() for part in ce.split(lens)]))
                tokens += int(out.labels.numel()) + out.n_input_tokens
                if out.moe_stats:
                    pending["task"] = torch.stack([st.counts_by_task for st in out.moe_stats])
                    pending["modality"] = torch.stack([st.counts_by_modality for st in out.moe_stats])
            if len(con) >= 2:
                inputs, texts = self._contrastive_pairs(con)
                a = self.model.embed(inputs)
                b = self.model.embed(texts)
                closs = self.model.contrastive_loss(a, b)
                total = total + self.cfg.contrastive_weight * con_scale * closs
                pending["names"].append("contrastive")
                pending["losses"].append(closs.detach().float().reshape(1))
        if not total.requires_grad:  # nothing to learn from (one contrastive pair, no text target):
            # a zero gradient for the logit scale, as under torchrun, so that the backward runs
            total = total + 0.0 * self.model.logit_scale.sum()
        return total, pending, tokens

    def step_scales(self, draws: list[tuple[list, list]]) -> list[tuple[float, float]]:
        """(lm_scale, con_scale) of each micro-batch of a step, from its (picks, extra): the text
        loss is each micro-batch's mean over its generative examples, and the contrastive loss is
        each one's over its pairs; each step divides their sum by accum. Scaled by accum times the
        micro-batch's share of the step's examples, every example of the step weighs the same, as
        in one batch of them all (1 with accum = 1). A micro-batch of fewer than two pairs has no
        contrastive loss, and takes no share."""
        task = {name: self.data[name].task for name in self.data}
        gen = [sum(task[t].generative for t, _ in picks) for picks, _ in draws]
        con = [sum(task[t].contrastive for t, _ in picks) + len(extra) for picks, extra in draws]
        con = [n if n >= 2 else 0 for n in con]
        k = len(draws)
        return [(k * g / sum(gen) if sum(gen) else 1.0, k * c / sum(con) if sum(con) else 1.0)
                for g, c in zip(gen, con)]

    def _collect(self, pending: dict, per_task: dict[str, list[float]]) -> None:
        """Adds a micro-batch's per-example losses to per_task and its routing counts to
        self.routing (host transfers: call it once the backward is queued)."""
        if pending["losses"]:
            for name, value in zip(pending["names"], torch.cat(pending["losses"]).tolist()):
                per_task.setdefault(name, []).append(value)
        for key in ("task", "modality"):
            if pending[key] is not None:
                self.routing[key] += pending[key].cpu().numpy()

    def train_step(self) -> dict:
        cfg = self.cfg
        spent = self.elapsed / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
        lr = lr_at(self.step, cfg, spent)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        losses, per_task, tokens, finite, auxes = [], {}, 0, True, []
        routing = {k: v.copy() for k, v in self.routing.items()}  # (restored if the step is skipped)
        # every micro-batch's picks first (two samplers, two random streams: the same picks as
        # drawn one by one), so that each example weighs the same however they fall (step_scales)
        draws = [(self.sampler.sample(cfg.batch_size),
                  self.con_sampler.sample(cfg.contrastive_batch) if self.con_sampler is not None else [])
                 for _ in range(cfg.accum)]
        for micro, ((picks, extra), (lm_scale, con_scale)) in enumerate(zip(draws, self.step_scales(draws))):
            if self.dp is not None:  # the same global loss on every rank, so they all agree to skip
                loss, pt, n, aux = self.dp.micro_batch(picks, 1 / cfg.accum, sync=micro == cfg.accum - 1,
                                                       extra=extra, lm_scale=lm_scale, con_scale=con_scale)
                auxes.append(aux)
                if not math.isfinite(loss):
                    finite = False
                    break
                losses.append(loss)
                for k, v in pt.items():
                    per_task.setdefault(k, []).extend(v)
            else:
                loss, pending, n = self._micro_batch_loss(picks, extra, lm_scale, con_scale)
                # backward first, then read the loss: the check needs the host, and a non-finite
                # loss's (non-finite) gradients are dropped with the step below
                (loss / cfg.accum).backward()
                value = loss.item()
                if not math.isfinite(value):
                    finite = False
                    break
                losses.append(value)
                self._collect(pending, per_task)
                # (a micro-batch without generative examples runs no MoE layer: 0, as under torchrun)
                auxes.append(float(pending["aux"]) if pending["aux"] is not None else 0.0)
            tokens += n
        grad_norm = float("nan")
        if finite:
            grad_norm = (self.dp.clip_grad_norm(cfg.grad_clip) if self.dp is not None else
                         float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)))
            finite = math.isfinite(grad_norm)
        if finite:
            self.opt.step()
            self.bad_in_row = 0
        else:
            self.opt.zero_grad(set_to_none=True)
            if self.dp is not None:
                self.dp.discard()
            # a skipped step's micro-batches count nowhere: not in the routing, nor in the log's losses
            self.routing, losses, per_task, auxes = routing, [], {}, []
            self.bad_in_row += 1
            self.skipped += 1
            if self.main:
                tqdm.write(f"step {self.step}: non-finite loss or gradient, step skipped ({self.bad_in_row} in a row)")
            if self.bad_in_row >= cfg.max_bad_steps:
                raise FloatingPointError(f"{self.bad_in_row} steps in a row had a non-finite loss or gradient "
                                         f"(last at step {self.step}); stopping. Lower the learning rate or check the data.")
        self.step += 1
        return {"step": self.step, "lr": lr, "loss": float(np.mean(losses)) if losses else float("nan"),
                "grad_norm": grad_norm, "skipped": not finite, "tokens": tokens,
                "aux_loss": float(np.mean(auxes)) if auxes else float("nan"),  # the MoE router losses, weighted
                "task_loss": {k: float(np.mean(v)) for k, v in per_task.items()}}

    # ---- the loop -----------------------------------------------------------------------------
    def _truncate_log(self, step: int) -> None:
        """Drops log lines written after the checkpoint we resume from (they will be redone), or
        every line (step 0), and a last line cut short by a kill."""
        log = self.run_dir / "metrics.jsonl"
        if log.is_file():
            keep = [line for line in log.read_text(errors="replace").splitlines() if _logged_step(line) <= step]
            # never in place: a kill between emptying the file and writing it back would lose the run's log
            replace_file(log, "".join(line + "\n" for line in keep))

    def save(self) -> Path | None:
        """Every rank calls it; rank 0 writes the (unwrapped) model and returns the checkpoint."""
        state = {"step": self.step, "skipped": self.skipped, "bad_in_row": self.bad_in_row, "elapsed": self.elapsed,
                 "decay_rule": self.decay_rule,
                 "sampler": self.sampler.state_dict(), "rng": rng_state(),
                 **({"con_sampler": self.con_sampler.state_dict()} if self.con_sampler is not None else {}),
                 "routing": {k: v.tolist() for k, v in self.routing.items()}}
        model_state, opt_state = None, None
        if self.group is not None:
            state["rng_ranks"] = self.group.gather_objects(state["rng"])
            model_state, opt_state = self.dp.full_state()  # expert-parallel: gathered on rank 0
            if not self.main:
                return None
        meta = {**self.data_meta, "train": asdict(self.cfg)}
        return save_checkpoint(self.run_dir, self.model, self.tokenizer,
                               opt_state if opt_state is not None else self.opt.state_dict(), state, meta, model_state)

    def fit(self) -> None:
        """Trains up to cfg.steps (or the time budget). SIGTERM or SIGINT meanwhile end the run
        after the current step with a checkpoint; `stopped_by` then holds the signal's number."""
        self.stopped_by = None
        try:
            with _StopSignals() as self._signals:
                if self.group is None:
                    self._fit()
                else:
                    with self.group.guard():
                        self._fit()
                    self.group.barrier()  # leave together, once rank 0's last checkpoint is written
                self._signals.handled = self.stopped_by is not None
        finally:
            if self.group is not None:
                self.group.close()  # only if this trainer initialised the process group

    def _fit(self) -> None:
        cfg = self.cfg
        self.model.train()
        writer = _tensorboard(self.run_dir) if self.main else None
        # the bar counts steps, or training seconds when a time budget is set (whichever ends the
        # run is not known in advance; the postfix always shows the step)
        timed = cfg.max_minutes is not None
        bar = tqdm(total=round(60 * cfg.max_minutes) if timed else cfg.steps,
                   initial=min(round(self.elapsed), round(60 * cfg.max_minutes)) if timed else self.step,
                   unit="s" if timed else "it", desc="train", disable=not self.progress, dynamic_ncols=True)
        # all three are closed however the loop ends, so an error prints after the bar's last line
        with open(self.run_dir / "metrics.jsonl" if self.main else os.devnull, "a") as log, bar, \
                (writer if writer is not None else contextlib.nullcontext()):
            if self.main and self.step >= cfg.steps and self.step:  # a finished run, resumed as it was
                tqdm.write(f"the run is already at step {self.step} of {cfg.steps}: nothing to train (pass more --steps "
                           "to train on)")
            elif self.main and timed and self.elapsed > 60 * cfg.max_minutes:
                tqdm.write(f"the time budget of {cfg.max_minutes:g} min is already spent ({self.elapsed / 60:.2f} min "
                           f"trained, up to step {self.step}): nothing to train (--max-minutes counts the run's whole "
                           "training time: pass a larger one to train on)")
            while self.step < cfg.steps:
                if timed and self.elapsed > 60 * cfg.max_minutes:  # resumed after its budget ran out
                    break
                t0 = time.time()
                rec = self.train_step()
                dt = time.time() - t0
                stop = self._signals.received or 0
                if self.group is not None:  # the ranks must agree on the time spent, and on a signal
                    # that one of them received: either ends the run, whose checkpoint every rank joins
                    dt, stop = self.group.max(dt, stop)
                    stop = int(stop)
                self.elapsed += dt
                rec["tokens_per_s"] = rec["tokens"] / max(1e-9, dt)
                log.write(json.dumps(rec) + "\n")
                if writer is not None:
                    writer.add_scalar("loss/total", rec["loss"], rec["step"])
                    for k, v in rec["task_loss"].items():
                        writer.add_scalar(f"loss/{k}", v, rec["step"])
                    writer.add_scalar("lr", rec["lr"], rec["step"])
                    for key in ("grad_norm", "aux_loss", "tokens_per_s"):
                        writer.add_scalar(key, rec[key], rec["step"])
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    log.flush()
                    bar.set_postfix_str(f"step {self.step} loss {rec['loss']:.3f} tok/s {rec['tokens_per_s']:.0f} " + " ".join(
                        f"{k[:8]} {v:.2f}" for k, v in sorted(rec["task_loss"].items())))
                bar.update(min(round(self.elapsed), bar.total) - bar.n if timed else 1)
                out_of_time = cfg.max_minutes is not None and self.elapsed > 60 * cfg.max_minutes
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or out_of_time or stop:
                    # on disk before the checkpoint that counts its lines: a power cut after the
                    # save must not leave a resume with a log shorter than its step
                    log.flush()
                    if self.main:
                        os.fsync(log.fileno())
                    ckpt = self.save()
                if stop:
                    self.stopped_by = stop
                    break
                if out_of_time:
                    if self.main:
                        tqdm.write(f"time budget of {cfg.max_minutes} min reached at step {self.step}; checkpoint saved")
                    break
        if self.stopped_by is not None and self.main:  # below the bar's last line, where the shell prompt follows
            print(f"{signal.Signals(self.stopped_by).name} received: stopped at step {self.step} of {cfg.steps} with a "
                  f"checkpoint in {ckpt}; continue with generalist train --out {cfg.out} --resume", file=sys.stderr)
        self.model.eval()


class _StopSignals:
    """While training, SIGTERM (what schedulers send: SLURM, Kubernetes, docker stop) and SIGINT
    set `received` instead of ending the process, so that the loop stops after the current step
    with a checkpoint. A second one restores the handlers that were there before and delivers
    itself again: the process ends at once (SIGINT: a KeyboardInterrupt). One that repeats the
    first within REPEAT_S is the same request, not a second: torchrun forwards to its workers the
    signal it got, which a terminal's Ctrl-C or SLURM's scancel also sent them. On exit the previous
    handlers come back; a signal that came too late for the loop to act on (`handled` left
    False) is then delivered to them. Signals that were ignored stay ignored; outside the main
    thread (where Python cannot set handlers) nothing changes."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    REPEAT_S = 1.0

    def __init__(self):
        self.received: int | None = None
        self.since = 0.0  # time.monotonic() when `received` came
        self.handled = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                handler = signal.getsignal(signum)
                if handler is not signal.SIG_IGN:
                    self.previous[signum] = handler
                    signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received, self.since = signum, time.monotonic()
            return
        if signum == self.received and time.monotonic() - self.since < self.REPEAT_S:
            return
        self._restore()
        signal.raise_signal(signum)

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            # None: a handler installed outside Python, which getsignal cannot give back
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self.previous = {}

    def __exit__(self, kind, error, tb) -> None:
        self._restore()
        if kind is None and self.received is not None and not self.handled:
            signal.raise_signal(self.received)


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for one that is not a record (the write a kill
    cut short, a line edited by hand), so that it is dropped."""
    record = log_record(line)
    return math.inf if record is None else record["step"]


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.jsonl always has everything
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
