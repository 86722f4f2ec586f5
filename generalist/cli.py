"""The `generalist` command line: `generalist info`, `generalist check`.

Training, evaluation and prediction subcommands join as those parts land (see DESIGN.md).
"""

from __future__ import annotations

import argparse
import platform
import sys


def _info(args) -> int:
    import torch

    from generalist import __version__, _ext
    from generalist.ops import ATTENTION_BACKENDS

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    rows = [
        ("generalist", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", triton_version),
        ("CUDA device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
        ("extension generalist._C", "built" if _ext.has_extension() else f"not built ({_ext.import_error})"),
        ("  with CUDA kernels", str(_ext.cuda_built())),
        ("attention backends", ", ".join(ATTENTION_BACKENDS.available())),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _check(args) -> int:
    """Every available attention backend against a naive float64 implementation."""
    import torch

    from generalist.ops import ATTENTION_BACKENDS, flash_attn_varlen_func
    from generalist.testing import naive_attention, random_varlen

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(args.seed)
    # (name, lens_q, lens_k, H, Hkv, D, causal, prefix)
    cases = [
        ("self, bidirectional", [97, 1, 0, 200], [97, 1, 0, 200], 8, 8, 64, False, None),
        ("self, causal, GQA 4", [97, 1, 0, 200], [97, 1, 0, 200], 8, 2, 64, True, None),
        ("cross, Sq < Sk, causal", [5, 33, 64], [40, 50, 64], 4, 4, 111, True, None),
        ("cross, Sq > Sk, causal", [40, 7], [9, 3], 4, 1, 40, True, None),
        ("prefix mask, MQA", [60, 31, 128], [60, 31, 128], 8, 1, 128, True, "mid"),
    ]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    atol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
    print(f"attention backends vs float64, on {device} (seed {args.seed}); pass: error <= 2 x same-dtype PyTorch + atol")
    header = f"{'backend':<10} {'case':<24} {'dtype':<9} {'max error':>10} {'PyTorch':>10}  result"
    print(header)
    print("-" * len(header))
    failures = 0
    for backend in ATTENTION_BACKENDS.available():
        for name, lq, lk, h, hkv, d, causal, prefix in cases:
            for dtype in dtypes:
                case = random_varlen(lq, lk, h, hkv, d, dtype=dtype, prefix=prefix, device=device, generator=gen)
                try:
                    out = flash_attn_varlen_func(case.q, case.k, case.v, case.cu_q, case.cu_k, max(lq), max(lk),
                                                 causal=causal, prefix_lens=case.prefix_lens, backend=backend)
                except ValueError as error:  # this backend does not serve these inputs
                    print(f"{backend:<10} {name:<24} {str(dtype)[6:]:<9} {'':>10} {'':>10}  skipped: {error}")
                    continue
                want, _ = naive_attention(case.q, case.k, case.v, lq, lk, causal=causal, prefix_lens=case.prefix_lens)
                same, _ = naive_attention(case.q, case.k, case.v, lq, lk, causal=causal,
                                          prefix_lens=case.prefix_lens, dtype=dtype)
                err = (out.double() - want).abs().max().item()
                base = (same.double() - want).abs().max().item()
                ok = err <= 2 * base + atol[dtype]
                failures += not ok
                print(f"{backend:<10} {name:<24} {str(dtype)[6:]:<9} {err:>10.2e} {base:>10.2e}  {'ok' if ok else 'FAIL'}")
    print(f"\n{'all backends match the float64 semantics' if not failures else f'{failures} check(s) FAILED'}")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generalist",
        description="A sparse mixture-of-experts transformer for text, images, audio, video and tables.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, compiled extension and available kernel backends")
    info.set_defaults(func=_info)
    check = sub.add_parser("check", help="check every attention backend against float64 on random inputs")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
