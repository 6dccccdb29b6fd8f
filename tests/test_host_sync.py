"""A training update never reads a value of a device tensor on the host (issue 6: no host
synchronisation in the step loop but the logging's). On a GPU such a read (``.item()``,
``int()``, ``bool()``, an operator whose output shape depends on the values) waits for
everything queued before it, so the host stops running ahead of the device.

The settings are those of a GPU: the loss fused with the output projection
(``trainer.fused_loss``, on by default on the CPU only) picks the real-token rows with a
boolean mask, whose count is read on the host, once per micro-batch.

This machine has no GPU, so the check runs on the CPU: the tensors that would live on the
device (the models' weights, gradients and optimizer state, the batches once the trainer
has copied them) are tagged, every operator's output is tagged when one of its inputs is (or
when it is made from nothing, as a device tensor would be), and an operator that would read
a tagged tensor on the host is recorded with where in our code it was called."""

import dataclasses
import traceback

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from transformer.trainer import Trainer

aten = torch.ops.aten
# operators that read values on the host (scalars out, or an output shape from the values)
READS = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
TAG = "_would_be_on_device"


def tag(tensors) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            setattr(t, TAG, True)


def tagged(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, TAG, False)


def our_frame() -> str:
    """The innermost frame of this project's code (not of torch, not of this test)."""
    for frame in reversed(traceback.extract_stack()):
        if "/transformer/" in frame.filename and "site-packages" not in frame.filename:
            return f"{frame.filename.rsplit('/transformer/', 1)[1]}:{frame.lineno}: {frame.line}"
    return "(no frame of ours)"


class DeviceReads(TorchDispatchMode):
    """Records each operator that would read a device tensor on the host."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = any(tagged(t) for t in inputs)
        reads = func in READS or (
            func is aten.index.Tensor  # x[mask]: its length is the mask's count
            and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        )
        if func is aten._pack_padded_sequence.default:  # takes its lengths on the host
            on_device, reads = tagged(args[1]), True
        if on_device and reads:
            self.reads.append(f"{func}: {our_frame()}")
        out = func(*args, **kwargs)
        if on_device or not inputs:
            tag(pytree.tree_leaves(out))
        return out


def batch_tensors(batch) -> list[torch.Tensor]:
    """The tensors of a batch (``seq2seq.Batch``, ``packing.PackedBatch`` and its rows)."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if dataclasses.is_dataclass(batch):
        return [t for f in dataclasses.fields(batch) for t in batch_tensors(getattr(batch, f.name))]
    return []


def tag_device_state(trainer: Trainer) -> None:
    """Weights, gradients and optimizer state of every model the update touches, and what
    the trainer keeps on the device between updates."""
    models = {id(m): m for m in (trainer.model, trainer.compute_model)}.values()
    for model in models:
        tag(model.parameters())
        tag(p.grad for p in model.parameters() if p.grad is not None)
        tag(model.buffers())
    tag(pytree.tree_leaves(trainer.optimizer.state_dict()["state"]))
    tag(pytree.tree_leaves(vars(trainer.skips)))
    if trainer.mixed:
        tag(pytree.tree_leaves(vars(trainer.mixed)))


def device_reads(trainer: Trainer, monkeypatch, updates: int = 2) -> list[str]:
    """The host reads of device tensors in ``updates`` training updates (after a first,
    untagged one that creates the optimizer state)."""
    stream = trainer.batches()
    assert trainer.train_step([next(stream)[1]]) is not None
    copy = trainer.to_device

    def to_device(batch):
        moved = copy(batch)
        tag(batch_tensors(moved))
        return moved

    monkeypatch.setattr(trainer, "to_device", to_device)
    tag_device_state(trainer)
    with DeviceReads() as mode:
        for _ in range(updates):
            micro = [next(stream)[1] for _ in range(trainer.t.accum_steps)]
            assert trainer.train_step(micro) is not None
    return mode.reads


RNN = ("model=rnn", "model.emb_dim=16", "model.hidden_size=16")
GPU_LIKE = ("trainer.fused_loss=false",)  # the CUDA default (module docstring)


def trainer_of(compose, small_overrides, tmp_path, *extra) -> Trainer:
    overrides = small_overrides
    if "model=rnn" in extra:  # the tiny run's sizes are the Transformer's
        overrides = [o for o in small_overrides if not o.startswith("model.")]
    return Trainer(compose([*overrides, *GPU_LIKE, *extra]), tmp_path / "run")


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("trainer.packed_rows=32",),  # rows, as the Transformer trains on CUDA by default
        ("trainer.precision=bf16-weights", "trainer.accum_steps=2"),
        RNN,
    ],
    ids=["transformer", "packed-rows", "bf16-weights-accum", "rnn"],
)
def test_an_update_reads_no_device_value_on_the_host(
    compose, small_overrides, tmp_path, monkeypatch, extra
):
    trainer = trainer_of(compose, small_overrides, tmp_path, *extra)
    assert trainer.skip_on_device  # the fused AdamW skips a NaN/inf update by itself
    assert device_reads(trainer, monkeypatch) == []


def test_the_check_finds_the_reads_there_were(compose, small_overrides, tmp_path, monkeypatch):
    """The RNN as it was before 2026-12-04, counting its lengths from the device's mask and
    reading them back at every step, and the fused loss's count of real tokens: the check
    names their lines."""
    trainer = trainer_of(compose, small_overrides, tmp_path, *RNN, "trainer.fused_loss=true")
    monkeypatch.setattr(trainer, "host_lengths", False)
    reads = device_reads(trainer, monkeypatch, updates=1)
    assert any("rnn_model.py" in r and "int(lengths.min())" in r for r in reads), reads
    assert any("loss.py" in r and "hidden[keep]" in r for r in reads), reads
