"""`generalist data list` and `generalist data prepare`: which data sources are installed, and
building their cache entries ahead of training.

`add_data_commands(subparsers)` adds the `data` command to the main parser; each subcommand's
function takes the parsed args and returns the exit status.
"""

from __future__ import annotations

import argparse
import os
import sys


def _use_cache(args) -> None:
    if getattr(args, "cache", None):
        path = os.path.abspath(os.path.expanduser(args.cache))
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"--cache {args.cache}: is a file, not a directory")
        os.environ["GENERALIST_CACHE"] = path


def _human(n: int) -> str:
    if n <= 0:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _list(args) -> int:
    from generalist.data.cache import cache_dir
    from generalist.data.sources import available

    _use_cache(args)
    rows = [(s.name, "yes" if s.present else "NO", _human(s.size_bytes), _human(s.cached_bytes), s.install)
            for s in available()]
    header = ("source", "present", "size", "cached", "install")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)) + "  " + row[-1])
    missing = [r[0] for r in rows if r[1] == "NO"]
    print(f"\ncache: {cache_dir()}")
    if missing:
        print(f"missing: {', '.join(missing)} (the tasks that read them will fail until installed)")
    return 0


def _prepare(args) -> int:
    from tqdm import tqdm

    from generalist.data.cache import cache_dir
    from generalist.data.sources import SOURCES, SourceMissing, prepare

    _use_cache(args)
    names = list(SOURCES) if args.sources is None else [n.strip() for n in args.sources.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--sources names no source; known: {', '.join(SOURCES)}")
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"unknown data source(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}")
    print(f"building the cache in {cache_dir()}")
    missing = []
    bar = tqdm(names, unit="source", file=sys.stderr)
    try:
        for name in bar:
            bar.set_postfix_str(name)
            try:
                prepare(name)
            except SourceMissing as error:
                missing.append(name)
                tqdm.write(f"skipped {error}", file=sys.stderr)
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: finished entries are kept, none is left half-written; rerun to continue", file=sys.stderr)
        return 130
    bar.close()
    print(f"ready: {len(names) - len(missing)} of {len(names)} source(s)"
          + (f"; missing: {', '.join(missing)}" if missing else ""))
    return 1 if missing else 0


def add_data_commands(subparsers) -> argparse.ArgumentParser:
    """Adds `data list` and `data prepare` to the main parser's subparsers; returns the `data`
    parser."""
    data = subparsers.add_parser("data", help="the real data sources: which are installed; build their cache")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    ls = data_sub.add_parser("list", help="every source: installed or not, size on disk and in the cache, install line")
    ls.add_argument("--cache", metavar="DIR", help="cache folder (default: $GENERALIST_CACHE or ~/.cache/generalist)")
    ls.set_defaults(func=_list)

    prep = data_sub.add_parser("prepare", help="decode and cache every source now (safe to interrupt and rerun)")
    prep.add_argument("--cache", metavar="DIR", help="cache folder (default: $GENERALIST_CACHE or ~/.cache/generalist)")
    prep.add_argument("--sources", metavar="A,B,...", help="only these sources (default: all; see `data list`)")
    prep.set_defaults(func=_prepare)
    return data
