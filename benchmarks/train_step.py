"""Whole training steps of the generalist (forward, backward, AdamW) on a fixed batch of mixed
modalities and tasks: tokens per second, and how much of a step the GPU is busy.

    python benchmarks/train_step.py [--preset demo] [--batch 64] [--steps 10] [--quick] [--compile]
                                    [--profile] [--out results.md]

Run as the trainer runs a step: bf16 autocast on a GPU (fp32 on a CPU), gradient clipping and
AdamW (fused where the trainer fuses it, CPU included), the value checks on. The batch is
encoded once and packed as training packs it, in two rows: "prepared", its segments through
their embedders' `prepare` once, as the trainer keeps its training examples (`prepare_example`),
and "raw", embedded from raw data every step, as at an example's first use; with --compile a
third row, "compiled", the prepared batch through blocks compiled by `compile_blocks` (the wait
for the compiles, the first step, in a note below the table). Columns:
  step ms     a step end to end (the GPU waited on), median of --steps;
  tokens/s    input plus target tokens of the batch over that;
  issue ms    the time the step's Python takes to return without a final synchronize: on a GPU
              its host time plus the waits inside it (the value checks read each new batch
              tensor back, a wait for the GPU to catch up, once per tensor in the forward);
  GPU busy    (GPU, --profile) the CUDA kernels' time per step over the step time: well under
              100% means the GPU waits on the host;
and with --profile, the kernels that take most of a step. Benchmarks never assert.
"""

from __future__ import annotations

import argparse
import sys
import math
import statistics
import time

import torch

from _report import emit, exit_status, until_stopped

from generalist.data.packing import Example, ExampleEncoder
from generalist.modalities import TextTokenizer
from generalist.models.config import preset
from generalist.models.generalist import GeneralistModel
from generalist.train.trainer import _fused_adamw_serves, prepare_example

CORPUS = ["a photo of a small cat", "a sheep in a field", "the digit seven", "the digit three", "a spoken word",
          "a moving digit going left", "a table of measurements", "what is shown here", "how many digits are there",
          "an answer in a few words", "red green blue yellow", "one two three four five six seven eight nine"]
TASKS = ["caption", "classify", "vqa", "table", "echo"]


def make_examples(n: int, gen: torch.Generator) -> list[Example]:
    """n examples cycling through five kinds: image captioning, audio classification, image +
    question, a table, text to text (sizes of the demo mixture's inputs)."""
    t = torch.arange(16000) / 16000
    out = []
    for i in range(n):
        words = CORPUS[i % len(CORPUS)]
        kind = i % 5
        if kind == 0:
            out.append(Example([("image", torch.rand(3, 28, 28, generator=gen))], words, "caption"))
        elif kind == 1:
            wave = torch.sin(2 * math.pi * (200 + 40 * (i % 7)) * t) + 0.1 * torch.randn(t.shape, generator=gen)
            out.append(Example([("audio", (wave, 16000))], "the digit seven", "classify"))
        elif kind == 2:
            out.append(Example([("image", torch.rand(3, 32, 32, generator=gen)), ("text", "what is shown here")],
                               words, "vqa"))
        elif kind == 3:
            out.append(Example([("table", (torch.arange(12), torch.randn(12, generator=gen)))], "three", "table"))
        else:
            out.append(Example([("text", words + " " + CORPUS[(i + 3) % len(CORPUS)])], words, "echo"))
    return out


def gpu_busy_fraction(step, steps: int, step_s: float) -> tuple[float, list[str]]:
    """(CUDA kernel time per step / step time, the kernels that take most of it as lines)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
    total = sum(kernel_us(e) for e in kernels) / steps
    top = sorted(kernels, key=kernel_us, reverse=True)[:12]
    lines = ["", "CUDA kernels taking most of a step:", "", "| kernel | ms per step | calls per step |", "|---|---|---|"]
    lines += [f"| {e.key[:90]} | {kernel_us(e) / steps / 1e3:.3f} | {e.count / steps:.0f} |" for e in top]
    return total / 1e6 / step_s, lines


def graph_breaks() -> str:
    """What torch.compile split the compiled blocks at, so far in this process: each reason once,
    with its count (dynamo's counters)."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    if not breaks:
        return "Graph breaks in the compiled blocks: none."
    reasons = "; ".join(f"{n}x {' '.join(str(reason).split())[:200]}" for reason, n in breaks.most_common())
    return f"Graph breaks in the compiled blocks: {sum(breaks.values())} ({reasons})."


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="model preset (default: demo on a GPU, tiny on a CPU)")
    parser.add_argument("--batch", type=int, default=None, help="examples per step (default 64; 10 on a CPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--profile", action="store_true", help="(GPU) GPU busy time and the top kernels")
    parser.add_argument("--compile", action="store_true", help="also time the blocks compiled (compile_blocks)")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = args.preset or ("demo" if cuda else "tiny")
    b = args.batch or (64 if cuda else 10)
    steps = 3 if args.quick else args.steps

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tokenizer = TextTokenizer.train(CORPUS * 8, vocab_size=300)
    cfg = preset(name, vocab_size=tokenizer.vocab_size, n_tasks=len(TASKS), bos_id=tokenizer.token_id("<bos>"),
                 eos_id=tokenizer.token_id("<eos>"))
    model = GeneralistModel(cfg).to(device).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=_fused_adamw_serves(params) or None)
    encoder = ExampleEncoder(tokenizer, TASKS)
    examples = make_examples(b, gen)
    raw = [encoder.encode(e) for e in examples]
    batches = {"prepared": [prepare_example(model, ex)[0] for ex in raw], "raw": raw}
    if args.compile:
        batches["compiled"] = batches["prepared"]  # (the model's blocks are compiled before this row)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tokens = []

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # (the trainer also reads the norm back, for its log)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens.append(out.n_input_tokens + out.labels.numel())

    rows, notes, extra = [], [], []
    with until_stopped(notes):
        for kind, batch in batches.items():
            if kind == "compiled":
                model.compile_blocks()
                start = time.perf_counter()
                step(batch)
                sync()
                notes.append(f"\nThe compiled row's first step, which compiles: {time.perf_counter() - start:.1f} s.")
                notes.append(graph_breaks())
            for _ in range(2):  # warm-up: kernel compiles and tuning, allocator
                step(batch)
            sync()
            times, issue = [], []
            for _ in range(steps):
                start = time.perf_counter()
                step(batch)
                issue.append(time.perf_counter() - start)
                sync()
                times.append(time.perf_counter() - start)
            step_s = statistics.median(times)
            busy = "-"
            if args.profile and cuda:
                try:
                    fraction, top = gpu_busy_fraction(lambda: step(batch), min(steps, 3), step_s)
                    extra = extra or top  # the kernels of the first row's step
                    busy = f"{100 * fraction:.0f}%"
                except Exception as error:  # the profiler's API moves between torch versions: report, go on
                    notes.append(f"\n--profile failed: {type(error).__name__}: {error}")
            n_tokens = tokens[-1]
            rows.append((f"{name} B{b} {kind}", n_tokens, step_s, n_tokens / step_s, statistics.median(issue), busy))
            print(f"{name} B{b} {kind}: {step_s * 1e3:.1f} ms/step, {n_tokens / step_s:,.0f} tokens/s, issue "
                  f"{statistics.median(issue) * 1e3:.1f} ms, GPU busy {busy}", flush=True)

    where = f"{torch.cuda.get_device_name()}, bf16 autocast" if cuda else "CPU, fp32"
    lines = [f"training steps, {where}; torch {torch.__version__}; median of {steps} steps", "",
             "| model, batch | tokens | step ms | tokens/s | issue ms | GPU busy |", "|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2] * 1e3:.1f} | {r[3]:,.0f} | {r[4] * 1e3:.1f} | {r[5]} |" for r in rows]
    emit(lines + extra + notes, args.out, "model,tokens,issue_seconds,seconds,tokens_per_second",
         [(r[0], r[1], r[4], r[2], r[3]) for r in rows])


if __name__ == "__main__":
    main()
    sys.exit(exit_status())
