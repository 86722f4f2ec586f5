"""MoE grouped-matmul microbenchmark: TFLOP/s of the grouped path against a per-expert loop and
against one dense matmul of the same FLOPs, measured in one run.

    python benchmarks/moe.py [--quick] [--out results.md]
    python benchmarks/moe.py --kernels [--out results.md]   # only the forward, dx, dw kernels apart
                                                            # (--quick runs both)

GPU only (bf16): triton.testing.do_bench, median of CUDA-event timings. Providers:
  triton            generalist.ops.grouped_mm(backend="triton"), the grouped kernels;
  reference         generalist.ops.grouped_mm(backend="reference"), a loop of torch.matmul per expert;
                    both called as the MoE layer calls them (check_values=False: no device sync);
  torch._grouped_mm PyTorch's own grouped GEMM, when this torch has it and it runs the shape;
  dense             one torch.matmul (T, D) @ (D, F): the same FLOPs with no grouping, the ceiling.
TFLOP/s = 2·T·D·F for the forward, 3× that for forward + backward (dx and dw). Group sizes are
balanced (T/E each) or skewed (Zipf-like, 1/rank, shuffled). Without a GPU it says so and exits 0.
Benchmarks never assert.
"""

from __future__ import annotations

import argparse
import time

import torch

from _report import emit, pivot, tuner_choices, until_stopped

from generalist.ops import MOE_BACKENDS, BackendError, grouped_mm

PASS_FACTOR = {"fwd": 1.0, "fwd+bwd": 3.0}


def flops(t, d, f):
    return 2 * t * d * f


def group_sizes(t: int, e: int, skew: str, gen: torch.Generator) -> list[int]:
    """E sizes summing to T: "balanced" (T/E each) or "skewed" (weights 1/rank, shuffled)."""
    if skew == "balanced":
        weights = torch.ones(e, dtype=torch.float64)
    else:
        weights = 1.0 / torch.arange(1, e + 1, dtype=torch.float64)
        weights = weights[torch.randperm(e, generator=gen)]
    sizes = (weights / weights.sum() * t).floor().long()
    sizes[int(weights.argmax())] += t - int(sizes.sum())
    return sizes.tolist()


def serves(backend, dtype) -> bool:
    x, w = torch.zeros(4, 8, dtype=dtype, device="cuda"), torch.zeros(1, 8, 8, dtype=dtype, device="cuda")
    try:
        MOE_BACKENDS.resolve(backend, x, w, torch.tensor([4], device="cuda"))
    except BackendError as error:
        print(f"skipping {error}")
        return False
    return True


def _bench_gpu(fn, grads=()):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads), return_mode="median") / 1e3


def _host_seconds(fn, grads=(), calls=10) -> float:
    """Host time per call: back-to-back calls timed before the GPU is waited on, which is the
    Python and launch path alone while the GPU's queue has room (a few launches a call)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        for g in grads:
            g.grad = None
        fn()
    sec = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return sec


def _timed_modes(make, inputs):
    """(mode, seconds or the exception) for a provider; make() runs the forward and returns the output."""
    try:
        with torch.no_grad():
            yield "fwd", _bench_gpu(make)
        dy = torch.randn_like(make())
        yield "fwd+bwd", _bench_gpu(lambda: make().backward(dy), inputs)
    except Exception as error:  # a provider that cannot run this shape (or pass) is reported, not fatal
        yield None, error


def _providers(backends, t, d, f, sizes, dtype):
    """(name, make, inputs) for one shape: the grouped providers share x, w, group_sizes."""
    e = len(sizes)
    x = torch.randn(t, d, dtype=dtype, device="cuda", requires_grad=True)
    w = (torch.randn(e, d, f, dtype=dtype, device="cuda") * d ** -0.5).requires_grad_()
    gs = torch.tensor(sizes, dtype=torch.int32, device="cuda")
    for backend in backends:
        # as the MoE layer calls it: group sizes from permute, no host-side check (a device sync)
        yield backend, (lambda backend=backend: grouped_mm(x, w, gs, backend=backend, check_values=False)), (x, w)
    if hasattr(torch, "_grouped_mm"):
        offs = gs.cumsum(0, dtype=torch.int32)
        yield "torch._grouped_mm", (lambda: torch._grouped_mm(x, w, offs)), (x, w)
    x2 = torch.randn(t, d, dtype=dtype, device="cuda", requires_grad=True)
    w2 = (torch.randn(d, f, dtype=dtype, device="cuda") * d ** -0.5).requires_grad_()
    yield "dense", (lambda: torch.matmul(x2, w2)), (x2, w2)


def tuned_configs() -> list[str]:
    """The configuration the autotuner chose for each (kernel, tuning key) of the bf16 kernels."""
    if "triton" not in MOE_BACKENDS.available():
        return []
    from generalist.kernels.triton import moe as K

    return tuner_choices("Triton configurations chosen by the autotuner (key: K, N, E, t_bucket for mm; D, F, E, "
                         "t_bucket for dw):",
                         ((k, K._autotuned(k, 2, torch.cuda.current_device(), True).tuner) for k in ("mm", "dw")))


def gpu_grid(args):
    import triton

    dtype = torch.bfloat16
    backends = [name for name in ("triton", "reference") if name in MOE_BACKENDS.available()
                and serves(name, dtype)]
    gen = torch.Generator().manual_seed(0)
    t = 16384  # tokens x top-k
    shapes = [(2048, 1408)] if args.quick else [(2048, 1408), (1408, 2048), (4096, 1024)]
    experts = (8, 64) if args.quick else (8, 16, 64, 128)
    rows = []
    notes = []
    with until_stopped(notes):
        for d, f in shapes:
            for e in experts:
                for skew in ("balanced", "skewed"):
                    sizes = group_sizes(t, e, skew, gen)
                    shape = f"T{t} D{d} F{f} E{e} {skew}"
                    for name, make, inputs in _providers(backends, t, d, f, sizes, dtype):
                        for mode, sec in _timed_modes(make, inputs):
                            if mode is None:
                                print(f"{name} {shape}: {type(sec).__name__}: {str(sec).splitlines()[0][:160]}")
                                continue
                            tf = flops(t, d, f) * PASS_FACTOR[mode] / sec / 1e12
                            rows.append((shape, max(sizes), mode, name, sec, tf))
                            print(f"{shape:36s} {mode:7s} {name:18s} {sec * 1e3:8.3f} ms {tf:7.1f} TFLOP/s", flush=True)
                    torch.cuda.empty_cache()

    lines = [f"device: {torch.cuda.get_device_name()}, bf16, torch {torch.__version__}, triton {triton.__version__}; "
             "do_bench median; TFLOP/s = 2·T·D·F (fwd), 3× (fwd+bwd); T = tokens × top-k", ""]
    emit(lines + pivot(rows, ("shape", "largest group", "pass")) + notes + tuned_configs(), args.out,
         "shape,largest_group,pass,provider,seconds,tflops", rows)
    return not notes  # False when cut short


def record(rows, shape, largest, part, name, sec, fl):
    tf = fl / sec / 1e12
    rows.append((shape, largest, part, name, sec, tf))
    print(f"{shape:36s} {part:9s} {name:24s} {sec * 1e3:8.3f} ms {tf:7.1f} TFLOP/s", flush=True)


def kernel_breakdown(args):
    """The Triton backward's two kernels timed apart (dx = dy @ w^T per group, dw = x^T @ dy per
    group), next to the forward kernel, the three back to back, the same through grouped_mm and
    autograd, and the dense matmul of each one's shape; the host time of the Triton paths."""
    import triton
    from generalist.kernels.triton import moe as K

    dtype, t, d, f = torch.bfloat16, 16384, 2048, 1408
    gen = torch.Generator().manual_seed(1)
    x, dy = torch.randn(t, d, dtype=dtype, device="cuda"), torch.randn(t, f, dtype=dtype, device="cuda")
    w_dense = torch.randn(d, f, dtype=dtype, device="cuda")
    dense = {"fwd": lambda: x @ w_dense, "dx": lambda: dy @ w_dense.T, "dw": lambda: x.T @ dy}
    rows, notes = [], []
    host = ["", "Triton, GPU time (do_bench) against host time per call (the calls' Python and launches, "
            "timed without waiting for the GPU): where the host's is the larger, the GPU waits on it.", "",
            "| shape | kernels | GPU ms | host ms |", "|---|---|---|---|"]
    with until_stopped(notes):
        for e, skew in ((8, "balanced"), (64, "balanced"), (64, "skewed")):
            sizes = group_sizes(t, e, skew, gen)
            gs = torch.tensor(sizes, dtype=torch.int32, device="cuda")
            w = torch.randn(e, d, f, dtype=dtype, device="cuda") * d ** -0.5
            shape = f"T{t} D{d} F{f} E{e} {skew}"
            providers = {("fwd", "triton"): lambda: K._mm(x, w, gs),
                         ("dx", "triton"): lambda: K._mm(dy, w.transpose(1, 2), gs),
                         ("dw", "triton"): lambda: K._dw(x, dy, gs, e),
                         # the three kernels back to back, as the autograd path launches them
                         ("fwd+dx+dw", "triton"): lambda: (K._mm(x, w, gs), K.grouped_mm_backward(dy, x, w, gs))}
            providers.update({(part, "dense"): fn for part, fn in dense.items()})
            providers[("fwd+dx+dw", "dense")] = lambda: (dense["fwd"](), dense["dx"](), dense["dw"]())
            # the same three kernels through the public function and autograd, as training runs them
            xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
            providers[("autograd fwd+bwd", "triton")] = lambda: grouped_mm(
                xg, wg, gs, backend="triton", check_values=False).backward(dy)
            for (part, name), fn in providers.items():
                grads = (xg, wg) if part.startswith("autograd") else ()
                sec = _bench_gpu(fn, grads)
                record(rows, shape, max(sizes), part, name, sec, flops(t, d, f) * (1 if part in dense else 3))
                if name == "triton" and part in ("fwd+dx+dw", "autograd fwd+bwd"):
                    host.append(f"| {shape} | {part} | {sec * 1e3:.3f} | {_host_seconds(fn, grads) * 1e3:.3f} |")
    lines = [f"kernels apart, device: {torch.cuda.get_device_name()}, bf16, triton {triton.__version__}; "
             "TFLOP/s = 2·T·D·F per kernel, 3× that for the three together and for autograd fwd+bwd", ""]
    out = args.out.replace(".md", "-kernels.md") if args.out else None
    emit(lines + pivot(rows, ("shape", "largest group", "kernel")) + host + notes, out,
         "shape,largest_group,kernel,provider,seconds,tflops", rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one shape, E in {8, 64}")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    parser.add_argument("--kernels", action="store_true",
                        help="time the Triton forward, dx and dw kernels apart against dense matmuls (one shape)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if not torch.cuda.is_available():
        print("benchmarks/moe.py measures GPU kernels and needs a CUDA device; nothing to do here.")
        return
    finished = args.kernels or gpu_grid(args)
    if finished and (args.kernels or args.quick):
        kernel_breakdown(args)


if __name__ == "__main__":
    main()
