"""MoE grouped-matmul microbenchmark: TFLOP/s of the grouped path against a per-expert loop and
against one dense matmul of the same FLOPs, measured in one run.

    python benchmarks/moe.py [--quick] [--out results.md]
    python benchmarks/moe.py --kernels [--out results.md]   # only the forward, dx, dw kernels apart
                                                            # (--quick runs both), with their roofline
    ncu --profile-from-start off -o moe python benchmarks/moe.py --ncu   # one launch of each kernel, profiled
    ncu --import moe.ncu-rep --csv --page raw > moe.csv && python benchmarks/moe.py --ncu-summary moe.csv

GPU only (bf16): triton.testing.do_bench, median of CUDA-event timings. Providers:
  triton            generalist.ops.grouped_mm(backend="triton"), the grouped kernels;
  reference         generalist.ops.grouped_mm(backend="reference"), a loop of torch.matmul per expert;
                    both called as the MoE layer calls them (check_values=False: no device sync);
  torch._grouped_mm PyTorch's own grouped GEMM, when this torch has it and it runs the shape;
  dense             one torch.matmul (T, D) @ (D, F): the same FLOPs with no grouping, the ceiling.
TFLOP/s = 2·T·D·F for the forward, 3× that for forward + backward (dx and dw). Group sizes are
balanced (T/E each) or skewed (Zipf-like, 1/rank, shuffled). Without a GPU it says so and exits 0.
The roofline of `--kernels`: each kernel's floor is the larger of its FLOPs at the dense matmul's
rate for its shape and its bytes (each input read once, the output written once) at the copy
bandwidth measured in the same run; at 64 experts of 256 rows the E·D·F weights (or their
gradient) are as many bytes as the FLOPs can hide. Benchmarks never assert.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from _report import emit, exit_status, pivot, tuner_choices, until_stopped

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


# the --kernels rows whose host time is measured too: each kernel path, and the autograd ones
HOST_TIMED = ("fwd", "dx+dw, as planned", "fwd+dx+dw", "autograd fwd", "autograd fwd+bwd",
              "autograd fwd+bwd, one thread")


def _one_thread(fn):
    """fn() with autograd's backward on the calling thread (no handoff to its device thread)."""
    with torch.autograd.set_multithreading_enabled(False):
        return fn()


def _host_profile(fn, grads, title: str, calls=20, top=12) -> list[str]:
    """Markdown lines: cProfile of `calls` back-to-back calls of fn (host side; the GPU is waited on
    once, at the end), the `top` functions by their own time."""
    import cProfile
    import pstats

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        for g in grads:
            g.grad = None
        fn()
    profile.disable()
    sync()
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, primitive calls, own, cumulative, callers)
    ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    lines = ["", f"Host profile (cProfile), {title}: {calls} calls, the functions taking the most time of their own "
             "(us per call):", "", "| function | own | with callees | calls a call |", "|---|---|---|---|"]
    for (path, line, name), (_, primitive, own, cumulative, _) in ranked:
        where = f"{os.path.basename(path)}:{line}" if line else path
        lines.append(f"| {name} ({where}) | {own / calls * 1e6:.1f} | {cumulative / calls * 1e6:.1f} | "
                     f"{primitive / calls:g} |")
    return lines


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

    return tuner_choices("Triton configurations chosen by the autotuner (key: K, N, E, t_bucket, TMA_OK, "
                         "B_TRANSPOSED for mm; D, F, E, t_bucket, TMA_OK, TMA_LOAD_OK for dw):",
                         ((k, K._autotuned(k, 2, torch.cuda.current_device(), True).tuner) for k in ("mm", "dw"))
                         ) + backward_plans_chosen()


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


def kernels_in(part: str) -> int:
    """How many matmuls of 2·T·D·F FLOPs a row of `--kernels` times: "fwd+dx+dw" 3, "dx+dw, ..." 2,
    "autograd fwd+bwd" 3 (its forward and two backward kernels; so with ", ..." after it),
    "autograd fwd" 1, one kernel 1."""
    if part.startswith("autograd"):
        return 3 if part.split(",")[0].endswith("bwd") else 1
    return part.split(",")[0].count("+") + 1


def record(rows, shape, largest, part, name, sec, fl):
    tf = fl / sec / 1e12
    rows.append((shape, largest, part, name, sec, tf))
    print(f"{shape:36s} {part:9s} {name:24s} {sec * 1e3:8.3f} ms {tf:7.1f} TFLOP/s", flush=True)


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (far past L2), counting bytes read and
    written: the memory ceiling of the roofline, measured on the card at hand."""
    src = torch.randint(-2**15, 2**15, (2**29,), dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    sec = _bench_gpu(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / sec


def kernel_bytes(t: int, d: int, f: int, e: int, elem: int) -> int:
    """Fewest bytes a kernel moves: each input read once, its output written once. The weights (or
    their gradient) are E·D·F whatever the grouping; the dense matmul's are D·F."""
    rows = (t * d + t * f) * elem  # x and y (fwd), dy and dx (dx), x and dy (dw)
    return rows + e * d * f * elem


def roofline_lines(rows: list[tuple], dims: dict[str, tuple[int, int, int, int]], bandwidth: float) -> list[str]:
    """Markdown lines: each Triton kernel's time against its floor, the larger of its FLOPs at the
    dense matmul's rate for the same shape (measured in this run) and its bytes at `bandwidth`."""
    times = {(r[0], r[2], r[3]): r[4] for r in rows}
    lines = ["", f"Roofline: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write, measured here); a kernel's "
             "floor is the larger of its FLOPs at the dense matmul's rate and its bytes at that bandwidth.", "",
             "| shape | kernel | MB moved | ms | FLOP floor ms | byte floor ms | floor / time |", "|---|---|---|---|---|---|---|"]
    for shape, (t, d, f, e) in dims.items():
        total = {"ms": 0.0, "flop": 0.0, "byte": 0.0, "floor": 0.0, "mb": 0.0}
        for part in ("fwd", "dx", "dw"):
            if (shape, part, "triton") not in times or (shape, part, "dense") not in times:
                continue
            sec, flop_floor = times[(shape, part, "triton")], times[(shape, part, "dense")]
            nbytes = kernel_bytes(t, d, f, e, 2)
            byte_floor = nbytes / bandwidth
            floor = max(flop_floor, byte_floor)
            for key, v in zip(total, (sec, flop_floor, byte_floor, floor, nbytes / 1e6)):
                total[key] += v
            lines.append(f"| {shape} | {part} | {nbytes / 1e6:.0f} | {sec * 1e3:.3f} | {flop_floor * 1e3:.3f} | "
                         f"{byte_floor * 1e3:.3f} | {floor / sec:.0%} |")
        if total["ms"]:
            lines.append(f"| {shape} | the three | {total['mb']:.0f} | {total['ms'] * 1e3:.3f} | {total['flop'] * 1e3:.3f} | "
                         f"{total['byte'] * 1e3:.3f} | {total['floor'] / total['ms']:.0%} |")
        # dx and dw side by side share one floor: their FLOPs together, or their bytes together
        both = [(shape, part, "dense") for part in ("dx", "dw")]
        if (shape, "dx+dw, side by side", "triton") in times and all(k in times for k in both):
            sec = times[(shape, "dx+dw, side by side", "triton")]
            nbytes = 2 * kernel_bytes(t, d, f, e, 2)
            flop_floor, byte_floor = sum(times[k] for k in both), nbytes / bandwidth
            lines.append(f"| {shape} | dx+dw side by side | {nbytes / 1e6:.0f} | {sec * 1e3:.3f} | {flop_floor * 1e3:.3f} | "
                         f"{byte_floor * 1e3:.3f} | {max(flop_floor, byte_floor) / sec:.0%} |")
    return lines


def mm_candidates(x, dy, w, gs, e: int, lines: list[str]) -> None:
    """Appends markdown lines to `lines` (as they are measured): the forward and dx timed under
    each of mm's tuning candidates alone (its table for this card, less what does not fit)."""
    from generalist.kernels.triton import moe as K

    arch, smem = K._arch_and_smem(torch.cuda.current_device())
    fl = flops(x.shape[0], x.shape[1], dy.shape[1])
    lines += ["", f"The forward and dx under each tuning candidate alone, E{e} (config: BLOCK_M, BLOCK_N, BLOCK_K, "
              "warps, stages[, programs per SM, TMA loads]), TFLOP/s:", "", "| config | fwd | dx |", "|---|---|---|"]
    for config in K.configs_for("mm", 2, arch, smem):
        fwd = _bench_gpu(lambda: K._mm(x, w, gs, config=config))
        dx = _bench_gpu(lambda: K._mm(dy, w.transpose(1, 2), gs, config=config))
        lines.append(f"| {config} | {fl / fwd / 1e12:.0f} | {fl / dx / 1e12:.0f} |")
        print(lines[-1], flush=True)


def dw_candidates(x, dy, w, gs, e: int, lines: list[str]) -> None:
    """Appends markdown lines to `lines` (as they are measured): the dw kernel timed under each of
    its tuning candidates alone, as the tuner saw them (its table for this card, less what does
    not fit its shared memory); then the backward (dx and dw) under each plan it is timed under at
    a key's first call (one after the other, or side by side on two streams)."""
    from generalist.kernels.triton import moe as K

    arch, smem = K._arch_and_smem(torch.cuda.current_device())
    fl = flops(x.shape[0], x.shape[1], dy.shape[1])
    lines += ["", f"dw under each tuning candidate alone, E{e} (config: BLOCK_M, BLOCK_N, BLOCK_K, warps, stages"
              "[, programs per SM, TMA store[, tiles a chunk]]):", "", "| config | ms | TFLOP/s |", "|---|---|---|"]
    for config in K.configs_for("dw", 2, arch, smem):
        sec = _bench_gpu(lambda: K._dw(x, dy, gs, e, config=config))
        lines.append(f"| {config} | {sec * 1e3:.3f} | {fl / sec / 1e12:.0f} |")
        print(lines[-1], flush=True)
    lines += ["", f"dx + dw under each backward plan, E{e} (a kernel without a configuration named runs its tuner's "
              "choice); TFLOP/s at 2·2·T·D·F:", "",
              "| plan | dw config | dx config | ms | TFLOP/s |", "|---|---|---|---|---|"]
    for plan in K.backward_plans(2, arch, smem):
        sec = _bench_gpu(lambda: K.grouped_mm_backward(dy, x, w, gs, plan=plan))
        lines.append(f"| {'side by side' if plan.side_by_side else 'one after the other'} | {plan.dw or 'tuned'} | "
                     f"{plan.dx or 'tuned'} | {sec * 1e3:.3f} | {2 * fl / sec / 1e12:.0f} |")
        print(lines[-1], flush=True)


def backward_plans_chosen() -> list[str]:
    """Markdown lines: the backward plan timed fastest for each key met in this process."""
    from generalist.kernels.triton import moe as K

    if not K._PLANS:
        return []
    lines = ["", "Backward plans kept (dx and dw one after the other or side by side, each kernel under its tuned "
             "configuration unless one is named):", "", "| device, dtype, rows bucket, D, F, E | plan |", "|---|---|"]
    for key, plan in K._PLANS.items():
        named = "".join(f", {kernel} {config}" for kernel, config in (("dw", plan.dw), ("dx", plan.dx)) if config)
        lines.append(f"| {key} | {'side by side' if plan.side_by_side else 'one after the other'}{named} |")
    return lines


def kernel_breakdown(args):
    """The Triton backward's two kernels timed apart (dx = dy @ w^T per group, dw = x^T @ dy per
    group), next to the forward kernel, the three back to back, the same through grouped_mm and
    autograd, and the dense matmul of each one's shape; each kernel again with its weights (or
    gradient) aliased to one expert's block, held in L2; the host time of the Triton paths; the
    kernels' roofline; and each kernel under each of its tuning candidates (mm's at E8 and E64,
    dw's at E64)."""
    import triton
    from generalist.kernels.triton import moe as K

    dtype, t, d, f = torch.bfloat16, 16384, 2048, 1408
    gen = torch.Generator().manual_seed(1)
    x, dy = torch.randn(t, d, dtype=dtype, device="cuda"), torch.randn(t, f, dtype=dtype, device="cuda")
    w_dense = torch.randn(d, f, dtype=dtype, device="cuda")
    dense = {"fwd": lambda: x @ w_dense, "dx": lambda: dy @ w_dense.T, "dw": lambda: x.T @ dy}
    rows, notes, dims, candidates, host_profile = [], [], {}, [], []
    host = ["", "Triton, GPU time (do_bench) against host time per call (the calls' Python and launches, "
            "timed without waiting for the GPU): where the host's is the larger, the GPU waits on it.", "",
            "| shape | kernels | GPU ms | host ms |", "|---|---|---|---|"]
    with until_stopped(notes):
        for e, skew in ((8, "balanced"), (64, "balanced"), (64, "skewed")):
            sizes = group_sizes(t, e, skew, gen)
            gs = torch.tensor(sizes, dtype=torch.int32, device="cuda")
            w = torch.randn(e, d, f, dtype=dtype, device="cuda") * d ** -0.5
            shape = f"T{t} D{d} F{f} E{e} {skew}"
            dims[shape] = (t, d, f, e)
            providers = {("fwd", "triton"): lambda: K._mm(x, w, gs),
                         ("dx", "triton"): lambda: K._mm(dy, w.transpose(1, 2), gs),
                         ("dw", "triton"): lambda: K._dw(x, dy, gs, e),
                         # the backward's two kernels, one after the other and side by side (dw on a
                         # side stream), and as the plan timed fastest for this key runs them
                         ("dx+dw, one after the other", "triton"):
                             lambda: K.grouped_mm_backward(dy, x, w, gs, plan=K.SEQUENTIAL),
                         ("dx+dw, side by side", "triton"): lambda: K.grouped_mm_backward(dy, x, w, gs, plan=K.Plan(True)),
                         ("dx+dw, as planned", "triton"): lambda: K.grouped_mm_backward(dy, x, w, gs),
                         # the three kernels back to back, as the autograd path launches them
                         ("fwd+dx+dw", "triton"): lambda: (K._mm(x, w, gs), K.grouped_mm_backward(dy, x, w, gs))}
            # the same kernels (and tuned configurations) with the E·D·F operand's memory traffic
            # taken away: every expert reads expert 0's weights, or writes its gradient over one
            # (D, F) block, which L2 holds; the time they save is what those bytes cost. The
            # aliased views are no TMA tensors: a dw configuration with TMA stores stores plainly
            # there, and mm is tuned for them apart (TMA_OK is in its key), so where the real
            # call's choice loads through TMA the two differ in that too (the tuner's choices,
            # listed at the end, show both)
            one_w = w[:1].expand(e, d, f)
            one_dw = torch.empty(1, d, f, dtype=dtype, device="cuda").expand(e, d, f)
            providers.update({("fwd, weights in L2", "triton"): lambda: K._mm(x, one_w, gs),
                              ("dx, weights in L2", "triton"): lambda: K._mm(dy, one_w.transpose(1, 2), gs),
                              ("dw, gradient in L2", "triton"): lambda: K._dw(x, dy, gs, e, out=one_dw)})
            providers.update({(part, "dense"): fn for part, fn in dense.items()})
            providers[("dx+dw, one after the other", "dense")] = lambda: (dense["dx"](), dense["dw"]())
            providers[("fwd+dx+dw", "dense")] = lambda: (dense["fwd"](), dense["dx"](), dense["dw"]())
            # the same three kernels through the public function and autograd, as training runs them
            xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
            def autograd_fwd(xg=xg, wg=wg, gs=gs):  # the forward recording its graph
                return grouped_mm(xg, wg, gs, backend="triton", check_values=False)

            providers[("autograd fwd", "triton")] = autograd_fwd
            providers[("autograd fwd+bwd", "triton")] = lambda: autograd_fwd().backward(dy)
            # the same with the backward run on the calling thread, not handed to autograd's thread
            # for the GPU: the difference is that handoff (the host rows say whether it matters)
            providers[("autograd fwd+bwd, one thread", "triton")] = lambda: _one_thread(
                lambda: autograd_fwd().backward(dy))
            for (part, name), fn in providers.items():
                grads = (xg, wg) if part.startswith("autograd") else ()
                sec = _bench_gpu(fn, grads)
                record(rows, shape, max(sizes), part, name, sec, flops(t, d, f) * kernels_in(part))
                if name == "triton" and part in HOST_TIMED:
                    host.append(f"| {shape} | {part} | {sec * 1e3:.3f} | {_host_seconds(fn, grads) * 1e3:.3f} |")
            if e == 8:  # where the host time comes from: the Python of the autograd call, by function
                host_profile = _host_profile(lambda: _one_thread(lambda: autograd_fwd().backward(dy)), (xg, wg),
                                             f"{shape}, autograd fwd+bwd, one thread")
            if skew == "balanced":
                mm_candidates(x, dy, w, gs, e, candidates)
            if e == 64 and skew == "balanced":
                dw_candidates(x, dy, w, gs, e, candidates)
    lines = [f"kernels apart, device: {torch.cuda.get_device_name()}, bf16, triton {triton.__version__}; "
             "TFLOP/s = 2·T·D·F per kernel, 2× that for dx+dw, 3× for the three together and for autograd fwd+bwd", ""]
    roofline = roofline_lines(rows, dims, copy_bandwidth()) if not notes else []
    out = args.out.replace(".md", "-kernels.md") if args.out else None
    emit(lines + pivot(rows, ("shape", "largest group", "kernel")) + host + host_profile + roofline + candidates
         + backward_plans_chosen() + notes, out,
         "shape,largest_group,kernel,provider,seconds,tflops", rows)


# What `--ncu` launches inside the profiled range, in order (the report's rows come in this order)
# (dx at E8 against the dense dx: at 75% of it on the H100, where the forward is at 99%)
NCU_LAUNCHES = ("E64 fwd", "E64 dx", "E64 dw", "E64 dw, first config", "E8 dx", "E8 dw", "dense fwd", "dense dx",
                "dense dw")
# Columns of ncu's raw page shown by --ncu-summary (where present: names differ across ncu versions)
NCU_METRICS = (
    ("gpu__time_duration.sum", "duration"),
    ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "DRAM throughput %"),
    ("dram__bytes_read.sum", "DRAM read"),
    ("dram__bytes_write.sum", "DRAM write"),
    ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "SM throughput %"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "achieved occupancy %"),
    ("sm__maximum_warps_per_active_cycle_pct", "theoretical occupancy %"),
    ("launch__registers_per_thread", "registers / thread"),
    ("launch__shared_mem_per_block_dynamic", "dynamic smem / block"),
    ("launch__occupancy_limit_registers", "blocks / SM (registers)"),
    ("launch__occupancy_limit_shared_mem", "blocks / SM (smem)"),
    ("launch__grid_size", "grid"),
    ("lts__t_sector_hit_rate.pct", "L2 hit %"),
    ("smsp__average_warp_latency_per_inst_issued.ratio", "warp cycles / issued instruction"),
)


def ncu_launches():
    """One launch of each kernel of NCU_LAUNCHES between cudaProfilerStart and Stop, after each
    has been tuned and warmed up outside that range: run under ncu --profile-from-start off."""
    from generalist.kernels.triton import moe as K

    dtype, t, d, f = torch.bfloat16, 16384, 2048, 1408
    x, dy = torch.randn(t, d, dtype=dtype, device="cuda"), torch.randn(t, f, dtype=dtype, device="cuda")
    w_dense = torch.randn(d, f, dtype=dtype, device="cuda")
    gen = torch.Generator().manual_seed(1)
    first_dw = K.configs_for("dw", 2, *K._arch_and_smem(torch.cuda.current_device()))[0]
    launches = []
    for e in (64, 8):
        gs = torch.tensor(group_sizes(t, e, "balanced", gen), dtype=torch.int32, device="cuda")
        w = torch.randn(e, d, f, dtype=dtype, device="cuda") * d ** -0.5
        if e == 64:
            launches.append(lambda w=w, gs=gs: K._mm(x, w, gs))
        launches += [lambda w=w, gs=gs: K._mm(dy, w.transpose(1, 2), gs), lambda gs=gs, e=e: K._dw(x, dy, gs, e)]
        if e == 64:  # dw under its table's first entry (a program per tile), next to the tuner's choice
            launches.append(lambda gs=gs: K._dw(x, dy, gs, 64, config=first_dw))
    launches += [lambda: x @ w_dense, lambda: dy @ w_dense.T, lambda: x.T @ dy]
    assert len(launches) == len(NCU_LAUNCHES)
    for fn in launches:  # tune and warm up, unprofiled
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for fn in launches:
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled, in order:", ", ".join(NCU_LAUNCHES))


def ncu_summary(path: str, out: str | None) -> None:
    """A markdown table (metrics x launches) from ncu's raw CSV page of an --ncu run, and the
    three largest stall reasons per launch."""
    import csv

    with open(path, newline="") as fh:
        table = [r for r in csv.reader(fh) if r]
    # the header is the row that starts with "ID" (ncu may print warnings before it)
    first = next((i for i, r in enumerate(table) if r[0] == "ID"), None)
    if first is None:
        raise SystemExit(f"{path}: no ncu raw page in it (no row starting with \"ID\"); did ncu profile anything?")
    header, table = table[first], table[first:]
    has_units = len(table) > 1 and table[1][0] == ""  # a row of units under the names, ID column empty
    units = table[1] if has_units else [""] * len(header)
    data = [r for r in table[1 + has_units:] if len(r) == len(header)]
    labels = list(NCU_LAUNCHES[:len(data)]) + [f"launch {i}" for i in range(len(NCU_LAUNCHES), len(data))]
    col = {name: i for i, name in enumerate(header)}
    # the tensor pipes' utilisation, whatever this ncu calls them
    tensor = [(name, name.replace("sm__", "").replace(".avg.pct_of_peak_sustained_active", " %")) for name in header
              if "pipe_tensor" in name and name.endswith(".avg.pct_of_peak_sustained_active")]
    lines = ["ncu (--clock-control none), bf16, T16384 D2048 F1408, balanced groups; one launch each", "",
             "| metric | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    if "Kernel Name" in col:
        lines.append("| kernel | " + " | ".join(r[col["Kernel Name"]][:32] for r in data) + " |")
    if not data or not any(name in col for name, _ in NCU_METRICS):
        raise SystemExit(f"{path}: {len(data)} launches and none of the expected metrics in the header")
    for name, label in list(NCU_METRICS) + tensor:
        if name in col:
            unit = units[col[name]]
            lines.append(f"| {label}{f' ({unit})' if unit and unit != '%' else ''} | "
                         + " | ".join(r[col[name]] for r in data) + " |")
    stalls = [(name, i) for name, i in col.items()
              if name.startswith("smsp__average_warps_issue_stalled_") and name.endswith("_per_issue_active.ratio")]
    lines += ["", "Largest stall reasons (warps stalled per issued instruction):", ""]
    for label, r in zip(labels, data):
        def value(i):
            try:
                return float(r[i].replace(",", ""))
            except ValueError:
                return 0.0
        top = sorted(stalls, key=lambda s: -value(s[1]))[:3]
        reasons = ", ".join(f"{n[len('smsp__average_warps_issue_stalled_'):-len('_per_issue_active.ratio')]} "
                            f"{value(i):.2f}" for n, i in top)
        lines.append(f"- {label}: {reasons or 'not in this report'}")
    emit(lines, out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one shape, E in {8, 64}")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    parser.add_argument("--kernels", action="store_true",
                        help="time the Triton forward, dx and dw kernels apart against dense matmuls (one shape)")
    parser.add_argument("--ncu", action="store_true",
                        help="launch each kernel once inside a profiler range (run under ncu --profile-from-start off)")
    parser.add_argument("--ncu-summary", metavar="CSV", help="summarise ncu's raw CSV page of an --ncu run")
    args = parser.parse_args()
    if args.ncu_summary:
        return ncu_summary(args.ncu_summary, args.out)
    torch.manual_seed(0)
    if not torch.cuda.is_available():
        print("benchmarks/moe.py measures GPU kernels and needs a CUDA device; nothing to do here.")
        return
    if args.ncu:
        return ncu_launches()
    finished = args.kernels or gpu_grid(args)
    if finished and (args.kernels or args.quick):
        kernel_breakdown(args)


if __name__ == "__main__":
    main()
    sys.exit(exit_status())
