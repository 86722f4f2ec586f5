"""Decoding attention (one new token per sequence against a long KV cache): the split-K Triton
kernel vs one split, vs the flash-attention kernel, vs torch SDPA; bf16 on a GPU.

    python benchmarks/decode.py [--quick] [--out results.md]

Decoding reads the whole cache once, so the figure of merit is GB/s: 2 (k and v) x B x S x
Hkv x D x 2 bytes over the time (triton.testing.do_bench median). Benchmarks never assert; the
max difference to SDPA is printed as a sanity check.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from _report import emit

from generalist.ops import attention_decode, flash_attn_func, set_value_checks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/decode.py needs a CUDA GPU; nothing to measure here")
        return
    from triton.testing import do_bench

    set_value_checks(False)  # no host sync per call, as in a decoding loop
    torch.manual_seed(0)
    shapes = [(16, 8192, 32, 8, 128), (1, 32768, 32, 8, 128), (64, 2048, 32, 8, 128), (4, 16384, 16, 1, 64)]
    rows = []
    for b, s, h, hkv, d in shapes[:2] if args.quick else shapes:
        q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lens = torch.full((b,), s, dtype=torch.int32, device="cuda")
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        providers = {
            "decode (split-K)": lambda: attention_decode(q, k, v, lens, backend="triton"),
            "decode, 1 split": lambda: attention_decode(q, k, v, lens, num_splits=1, backend="triton"),
            "flash (triton)": lambda: flash_attn_func(q, k, v, causal=True, backend="triton"),
            "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True),
        }
        err = (providers["decode (split-K)"]().float() - providers["sdpa"]().transpose(1, 2).float()).abs().max().item()
        gbytes = 2 * k.numel() * k.element_size() / 1e9
        cells = []
        for name, fn in providers.items():
            t = do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
            cells.append(f"{t * 1e6:.0f} us, {gbytes / t:.0f} GB/s")
        rows.append((f"B{b} S{s} H{h} Hkv{hkv} D{d}", f"{err:.1e}", cells))
        print(rows[-1], flush=True)
    lines = [f"device: {torch.cuda.get_device_name()}, bf16, torch {torch.__version__}", "",
             "| shape | max diff vs SDPA | " + " | ".join(providers) + " |", "|" + "---|" * (2 + len(providers))]
    lines += [f"| {shape} | {err} | " + " | ".join(cells) + " |" for shape, err, cells in rows]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
