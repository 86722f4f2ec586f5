"""The `generalist` command line: train, eval, predict, data, info, check, bench.

User errors (bad arguments, unreadable files, unknown tasks) print one line and exit with 2;
tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings


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

    from generalist.infer.generalist import resolve_device

    device = resolve_device(args.device)
    if not 0 <= args.seed < 2 ** 63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
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
        skipped = []  # (case, dtype, reason): a backend that serves no case for one reason gets one line
        for name, lq, lk, h, hkv, d, causal, prefix in cases:
            for dtype in dtypes:
                case = random_varlen(lq, lk, h, hkv, d, dtype=dtype, prefix=prefix, device=device, generator=gen)
                try:
                    out = flash_attn_varlen_func(case.q, case.k, case.v, case.cu_q, case.cu_k, max(lq), max(lk),
                                                 causal=causal, prefix_lens=case.prefix_lens, backend=backend)
                except ValueError as error:  # this backend does not serve these inputs
                    skipped.append((name, str(dtype)[6:], str(error)))
                    continue
                want, _ = naive_attention(case.q, case.k, case.v, lq, lk, causal=causal, prefix_lens=case.prefix_lens)
                same, _ = naive_attention(case.q, case.k, case.v, lq, lk, causal=causal,
                                          prefix_lens=case.prefix_lens, dtype=dtype)
                err = (out.double() - want).abs().max().item()
                base = (same.double() - want).abs().max().item()
                ok = err <= 2 * base + atol[dtype]
                failures += not ok
                print(f"{backend:<10} {name:<24} {str(dtype)[6:]:<9} {err:>10.2e} {base:>10.2e}  {'ok' if ok else 'FAIL'}")
        if len(skipped) == len(cases) * len(dtypes) and len({why for *_, why in skipped}) == 1:
            skipped = [("every case", "", skipped[0][2])]
        for name, dtype, why in skipped:
            print(f"{backend:<10} {name:<24} {dtype:<9} {'':>10} {'':>10}  skipped: {why}")
    print(f"\n{'all backends match the float64 semantics' if not failures else f'{failures} check(s) FAILED'}")
    return 1 if failures else 0


def _bench(args) -> int:
    from generalist.bench import run

    rows = run(tuple(op.strip() for op in args.ops.split(",") if op.strip()), args.device, args.dtype, args.quick,
               args.json)
    wrong = [r for r in rows if r.status.startswith("wrong")]
    if wrong:
        print(f"\n{len(wrong)} row(s) of a backend whose output disagrees with the reference: not timed", file=sys.stderr)
    return 1 if wrong else 0


def _train(args) -> int:
    """Under torchrun (`torchrun --nproc-per-node N -m generalist train ...`) every rank runs this;
    rank 0 alone clears --overwrite, logs, saves and evaluates. SIGTERM or SIGINT during training
    saves a checkpoint after the current step and exits with 143 or 130."""
    from generalist.train.data import build_data, get_mixture
    from generalist.train.distributed import Distributed, check_batch, check_expert_parallel
    from generalist.train.trainer import TrainConfig, Trainer, check_mixture_options, set_option

    cfg = TrainConfig(preset=args.preset or "demo", mixture=args.mixture or "demo", out=args.out,
                      max_minutes=args.max_minutes)
    if args.resume:
        from pathlib import Path

        from generalist._fields import check_keys
        from generalist.train.checkpoint import find_checkpoint, run_meta

        ckpt = find_checkpoint(Path(args.out))
        _, saved = run_meta(ckpt)
        check_keys(TrainConfig, saved, f"{ckpt / 'meta.json'}, training options of another version: ")
        # the run's own time budget unless --max-minutes gives another
        budget = saved.get("max_minutes") if args.max_minutes is None else args.max_minutes
        # built from a copy, which --set changes while `saved` stays as the run was built
        # (runs saved before freq_warp existed trained without it)
        cfg = TrainConfig(**{"freq_warp": 0.0, **json.loads(json.dumps(saved)), "out": args.out,
                             "max_minutes": budget})
        for name in ("preset", "mixture"):  # what the run is made of: as it was built
            given = getattr(args, name)
            if given is not None and given != getattr(cfg, name):
                raise ValueError(f"--resume continues the run as it was built: its {name} is {getattr(cfg, name)!r}, "
                                 f"not {given!r} (leave out --{name}, or start a new run with --overwrite or another --out)")
    if args.steps is not None:
        cfg.steps = args.steps
    for assignment in args.set or []:
        set_option(cfg, assignment)
    cfg.check()  # --steps and --max-minutes too
    if args.resume:  # the model, its tokenizer and the data splits were made from these
        for name in ("model", "vocab_size", "seed"):
            if getattr(cfg, name) != saved.get(name, getattr(cfg, name)):
                raise ValueError(f"--resume continues the run as it was built: {name} is {saved[name]!r} there, "
                                 f"not {getattr(cfg, name)!r} (start a new run with --overwrite or another --out)")
    from generalist.models.config import preset

    mcfg = preset(cfg.preset, vocab_size=cfg.vocab_size, **cfg.model)  # the model's options, before the data is built
    mixture = get_mixture(cfg.mixture)  # and the mixture, before --overwrite deletes anything
    check_mixture_options(cfg, mixture)
    from pathlib import Path

    group = Distributed.from_env(cfg.dist_timeout_s)  # None without torchrun
    main_rank = group is None or group.main
    try:
        if group is not None:
            check_batch(cfg.batch_size, group.world, cfg.contrastive_batch)  # before --overwrite deletes anything
            if cfg.expert_parallel:
                check_expert_parallel(mcfg.n_routed, group.world)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a directory")
        from generalist.train.checkpoint import check_run_dir

        check_run_dir(out)  # (before the data is built; Trainer checks it too)
        if not args.resume and ((out / "checkpoint").exists() or (out / ".checkpoint.old").exists()):
            if not args.overwrite:
                raise ValueError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
            if main_rank:
                from generalist.train.checkpoint import clear_run

                clear_run(out)  # the run's own files; anything else in the folder stays
        if group is not None:
            group.barrier()  # nobody writes into --out before rank 0 has cleared it
        # every rank builds the data (the cache is safe for concurrent builds)
        data = build_data(mixture, seed=cfg.seed, progress=main_rank)
        trainer = Trainer(cfg, data, resume=args.resume, progress=main_rank)
        trainer.fit()
        if group is not None:
            # every rank done with its collectives before any tears the groups down: a rank that
            # destroyed them while its peer's last exchange was in flight once aborted at exit
            group.barrier()
    finally:
        if group is not None:
            group.close()
    if trainer.stopped_by is not None:  # SIGTERM or SIGINT: saved where it stopped, no evaluation
        return 128 + trainer.stopped_by  # the shell's code for a process ended by that signal
    if not args.no_eval and main_rank:
        return _evaluate_run(args.out, data)
    return 0


def eval_mixture(sizes: dict, trained, tasks=None, limit=None) -> dict:
    """The held-out splits to build for evaluating a run: each of its `trained` tasks (those of
    `tasks` only, if given) with no training examples and the test examples its mixture's `sizes`
    give (all, for a task they leave out), at most `limit` each; a test split of 0 stays 0."""
    mixture = {t: {**sizes.get(t, {}), "train": 0} for t in trained if tasks is None or t in tasks}
    if limit is not None:
        mixture = {t: {**m, "test": limit if m.get("test") is None else min(limit, m["test"])}
                   for t, m in mixture.items()}
    return mixture


def _evaluate_run(run_dir, data=None, limit=None, device=None, bf16=None, tasks=None) -> int:
    from pathlib import Path

    from generalist.infer.generalist import Generalist, resolve_device
    from generalist.train.checkpoint import (CHECKPOINT, PARTIAL_PREDICTIONS, PARTIAL_RESULTS, PREDICTIONS,
                                             find_checkpoint, read_json, run_meta)
    from generalist.data.tasks import discover
    from generalist.train.data import build_data, changed_splits, load_mixtures
    from generalist.train.evaluate import answer_records, evaluate, format_table, write_predictions, write_results
    from generalist.train.report import write_report

    ckpt = find_checkpoint(Path(run_dir))
    trained, train = run_meta(ckpt)
    device = resolve_device(device)  # before any data is built
    if tasks is not None:
        unknown = sorted(set(tasks) - set(trained))
        if unknown or not tasks:
            problem = f"unknown tasks {unknown}" if unknown else "no task named"
            raise ValueError(f"--tasks: {problem}; this run has {', '.join(trained)}")
        if data is not None:
            data = {t: d for t, d in data.items() if t in tasks}
    if data is None:
        # the held-out splits only: every task seeds its splits apart, so its test examples are
        # the same without the training ones (whose generation is most of the build's time). The
        # run's own tasks, sized as its mixture sizes them now (a task the mixture no longer
        # holds, or a mixture since removed: its whole test split)
        mixture = eval_mixture(load_mixtures().get(train["mixture"], {}), trained, tasks, limit)
        known = discover()
        lost = sorted(set(mixture) - set(known))
        if lost:
            raise ValueError(f"this run was trained on {', '.join(map(repr, lost))}, which no task file defines here "
                             "(a task of your own: is GENERALIST_TASKS_PATH set?)")
        data = build_data(mixture, tasks=known, seed=train["seed"])
    changed = changed_splits(data, read_json(ckpt / "meta.json").get("test_splits"))
    if changed:
        warnings.warn(f"the test split of {', '.join(changed)} differs from the one this run recorded (the task's data "
                      "or its split changed since training): those figures are not comparable with the run's, and "
                      "their test examples may have been training examples", stacklevel=2)
    answers = {}
    results = evaluate(Generalist.load(ckpt, device=device, bf16=bf16), data, answers=answers)
    print(format_table(results))
    records = answer_records(data, answers)
    # a run's checkpoint (or the one a cut-short save left) writes into its run; any other
    # checkpoint folder into itself
    run_dir = ckpt.parent if ckpt.name in (CHECKPOINT, f".{CHECKPOINT}.old") else ckpt
    if limit is not None or tasks is not None:
        # a part of the evaluation (fewer examples, fewer tasks; a smaller retrieval gallery reads
        # higher) must not replace the whole one that eval.json and the report hold
        print(f"\nwrote {write_results(run_dir, results, PARTIAL_RESULTS)} and "
              f"{write_predictions(run_dir, records, PARTIAL_PREDICTIONS).name} (a partial evaluation: "
              f"eval.json, {PREDICTIONS} and report.html are left as they were)")
        return 0
    print(f"\nwrote {write_results(run_dir, results)} and {write_predictions(run_dir, records).name}")
    print(f"report: {write_report(run_dir, results, ckpt, records, data)}")
    return 0


def _eval(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    tasks = None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    return _evaluate_run(args.run_dir, limit=args.limit, device=args.device, bf16=False if args.fp32 else None,
                         tasks=tasks)


def _predict(args) -> int:
    from generalist.infer.generalist import Generalist

    if args.beam < 1:
        raise ValueError(f"--beam must be >= 1, got {args.beam}")
    table = None if args.table is None else _parse_table(args.table)
    g = Generalist.load(args.run_dir, device=args.device, bf16=False if args.fp32 else None)
    inputs = dict(image=args.image, audio=args.audio, video=args.video, table=table, text=args.text)
    if args.labels is None:
        if args.prompt is not None:
            raise ValueError("--prompt goes with --labels")
        if args.by != "auto":
            raise ValueError("--by goes with --labels")
        answer = g.predict(task=args.task, beam_size=args.beam, **inputs)
        print(json.dumps({"task": args.task, "prediction": answer}) if args.json else answer)
        return 0
    if args.beam != 1:
        raise ValueError("--beam does not apply to --labels (nothing is decoded)")
    labels = [x.strip() for x in args.labels.split(",")]
    by = args.by
    if by == "auto":  # the contrastive head where it was trained for the task (or the text head cannot
        # answer it), else the text head
        known = args.task in g.tasks
        by = "contrastive" if known and (g.trained_contrastively(args.task) or not g.answers_in_text(args.task)) \
            else "text"
    if by == "text":
        if args.prompt is not None:
            raise ValueError("--prompt goes with the contrastive head (--by contrastive); the text head scores each "
                             "label as the whole answer")
        scores = g.rank(labels, task=args.task, **inputs)
    else:
        scores = g.classify(labels, task=args.task, prompt="{}" if args.prompt is None else args.prompt, **inputs)
    best = next(iter(scores))
    print(json.dumps({"task": args.task, "prediction": best, "scores": scores, "by": by}) if args.json else best)
    return 0


def _parse_table(text: str):
    """--table: "v0,v1,..." (columns 0, 1, ...) or "c=v,c=v,..." (column ids as the task numbers
    them); an empty value, ? or nan is missing. -> (column ids, float32 values)."""
    import numpy as np

    usage = "comma-separated numbers, or COLUMN=VALUE pairs (empty or ? for a missing value)"
    items = text.split(",")
    pairs = [item.split("=", 1) if "=" in item else (None, item) for item in items]
    if len({c is None for c, _ in pairs}) > 1:
        raise ValueError(f"--table mixes plain values and COLUMN=VALUE pairs: {text!r}")
    try:
        columns = [i if c is None else int(c) for i, (c, _) in enumerate(pairs)]
        values = [float("nan") if v.strip().lower() in ("", "nan", "?") else float(v) for _, v in pairs]
    except ValueError:
        raise ValueError(f"--table must be {usage}, got {text!r}") from None
    if len(set(columns)) < len(columns):
        raise ValueError(f"--table names a column twice: {text!r}")
    if any(not 0 <= c < 2 ** 31 for c in columns):  # (the table embedder names the model's own limit)
        raise ValueError(f"--table column ids must be in [0, 2^31), got {text!r}")
    big = [v for v in values if abs(v) > float(np.finfo(np.float32).max)]
    if big:
        raise ValueError(f"--table value {big[0]!r} is beyond float32's range")
    if all(v != v for v in values):
        raise ValueError(f"--table has no value, only missing ones: {text!r}")
    return np.array(columns), np.array(values, dtype=np.float32)


def _add_inference_options(parser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--fp32", action="store_true", help="on a GPU, run in fp32 instead of under bf16 autocast")


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
    bench = sub.add_parser("bench", help="time every kernel backend of the model's ops against PyTorch's own, here")
    bench.add_argument("--ops", default="attention,moe,decode", help="comma-separated: attention, moe, decode")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: bf16 on a GPU, fp32 on a CPU)")
    bench.add_argument("--quick", action="store_true", help="fewer and smaller cases, fewer repetitions")
    bench.add_argument("--json", default=None, metavar="FILE", help="also write the rows to FILE as JSON")
    bench.set_defaults(func=_bench)

    train = sub.add_parser("train", help="train one generalist on a task mixture, then evaluate it and write a report")
    train.add_argument("--preset", default=None, help="model preset: tiny, demo or base (default: demo; with "
                                                      "--resume: the run's)")
    train.add_argument("--mixture", default=None, help="task mixture from tasks/mixtures.py or a mixtures.py on "
                                                       "GENERALIST_TASKS_PATH (default: demo; with --resume: the run's)")
    train.add_argument("--out", default="runs/demo", help="run directory (checkpoints, logs, report)")
    train.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 1000, warm-up 50; with "
                                                                "--resume: the run's)")
    train.add_argument("--max-minutes", type=float, default=None,
                       help="stop (with a checkpoint) after this many minutes of training, counted over every resume")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a training option, or the model's with model.KEY=VALUE (repeatable)")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    again.add_argument("--overwrite", action="store_true", help="delete an existing run in --out first (its "
                                                                "checkpoints, logs and report; nothing else there)")
    train.add_argument("--no-eval", action="store_true", help="skip the evaluation and report at the end")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="per-task metrics of a trained run on its held-out splits")
    ev.add_argument("run_dir")
    partial = "a partial evaluation: written to eval-partial.json and predictions-partial.jsonl"
    ev.add_argument("--limit", type=int, default=None, help=f"at most this many test examples per task ({partial})")
    ev.add_argument("--tasks", default=None, help=f"comma-separated: evaluate only these of the run's tasks ({partial})")
    _add_inference_options(ev)
    ev.set_defaults(func=_eval)

    pr = sub.add_parser("predict", help="ask a trained generalist: any mix of inputs in, text out")
    pr.add_argument("run_dir")
    pr.add_argument("--task", required=True, help="one of the run's tasks")
    pr.add_argument("--image", help="PNG/JPEG/BMP/GIF/WebP/TIFF or .npy")
    pr.add_argument("--audio", help="WAV (8/16/24/32-bit PCM or float, any channels); .mp3/.flac/.ogg/... "
                                    "or a video's soundtrack (needs ffmpeg)")
    pr.add_argument("--video", help=".npy clip (frames x H x W [x C]), animated .gif, or .mp4/.mov/.avi/.mkv/.webm "
                                    "(needs ffmpeg)")
    pr.add_argument("--table", help="comma-separated feature values in column order, or COLUMN=VALUE pairs "
                                    "in any order (empty or ? for missing)")
    pr.add_argument("--text", help="text, or a .txt file")
    pr.add_argument("--beam", type=int, default=1, help="beam size")
    pr.add_argument("--labels", help="comma-separated labels: rank them against the inputs instead of generating "
                                     "text, a probability each (--json)")
    pr.add_argument("--by", choices=("auto", "text", "contrastive"), default="auto",
                    help="with --labels: 'text' scores each label as the task's whole answer through the text head; "
                         "'contrastive' compares embeddings through the contrastive head (zero-shot); 'auto' "
                         "(default): contrastive for a task trained contrastively, else text")
    pr.add_argument("--prompt", help="with --labels: the text each label is put into, e.g. 'a photo of a {}' "
                                     "(default: the label alone)")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    _add_inference_options(pr)
    pr.set_defaults(func=_predict)

    try:
        from generalist.data.cli import add_data_commands
    except ImportError:  # the data layer is optional for the kernel-only commands
        pass
    else:
        add_data_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from generalist.data.sources import SourceMissing
    from generalist.train.distributed import DistributedError

    def show(message, *_, **__):  # one line naming the command, as errors are (not a source line and its code)
        print(f"generalist {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            return args.func(args)
    except DistributedError as error:  # a rank died or hung: one line, no traceback
        print(f"generalist {args.command}: error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`generalist check | head`): no more output
        sys.stdout = open(os.devnull, "w")
        return 141
    except (ValueError, OSError, FloatingPointError, SourceMissing) as error:  # one line, no traceback
        print(f"generalist {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"generalist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
