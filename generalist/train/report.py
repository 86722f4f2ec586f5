"""The run report: one self-contained report.html (plots inlined as PNG) with the loss curves
per task, the per-task metric table and the routing heatmaps — the fraction of each task's and
each modality's tokens that every layer sends to each routed expert, the picture that shows
whether task pathways formed."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _smooth(values: list[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < window or window < 2:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = sorted(set().union(*(r["task_loss"] for r in records))) if records else []
    window = max(1, len(records) // 50)
    for name in names:
        steps = [r["step"] for r in records if name in r["task_loss"]]
        vals = [r["task_loss"][name] for r in records if name in r["task_loss"]]
        sm = _smooth(vals, window)
        ax.plot(steps[len(steps) - len(sm):], sm, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (moving average of {window})")
    ax.set_yscale("log")
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("training loss per task")
    return fig


def routing_figure(counts_LGE: np.ndarray, groups: list[str], title: str):
    """counts (layers, groups, experts) -> one heatmap per layer, rows normalised to fractions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = counts_LGE.shape[0]
    fig, axes = plt.subplots(1, n_layers, figsize=(2.2 * n_layers + 1.5, 0.35 * len(groups) + 1.6), squeeze=False)
    frac = counts_LGE / np.maximum(1, counts_LGE.sum(axis=2, keepdims=True))
    for layer, ax in enumerate(axes[0]):
        im = ax.imshow(frac[layer], aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, frac.max()))
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_yticks(range(len(groups)))
        ax.set_yticklabels(groups if layer == 0 else [""] * len(groups), fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02)
    fig.suptitle(title, fontsize=10)
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


def write_report(run_dir: Path, results: dict[str, dict[str, float]] | None = None, ckpt: Path | None = None) -> Path:
    """run_dir/report.html from the run's log, its checkpoint (`ckpt`, found in run_dir when not
    given) and held-out `results`."""
    import matplotlib.pyplot as plt

    from generalist.train.checkpoint import find_checkpoint, read_json, run_meta

    run_dir = Path(run_dir)
    log = run_dir / "metrics.jsonl"
    records = read_log(log) if log.is_file() else []
    ckpt = find_checkpoint(run_dir) if ckpt is None else Path(ckpt)
    tasks, _ = run_meta(ckpt)
    # the training state is the report's, not inference's: a checkpoint without a readable one
    # (copied for inference, edited by hand) gets a report without its counts and routing
    state = read_json(ckpt / "state.json") if (ckpt / "state.json").is_file() else {}
    state = state if isinstance(state, dict) else {}
    steps = f"{state['step']} steps" if _number(state.get("step")) else "steps unknown (no training state)"
    skipped = f", {state['skipped']} skipped (non-finite)" if _number(state.get("skipped")) else ""
    parts = [f"<h1>generalist run: {html.escape(run_dir.name)}</h1>",
             f"<p>{steps}{skipped}; tasks: {', '.join(map(html.escape, tasks))}</p>"]
    if results:
        rows = "".join(f"<tr><td>{html.escape(t)}</td><td>{html.escape(m)}</td><td>{v:.3f}</td></tr>"
                       for t, ms in sorted(results.items()) for m, v in ms.items())
        parts.append(f"<h2>Held-out metrics</h2><table><tr><th>task</th><th>metric</th><th>value</th></tr>{rows}</table>")
    figures = []
    if records:
        figures.append(("Training loss", loss_figure(records)))
    from generalist.modalities import MODALITIES

    routing = state.get("routing") if isinstance(state.get("routing"), dict) else {}
    for key, groups, what in (("task", tasks, "task"), ("modality", list(MODALITIES), "modality")):
        counts = _counts(routing.get(key), len(groups))
        if counts is not None:
            figures.append((f"Routing by {what}", routing_figure(counts, groups,
                                                                 f"fraction of each {what}'s tokens per expert")))
    for title, fig in figures:
        parts.append(f"<h2>{title}</h2><img src='data:image/png;base64,{_png(fig)}'>")
        plt.close(fig)
    style = ("<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}</style>")
    out = run_dir / "report.html"
    out.write_text(f"<!doctype html><meta charset='utf-8'><title>generalist report</title>{style}" + "".join(parts))
    return out
