"""The training logs: ``train_log.csv`` (loss, learning rate, tokens/s and padding per
``trainer.log_every`` updates, from a ``LogWindow``), ``valid_log.csv`` (validation loss,
perplexity and BLEU), and ``SkipCounter``, the device-side count of the NaN/inf updates
skipped between two rows. Only rank 0 writes; the other ranks get ``NullLog``s.
"""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path

import torch

TRAIN_FIELDS = ["step", "epoch", "loss", "lr", "tokens_per_s", "pad_frac"]
VALID_FIELDS = ["step", "epoch", "train_seconds", "valid_loss", "valid_nll", "valid_ppl",
                "valid_bleu"]  # fmt: skip


@dataclasses.dataclass
class LogWindow:
    """The updates since the last train_log.csv row: this rank's summed loss (a device
    tensor, read only when the row is written) and target tokens, its batches' padding
    fractions, and the training seconds (time spent evaluating paused). Checkpoints keep it,
    so that a run resumed between two rows writes the same next row as one never stopped."""

    loss: float | torch.Tensor = 0.0
    tokens: int = 0
    pad: float = 0.0
    batches: int = 0
    seconds: float = 0.0  # before running_since
    running_since: float | None = None

    def start(self) -> LogWindow:
        self.running_since = time.perf_counter()
        return self

    def pause(self) -> None:
        self.seconds = self.elapsed()
        self.running_since = None

    def elapsed(self) -> float:
        running = 0.0 if self.running_since is None else time.perf_counter() - self.running_since
        return self.seconds + running


class SkipCounter:
    """NaN/inf updates counted on the device, so that no update waits for the GPU: how many
    since the last read, the tokens they held, and the longest run of them in a row."""

    def __init__(self, device):
        zero = torch.zeros((), device=device)
        self.count, self.tokens, self.run, self.longest = zero, zero, zero, zero

    def record(self, bad: torch.Tensor, ntok: int) -> None:
        bad = bad.float()
        self.count, self.tokens = self.count + bad, self.tokens + bad * ntok
        self.run = (self.run + 1) * bad
        self.longest = torch.maximum(self.longest, self.run)

    def read(self) -> tuple[int, int, int]:
        """(count, longest run, tokens) since the last read. A run still going on goes on
        counting from its length, so a run across two reads is measured whole."""
        count, longest, tokens = (int(x) for x in torch.stack(
            [self.count, self.longest, self.tokens]).tolist())  # fmt: skip
        zero = torch.zeros_like(self.count)
        self.count, self.tokens, self.longest = zero, zero, zero
        return count, longest, tokens


class NullLog:
    """What ranks other than 0 write logs to: nothing."""

    def write(self, row: dict) -> None:
        pass


class CsvLog:
    """Append rows to a CSV file, writing the header once (resume appends)."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = path, fields
        if not path.exists():
            with open(path, "w", newline="") as f:
                csv.DictWriter(f, fields).writeheader()

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (atomically rewritten)."""
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["step"] and int(r["step"]) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)


def open_logs(run_dir: Path, is_main: bool, step: int) -> tuple[CsvLog | NullLog, CsvLog | NullLog]:
    """train_log.csv and valid_log.csv of ``run_dir`` (rank 0; the other ranks get
    ``NullLog``s). Rows after ``step``, the checkpoint resumed from, are trained again and
    dropped; a fresh run (step 0) drops those of a run that stopped before its first
    checkpoint."""
    if not is_main:
        return NullLog(), NullLog()
    logs = (
        CsvLog(run_dir / "train_log.csv", TRAIN_FIELDS),
        CsvLog(run_dir / "valid_log.csv", VALID_FIELDS),
    )
    for csv_log in logs:
        csv_log.truncate_after(step)
    return logs
