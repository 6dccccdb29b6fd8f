"""Average the weights of several checkpoints of one run into a new checkpoint.

    python -m transformer.average RUN_DIR [--last 5] [--out FILE]
    python -m transformer.average CKPT CKPT ... --out RUN_DIR/checkpoints/avg.pt

Vaswani et al. (2017, Section 6.1) translate with the average of the last 5 (base) or 20
(big) checkpoints; the average of points along the end of training usually sits in a flatter
region than any one of them. With a run directory, the newest ``--last`` ``step_N.pt`` files
are averaged (the trainer keeps ``trainer.keep_checkpoints`` of them, one per validation) into
``RUN_DIR/checkpoints/avg_last{N}.pt``. Every input must hold the same model settings and
tokenizer. The result carries the config and tokenizer of the newest input (with a run
directory) or of the first file given (with files), and lists its inputs
under ``averaged_from``; it has no optimizer state, so it is for translating and scoring
(``translate.py ckpt=...``, ``python -m transformer.evaluate``), not for resuming. Compare
it with ``best.pt`` on the validation set, never on test.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import checkpoint
from .checkpoint import CheckpointError
from .cli import one_line

log = logging.getLogger(__name__)


AVERAGED_KEYS = ("model", "model_kwargs", "config", "tokenizer", "progress")  # read of each


def average(paths: list[Path]) -> dict:
    """A checkpoint whose float tensors are the mean of those in ``paths`` (accumulated in
    float64); integer buffers are taken from the first. ``paths[0]`` supplies the metadata."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    first = checkpoint.load(paths[0])
    checkpoint.require(first, paths[0], AVERAGED_KEYS)
    sources = [{"file": str(paths[0]), "step": first["progress"]["step"]}]
    sums = {k: v.double() if v.is_floating_point() else v for k, v in first["model"].items()}
    for path in paths[1:]:
        ckpt = checkpoint.load(path)
        checkpoint.require(ckpt, path, AVERAGED_KEYS)
        for key in ("model_kwargs", "tokenizer"):
            if ckpt[key] != first[key]:
                raise CheckpointError(f"{path}: its {key} differs from {paths[0]}'s")
        if ckpt["config"]["model"] != first["config"]["model"]:
            raise CheckpointError(f"{path}: its model settings differ from {paths[0]}'s")
        if ckpt["model"].keys() != sums.keys():
            raise CheckpointError(f"{path}: its parameters differ from {paths[0]}'s")
        for key, value in ckpt["model"].items():
            if value.is_floating_point():
                sums[key] += value.double()
        sources.append({"file": str(path), "step": ckpt["progress"]["step"]})
        del ckpt  # one checkpoint in memory besides the sums
    model = {
        k: (v / len(paths)).to(first["model"][k].dtype) if v.is_floating_point() else v
        for k, v in sums.items()
    }
    return {
        "model": model,
        "model_kwargs": first["model_kwargs"],
        "config": first["config"],
        "tokenizer": first["tokenizer"],
        "progress": first.get("progress", {}),
        "averaged_from": sources,
    }


def newest_steps(run_dir: Path, n: int) -> list[Path]:
    """The ``n`` newest step checkpoints of a run, newest first; an error names what is there."""
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{run_dir} has no checkpoints/ folder")
    found = checkpoint.step_checkpoints(ckpt_dir)
    if len(found) < n:
        raise CheckpointError(
            f"{ckpt_dir} holds {len(found)} step checkpoint(s), fewer than --last {n} "
            "(raise trainer.keep_checkpoints for the next run, or average fewer)"
        )
    return found[:n]


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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if len(args.inputs) == 1 and args.inputs[0].is_dir():
            run_dir = args.inputs[0]
            paths = newest_steps(run_dir, args.last)
            out = args.out or run_dir / "checkpoints" / f"avg_last{args.last}.pt"
        else:
            paths = args.inputs
            if args.out is None:
                p.error("--out is needed when averaging checkpoint files")
            out = args.out
        averaged = average(paths)
        run_of = {Path(x).resolve().parent.parent for x in [*paths, out]}
        if len(run_of) > 1:
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
