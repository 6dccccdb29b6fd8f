"""trainer.data_workers (transformer/prefetch.py): batches made by worker processes are the
training loop's own, in its order, from any position, and train the same weights."""

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from transformer import run_lock
from transformer.data import EncodedSplit, TokenBatcher
from transformer.packing import pack_batch
from transformer.prefetch import Prepared, batch_stream
from transformer.trainer import Trainer

IDS = ("src", "src_mask", "tgt_in", "tgt_out")


def small_batcher(n: int = 120, max_tokens: int = 60) -> TokenBatcher:
    rng = np.random.default_rng(0)
    src = [rng.integers(3, 50, size=rng.integers(1, 12)) for _ in range(n)]
    tgt = [rng.integers(3, 50, size=rng.integers(1, 12)) for _ in range(n)]
    return TokenBatcher(EncodedSplit.from_lists(src, tgt), max_tokens, seed=3,
                        special_ids=(0, 1, 2))  # fmt: skip


def same_ids(a, b) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in IDS)


@pytest.mark.parametrize("workers, width", [(0, 32), (1, 0), (2, 0), (2, 32)])
def test_workers_hand_over_the_loops_batches_in_its_order_across_epochs(workers, width):
    batcher = small_batcher()
    expected = []  # what the loop without workers takes, from epoch 0 position 5 on
    for epoch in range(3):
        plan = batcher.epoch_batches(epoch)
        expected += [(epoch, pos, plan[pos]) for pos in range(5 if epoch == 0 else 0, len(plan))]
    assert len({e for e, _, _ in expected}) == 3 and len(expected) > 10
    stream = batch_stream(batcher, 0, 5, pad_id=0, width=width, workers=workers)
    got = [next(stream) for _ in expected]
    del stream
    for item, (epoch, pos, examples) in zip(got, expected):
        assert isinstance(item, Prepared)
        assert (item.epoch, item.pos) == (epoch, pos)
        assert np.array_equal(item.examples, examples)
        batch = batcher.batch(examples)
        assert same_ids(item.batch, batch)
        if width:
            packed = pack_batch(batch, 0, width)
            assert same_ids(item.packed, packed)
            for x, y in zip(item.packed.rows.tensors(), packed.rows.tensors()):
                assert torch.equal(x, y)
        else:
            assert item.packed is None


def children() -> set[int]:
    """The pids of this process's children (Linux /proc)."""
    listed = Path("/proc/self/task").glob("*/children")
    return {int(pid) for f in listed for pid in f.read_text().split()}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux /proc")
def test_a_worker_leaves_signals_and_the_run_lock_to_the_trainer(tmp_path):
    """Ctrl-C reaches the whole process group, workers too, and a trainer killed with -9
    leaves its workers running for up to 5 s: a worker that ended on SIGINT or SIGTERM
    took the batches away before the trainer could save, and one that kept its inherited
    copy of the run lock refused the resume meanwhile."""
    batcher = small_batcher()
    before = children()
    with run_lock.run_lock(tmp_path):  # the trainer's
        stream = batch_stream(batcher, 0, 0, pad_id=0, width=0, workers=1)
        first = next(stream)  # the worker runs
    try:
        (worker,) = children() - before
        assert run_lock.holder(tmp_path) is None  # gone with the trainer's own copy
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(worker, sig)
        got = [first] + [next(stream) for _ in range(9)]  # more than the loader prefetched
        assert [item.pos for item in got] == list(range(10))
        assert worker in children()
    finally:
        del stream


@pytest.mark.parametrize("rows", [0, 64])
def test_training_with_workers_gives_the_same_weights(compose, small_overrides, tmp_path, rows):
    """Bit for bit on the CPU, over an epoch boundary, in packed rows too: the same batches
    in the same order, and the workers draw nothing from the global RNG (dropout's)."""
    weights, epochs = [], []
    for workers in (0, 2):
        run = tmp_path / f"run{workers}"
        cfg = compose(small_overrides + [f"run_dir={run}", "trainer.max_steps=14",
                                         "model.dropout=0.3", f"trainer.packed_rows={rows}",
                                         f"trainer.data_workers={workers}"])  # fmt: skip
        trainer = Trainer(cfg, run)
        trainer.run()
        epochs.append((trainer.epoch, trainer.batch_in_epoch, trainer.epoch_len))
        weights.append(trainer.model.state_dict())
    assert epochs[0] == epochs[1] and epochs[0][0] >= 1, epochs  # crossed an epoch
    for name, tensor in weights[0].items():
        assert torch.equal(weights[1][name], tensor), name


def test_data_workers_must_be_a_count(compose, small_overrides):
    from transformer.trainer import TrainingError, train

    with pytest.raises(TrainingError, match="trainer.data_workers must be an integer >= 0, got -1"):
        train(compose(small_overrides + ["trainer.data_workers=-1"]))
