"""Host time per call of the ops at shapes so small that the kernels take almost nothing: what a
decoding step or a small model's training step pays in Python on every layer.

    python benchmarks/host_overhead.py [--quick] [--out results.md]

Providers, per op and pass:
  ours        the public function as users and the model call it: in eager mode it skips the
              registered torch.library op (Registry.call): the backend's forward directly for
              inference, an autograd.Function around the backend for training;
  via op      the same backend through the registered op (and its autograd), as torch.compile and
              FakeTensorMode calls go, and as every eager call went before the skip;
  torch       PyTorch's own op for the same job, the baseline: scaled_dot_product_attention for
              attention and decoding, torch._grouped_mm (GPU) or one torch.matmul for grouped_mm.
On a GPU the Triton backend runs for real; times are wall-clock over back-to-back calls ended by
one synchronize, which is host time when the GPU keeps up (it does at these shapes). On a CPU
the Triton backend runs under its interpreter with every kernel launch replaced by a no-op
(TRITON_INTERPRET=1 is set here before import), so the figures are our Python up to the launch,
without Triton's own launcher; "torch" there computes for real. Value checks that read tensors
back (a device sync) are off, as in a decoding loop. Best of several rounds, in microseconds.
Benchmarks never assert.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch  # (torch does not import triton)
import torch.nn.functional as F

# one configuration per kernel: host time does not depend on it, and tuning would take minutes
os.environ.setdefault("GENERALIST_TRITON_AUTOTUNE", "0")
ON_GPU = "--cpu" not in sys.argv and torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    os.environ["GENERALIST_TRITON_ON_CPU"] = "1"

from _report import emit, exit_status, until_stopped  # noqa: E402

from generalist.ops import attention_decode, flash_attn_varlen_func, grouped_mm  # noqa: E402
from generalist.ops import set_value_checks  # noqa: E402

attention_module, decode_module, moe_module = (importlib.import_module(f"generalist.ops.{name}")
                                               for name in ("attention", "attention_decode", "moe"))


def stub_triton_launches():
    """Every Triton kernel of ours launches nothing (CPU only: measures the Python path)."""
    from generalist.kernels.triton import attention as KA, decode as KD, moe as KM

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for module, names in ((KA, ["_attn_bwd_delta_kernel"]), (KD, ["_decode_split_kernel", "_decode_reduce_kernel"])):
        for name in names:
            setattr(module, name, NoLaunch())
    for module in (KA, KM):
        for name in list(module._KERNELS):
            module._KERNELS[name] = NoLaunch()


def per_call_us(fn, calls: int, rounds: int) -> float:
    sync = torch.cuda.synchronize if ON_GPU else (lambda: None)
    for _ in range(max(50, calls // 2)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def grad(out, inputs, grad_out):
    """The backward pass alone, without accumulating into .grad (which would add work per call)."""
    return torch.autograd.grad(out, inputs, grad_out)


def cases(device, dtype):
    """(op, pass, {provider: fn}) at tiny shapes."""
    h, d, s = 8, 64, 64
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_(grad)

    # varlen self-attention, two sequences of 64 tokens
    q, k, v = rand(2 * s, h, d), rand(2 * s, h, d), rand(2 * s, h, d)
    cu = torch.tensor([0, s, 2 * s], dtype=torch.int32, device=device)
    qg, kg, vg = rand(2 * s, h, d, grad=True), rand(2 * s, h, d, grad=True), rand(2 * s, h, d, grad=True)
    dout = rand(2 * s, h, d)
    qd, kd, vd = (t.view(2, s, h, d).transpose(1, 2) for t in (q, k, v))
    qdg, kdg, vdg = (rand(2, h, s, d, grad=True) for _ in range(3))
    scale = d ** -0.5
    op_args = (cu, cu, s, s, scale, True, None, "triton")
    yield "attention varlen", "fwd", {
        "ours": lambda: flash_attn_varlen_func(q, k, v, cu, cu, s, s, causal=True, backend="triton"),
        "via op": lambda: attention_module.attention_fwd(q, k, v, *op_args),
        "torch": lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True),
    }
    yield "attention varlen", "fwd+bwd", {
        "ours": lambda: grad(flash_attn_varlen_func(qg, kg, vg, cu, cu, s, s, causal=True, backend="triton"),
                             (qg, kg, vg), dout),
        "via op": lambda: grad(attention_module.attention_fwd(qg, kg, vg, *op_args)[0], (qg, kg, vg), dout),
        "torch": lambda: grad(F.scaled_dot_product_attention(qdg, kdg, vdg, is_causal=True), (qdg, kdg, vdg),
                              dout.view(2, h, s, d)),
    }

    # decoding: one new token against a 4096-token cache
    b, cache = 2, 4096
    qq, kc, vc = rand(b, 1, h, d), rand(b, cache, h, d), rand(b, cache, h, d)
    lens = torch.full((b,), cache, dtype=torch.int32, device=device)
    qt, kt, vt = qq.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    yield "decode", "fwd", {
        "ours": lambda: attention_decode(qq, kc, vc, lens, backend="triton"),
        "via op": lambda: decode_module.attention_decode_op(qq, kc, vc, lens, scale, 0, "triton"),
        "torch": lambda: F.scaled_dot_product_attention(qt, kt, vt),
    }

    # grouped matmul: 8 experts of 32 rows, 256 x 256 weights
    e, rows, din, dout_f = 8, 32, 256, 256
    x, w = rand(e * rows, din), torch.nn.Parameter(rand(e, din, dout_f))
    sizes = torch.full((e,), rows, dtype=torch.int32, device=device)
    xg, dy = rand(e * rows, din, grad=True), rand(e * rows, dout_f)
    w_dense = rand(din, dout_f, grad=True)
    offs = sizes.cumsum(0, dtype=torch.int32)
    if ON_GPU and hasattr(torch, "_grouped_mm"):
        def grouped_torch(a, b):
            return torch._grouped_mm(a, b, offs)
        grouped_torch.dense = False
    else:
        def grouped_torch(a, b):
            return a @ w_dense
        grouped_torch.dense = True
    yield "grouped_mm", "fwd", {
        "ours": lambda: grouped_mm(x, w, sizes, backend="triton", check_values=False),
        "via op": lambda: moe_module.grouped_mm_op(x, w, sizes, "triton"),
        "torch": lambda: grouped_torch(x, w),
    }
    yield "grouped_mm", "fwd+bwd", {
        "ours": lambda: grad(grouped_mm(xg, w, sizes, backend="triton", check_values=False), (xg, w), dy),
        "via op": lambda: grad(moe_module.grouped_mm_op(xg, w, sizes, "triton"), (xg, w), dy),
        "torch": lambda: grad(grouped_torch(xg, w), (xg, w_dense) if grouped_torch.dense else (xg, w), dy),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    parser.add_argument("--cpu", action="store_true", help="the CPU measurement even when a GPU is present")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()
    calls, rounds = (200, 3) if args.quick else (500, 7)
    set_value_checks(False)
    if ON_GPU:
        device, dtype = "cuda", torch.bfloat16
        where = f"{torch.cuda.get_device_name()}, bf16, Triton kernels launched"
    else:
        stub_triton_launches()
        device, dtype = "cpu", torch.float32
        where = "CPU, fp32, Triton interpreter with every launch a no-op (our Python only)"
    rows, notes = [], []
    with until_stopped(notes):
        for op, mode, providers in cases(device, dtype):
            times = {}
            for name, fn in providers.items():
                # inference passes run without grad, as generate does
                grad = torch.enable_grad() if mode == "fwd+bwd" else torch.no_grad()
                with grad:
                    times[name] = per_call_us(fn, calls, rounds)
                rows.append((op, mode, name, times[name]))
            print(f"{op:18s} {mode:8s} " + "  ".join(f"{n} {t:7.1f} us" for n, t in times.items()), flush=True)
    names = list(dict.fromkeys(r[2] for r in rows))
    table = {(r[0], r[1], r[2]): r[3] for r in rows}
    lines = [f"host time per call, {where}; torch {torch.__version__}; best of {rounds} rounds of {calls} calls", "",
             "| op | pass | " + " | ".join(f"{n} (us)" for n in names) + " | ours / via op | ours / torch |",
             "|" + "---|" * (4 + len(names))]
    for key in dict.fromkeys(r[:2] for r in rows):
        cells = [f"{table[key + (n,)]:.1f}" if key + (n,) in table else "-" for n in names]
        ratio = lambda other: (f"{table[key + ('ours',)] / table[key + (other,)]:.2f}"
                               if key + ("ours",) in table and key + (other,) in table else "-")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {ratio('via op')} | {ratio('torch')} |")
    emit(lines + notes, args.out, "op,pass,provider,seconds,us", [(o, m, n, t / 1e6, t) for o, m, n, t in rows])


if __name__ == "__main__":
    main()
    sys.exit(exit_status())
