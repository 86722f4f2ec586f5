"""Decoding attention (one new token per sequence against a long KV cache): the split-K Triton
kernel vs one split, vs the flash-attention kernel, vs torch SDPA; bf16 on a GPU.

    python benchmarks/decode.py [--quick] [--out results.md]

Decoding reads the whole cache once, so the figure of merit is GB/s: 2 (k and v) x B x S x
Hkv x D x 2 bytes over the time (median). Each provider is timed twice: called from Python
("eager", triton.testing.do_bench: launch overheads included, which at tens of microseconds per
step can be most of the time) and replayed from a CUDA graph ("graph", do_bench_cudagraph: the GPU
time alone, as a decoding loop captured in a graph sees it). Benchmarks never assert; the max
difference to SDPA is printed as a sanity check.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from _report import emit, exit_status, until_stopped

from generalist.ops import attention_decode, flash_attn_func, set_value_checks


NAMES = ("decode (split-K)", "decode, 1 split", "flash (triton)", "sdpa")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/decode.py needs a CUDA GPU; nothing to measure here")
        return
    from triton.testing import do_bench, do_bench_cudagraph

    set_value_checks(False)  # no host sync per call, as in a decoding loop
    torch.manual_seed(0)
    shapes = [(16, 8192, 32, 8, 128), (1, 32768, 32, 8, 128), (64, 2048, 32, 8, 128), (4, 16384, 16, 1, 64)]
    rows = []
    notes = []
    with until_stopped(notes):
        for b, s, h, hkv, d in shapes[:2] if args.quick else shapes:
            q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            lens = torch.full((b,), s, dtype=torch.int32, device="cuda")
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            providers = dict(zip(NAMES, (
                lambda: attention_decode(q, k, v, lens, backend="triton"),
                lambda: attention_decode(q, k, v, lens, num_splits=1, backend="triton"),
                lambda: flash_attn_func(q, k, v, causal=True, backend="triton"),
                lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True),
            )))
            err = (providers["decode (split-K)"]().float()
                   - providers["sdpa"]().transpose(1, 2).float()).abs().max().item()
            gbytes = 2 * k.numel() * k.element_size() / 1e9
            for mode, bench in (("eager", lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")),
                                ("graph", lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median"))):
                cells = []
                for name, fn in providers.items():
                    try:
                        t = bench(fn) / 1e3
                        cells.append(f"{t * 1e6:.0f} us, {gbytes / t:.0f} GB/s")
                    except Exception as error:  # e.g. a provider that cannot be captured in a graph
                        print(f"{name} ({mode}): {type(error).__name__}: {str(error).splitlines()[0][:160]}")
                        cells.append("-")
                rows.append((f"B{b} S{s} H{h} Hkv{hkv} D{d}", mode, f"{err:.1e}", cells))
                print(rows[-1], flush=True)
    lines = [f"device: {torch.cuda.get_device_name()}, bf16, torch {torch.__version__}", "",
             "| shape | timed | max diff vs SDPA | " + " | ".join(NAMES) + " |",
             "|" + "---|" * (3 + len(NAMES))]
    lines += [f"| {shape} | {mode} | {err} | " + " | ".join(cells) + " |" for shape, mode, err, cells in rows]
    emit(lines + notes, args.out)


if __name__ == "__main__":
    main()
    sys.exit(exit_status())
