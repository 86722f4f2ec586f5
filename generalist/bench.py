"""`generalist bench`: the model's ops on this machine, each backend against what PyTorch alone
would do with the same inputs, timed in one run.

    generalist bench [--ops attention,moe,decode] [--device cpu|cuda] [--dtype fp32|fp16|bf16]
                     [--quick] [--json FILE]

A row is one provider on one case and pass (fwd, or fwd+bwd): its median time, its rate (TFLOP/s
of useful work, or GB/s of KV cache read for decoding) and its speed against the case's baseline
(baseline time / provider time: above 1 is faster). The baselines:
- attention: torch SDPA. Dense cases call it as they are (`is_causal`); packed (varlen) cases
  give it the same batch padded to its longest sequence with a boolean mask, which is what SDPA
  needs for a mask it has no flag for, and the key / value heads repeated for every query head
  beforehand. Useful FLOPs count only the visible (query, key) pairs: 4·D·H per pair (H query
  heads) forward, 2.5 times that backward; padding and masked pairs earn nothing.
- MoE grouped matmul: one dense matmul of the same FLOPs (x (T, D) @ w (D, F); 2·T·D·F forward,
  3 times that with the backward) and, as a second row, a Python loop of one matmul per expert.
- decoding: SDPA over the whole KV cache (every sequence full, grouped-query heads expanded by
  SDPA), one new token per sequence.
Before they are timed, each of our providers' output, and the inputs' gradients for one fixed
output gradient, are compared with the reference backend's on the same inputs; one that
disagrees (shape, dtype, or by more than a loose dtype tolerance) is reported as wrong and not
timed, and the command exits with 1 (a sanity check; `generalist check` is the precision
test). On a GPU the reference is that check only, not timed: it holds every score in fp32.
Our backends that cannot serve a case (e.g. a dtype) are skipped with the reason; the Triton
backends are not timed on a CPU, where only their interpreter runs (a line says so). A provider that runs out of
memory is skipped and the others go on. With `--json` the rows are written after each one, so a
run cut short keeps what it measured.

Timing: on a GPU `triton.testing.do_bench` (median, CUDA events; without triton, CUDA events
around each call); on a CPU the providers of a case take turns call by call (A B C A B C ...)
after a warm-up, so that a drift in the machine's speed reaches them all alike, and each gets
the median of its calls. Figures from another run, another machine or another thread count do not
compare; the ratios of one run do.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from generalist.ops import (ATTENTION_BACKENDS, DECODE_BACKENDS, MOE_BACKENDS, BackendError, attention_decode,
                            flash_attn_func, flash_attn_varlen_func, grouped_mm)
from generalist.infer.generalist import resolve_device
from generalist.testing import random_varlen, visible_keys

OPS = ("attention", "moe", "decode")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
UNITS = {"TFLOP/s": 1e12, "GFLOP/s": 1e9, "GB/s": 1e9}
TOLERANCE = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}  # max |ours - reference|


@dataclass
class Row:
    op: str
    case: str
    pass_: str  # "fwd" or "fwd+bwd"
    provider: str
    status: str  # "ok" (ours, checked), "pytorch" (PyTorch alone), "baseline", "wrong: ...", "skipped: ..."
    ms: float | None = None
    rate: float | None = None  # in `unit`
    unit: str = ""  # TFLOP/s on a GPU, GFLOP/s on a CPU; GB/s for decoding
    speedup: float | None = None  # baseline time / this time


@dataclass
class Provider:
    name: str
    run: Callable[[], torch.Tensor]  # the forward; returns the output
    inputs: tuple[torch.Tensor, ...]  # what the backward gives gradients to
    ours: bool  # compared with the reference before it is timed
    backward: bool = True


# ---- timing --------------------------------------------------------------------------------

def _gpu_seconds(fn: Callable[[], object]) -> float:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(5):
        fn()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_providers(fns: dict[str, Callable[[], object]], device: torch.device, reps: int) -> dict[str, float | str]:
    """Median seconds a call of each function: do_bench one after another on a GPU; on a CPU,
    the functions take turns call by call, after two warm-up rounds. A function that runs out
    of memory gets "out of memory" instead, and the others go on."""
    result: dict[str, float | str] = {}
    if device.type == "cuda":
        for name, fn in fns.items():
            try:
                result[name] = _gpu_seconds(fn)
            except torch.OutOfMemoryError:
                result[name] = "out of memory"
                torch.cuda.empty_cache()
        return result
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(reps + 2):
        for name, fn in fns.items():
            if name in result:
                continue
            t0 = time.perf_counter()
            try:
                fn()
            except torch.OutOfMemoryError:
                result[name] = "out of memory"
                continue
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: result.get(name) or statistics.median(times[name]) for name in fns}


def _fwd(p: Provider) -> Callable[[], torch.Tensor]:
    def run():
        with torch.no_grad():
            return p.run()
    return run


def _fwd_bwd(p: Provider, dout: torch.Tensor) -> Callable[[], None]:
    """Forward and backward of a provider, with the output gradient `dout`."""
    def run():
        for x in p.inputs:
            x.grad = None
        p.run().backward(dout)
    return run


def _disagreement(got: list[torch.Tensor], want: list[torch.Tensor]) -> str | None:
    """Why `got` is not `want` (shape, dtype, or a max |error| over the dtype's tolerance scaled
    by the largest |want|), or None."""
    for name, g, w in zip(("output", *(f"the gradient of input {i}" for i in range(1, len(want)))), got, want):
        if g is None or g.shape != w.shape or g.dtype != w.dtype:
            what = "none" if g is None else f"{tuple(g.shape)} {g.dtype}"
            return f"{name} is {what}, the reference's {tuple(w.shape)} {w.dtype}"
        if not g.numel():
            continue
        err = (g.float() - w.float()).abs().max().item()
        if not math.isfinite(err) or err > TOLERANCE[w.dtype] * max(1.0, w.float().abs().max().item()):
            return f"{name}: max |error| {err:.3g} against the reference"
    return None


def _outputs(p: Provider, dout: torch.Tensor | None) -> list[torch.Tensor]:
    """[output] or, with `dout`, [output, *gradients of the inputs]."""
    if dout is None:
        with torch.no_grad():
            return [p.run()]
    for x in p.inputs:
        x.grad = None
    out = p.run()
    if out.shape != dout.shape or out.dtype != dout.dtype:
        return [out.detach()]  # _disagreement names the difference
    out.backward(dout)
    grads = [None if x.grad is None else x.grad.clone() for x in p.inputs]
    return [out.detach(), *grads]


def _measure(op: str, case: str, providers: list[Provider], work: float, unit: str, device: torch.device,
             reps: int, passes: tuple[str, ...], skipped: list[tuple[str, str]]) -> Iterator[Row]:
    """Checks our providers against the reference backend (the output, and with a backward
    pass the inputs' gradients too, for one fixed output gradient), then times, in each pass,
    every provider that passed; the last provider is the baseline. `work`: the forward's useful
    FLOPs (bytes when the unit is GB/s); the backward counts 2.5 times the forward for
    attention, 2 times for a matmul. `skipped`: (backend, why) rows to report as they are. On a
    GPU the reference is the check and is not timed (it holds every score in fp32)."""
    base = providers[-1]
    for name, why in skipped:
        yield from (Row(op, case, pass_, name, f"skipped: {why}") for pass_ in passes)
    ref = next((p for p in providers if p.name == "reference"), None)
    want = dout = None
    if ref is not None:
        try:
            with torch.no_grad():
                out = ref.run()
            if "fwd+bwd" in passes and ref.backward:
                dout = torch.randn_like(out)
                out = None
                want = _outputs(ref, dout)
            else:
                want = [out]
        except torch.OutOfMemoryError:
            want = dout = None
            torch.cuda.empty_cache()
    alive = []
    for p in providers:
        if p is ref and device.type == "cuda":
            yield from (Row(op, case, pass_, p.name, "check only: not timed on a GPU" if want is not None
                            else "skipped: out of memory") for pass_ in passes)
            continue
        why = None
        if p.ours and p is not ref and want is not None:
            try:
                why = _disagreement(_outputs(p, dout if p.backward else None), want)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                yield from (Row(op, case, pass_, p.name, "skipped: out of memory") for pass_ in passes)
                continue
        if why is not None:
            yield from (Row(op, case, pass_, p.name, f"wrong: {why}") for pass_ in passes)
            continue
        alive.append(p)
    for pass_ in passes:
        factor = {"fwd": 1.0, "fwd+bwd": 3.5 if op == "attention" else 3.0}[pass_]
        timed = [p for p in alive if pass_ == "fwd" or p.backward]
        fns = {}
        for p in timed:
            if pass_ == "fwd":
                fns[p.name] = _fwd(p)
            else:
                with torch.no_grad():
                    fns[p.name] = _fwd_bwd(p, torch.randn_like(p.run()))
        seconds = time_providers(fns, device, reps)
        base_s = seconds.get(base.name)
        for p in timed:
            s = seconds[p.name]
            if isinstance(s, str):
                yield Row(op, case, pass_, p.name, f"skipped: {s}")
                continue
            speed = base_s / s if isinstance(base_s, float) else None
            status = ("baseline" if p is base else "pytorch" if not p.ours else
                      "ok" if want is not None else "unchecked: no reference to compare with")
            yield Row(op, case, pass_, p.name, status, s * 1e3, work * factor / s / UNITS[unit], unit, speed)


def _flops_unit(device: torch.device) -> str:
    return "TFLOP/s" if device.type == "cuda" else "GFLOP/s"


def _serving(registry, device: torch.device, *inputs) -> tuple[list[str], list[tuple[str, str]]]:
    """(the backends of `registry` that serve these inputs, [(backend, why not)] for the others).
    Triton is not timed on a CPU, where only its interpreter runs it: correct, never fast."""
    serve, skipped = [], []
    for name in registry.available():
        if name == "triton" and device.type == "cpu":  # `run` says so once
            continue
        try:
            registry.resolve(name, *inputs)
        except BackendError as error:
            skipped.append((name, str(error)))
        else:
            serve.append(name)
    return serve, skipped


# ---- attention ---------------------------------------------------------------------------------

@dataclass
class AttentionCase:
    lens_q: list[int]
    lens_k: list[int]
    h: int
    hkv: int
    d: int
    causal: bool
    prefix: str | None = None  # "mid": each sequence's first half is a bidirectional prefix
    dense: bool = False  # equal lengths, called as a (B, S, H, D) batch

    @property
    def name(self) -> str:
        b, heads = len(self.lens_q), f"H{self.h}" + (f"/{self.hkv}" if self.hkv != self.h else "")
        if self.dense:
            shape = f"dense B{b} S{self.lens_q[0]}"
        elif self.lens_q != self.lens_k:
            shape = f"packed cross {b} seqs, {sum(self.lens_q)}q/{sum(self.lens_k)}k"
        else:
            shape = f"packed {b} seqs, {sum(self.lens_q)} tok"
        mask = ", prefix" if self.prefix else ", causal" if self.causal else ""
        return f"{shape} {heads} D{self.d}{mask}"


def _attention_cases(device: torch.device, quick: bool) -> list[AttentionCase]:
    """Dense bidirectional and causal; packed sequences of mixed lengths: causal self-attention
    with grouped-query heads, cross-attention with other key lengths, and the prefix mask."""
    gpu = device.type == "cuda"
    d, h, s, b = (128, 16, 2048, 8) if gpu else (64, 4, 256, 4)
    mixed = [4096, 512, 2048, 128, 3000, 1024, 4096, 1500] if gpu else [300, 37, 256, 120, 511]
    short = [256, 64, 512, 300] * 2 if gpu else [64, 5, 100, 30, 17]
    if quick and not gpu:
        s, mixed = s // 4, [n // 4 for n in mixed]
    cases = [AttentionCase([s] * b, [s] * b, h, h, d, False, dense=True),
             AttentionCase([s] * b, [s] * b, h, h, d, True, dense=True),
             AttentionCase(mixed, mixed, h, h // 4, d, True),
             AttentionCase(short, mixed, h, h, d, False),
             AttentionCase(mixed, mixed, h, h, d, True, prefix="mid")]
    return cases[1:3] if quick else cases


def _padded_sdpa(case, causal: bool) -> Provider:
    """SDPA on the case's own q, k, v padded to the longest sequences, with a boolean mask of the
    same visible keys (a padded query row, or one that sees nothing, sees key 0: no NaN), and
    the key / value heads repeated for every query head. Output (B, H, Sq, D)."""
    lq, lk = case.lens_q, case.lens_k
    b, sq, sk, h = len(lq), max(lq), max(lk), case.q.shape[1]
    mask = torch.zeros(b, 1, sq, sk, dtype=torch.bool)
    prefixes = [None] * b if case.prefix_lens is None else case.prefix_lens.tolist()
    for i, (nq, nk, p) in enumerate(zip(lq, lk, prefixes)):
        seen = torch.tensor(visible_keys(nq, nk, causal, p), dtype=torch.long)
        mask[i, 0, :nq] = torch.arange(sk)[None, :] < seen[:, None]
    mask[:, 0, :, 0] |= ~mask.any(-1)[:, 0]
    mask = mask.to(case.q.device)

    def pad(x, lens, s):  # (T, heads, D) -> (B, H, s, D), every query head its own copy
        out = x.new_zeros(b, s, h, x.shape[2])
        for i, (start, n) in enumerate(zip([0, *itertools.accumulate(lens)], lens)):
            out[i, :n] = x[start:start + n].detach().repeat_interleave(h // x.shape[1], dim=1)
        return out.transpose(1, 2).contiguous().requires_grad_()
    # k and v repeated beforehand: SDPA's kernels for a mask do not all take grouped-query heads
    # (enable_gqa), and its math fallback would hold every score in fp32
    q, k, v = pad(case.q, lq, sq), pad(case.k, lk, sk), pad(case.v, lk, sk)
    return Provider("sdpa, padded + mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                    (q, k, v), ours=False)


def attention_rows(device: torch.device, dtype: torch.dtype, quick: bool, reps: int,
                   passes: tuple[str, ...], report: Callable[[Row], None]) -> None:
    gen = torch.Generator().manual_seed(0)
    for case in _attention_cases(device, quick):
        name, lq, lk, h, hkv, d, causal, dense = (case.name, case.lens_q, case.lens_k, case.h, case.hkv, case.d,
                                                  case.causal, case.dense)
        c = random_varlen(lq, lk, h, hkv, d, dtype=dtype, prefix=case.prefix, device=device, generator=gen,
                          requires_grad=True)
        prefixes = [None] * len(lq) if c.prefix_lens is None else c.prefix_lens.tolist()
        pairs = sum(sum(visible_keys(nq, nk, causal, p)) for nq, nk, p in zip(lq, lk, prefixes))
        serve, skipped = _serving(ATTENTION_BACKENDS, device, c.q, c.k, c.v, c.cu_q, c.cu_k, max(lq), max(lk),
                                  d ** -0.5, causal, c.prefix_lens)
        providers = []
        if dense:  # (B, S, H, D) through flash_attn_func, and SDPA as it is called on a dense batch
            b, s = len(lq), lq[0]
            q, k, v = (x.detach().reshape(b, s, *x.shape[1:]).requires_grad_() for x in (c.q, c.k, c.v))
            providers += [Provider(backend, lambda backend=backend: flash_attn_func(q, k, v, causal=causal,
                                                                                    backend=backend),
                                   (q, k, v), ours=True) for backend in serve]
            qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
            gqa = {"enable_gqa": True} if h != hkv else {}
            providers.append(Provider("sdpa", lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, **gqa),
                                      (qt, kt, vt), ours=False))
        else:
            providers += [Provider(backend, lambda backend=backend: flash_attn_varlen_func(
                c.q, c.k, c.v, c.cu_q, c.cu_k, max(lq), max(lk), causal=causal, prefix_lens=c.prefix_lens,
                backend=backend), (c.q, c.k, c.v), ours=True) for backend in serve]
            providers.append(_padded_sdpa(c, causal))
        for row in _measure("attention", name, providers, 4.0 * d * h * pairs, _flops_unit(device), device, reps,
                            passes, skipped):
            report(row)


# ---- MoE grouped matmul ------------------------------------------------------------------------

def moe_rows(device: torch.device, dtype: torch.dtype, quick: bool, reps: int, passes: tuple[str, ...],
             report: Callable[[Row], None]) -> None:
    if device.type == "cuda":
        t, d, f, experts = 16384, 2048, 1408, ([8] if quick else [8, 64])
    else:
        t, d, f, experts = (512, 128, 256, [8]) if quick else (4096, 256, 512, [8])
    gen = torch.Generator().manual_seed(1)
    for e in experts:
        # even groups, but the first one empty and its rows given to the second
        sizes = [t // e] * e
        sizes[0], sizes[1] = 0, sizes[1] + sizes[0] + t % e
        gs = torch.tensor(sizes, dtype=torch.int32, device=device)
        x = torch.randn(t, d, generator=gen).to(device, dtype).requires_grad_()
        w = (torch.randn(e, d, f, generator=gen) * d ** -0.5).to(device, dtype).requires_grad_()
        serve, skipped = _serving(MOE_BACKENDS, device, x, w, gs)
        providers = [Provider(backend, lambda backend=backend: grouped_mm(x, w, gs, backend=backend,
                                                                                 check_values=False), (x, w),
                              ours=True) for backend in serve]
        bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        providers.append(Provider("loop over experts", lambda: torch.cat(
            [x[bounds[i]:bounds[i + 1]] @ wi for i, wi in enumerate(w.unbind(0))]), (x, w), ours=False))
        x2, w2 = x.detach().clone().requires_grad_(), w.detach()[1].clone().requires_grad_()
        providers.append(Provider("dense mm", lambda: x2 @ w2, (x2, w2), ours=False))
        for row in _measure("moe", f"grouped mm E{e}, T{t} D{d} F{f}", providers, 2.0 * t * d * f,
                            _flops_unit(device), device, reps, passes, skipped):
            report(row)


# ---- decoding --------------------------------------------------------------------------------

def decode_rows(device: torch.device, dtype: torch.dtype, quick: bool, reps: int,
                report: Callable[[Row], None]) -> None:
    if device.type == "cuda":
        shapes = [(16, 8192, 32, 8, 128)] + ([] if quick else [(1, 32768, 32, 8, 128)])
    else:
        shapes = [(4, 512 if quick else 2048, 8, 2, 64)]
    gen = torch.Generator().manual_seed(2)
    for b, s, h, hkv, d in shapes:
        q = torch.randn(b, 1, h, d, generator=gen).to(device, dtype)
        k, v = (torch.randn(b, s, hkv, d, generator=gen).to(device, dtype) for _ in range(2))
        serve, skipped = _serving(DECODE_BACKENDS, device, q, k, v, None, d ** -0.5, 0)
        providers = [Provider(backend, lambda backend=backend: attention_decode(q, k, v, None, backend=backend),
                              (), ours=True, backward=False) for backend in serve]
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = {"enable_gqa": True} if h != hkv else {}
        providers.append(Provider("sdpa", lambda: F.scaled_dot_product_attention(qt, kt, vt, **gqa).transpose(1, 2),
                                  (), ours=False, backward=False))
        for row in _measure("decode", f"B{b} S{s} H{h} Hkv{hkv} D{d}", providers, 2.0 * k.numel() * k.element_size(),
                            "GB/s", device, reps, ("fwd",), skipped):
            report(row)


# ---- the command -------------------------------------------------------------------------------

HEADER = f"{'op':<9} {'case':<44} {'pass':<7} {'provider':<20} {'ms':>9} {'rate':>14} {'vs baseline':>11}  check"


def format_row(r: Row) -> str:
    if r.ms is None:
        return f"{r.op:<9} {r.case:<44} {r.pass_:<7} {r.provider:<20} {'':>9} {'':>14} {'':>11}  {r.status}"
    speed = f"{r.speedup:.2f}x" if r.speedup is not None else ""
    return (f"{r.op:<9} {r.case:<44} {r.pass_:<7} {r.provider:<20} {r.ms:>9.3f} {r.rate:>6.2f} {r.unit:<7} "
            f"{speed:>11}  {r.status}")


def _as_dict(r: Row) -> dict:
    d = asdict(r)
    d["pass"] = d.pop("pass_")
    return d


def run(ops: tuple[str, ...] = OPS, device: str | None = None, dtype: str | None = None, quick: bool = False,
        json_path: str | None = None, print_fn: Callable[[str], None] = print) -> list[Row]:
    """Benchmarks `ops` on `device` (default: cuda when there is one), prints a row as each is
    measured, writes them to `json_path` when given; returns the rows."""
    if not ops:
        raise ValueError(f"no op to benchmark; choose from {', '.join(OPS)}")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    dev = resolve_device(device)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if json_path and (os.path.isdir(json_path) or not os.path.isdir(os.path.dirname(os.path.abspath(json_path)))):
        raise ValueError(f"--json {json_path}: " + ("is a directory" if os.path.isdir(json_path)
                                                     else "its directory does not exist"))
    dt = DTYPES[dtype] if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    reps = 3 if quick else 10
    passes = ("fwd", "fwd+bwd")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or platform.machine()}"
    threads = f", {torch.get_num_threads()} threads" if dev.type == "cpu" else ""
    print_fn(f"generalist bench: {dev.type} ({name}{threads}), {str(dt)[6:]}, torch {torch.__version__}"
             f"{', quick' if quick else ''}; speed = baseline time / provider time")
    if dev.type == "cpu" and any("triton" in r.available() for r in (ATTENTION_BACKENDS, MOE_BACKENDS, DECODE_BACKENDS)):
        print_fn("(the Triton backends are not timed on a CPU, where only Triton's interpreter runs them: "
                 "correct, never fast)")
    print_fn(HEADER)
    rows: list[Row] = []
    meta = {"device": dev.type, "device_name": name, "dtype": str(dt)[6:], "torch": torch.__version__,
            "quick": quick, "threads": torch.get_num_threads()}

    def report(row: Row) -> None:  # the JSON is written anew after every row: a run cut short keeps its rows
        rows.append(row)
        print_fn(format_row(row))
        if json_path:
            tmp = f"{json_path}.tmp"
            with open(tmp, "w") as fh:
                json.dump({**meta, "rows": [_as_dict(r) for r in rows]}, fh, indent=1)
            os.replace(tmp, json_path)

    for op in ops:
        if op == "attention":
            attention_rows(dev, dt, quick, reps, passes, report)
        elif op == "moe":
            moe_rows(dev, dt, quick, reps, passes, report)
        else:
            decode_rows(dev, dt, quick, reps, report)
    return rows
