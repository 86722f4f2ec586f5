"""Attention microbenchmarks: our backends against torch SDPA, as ratios measured in one run.

    python benchmarks/attention.py [--quick] [--threads N] [--out results.md]

CPU: each (provider, baseline) pair is timed interleaved (A B A B ...) after a warm-up, and the
median of the per-pair time ratios is reported next to the median times; the thread count is
fixed. GPU: triton.testing.do_bench (median, CUDA events). TFLOP/s uses 4·B·H·Sq·Sk·D for the
forward (halved when causal), 2.5× that for the backward. Benchmarks never assert.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

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
    q = torch.zeros(4, 2, 8, dtype=dtype, device=device)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=device)
    try:
        ATTENTION_BACKENDS.resolve(backend, q, q, q, cu, cu, 4, 4, 1.0, True, None)
    except BackendError as error:
        print(f"skipping {error}")
        return False
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (the demo)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
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
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
