"""Average the weights of several checkpoints of one run into a new checkpoint.

    python -m transformer.average RUN_DIR [--last 5] [--out FILE]
    python -m transformer.average CKPT CKPT ... --out RUN_DIR/checkpoints/avg.pt

Vaswani et al. (2017, Section 6.1) translate with the average of the last 5 (base) or 20
(big) checkpoints; the average of points along the end of training usually sits in a flatter
region than any one of them. With a run directory, the newest ``--last`` ``step_N.pt`` files
are averaged (the trainer keeps ``trainer.keep_checkpoints`` of them, one per validation) into
``RUN_DIR/checkpoints/avg_last{N}.pt``. Every input must hold the same model settings and
tokenizer, and counts once: the same file given twice (``best.pt`` and ``last.pt`` are hard
links of a ``step_N.pt``), two files of one step of a run, or an input that is itself an
average is refused. The result carries the config, tokenizer and ``progress`` (its step) of
the newest input, the one with the highest step in whatever order they are given, and lists
every input's file and step under ``averaged_from``. It has no optimizer state, so it is for
translating and scoring (``translate.py ckpt=...``, ``python -m transformer.evaluate``), not
for resuming: ``--out`` may name neither an input nor a file the trainer writes
(``last.pt``, ``best.pt``, ``step_N.pt``). Compare it with ``best.pt`` on the validation
set, never on test.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import checkpoint
from .checkpoint import CheckpointError
from .cli import one_line

log = logging.getLogger(__name__)


AVERAGED_KEYS = ("model", "model_kwargs", "config", "tokenizer", "progress")  # read of each
OWNED = ("last.pt", "best.pt")  # and step_N.pt: the trainer's files, never an average's name


def distinct_files(paths: list[Path]) -> None:
    """No file is given twice: not by the same name, nor by another name for it (best.pt
    and last.pt are hard links of a step_N.pt), else it would count twice in the mean."""
    seen = {}
    for path in paths:
        st = os.stat(path)
        other = seen.setdefault((st.st_dev, st.st_ino), path)
        if other is not path:
            raise CheckpointError(
                f"{other} and {path} are the same checkpoint file; it would count twice"
            )


def average(paths: list[Path]) -> dict:
    """A checkpoint whose float tensors are the mean of those in ``paths`` (accumulated in
    float64); integer buffers, config, tokenizer and ``progress`` are the newest input's (the
    highest step). Each input is counted once: the same file twice, two files of one step of
    one run, or an input that is itself an average is a CheckpointError."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    distinct_files(paths)
    sums, first, newest, sources, of_step = {}, None, None, [], {}
    for path in paths:
        ckpt = checkpoint.load(path)
        step = checked_step(ckpt, path)
        shared = {  # what every input shares with the first
            "model_kwargs": ckpt["model_kwargs"],
            "tokenizer": ckpt["tokenizer"],
            "model settings": ckpt["config"]["model"],
            "parameters": set(ckpt["model"]),
        }
        if first is None:
            first = (path, shared, {k: v.dtype for k, v in ckpt["model"].items()})
            sums = {k: v.double() for k, v in ckpt["model"].items() if v.is_floating_point()}
        else:
            for what, value in shared.items():
                if value != first[1][what]:
                    differ = "differ" if what.endswith("s") else "differs"
                    raise CheckpointError(f"{path}: its {what} {differ} from {first[0]}'s")
            for key in sums:
                sums[key] += ckpt["model"][key].double()
        other = of_step.setdefault((Path(path).resolve().parent.parent, step), path)
        if other is not path:  # a copy, or best.pt where it is no hard link
            raise CheckpointError(
                f"{other} and {path} are both step {step} of one run; it would count twice"
            )
        if newest is None or step > newest["progress"]["step"]:
            newest = {k: ckpt[k] for k in ("model_kwargs", "config", "tokenizer", "progress")}
            ints = {k: v for k, v in ckpt["model"].items() if not v.is_floating_point()}
        sources.append({"file": str(path), "step": step})
        del ckpt  # one checkpoint in memory besides the sums
    model = {
        k: (sums[k] / len(paths)).to(dtype) if k in sums else ints[k]
        for k, dtype in first[2].items()
    }
    return {"model": model, **newest, "averaged_from": sources}


def checked_step(ckpt: dict, path: Path) -> int:
    """The training step of ``ckpt``, a checkpoint the trainer wrote (not an average)."""
    checkpoint.require(ckpt, path, AVERAGED_KEYS)
    checkpoint.require(ckpt["config"], path, ("model",), "config")
    checkpoint.require(ckpt["progress"], path, ("step",), "progress")
    if "averaged_from" in ckpt:
        raise CheckpointError(
            f"{path} is an average of {len(ckpt['averaged_from'])} checkpoints, not a "
            "training checkpoint; average the step checkpoints it was made from"
        )
    return ckpt["progress"]["step"]


def newest_steps(run_dir: Path, n: int) -> list[Path]:
    """The ``n`` newest step checkpoints of a run, newest first; an error names what is there."""
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        if checkpoint.step_checkpoints(run_dir) or (run_dir / "last.pt").is_file():
            raise CheckpointError(
                f"{run_dir} is a checkpoints/ folder; give its run folder {run_dir.parent}"
            )
        raise CheckpointError(f"{run_dir} has no checkpoints/ folder")
    found = checkpoint.step_checkpoints(ckpt_dir)
    if len(found) < n:
        raise CheckpointError(
            f"{ckpt_dir} holds {len(found)} step checkpoint(s), fewer than --last {n} "
            "(raise trainer.keep_checkpoints for the next run, or average fewer)"
        )
    return found[:n]


def check_out(out: Path, paths: list[Path]) -> None:
    """``out`` replaces neither an input nor a file the trainer writes and reads (an average
    has no optimizer state: a run resumed from it would fail)."""
    if out.is_dir():
        raise CheckpointError(f"--out {out} is a folder; name a file such as {out / 'avg.pt'}")
    if out.name in OWNED or checkpoint.STEP_PATTERN.match(out.name):
        raise CheckpointError(
            f"--out {out}: the trainer writes its own checkpoints as {out.name} (resumed or "
            "translated from); name the average otherwise, e.g. avg.pt"
        )
    for path in paths:
        if out.exists() and os.path.samefile(out, path):
            raise CheckpointError(f"--out {out} is the input {path}; name a new file")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="a run directory, or checkpoint files")
    p.add_argument("--last", type=int, default=5, help="with a run directory: how many")
    p.add_argument("--out", type=Path, help="default: RUN_DIR/checkpoints/avg_last{N}.pt")
    args = p.parse_args(argv)
    if args.last < 1:
        p.error(f"--last must be at least 1, got {args.last}")
    missing = [str(x) for x in args.inputs if not x.exists()]
    if missing:
        p.error(f"no such run directory or checkpoint file: {', '.join(missing)}")
    folders = [str(x) for x in args.inputs if x.is_dir()]
    if folders and len(args.inputs) > 1:
        p.error(f"folders among several inputs: {', '.join(folders)} (give one run folder)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if folders:
            run_dir = args.inputs[0]
            paths = newest_steps(run_dir, args.last)
            out = args.out or run_dir / "checkpoints" / f"avg_last{args.last}.pt"
        else:
            paths = args.inputs
            if args.out is None:
                p.error("--out is needed when averaging checkpoint files")
            out = args.out
        check_out(out, paths)
        averaged = average(paths)  # inputs of other models or runs fail here, named
        if len({Path(x).resolve().parent.parent for x in [*paths, out]}) > 1:
            raise CheckpointError(
                f"{out} must be in the checkpoints/ folder of its inputs' run, where "
                "translate.py finds the tokenizer/ it names"
            )
        checkpoint.save(out, averaged)
    except (CheckpointError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    log.info("averaged %d checkpoints into %s: %s", len(paths), out, ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
