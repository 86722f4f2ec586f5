"""Shared output of the benchmark scripts: a markdown table printed and, with --out, written
next to a CSV of the raw rows."""

from __future__ import annotations

import contextlib
import signal


def pivot(rows: list[tuple], key_names: tuple[str, str, str]) -> list[str]:
    """Markdown table of rows (k0, k1, k2, provider, seconds, tflops): one line per key, one
    column of TFLOP/s per provider ("-" where a provider has no figure)."""
    names = list(dict.fromkeys(r[3] for r in rows))
    keys = list(dict.fromkeys(r[:3] for r in rows))
    table = {r[:4]: r[5] for r in rows}
    lines = ["| " + " | ".join(key_names) + " | " + " | ".join(names) + " |", "|" + "---|" * (3 + len(names))]
    for key in keys:
        cells = [f"{table[key + (n,)]:.0f}" if key + (n,) in table else "-" for n in names]
        lines.append("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")
    return lines


def emit(lines: list[str], out: str | None, csv_header: str | None = None, csv_rows: list[tuple] = ()) -> None:
    """Prints the table; with `out`, writes it there, and the rows (seconds then TFLOP/s last)
    to the same name with .csv when csv_header is given."""
    text = "\n".join(lines)
    print(text)
    if not out:
        return
    with open(out, "w") as f:
        f.write(text + "\n")
    if csv_header is not None:
        with open(out.rsplit(".", 1)[0] + ".csv", "w") as f:
            f.write(csv_header + "\n")
            f.writelines(",".join(str(x) for x in r[:-2]) + f",{r[-2]:.6g},{r[-1]:.2f}\n" for r in csv_rows)


@contextlib.contextmanager
def until_stopped(notes: list[str]):
    """Runs the block to its end or until the process gets SIGTERM (a time limit such as
    `timeout`) or Ctrl-C, then carries on, so that the rows measured so far are still written;
    a cut adds a line to `notes` for the table."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except KeyboardInterrupt:
        notes.extend(["", "Cut short by a time limit: the rows above are those measured before it."])
        print(notes[-1], flush=True)
    finally:
        signal.signal(signal.SIGTERM, old)


def tuner_choices(header: str, tuners) -> list[str]:
    """Lines for a report (also printed): the configuration each Triton autotuner of `tuners`
    ((label, tuner) pairs) chose per tuning key it met this run: the values of the tuner's key
    arguments (the key's dtypes left out)."""
    lines = ["", header, ""]
    for label, tuner in tuners:
        for key, config in sorted(getattr(tuner, "cache", {}).items(), key=str):
            lines.append(f"- {label} {tuple(key)[:len(tuner.keys)]}: {config}")
    print("\n".join(lines))
    return lines
