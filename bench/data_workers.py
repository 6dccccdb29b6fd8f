"""Training throughput of the trainer itself with its batches made in the training loop or
by worker processes (``trainer.data_workers``, transformer/prefetch.py).

    python bench/data_workers.py [--workers 0,1,2] [--rounds 2] [--steps 300]
        [--overrides "model.d_model=64 ..."] [--out results/bench/data_workers_NAME.md]

Each round trains ``train.py`` once per worker count, in turn, for ``--steps`` updates
(no evaluation until the end; the final choice and test translations off), each run
afresh in a temporary folder sharing one encoded corpus cache, and reads the run's
``metrics.json``: target tokens per second of training (evaluation excluded), as the trainer
reports them. Making a batch (and packing it, with ``trainer.packed_rows``) is host time
between two steps of the loop; workers move it to other processes. It can only pay where the
step waits for the host (a GPU whose step is bound by launching kernels; CUDA graphs), and
costs where the workers take cores from the step (a CPU with few cores).
Not a test: it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments  # noqa: E402
import torch  # noqa: E402
from train_speed import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# the run's settings that keep it to training: no evaluation before the end, no candidates
# for the final choice beyond best.pt, no test translations
QUIET = [
    "trainer.eval_every=1000000",
    "trainer.bleu_every=1000000",
    "trainer.progress_bar=false",
    "trainer.final.average_last=0",
    "trainer.final.length_penalties=[]",
    "data.test_splits=[]",
    "decode=greedy",  # the final translation of valid: greedy, not beam 5 (the table reads no BLEU)
]


def train_once(workdir: Path, name: str, steps: int, workers: int, extra: list[str]) -> dict:
    """One ``train.py`` run under ``workdir``; its metrics.json."""
    run = workdir / name
    args = [
        f"run_dir={run}",
        f"hydra.run.dir={run}/hydra",
        f"data.cache_dir={workdir / 'cache'}",
        f"trainer.max_steps={steps}",
        f"trainer.data_workers={workers}",
        *QUIET,
        *extra,
    ]
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=workdir,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise SystemExit(f"train.py {' '.join(args)} failed ({done.returncode}):\n{tail}")
    return json.loads((run / "metrics.json").read_text())


def report(argv, args, extra: list[str], tok_s: dict, device: str, torch_version: str) -> list[str]:
    """The table of the runs so far."""
    if device == "cpu":  # metrics.json names a GPU; a CPU by its model here
        device = machine(torch.device("cpu"))
    lines = [
        f"# The trainer's throughput with its batches made by worker processes ({device})",
        "",
        f"- torch {torch_version}; {os.cpu_count()} CPUs; command: "
        f"`python bench/data_workers.py {arguments.given(argv)}`",
        f"- each run: `train.py` {' '.join(QUIET + extra)}, {args.steps} updates; the worker "
        f"counts alternate within each of {args.rounds} rounds",
        "- tgt tok/s: the run's `train_tokens_per_s` (metrics.json: target tokens over training "
        f"time, evaluation excluded); ratio: the mean against {args.workers[0]} workers'",
        "",
        "| workers | tgt tok/s per round | mean | ratio |",
        "|---:|---|---:|---:|",
    ]
    base = tok_s[args.workers[0]]
    for w, values in tok_s.items():
        if not values:
            continue
        mean = statistics.mean(values)
        ratio = f"{mean / statistics.mean(base):.2f}x" if base else "-"
        lines.append(f"| {w} | {', '.join(f'{v:,}' for v in values)} | {mean:,.0f} | {ratio} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=arguments.counts(0), default="0,1,2")
    ap.add_argument("--rounds", type=arguments.count(1), default=2)
    ap.add_argument("--steps", type=arguments.count(1), default=300)
    ap.add_argument(
        "--overrides", default="", help="train.py overrides for every run, space-separated"
    )
    ap.add_argument("--out", type=arguments.out_file)
    args = ap.parse_args(argv)
    extra = shlex.split(args.overrides)
    tok_s = {w: [] for w in args.workers}
    with tempfile.TemporaryDirectory(prefix="data-workers-") as tmp:
        for r in range(args.rounds):
            for w in args.workers:
                m = train_once(Path(tmp), f"r{r}-w{w}", args.steps, w, extra)
                tok_s[w].append(m["train_tokens_per_s"])
                print(f"round {r + 1}, {w} workers: {m['train_tokens_per_s']:,} tgt tok/s "
                      f"({m['steps']} steps in {m['train_seconds']} s)", flush=True)  # fmt: skip
                lines = report(argv, args, extra, tok_s, m["device"], m["torch"])
                arguments.save(args.out, lines, done=False)  # kept if a later run is cut off
    arguments.save(args.out, lines, done=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
