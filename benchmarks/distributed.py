"""Data-parallel training throughput on CPU: tokens/s of training steps in one process against N
processes under torchrun (gloo), at the same global batch.

    python benchmarks/distributed.py [--preset demo] [--batch 32] [--steps 10] [--pairs 3] [--nproc 2]

Providers, each a fresh launch that trains `--steps` steps on synthetic tasks (no dataset files:
28x28 images -> a label, text -> the same text, image-caption pairs for the contrastive head):
  PxT   P processes with T torch threads each (P > 1: `python -m torch.distributed.run
        --standalone --nproc-per-node P`); default 1x1, 1xN and Nx1, so N processes are compared
        with one process on the same N cores;
  PxT ep    the same with `expert_parallel=True` (each process holds n_routed / P experts);
  PxT fsdp  the same with `fsdp=True` (FSDP2 instead of DDP).
The figure per launch is the median over its steps after the first 3 (warm-up) of the global
tokens (encoder + decoder) per second that the trainer writes to metrics.jsonl (rank 0, from the
slowest rank's step time). Launches are interleaved (A B C A B C ...) and the median of the
per-round ratios to the first provider is reported. Benchmarks never assert.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

WARMUP = 3


def _tasks():
    from generalist.data.packing import Example
    from generalist.data.tasks import Task, check_split

    words = ["red", "green", "blue", "yellow", "black", "white", "small", "large", "round", "square"]

    class Shapes(Task):
        name = "shapes"

        def examples(self, split, limit=None, seed=0):
            check_split(split)
            rng = np.random.default_rng([seed, int(split == "train")])
            out = []
            for _ in range(limit or 64):
                k = int(rng.integers(10))
                img = rng.random((28, 28), dtype=np.float32) * 0.3
                img[2 * k:2 * k + 6, 2 * k:2 * k + 6] = 1.0
                out.append(Example([("image", torch.from_numpy(img))], f"shape {words[k]}", self.name))
            return out

    class Echo(Task):
        name = "echo"

        def examples(self, split, limit=None, seed=0):
            check_split(split)
            rng = np.random.default_rng([seed, 2 + int(split == "train")])
            out = []
            for _ in range(limit or 64):
                text = " ".join(rng.choice(words, size=int(rng.integers(3, 9))))
                out.append(Example([("text", text)], text, self.name))
            return out

    class Captions(Shapes):
        name = "captions"
        contrastive, generative = True, False

    return {t.name: t for t in (Shapes(), Echo(), Captions())}


def worker(args) -> None:
    from generalist.train.data import build_data
    from generalist.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    tasks = _tasks()
    data = build_data({name: {"train": 256, "test": 8} for name in tasks}, tasks=tasks, progress=False)
    cfg = TrainConfig(preset=args.preset, out=args.out, steps=args.steps, batch_size=args.batch, ckpt_every=10 ** 6,
                      log_every=1, vocab_size=300, warmup=2, expert_parallel=args.mode == "ep",
                      fsdp=args.mode == "fsdp")
    Trainer(cfg, data, progress=False).fit()


def launch(procs: int, threads: int, mode: str, args, out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    me = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--threads", str(threads),
          "--preset", args.preset, "--batch", str(args.batch), "--steps", str(args.steps), "--mode", mode]
    cmd = [sys.executable, *me] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *me]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # the worker's own error, not only its exit status
        raise SystemExit(f"{_name((procs, threads, mode))} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in recs[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--batch", type=int, default=32, help="global batch (examples per step)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=3, help="rounds of interleaved launches")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.steps <= WARMUP:
        parser.error(f"--steps must be more than the {WARMUP} warm-up steps, got {args.steps}")
    n = args.nproc
    providers = [(1, 1, ""), (1, n, ""), (n, 1, ""), (n, 1, "ep"), (n, 1, "fsdp")]
    rates: dict[tuple[int, int, str], list[float]] = {p: [] for p in providers}
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, preset {args.preset}, global batch {args.batch}, "
          f"{args.steps} steps per launch ({WARMUP} warm-up), {args.pairs} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.pairs):
            for p in providers:
                out = Path(tmp) / f"{p[0]}x{p[1]}{p[2]}-{r}"
                rates[p].append(launch(*p, args, out))
                print(f"  round {r}: {_name(p)}: {rates[p][-1]:.0f} tokens/s", flush=True)
    base = providers[0]
    print(f"\n{'provider':<22} {'median tokens/s':>16} {'ratio to 1x1 (median of rounds)':>32}")
    for p in providers:
        ratio = statistics.median(a / b for a, b in zip(rates[p], rates[base]))
        print(f"{_name(p):<22} {statistics.median(rates[p]):>16.0f} {ratio:>32.2f}")


def _name(p: tuple[int, int, str]) -> str:
    return f"{p[0]} proc x {p[1]} thread{'s' if p[1] > 1 else ''} {p[2]}".rstrip()


if __name__ == "__main__":
    main()
