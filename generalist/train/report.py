"""The run report: one self-contained report.html (plots inlined as PNG) with the loss curves
per task, the per-task metric table, the routing heatmaps — the fraction of each task's and
each modality's tokens that every layer sends to each routed expert, the picture that shows
whether task pathways formed — and the answers: a confusion matrix per task of a few labels and
a few test examples of every task, inputs drawn, next to their targets (generalist.train.gallery)."""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
from pathlib import Path

import numpy as np


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# task names are any strings a task file gives: "$" must not start math text
_PLAIN_TEXT = {"text.parse_math": False}
MAX_POINTS = 2000  # per curve: a long run is drawn from every point's EMA, thinned to this many


def ema(values: np.ndarray, span: float, log: bool = False) -> np.ndarray:
    """The exponential moving average of `values` (in log space with `log`, a geometric mean
    that one spike does not lift a curve of log-scaled losses by), from the first point on: each
    point averages what came before it, the first being itself."""
    v = np.log(np.maximum(values, 1e-12)) if log else np.asarray(values, dtype=np.float64)
    alpha, out, acc, weight = 2.0 / (span + 1.0), np.empty(len(v)), 0.0, 0.0
    for i, x in enumerate(v):  # bias-corrected, so the first points are not pulled toward 0
        acc, weight = (1 - alpha) * acc + alpha * x, (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return np.exp(out) if log else out


def _thin(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), MAX_POINTS)).round().astype(int))
    return steps[keep], values[keep]


def log_record(line: str) -> dict | None:
    """A metrics.jsonl line's record, or None for a line that is not one (a write a kill cut
    short, a line edited by hand): a JSON object whose "step" is a count."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return record if isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 2 ** 53 else None


def _number(value) -> bool:
    """A real number a float holds (not a bool, NaN, inf, or an int too large to convert)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 2 ** 1000


def read_log(path: Path) -> list[dict]:
    """The records of a metrics.jsonl that hold a step's losses (their task_loss keeps only its
    numbers); other lines are left out, as the trainer leaves them out when it resumes."""
    records = [log_record(line) for line in path.read_text(errors="replace").splitlines()]
    records = [r for r in records if r is not None and isinstance(r.get("task_loss"), dict)]
    for r in records:
        r["task_loss"] = {k: float(v) for k, v in r["task_loss"].items() if _number(v)}
    return records


def loss_figure(records: list[dict]):
    """Each task's training loss (log scale), an EMA in log space over ~2% of its records."""
    plt = _plt()
    with plt.rc_context(_PLAIN_TEXT):
        fig, ax = plt.subplots(figsize=(9, 4.8))
        names = sorted(set().union(*(r["task_loss"] for r in records)), key=lambda n: (n == "contrastive", n))
        colours = plt.get_cmap("tab20").colors  # 20 distinct colours (the default cycle has 10)
        handles, span = [], 1.0
        for i, name in enumerate(names):
            steps = np.array([r["step"] for r in records if name in r["task_loss"]])
            vals = np.array([r["task_loss"][name] for r in records if name in r["task_loss"]])
            span = max(1.0, len(vals) / 50)
            line, = ax.plot(*_thin(steps, ema(vals, span, log=True)), color=colours[i % 20],
                            linestyle="--" if name == "contrastive" else "-", marker="." if len(vals) < 3 else None,
                            label=name)
            handles.append(line)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (EMA of each task's log loss, ~2% of its steps)")
        ax.set_yscale("log")
        if handles:  # explicit labels: a name starting with "_" would otherwise be left out
            ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left",
                      bbox_to_anchor=(1.01, 1.0), title="task (dashed: the contrastive loss)", title_fontsize=8)
        ax.set_title("training loss per task")
    return fig


def signals_figure(records: list[dict]):
    """The run's own signals, where logged: total loss, learning rate, gradient norm, tokens a
    second and the MoE router losses, with the non-finite steps that were skipped marked on the
    loss."""
    plt = _plt()
    steps = np.array([r["step"] for r in records])
    fields = [("loss", "total loss", True), ("lr", "learning rate", False), ("grad_norm", "gradient norm", True),
              ("tokens_per_s", "tokens / s", False), ("aux_loss", "MoE router losses (weighted)", True)]
    fig, axes = plt.subplots(3, 2, figsize=(9, 7.2), sharex=True)
    axes.flat[-1].axis("off")
    for ax, (key, label, log) in zip(axes.flat, fields):
        have = np.array([_number(r.get(key)) and math.isfinite(r[key]) for r in records], dtype=bool)
        if have.any():
            vals = np.array([r[key] for r in records if _number(r.get(key)) and math.isfinite(r[key])], dtype=float)
            xs = steps[have]
            if key != "lr":  # a schedule is drawn as it is; noisy signals as a faint line and their EMA
                ax.plot(*_thin(xs, vals), color="0.75", linewidth=0.6)
                vals = ema(vals, max(1.0, len(vals) / 50), log=log and bool((vals > 0).all()))
            ax.plot(*_thin(xs, vals), color="tab:blue", marker="." if len(vals) < 3 else None)
            if log and (vals > 0).all():
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="0.5")
        if key == "loss":
            skipped = [r["step"] for r in records if r.get("skipped") is True]
            for x in skipped[:200]:
                ax.axvline(x, color="tab:red", alpha=0.3, linewidth=0.8)
            if skipped:
                ax.set_title(f"{len(skipped)} non-finite step(s) skipped (red)", fontsize=8, color="tab:red")
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(which="both", labelsize=7)
    for ax in axes[-1][:1].tolist() + [axes[1][1]]:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelbottom=True)
    fig.suptitle("training signals (grey: every step; blue: EMA)", fontsize=10)
    fig.tight_layout()
    return fig


def routing_figure(counts_LGE: np.ndarray, groups: list[str], title: str, layer_names: list[str] | None = None):
    """counts (layers, groups, experts) -> one heatmap per layer, rows normalised to fractions;
    a row with no tokens (a task that trains no routed layer there, the decoder's non-text
    modalities) is grey, not a row of zeros."""
    plt = _plt()
    n_layers, _, n_experts = counts_LGE.shape
    names = layer_names if layer_names is not None and len(layer_names) == n_layers else \
        [f"layer {i}" for i in range(n_layers)]
    with plt.rc_context(_PLAIN_TEXT):
        fig, axes = plt.subplots(1, n_layers, figsize=(2.4 * n_layers + 2.0, max(2.6, 0.35 * len(groups) + 1.8)),
                                 squeeze=False)
        totals = counts_LGE.sum(axis=2, keepdims=True)
        frac = np.where(totals > 0, counts_LGE / np.maximum(totals, 1), np.nan)
        top = float(np.nanmax(frac)) if np.isfinite(frac).any() else 1.0
        cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
        for layer, ax in enumerate(axes[0]):
            im = ax.imshow(frac[layer], aspect="auto", cmap=cmap, vmin=0, vmax=max(1e-9, top))
            ax.set_title(names[layer], fontsize=8)
            ax.set_xlabel("expert", fontsize=7)
            ax.set_xticks(range(n_experts))
            ax.set_xticklabels([str(e) if n_experts <= 16 or e % 4 == 0 else "" for e in range(n_experts)],
                               fontsize=6)
            ax.set_yticks(range(len(groups)))
            ax.set_yticklabels(groups if layer == 0 else [""] * len(groups), fontsize=7)
        bar = fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02)
        bar.set_label(f"fraction of the row's routed choices (even: 1/{n_experts} = {1 / n_experts:.3f})",
                      fontsize=7)
        bar.ax.axhline(1 / n_experts, color="white", linewidth=1.5)
        bar.ax.tick_params(labelsize=6)
        fig.suptitle(title + " (grey: no tokens)", fontsize=10)
    return fig


def _counts(value, n_groups: int) -> np.ndarray | None:
    """Routing counts (layers, n_groups, experts) as a float array, or None when `value` is not
    such counts (a run without routed experts, a state.json edited by hand)."""
    try:
        counts = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    ok = counts.ndim == 3 and counts.shape[1] == n_groups and counts.size and np.isfinite(counts).all()
    return counts if ok else None


def _facts(ckpt: Path, config: dict, state: dict, train: dict, records: list[dict]) -> list[tuple[str, str]]:
    """(name, value) rows of what the run was: its model, training options, how far it went."""
    rows = []
    if _number(state.get("step")):
        planned = train.get("steps")
        rows.append(("steps", f"{state['step']}" + (f" of {planned}" if _number(planned) else "")
                     + (f", {state['skipped']} skipped (non-finite)" if _number(state.get("skipped")) else "")))
    else:
        rows.append(("steps", "unknown (no training state)"))
    if _number(state.get("elapsed")):
        budget = train.get("max_minutes")
        rows.append(("training time", f"{state['elapsed'] / 60:.1f} min"
                     + (f" (budget {budget:g} min)" if _number(budget) else "")))
    if records and _number(records[-1].get("tokens_per_s")):
        rows.append(("throughput, last step", f"{records[-1]['tokens_per_s']:,.0f} tokens/s"))
    for key in ("preset", "mixture", "batch_size", "accum", "lr", "warmup", "weight_decay", "temperature", "seed",
                "bf16"):
        if key in train and isinstance(train[key], (str, int, float, bool)):
            rows.append((key, str(train[key])))
    shape = [f"{k} {config[k]}" for k in ("d_model", "n_heads", "enc_layers", "dec_layers", "n_routed", "top_k",
                                           "n_shared", "d_ff") if _number(config.get(k))]
    if shape:
        rows.append(("model", ", ".join(shape)))
    rows.append(("checkpoint", str(ckpt)))
    rows.append(("report written", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")))
    return rows


def _metric_rows(results: dict) -> str:
    """The metric table's rows: each task's name once beside its metrics; a metric that is no
    number (a NaN, null in eval.json) reads "—"."""
    rows = []
    for task, metrics in sorted(results.items()):
        items = list(metrics.items()) if isinstance(metrics, dict) else []
        for i, (metric, value) in enumerate(items):
            shown = f"{value:.3f}" if _number(value) and math.isfinite(value) else "—"
            name = f"<td rowspan='{len(items)}'>{html.escape(str(task))}</td>" if i == 0 else ""
            rows.append(f"<tr>{name}<td>{html.escape(str(metric))}</td><td>{shown}</td></tr>")
    return "".join(rows)


def write_report(run_dir: Path, results: dict[str, dict[str, float]] | None = None, ckpt: Path | None = None,
                 answered: dict[str, list[dict]] | None = None, data: dict | None = None) -> Path:
    """run_dir/report.html from the run's log, its checkpoint (`ckpt`, found in run_dir when not
    given), held-out `results` (None: the run's eval.json, if it has one) and the answers to the
    test examples: `answered` (`evaluate.answer_records`; None: the run's predictions.jsonl, if it
    has one). The examples shown are drawn from `data`'s test splits when given, else named in
    words."""
    from generalist.train.evaluate import read_predictions
    from generalist.train.gallery import MANY_LABELS, confusion, confusion_figure, gallery_html

    plt = _plt()

    from generalist.modalities import MODALITIES
    from generalist.train.checkpoint import PREDICTIONS, find_checkpoint, read_json, replace_file, run_meta

    run_dir = Path(run_dir)
    log = run_dir / "metrics.jsonl"
    records = read_log(log) if log.is_file() else []
    ckpt = find_checkpoint(run_dir) if ckpt is None else Path(ckpt)
    tasks, train = run_meta(ckpt)
    # the training state is the report's, not inference's: a checkpoint without a readable one
    # (copied for inference, edited by hand) gets a report without its counts and routing
    state = read_json(ckpt / "state.json") if (ckpt / "state.json").is_file() else {}
    state = state if isinstance(state, dict) else {}
    try:  # the model's shape, for the facts and the routing plots' layer names
        config = read_json(ckpt / "config.json")
    except (OSError, ValueError):
        config = {}
    config = config if isinstance(config, dict) else {}
    if results is None and (run_dir / "eval.json").is_file():
        try:
            results = read_json(run_dir / "eval.json")
        except ValueError:
            results = None
    name = html.escape(run_dir.name)
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                    for k, v in _facts(ckpt, config, state, train, records))
    parts = [f"<h1>generalist run: {name}</h1>",
             f"<p>tasks: {', '.join(map(html.escape, tasks))}</p><table>{facts}</table>"]
    if isinstance(results, dict) and results:
        parts.append("<h2>Held-out metrics</h2><table><tr><th>task</th><th>metric</th><th>value</th></tr>"
                     f"{_metric_rows(results)}</table>")
        missing = [t for t in tasks if t not in results]
        if missing:  # (a task whose mixture gives it no test examples, or left out of a partial evaluation)
            parts.append(f"<p>Not evaluated: {', '.join(map(html.escape, missing))}.</p>")
    figures = []
    if records:
        figures += [("Training loss", loss_figure(records)), ("Training signals", signals_figure(records))]
    else:
        parts.append("<p>No training steps logged (metrics.jsonl is missing or empty).</p>")
    routing = state.get("routing") if isinstance(state.get("routing"), dict) else {}
    enc = int(config["enc_layers"]) if _number(config.get("enc_layers")) else None
    for key, groups, what in (("task", tasks, "task"), ("modality", list(MODALITIES), "modality")):
        counts = _counts(routing.get(key), len(groups))
        if counts is not None:
            layers = None if enc is None else [f"encoder {i}" if i < enc else f"decoder {i - enc}"
                                               for i in range(counts.shape[0])]
            figures.append((f"Routing by {what}", routing_figure(counts, groups,
                                                                 f"fraction of each {what}'s tokens per expert",
                                                                 layers)))
    if answered is None:
        answered = read_predictions(run_dir / PREDICTIONS) if (run_dir / PREDICTIONS).is_file() else {}
    tables = {task: table for task, rows in answered.items() if rows and (table := confusion(rows)) is not None}
    with plt.rc_context(_PLAIN_TEXT):
        few = {t: table for t, table in tables.items() if len(table[0]) <= MANY_LABELS}
        if few:
            figures.append(("Answers by target (test split)", confusion_figure(few)))
        for task in sorted(set(tables) - set(few)):
            figures.append((f"Answers by target (test split): {html.escape(task)}",
                            confusion_figure({task: tables[task]}, cols=1, panel=9.0)))
    for title, fig in figures:
        parts.append(f"<h2>{title}</h2><img alt='{title.lower()}' src='data:image/png;base64,{_png(fig)}'>")
        plt.close(fig)
    if answered:
        parts.append("<h2>Test examples</h2>")
        parts += [gallery_html(task, rows, data[task].test if data is not None and task in data else None)
                  for task, rows in sorted(answered.items()) if rows]
    style = ("<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left;vertical-align:top}img{max-width:100%}</style>")
    out = run_dir / "report.html"
    replace_file(out, f"<!doctype html><meta charset='utf-8'><title>generalist report: {name}</title>{style}"
                 + "".join(parts))  # a new file renamed over the old: a kill leaves one report, whole
    return out
