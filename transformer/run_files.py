"""A finished run's result files read back and checked: ``metrics.json`` (written by
``Trainer.finish``) and ``valid_log.csv`` (``CsvLog`` rows from ``Trainer.maybe_evaluate``).

Shared by ``python -m transformer.compare`` and ``scripts/runs_table.py``, so that a damaged
or hand-edited file is one ``RunError`` naming the file and the key (or line) before any
table is printed, never a traceback halfway through or a run left out without a word; and
what the tools that write result pages share (``write_whole``, ``reader_left``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path

from .values import is_integer, is_number


class RunError(ValueError):
    pass


# what a key of metrics.json may hold: (test, the words an error uses)
KINDS = {
    "number": (is_number, "a number"),
    "integer": (is_integer, "an integer"),
    "text": (lambda v: isinstance(v, str), "text"),
    "text or null": (lambda v: v is None or isinstance(v, str), "text or null"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


def read_metrics(run: Path) -> dict:
    """The JSON object in ``run/metrics.json``; RunError when it is missing, unreadable, not
    JSON or not an object."""
    path = run / "metrics.json"
    if not path.is_file():
        raise RunError(f"{run}: no metrics.json (is the run finished?)")
    try:
        metrics = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not JSON ({e})") from e
    except OSError as e:
        raise RunError(f"{path}: {e.strerror or e}") from e
    if not isinstance(metrics, dict):
        raise RunError(f"{path}: not a metrics file (no object at the top)")
    return metrics


def shown(value) -> str:
    """``value`` as JSON spells it (so "12" shows its quotes, None shows null), cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check(
    tree: dict, path: Path, required: dict, optional: dict | None = None, prefix: str = ""
) -> dict:
    """``tree`` (``path``'s metrics, or the part of them under ``prefix``) holds every key
    of ``required`` and a value of the kind (``KINDS``) each names, and so does each key of
    ``optional`` it holds; RunError names the missing keys, or the key, the kind expected
    and the value found. Returns ``tree``."""
    missing = [prefix + key for key in required if key not in tree]
    if missing:
        raise RunError(f"{path}: no {', '.join(missing)}")
    for key, kind in {**required, **(optional or {})}.items():
        test, words = KINDS[kind]
        if key in tree and not test(tree[key]):
            raise RunError(f"{path}: {prefix}{key} must be {words}, got {shown(tree[key])}")
    return tree


def check_part(
    metrics: dict, path: Path, key: str, required: dict, optional: dict | None = None
) -> dict:
    """``metrics[key]``, an object, checked as ``check`` does; {} when there is none."""
    if key not in metrics:
        return {}
    check(metrics, path, {}, {key: "object"})
    return check(metrics[key], path, required, optional, prefix=f"{key}.")


# the columns of valid_log.csv a curve is drawn from (the trainer writes more)
CURVE_COLUMNS = ("train_seconds", "valid_bleu")


def finite(text: str, path: Path, line: int, column: str) -> float:
    """The number in a valid_log.csv field; RunError names the file, line and column."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise RunError(f"{path} line {line}: {column} must be a number, got {text!r}")
    return value


def read_valid_curve(run: Path) -> list[tuple[float, float]]:
    """(training seconds, greedy valid BLEU) of every validation in ``run/valid_log.csv``
    that computed BLEU (the others leave valid_bleu empty); [] for a run that logged none.
    RunError, naming the file and line, for what the trainer never writes: an empty file (it
    writes the header first), a header without the columns read, a row whose field count is
    not the header's, a value that is no number, a last line without its line end (every row
    is written whole, so the file was cut short)."""
    path = run / "valid_log.csv"
    if not path.is_file():
        raise RunError(f"{run}: no valid_log.csv (is the run finished?)")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise RunError(f"{path}: not UTF-8 text ({e})") from e
    except OSError as e:
        raise RunError(f"{path}: {e.strerror or e}") from e
    if not text:
        raise RunError(f"{path}: empty, not even the header the trainer writes first")
    reader = csv.reader(io.StringIO(text))
    curve = []
    try:
        header = next(reader)
        missing = [c for c in CURVE_COLUMNS if c not in header]
        if missing:
            raise RunError(f"{path} line 1: the header has no {', '.join(missing)} column")
        seconds_at, bleu_at = (header.index(c) for c in CURVE_COLUMNS)
        for row in reader:
            line = reader.line_num
            if not row:  # a blank line holds nothing to lose
                continue
            if len(row) != len(header):
                raise RunError(
                    f"{path} line {line}: {len(row)} fields, the header names {len(header)}"
                )
            seconds = finite(row[seconds_at], path, line, "train_seconds")
            if row[bleu_at]:
                curve.append((seconds, finite(row[bleu_at], path, line, "valid_bleu")))
    except csv.Error as e:
        raise RunError(f"{path} line {reader.line_num}: {e}") from e
    if not text.endswith(("\n", "\r")):
        raise RunError(f"{path} line {reader.line_num}: cut short (the last line has no end)")
    return curve


def write_whole(path: Path, text: str) -> None:
    """``path`` replaced atomically: written beside itself, then renamed over."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def reader_left() -> None:
    """After a BrokenPipeError on stdout (``| head`` has what it wanted): send what is
    still buffered nowhere, so that the interpreter's exit does not fail writing it."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
