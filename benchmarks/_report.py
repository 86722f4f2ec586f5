"""Shared output of the benchmark scripts: a markdown table printed and, with --out, written
next to a CSV of the raw rows."""

from __future__ import annotations

import contextlib
import csv
import signal
import traceback

STOPPED_BY_ERROR: list[str] = []  # the errors until_stopped caught: the script then exits 1 (exit_status)


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
        with open(out.rsplit(".", 1)[0] + ".csv", "w", newline="") as f:
            writer = csv.writer(f)  # (kernel names hold commas: quoted)
            writer.writerow(csv_header.split(","))
            writer.writerows([*r[:-2], f"{r[-2]:.6g}", f"{r[-1]:.2f}"] for r in csv_rows)


@contextlib.contextmanager
def until_stopped(notes: list[str]):
    """Runs the block to its end or until the process gets SIGTERM (a time limit such as
    `timeout`) or Ctrl-C, or an error, then carries on, so that the rows measured so far are
    still written; a cut adds a line to `notes` for the table (an error also its traceback on
    stderr, and exit status 1 through `exit_status`)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except KeyboardInterrupt:
        notes.extend(["", "Cut short by a time limit: the rows above are those measured before it."])
        print(notes[-1], flush=True)
    except Exception as error:
        traceback.print_exc()
        STOPPED_BY_ERROR.append(f"{type(error).__name__}: {error}")
        notes.extend(["", f"Stopped by an error ({STOPPED_BY_ERROR[-1]}): the rows above are those measured "
                          "before it."])
        print(notes[-1], flush=True)
    finally:
        signal.signal(signal.SIGTERM, old)


def exit_status() -> int:
    """The script's exit status: 1 when until_stopped caught an error, else 0."""
    return 1 if STOPPED_BY_ERROR else 0


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
