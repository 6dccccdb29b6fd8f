"""Command-line value types shared by the bench scripts, and ``save``, which writes their
tables.

Each value type is an argparse ``type=``: a bad value (a count of 0, a misspelt name, a device this
machine lacks, an ``--out`` that cannot be written) becomes argparse's one-line usage error
naming the option and the value, before any data is read or any model built (a benchmark
runs for minutes on a GPU; a traceback after the first model, or an empty table, wastes
them).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformer.attention import SDPA_BACKENDS  # noqa: E402
from transformer.settings import TrainingError, pick_device  # noqa: E402

Invalid = argparse.ArgumentTypeError


def given(argv: list[str] | None) -> str:
    """The options as given (``main(argv)``, else the command line), for a table's header,
    quoted for a shell where one needs it."""
    return shlex.join(sys.argv[1:] if argv is None else argv)


def count(least: int) -> Callable[[str], int]:
    """An integer of at least ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise Invalid(f"not an integer: {text!r}") from None
        if value < least:
            raise Invalid(f"must be an integer >= {least}, got {value}")
        return value

    return parse


def number(above: float, at_most: float | None = None) -> Callable[[str], float]:
    """A number greater than ``above`` (and at most ``at_most``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise Invalid(f"not a number: {text!r}") from None
        if not (value > above and (at_most is None or value <= at_most)):  # NaN fails too
            upper = "" if at_most is None else f" and <= {at_most:g}"
            raise Invalid(f"must be a number > {above:g}{upper}, got {text}")
        return value

    return parse


def items(text: str, empty: bool = False) -> list[str]:
    """Comma-separated values, none of them blank or given twice; ``""`` is ``[]`` where
    ``empty`` (an option that is off by default), else an error."""
    if text == "" and empty:
        return []
    parts = [p.strip() for p in text.split(",")]
    if "" in parts:
        raise Invalid(f"a blank value in {text!r} (comma-separated values)")
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    if repeated:
        raise Invalid(f"{', '.join(repeated)} given more than once in {text!r}")
    return parts


def free_names(text: str) -> list[str]:
    """Comma-separated names (``""``: none) that the caller checks against what they name,
    once it knows."""
    return items(text, empty=True)


def counts(least: int, empty: bool = False) -> Callable[[str], list[int]]:
    """Comma-separated integers, each at least ``least`` (``""``: none, where ``empty``)."""
    one = count(least)

    def parse(text: str) -> list[int]:
        values = []
        for part in items(text, empty):
            try:
                values.append(one(part))
            except Invalid as e:
                raise Invalid(f"{e} in {text!r}" if "," in text else str(e)) from None
        return values

    return parse


def names(valid: Iterable[str], empty: bool = False) -> Callable[[str], list[str]]:
    """Comma-separated names out of ``valid`` (``""``: none, where ``empty``)."""
    valid = list(valid)

    def parse(text: str) -> list[str]:
        chosen = items(text, empty)
        unknown = [n for n in chosen if n not in valid]
        if unknown:
            raise Invalid(f"unknown {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
        return chosen

    return parse


def sdpa_setting(text: str) -> str:
    """One set of SDPA kernels joined by + (``trainer.sdpa_backends``), e.g. cudnn+math;
    ``""``: all of them, torch's pick."""
    kernels = text.split("+") if text else []
    unknown = [k for k in kernels if k not in SDPA_BACKENDS]
    if unknown:
        raise Invalid(
            f"unknown SDPA kernel {', '.join(map(repr, unknown))}"
            + (f" in {text!r}" if "+" in text else "")
            + f"; use {', '.join(SDPA_BACKENDS)}, several joined by +"
        )
    return text


def sdpa_settings(text: str) -> list[str]:
    """Comma-separated ``sdpa_setting``s; ``""``: none."""
    return [sdpa_setting(s) for s in items(text, empty=True)]


def device(text: str) -> torch.device:
    """cpu, cuda, cuda:N or auto, as ``trainer.device``, on this machine."""
    try:
        chosen = pick_device(text)
    except TrainingError as e:
        raise Invalid(str(e)) from None
    if chosen.type not in ("cpu", "cuda"):
        raise Invalid(f"device={text}: the benchmarks run on cpu or cuda")
    if chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise Invalid(f"device={text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return chosen


def writable_below(path: Path, text: str) -> None:
    """The nearest folder above ``path`` that exists is a folder this process can write in
    (``path``'s missing folders are made when it is written), and ``path``, if it is there,
    can be written."""
    there = next(p for p in path.absolute().parents if p.exists())
    if not there.is_dir():
        raise Invalid(f"{text}: {there} is a file, not a folder")
    try:  # a probe, as the process's rights (root's too) and read-only mounts decide
        if path.exists() and not path.is_dir():
            open(path, "a").close()  # appends nothing: the file is left as it was
        else:
            tempfile.TemporaryFile(dir=path if path.is_dir() else there).close()
    except OSError as e:
        raise Invalid(f"cannot write {text}: {e.strerror}") from None


def in_file(text: str) -> str:
    """A file there is to read (a checkpoint): not missing, not a folder."""
    path = Path(text)
    if not path.exists():
        raise Invalid(f"{text}: no such file")
    if not path.is_file():
        raise Invalid(f"{text} is a folder; name a file in it")
    return text


def out_path(folder: bool) -> Callable[[str], Path]:
    """Where a file (or, where ``folder``, a folder) of results can be written: not the
    other kind of thing, and writable (``writable_below``)."""
    want, other = ("folder", "file") if folder else ("file", "folder")

    def parse(text: str) -> Path:
        path = Path(text)
        if path.exists() and path.is_dir() != folder:
            raise Invalid(f"{text} is a {other}; name the {want} to write the results to")
        writable_below(path, text)
        return path

    return parse


out_file, out_folder = out_path(folder=False), out_path(folder=True)


def save(out: Path | None, lines: list[str], done: bool) -> None:
    """Write the table so far to ``out``, marked incomplete until ``done``."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    note = [] if done else ["", "(incomplete: the run had not finished when this was written)"]
    out.write_text("\n".join(lines + note) + "\n")
