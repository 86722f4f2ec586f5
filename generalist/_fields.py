"""Checks of values read from files and the command line: a config dataclass's fields against
their annotations (a value from a JSON file or a `--set key=value` fails at once with its name,
not deep inside training), JSON files that name themselves when damaged, and arguments that
count something."""

from __future__ import annotations

import json
import math
import operator
from dataclasses import fields
from pathlib import Path


class MissingFileError(FileNotFoundError, ValueError):
    """A file that should be there is not (a checkpoint's, a run's): an OSError to code that
    catches those and, like every other bad input, a ValueError."""


def read_json(path: Path):
    """A JSON file's value; a damaged file is a ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def check_types(obj, where: str) -> None:
    """Every field of dataclass `obj` holds a value of its annotated type (int, float, bool, str,
    dict, optionally `| None`): a bool is not an int, an int is a float, floats are finite. A
    ValueError names `where`, the field and the value."""
    for f in fields(obj):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        value = getattr(obj, f.name)
        optional = kind.endswith("| None")
        kind = kind.removesuffix("| None").strip()
        if value is None and optional:
            continue
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str)
        elif kind == "dict":
            ok = isinstance(value, dict)
        else:
            continue
        if not ok:
            want = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
                    "dict": "a mapping"}[kind]
            raise ValueError(f"{where}{f.name} must be {want}{' or null' if optional else ''}, got {value!r}")


def check_count(name: str, value, minimum: int = 1) -> int:
    """`value` as an argument that counts something, as an int: a Python or numpy integer (not a
    bool: a flag in a count's place) >= `minimum`, else a ValueError naming `name`."""
    try:
        if isinstance(value, bool):
            raise TypeError
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if count < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return count


def check_keys(cls, values: dict, where: str) -> None:
    """`values` names only fields of dataclass `cls`."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(sorted(known))}")
