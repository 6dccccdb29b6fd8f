"""A finished run's result files read back and checked: ``metrics.json`` (written by
``Trainer.finish``) and ``valid_log.csv`` (``CsvLog`` rows from ``Trainer.maybe_evaluate``).

Shared by ``python -m transformer.compare`` and ``scripts/runs_table.py``, so that a damaged
or hand-edited file is one ``RunError`` naming the file and the key (or line) before any
table is printed, never a traceback halfway through or a run left out without a word.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path


class RunError(ValueError):
    pass


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
