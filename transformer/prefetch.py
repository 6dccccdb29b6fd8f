"""``trainer.data_workers``: the training batches made, and packed, in worker processes
ahead of the step.

Without workers the training loop makes each batch itself (gathering its pairs from the
encoded split, padding them, ``trainer.packed_rows``' layout) between two steps. Where the
step is bound by the host issuing kernels, as the Multi30k model's eager step and every
step through CUDA graphs on a GPU, that host time adds to every step. With N workers
(``torch.utils.data.DataLoader`` over an endless ``BatchStream``), worker k makes batches
k, k + N, ... of the stream and the loader hands them over in order; the step copies them
into pinned memory on CUDA, as without workers (a few hundred KB a batch). The batches and
their order are those of the loop without workers, from the same position (resume), since
both follow ``TokenBatcher.epoch_batches``; only the process that makes them changes.

Workers are forked where the platform can fork (they read the memory-mapped split without
copying it), ignore SIGINT and SIGTERM (the trainer stops on those, saving a checkpoint,
and then shuts its workers down) and close their inherited copy of the run lock. A worker
whose trainer died (kill -9) ends within the loader's status-check interval (5 s).
"""

from __future__ import annotations

import multiprocessing
import signal
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import run_lock
from .packing import PackedBatch, pack_batch
from .seq2seq import Batch


@dataclass(frozen=True)
class Prepared:
    """One training batch as the stream hands it over: where it is in the stream (its
    epoch and its position in that epoch's plan), the indices of its examples, the padded
    batch and, with packed rows, the same pairs packed."""

    epoch: int
    pos: int
    examples: np.ndarray
    batch: Batch
    packed: PackedBatch | None


def prepare(batcher, epoch: int, pos: int, examples, pad_id: int, width: int) -> Prepared:
    """Batch ``pos`` of epoch ``epoch`` (``examples``: its indices), packed in rows of
    ``width`` slots where ``width`` > 0."""
    batch = batcher.batch(examples)
    packed = pack_batch(batch, pad_id, width) if width else None
    return Prepared(epoch, pos, examples, batch, packed)


class BatchStream(IterableDataset):
    """Every training batch of ``batcher``'s plans from position ``pos`` of epoch ``epoch``
    on, epoch after epoch, without end; in a loader's worker k of N, only every N-th from
    the k-th, so that the loader, taking one from each worker in turn, hands them over in
    the stream's order."""

    def __init__(self, batcher, epoch: int, pos: int, pad_id: int, width: int):
        self.batcher, self.epoch, self.pos = batcher, epoch, pos
        self.pad_id, self.width = pad_id, width

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start, index = self.epoch, self.pos, 0
        while True:
            plan = self.batcher.epoch_batches(epoch)
            if not plan:  # the trainer refuses an empty epoch 0; a later one would spin
                raise RuntimeError(f"epoch {epoch} has no training batches")
            for pos in range(start, len(plan)):
                if index % workers == worker:
                    yield prepare(self.batcher, epoch, pos, plan[pos], self.pad_id, self.width)
                index += 1
            epoch, start = epoch + 1, 0


def start_worker(_worker_id: int) -> None:
    """A worker leaves SIGINT (Ctrl-C reaches the whole process group) and SIGTERM to the
    trainer, which stops cleanly and then ends the workers, and closes its copy of the
    trainer's run lock, which would otherwise outlive a trainer killed with -9."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run_lock.close_inherited()


def batch_stream(batcher, epoch: int, pos: int, pad_id: int, width: int, workers: int):
    """An iterator of ``Prepared`` batches from position ``pos`` of epoch ``epoch`` on,
    packed in rows of ``width`` slots where ``width`` > 0: made by ``workers`` processes, or
    here, by the caller's process, where ``workers`` is 0."""
    stream = BatchStream(batcher, epoch, pos, pad_id, width)
    if not workers:
        return iter(stream)
    methods = multiprocessing.get_all_start_methods()
    loader = DataLoader(
        stream,
        batch_size=None,  # the stream's items are whole batches already
        num_workers=workers,
        worker_init_fn=start_worker,
        multiprocessing_context="fork" if "fork" in methods else None,
        # the workers' seeds from a generator of their own: drawn from the global one, they
        # would move the dropout masks of a run with workers away from one without
        generator=torch.Generator().manual_seed(0),
    )
    return iter(loader)
