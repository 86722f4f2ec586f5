"""Attention microbenchmarks: our backends against torch SDPA, as ratios measured in one run.

    python benchmarks/attention.py [--quick] [--threads N] [--out results.md]

CPU: each (provider, baseline) pair is timed interleaved (A B A B ...) after a warm-up, and the
median of the per-pair time ratios is reported next to the median times; the thread count is
fixed. GPU: triton.testing.do_bench (median, CUDA events). TFLOP/s uses 4·B·H·Sq·Sk·D for the
forward (halved when causal), 2.5× that for the backward. On a GPU --quick times fwd and bwd
of fewer shapes, and of SDPA only its flash and cuDNN backends. Benchmarks never assert.
"""

from __future__ import annotations

import argparse
import sys
import statistics
import time

import torch
import torch.nn.functional as F

from _report import emit, exit_status, pivot, tuner_choices, until_stopped

from generalist.ops import ATTENTION_BACKENDS, BackendError, flash_attn_func, flash_attn_varlen_func


def flops(b, h, sq, sk, d, causal, mode):
    fwd = 4 * b * h * sq * sk * d / (2 if causal else 1)
    return {"fwd": fwd, "fwd+bwd": fwd * 3.5}[mode]


def _time_once(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def paired(fn_a, fn_b, reps: int):
    """Median time of a, of b, and median of per-pair ratios a/b, interleaved (CPU); on GPU
    the ratio of triton.testing.do_bench medians."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        ta, tb = do_bench(fn_a) / 1e3, do_bench(fn_b) / 1e3
        return ta, tb, ta / tb
    for _ in range(2):
        fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(reps):
        ta.append(_time_once(fn_a))
        tb.append(_time_once(fn_b))
    return statistics.median(ta), statistics.median(tb), statistics.median(a / b for a, b in zip(ta, tb))


def _with_backward(fn, inputs):
    def run():
        out = fn()
        out.backward(torch.ones_like(out))
        for x in inputs:
            x.grad = None
    return run


def dense_case(b, h, s, d, causal, mode, dtype, device, backend, reps):
    q, k, v = (torch.randn(b, s, h, d, dtype=dtype, device=device, requires_grad=mode != "fwd") for _ in range(3))
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(mode != "fwd") for x in (q, k, v))
    ours = lambda: flash_attn_func(q, k, v, causal=causal, backend=backend)
    sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    if mode != "fwd":
        ours, sdpa = _with_backward(ours, (q, k, v)), _with_backward(sdpa, (qt, kt, vt))
    return paired(ours, sdpa, reps), flops(b, h, s, s, d, causal, mode)


def varlen_case(lens, h, d, causal, mode, dtype, device, backend, reps):
    """Packed varlen batch vs SDPA on the same batch padded to the longest sequence."""
    b, s = len(lens), max(lens)
    total = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q, k, v = (torch.randn(total, h, d, dtype=dtype, device=device, requires_grad=mode != "fwd") for _ in range(3))
    pad = torch.zeros(b, h, s, s, dtype=torch.bool, device=device)
    for i, n in enumerate(lens):
        pad[i, :, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril() if causal else True
    pad[:, :, torch.arange(s), torch.arange(s)] = True  # padded rows attend to themselves, never NaN
    qp, kp, vp = (torch.randn(b, h, s, d, dtype=dtype, device=device, requires_grad=mode != "fwd") for _ in range(3))
    ours = lambda: flash_attn_varlen_func(q, k, v, cu, cu, s, s, causal=causal, backend=backend)
    sdpa = lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=pad)
    if mode != "fwd":
        ours, sdpa = _with_backward(ours, (q, k, v)), _with_backward(sdpa, (qp, kp, vp))
    useful = sum(flops(1, h, n, n, d, causal, mode) for n in lens)
    return paired(ours, sdpa, reps), useful


def serves(backend, dtype, device) -> bool:
    """Whether `backend` can run on this device and dtype (e.g. "triton" cannot on a CPU)."""
    q = torch.zeros(4, 2, 64, dtype=dtype, device=device)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=device)
    try:
        ATTENTION_BACKENDS.resolve(backend, q, q, q, cu, cu, 4, 4, 1.0, True, None)
    except BackendError as error:
        print(f"skipping {error}")
        return False
    return True


# --------------------------------------------------------------------------------------------
# GPU grid: TFLOP/s per provider (ours by backend, SDPA by backend, FlexAttention, flash-attn)
# --------------------------------------------------------------------------------------------

SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}


def _bench_gpu(fn, grads=()):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads), return_mode="median") / 1e3


def _timed_modes(make, inputs, modes):
    """{mode: seconds} for a provider; make() runs the forward and returns the output."""
    result = {}
    if "fwd" in modes:
        with torch.no_grad():
            result["fwd"] = _bench_gpu(make)
    if "bwd" in modes or "fwd+bwd" in modes:
        out = make()
        dout = torch.randn_like(out)
        if "bwd" in modes:
            result["bwd"] = _bench_gpu(lambda: out.backward(dout, retain_graph=True), inputs)
        if "fwd+bwd" in modes:
            result["fwd+bwd"] = _bench_gpu(lambda: make().backward(dout), inputs)
    return result


def _dense_providers(backends, b, h, s, d, causal, dtype):
    """(name, make, inputs) for one dense shape: ours take (B, S, H, D), SDPA (B, H, S, D)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(b, s, h, d, dtype=dtype, device="cuda", requires_grad=True) for _ in range(3))
    for backend in backends:
        yield backend, (lambda backend=backend: flash_attn_func(q, k, v, causal=causal, backend=backend)), (q, k, v)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    for name, which in SDPA_BACKENDS.items():
        if name == "sdpa-math" and s > 2048:
            continue  # materializes B*H*S*S scores

        def sdpa(which=which):
            with sdpa_kernel(getattr(SDPBackend, which)):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        yield name, sdpa, (qt, kt, vt)
    try:
        from flash_attn import flash_attn_func as fa_func
    except ImportError:
        _say_once("skipping flash-attn: not installed")
        return
    yield "flash-attn", (lambda: fa_func(q, k, v, causal=causal)), (q, k, v)


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """Prints `message` the first time only (a provider skipped for every shape)."""
    if message not in _SAID:
        _SAID.add(message)
        print(message, flush=True)


def _prefix_providers(backends, lens, prefix, h, d, dtype, want_flex=True):
    """Packed prefix-LM batch (varlen, causal after a bidirectional prefix): ours vs FlexAttention
    on the same mask (one packed row, document ids; its block mask is built only if `want_flex`)."""
    total = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    pre = torch.tensor(prefix, dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(total, h, d, dtype=dtype, device="cuda", requires_grad=True) for _ in range(3))
    for backend in backends:
        yield backend, (lambda backend=backend: flash_attn_varlen_func(
            q, k, v, cu, cu, max(lens), max(lens), causal=True, prefix_lens=pre, backend=backend)), (q, k, v)
    if not want_flex:
        return
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        _say_once("skipping flex: this torch has no torch.nn.attention.flex_attention")
        return
    doc = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))
    pos = torch.arange(total, device="cuda") - cu[:-1].long()[doc]
    plen = pre.long()[doc]

    def mask_mod(b, hh, qi, ki):
        return (doc[qi] == doc[ki]) & ((pos[ki] <= pos[qi]) | (pos[ki] < plen[qi]))

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=total, KV_LEN=total, device="cuda")
    flex = torch.compile(flex_attention)
    qf, kf, vf = (x.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_() for x in (q, k, v))
    yield "flex", (lambda: flex(qf, kf, vf, block_mask=block_mask)), (qf, kf, vf)


def gpu_grid(args):
    dtype = torch.bfloat16
    backends = [name for name in ("cuda", "triton") if name in ATTENTION_BACKENDS.available()
                and serves(name, dtype, "cuda")]
    for name in sorted({"cuda", "triton"} - set(backends)):  # said, not left out silently
        why = "not built here" if name not in ATTENTION_BACKENDS.available() else "cannot serve bf16"
        print(f"skipping {name}: {why}")
    modes = tuple(args.passes.split(","))
    # --quick (the GPU check's grid, which has a time limit): SDPA's flash and cuDNN backends only
    wanted = args.providers.split(",") if args.providers else None
    skipped = ("sdpa-efficient", "sdpa-math") if args.quick and wanted is None else ()
    tokens = 16384  # batch x seqlen, as flash-attention's own benchmarks
    seqs = (1024, 4096, 16384) if args.quick else (512, 1024, 2048, 4096, 8192, 16384)
    rows = []

    def record(shape, causal, providers, fl):
        for name, make, inputs in providers:
            if (wanted is not None and name not in wanted) or name in skipped:
                continue
            try:
                times = _timed_modes(make, inputs, modes)
            except Exception as error:  # a provider that cannot run this shape is reported, not fatal
                print(f"{name} {shape}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
                continue
            for mode, t in times.items():
                tf = fl * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode] / t / 1e12
                rows.append((shape, causal, mode, name, t, tf))
                print(f"{shape:34s} causal={causal!s:5s} {mode:7s} {name:15s} {t * 1e3:8.3f} ms {tf:7.1f} TFLOP/s",
                      flush=True)
        torch.cuda.empty_cache()

    notes = []
    with until_stopped(notes):
        for d in (128, 64):
            h = 2048 // d
            for s in (seqs if d == 128 else (1024, 4096)):
                b = max(1, tokens // s)
                shape = f"dense B{b} H{h} S{s} D{d}"
                for causal in (False, True) if args.shapes in shape else ():
                    record(shape, causal, _dense_providers(backends, b, h, s, d, causal, dtype),
                           flops(b, h, s, s, d, causal, "fwd"))
        gen = torch.Generator().manual_seed(0)
        lens = torch.randint(256, 4096, (64,), generator=gen)
        lens = lens[: int((lens.cumsum(0) <= tokens).sum())].tolist()
        prefix = [n // 2 for n in lens]
        # work under the mask: prefix block p*p plus the causal rest (n*(n+1) - p*(p+1))/2 + p*(n-p)
        pairs = sum(p * p + (n * (n + 1) - p * (p + 1)) // 2 for n, p in zip(lens, prefix))
        fl = 4 * 16 * 128 * pairs
        shape = f"prefix-LM varlen {len(lens)} seqs {sum(lens)} tok D128"
        if args.shapes in shape:
            record(shape, True, _prefix_providers(backends, lens, prefix, 16, 128, dtype,
                                                  wanted is None or "flex" in wanted), fl)

    lines = [f"device: {torch.cuda.get_device_name()}, bf16, torch {torch.__version__}, triton "
             f"{__import__('triton').__version__}; do_bench median; TFLOP/s = 4·B·H·S²·D (÷2 causal), "
             "bwd 2.5×, fwd+bwd 3.5×", ""]
    emit(lines + pivot(rows, ("shape", "causal", "pass")) + notes + tuned_configs(), args.out,
         "shape,causal,pass,provider,seconds,tflops", rows)


def tuned_configs() -> list[str]:
    """What the Triton autotuner chose for each bf16 kernel and tuning key this run met, so that
    the tables' candidates can be pruned to the winners."""
    if "triton" not in ATTENTION_BACKENDS.available():
        return []
    from generalist.kernels.triton import attention as K

    device = torch.cuda.current_device()
    return tuner_choices("Triton configurations chosen by the autotuner (kernel, BLOCK_D; key HEAD_DIM, IS_CAUSAL, "
                         "HAS_PREFIX, seq_bucket):",
                         ((f"{kernel} D{block_d}", K._autotuned(kernel, 2, block_d, device, True).tuner)
                          for kernel in K._KERNELS for block_d in (64, 128)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (the demo)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    parser.add_argument("--providers", default="", help="GPU: only these providers (comma-separated names)")
    parser.add_argument("--passes", default=None,
                        help="GPU: passes to time, of fwd, bwd, fwd+bwd (default: all; fwd,bwd with --quick)")
    parser.add_argument("--shapes", default="", help="GPU: only the shapes whose name contains this (e.g. prefix)")
    args = parser.parse_args()
    if args.passes is None:
        args.passes = "fwd,bwd" if args.quick else "fwd,bwd,fwd+bwd"
    torch.manual_seed(0)
    if torch.cuda.is_available():
        return gpu_grid(args)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    reps = 5 if args.quick else 15
    b, h, s, d = (2, 4, 256, 64) if args.quick else (8, 8, 512, 64)
    lens = [s, s // 2, s // 4, 3 * s // 4, s // 8, s // 2, s, s // 3]
    rows = []
    for backend in [name for name in ATTENTION_BACKENDS.available() if serves(name, dtype, device)]:
        for mode in ("fwd", "fwd+bwd"):
            for causal in (False, True):
                (ta, tb, ratio), fl = dense_case(b, h, s, d, causal, mode, dtype, device, backend, reps)
                rows.append((backend, f"dense B{b} H{h} S{s} D{d}", mode, causal, ta, tb, ratio, fl / ta / 1e12))
            (ta, tb, ratio), fl = varlen_case(lens, h, d, True, mode, dtype, device, backend, reps)
            rows.append((backend, f"varlen {len(lens)} seqs ≤{s}, pad {1 - sum(lens) / (len(lens) * s):.0%}",
                         mode, True, ta, tb, ratio, fl / ta / 1e12))
    header = "| provider | shape | pass | causal | ours ms | SDPA ms | time ours/SDPA (lower is better) | ours TFLOP/s |"
    lines = [f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, {dtype}, torch {torch.__version__}, threads {args.threads}",
             "", header, "|" + "---|" * 8]
    for backend, shape, mode, causal, ta, tb, ratio, tf in rows:
        lines.append(f"| {backend} | {shape} | {mode} | {causal} | {ta * 1e3:.2f} | {tb * 1e3:.2f} | {ratio:.2f} | {tf:.3f} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
    sys.exit(exit_status())
