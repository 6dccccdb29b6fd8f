"""Data-parallel training over processes started by ``torchrun`` (PyTorch's own engine).

``torchrun --nproc_per_node=N train.py ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
in each process; ``from_env`` reads them and ``init`` joins the process group (NCCL on
CUDA, gloo on CPU, or ``trainer.dist_backend``). The trainer wraps its model in
``DistributedDataParallel``, which averages gradients; everything else that ranks must agree
on (token counts, stop flags, validation sums, hypotheses) travels through the small
collectives of ``Dist`` below, on a CPU (gloo) group so that they never wait on the GPU.
Without torchrun ``Dist()`` is a single process and every collective returns its input.

Debugging aid: with ``MT_DEBUG_BATCH_LOG=DIR`` each rank writes ``DIR/rank{R}.jsonl``, one
line per micro-batch (step, epoch, example indices) and a last line with the sha256 of its
final weights (``state_dict_sha256``); ``tests/test_distributed.py`` reads them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

DEBUG_ENV = "MT_DEBUG_BATCH_LOG"


class DistributedError(RuntimeError):
    """A bad torchrun environment or backend choice."""


@dataclass
class Dist:
    """This process's place among the ranks; a single process when ``world_size == 1``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: object = None  # the CPU (gloo) group for control values; None = the default group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64: integer counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.tolist()

    def max(self, values: list[int]) -> list[int]:
        """Element-wise maximum over ranks: a flag raised on any rank is raised on all."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.group)

    def shard(self, items: list) -> list:
        """This rank's share of ``items``: every ``world_size``-th one from ``rank``."""
        return items[self.rank :: self.world_size]

    def unshard(self, shards: list[list]) -> list:
        """Inverse of ``shard``: the items of every rank's shard in their original order."""
        out = [None] * sum(len(s) for s in shards)
        for rank, shard in enumerate(shards):
            out[rank :: self.world_size] = shard
        return out


def from_env() -> Dist:
    """The rank layout torchrun set in the environment; ``Dist()`` when it set none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError) as e:
        raise DistributedError(
            f"WORLD_SIZE={world_size} but RANK/LOCAL_RANK are missing or not integers ({e}); "
            "start distributed training with torchrun"
        ) from e
    return Dist(rank, world_size, local_rank)


def init(ctx: Dist, backend: str, device: torch.device, timeout_minutes: float) -> Dist:
    """Join the process group (``backend``: auto = nccl on CUDA, gloo on CPU) and make the
    CPU group for control values; a collective that waits longer than ``timeout_minutes``
    fails. Returns ``ctx`` with ``group`` set; a no-op for one process."""
    if not ctx.enabled:
        return ctx
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DistributedError(f"trainer.dist_backend=nccl needs CUDA, but the device is {device}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend, timeout=timeout)
    # Flags and counts are Python numbers on the host: a gloo group moves them without a
    # device copy or a CUDA synchronisation.
    group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return Dist(ctx.rank, ctx.world_size, ctx.local_rank, group)


def shutdown(ctx: Dist) -> None:
    """Leave the process group (every rank, at the end or on an error)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel: rank 0's weights are copied to every rank now,
    and gradients are averaged over ranks in every backward pass (unless ``no_sync``)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    # The models' only buffers are constant positional encodings: no need to broadcast
    # them at every forward (newer torch renamed broadcast_buffers).
    params = inspect.signature(ddp).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    ids = [device.index] if device.type == "cuda" else None
    return ddp(model, device_ids=ids, **{no_sync: False})


def state_dict_sha256(state_dict: dict) -> str:
    """A hash of every tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    return h.hexdigest()


class DebugLog:
    """``$MT_DEBUG_BATCH_LOG/rank{R}.jsonl`` when that variable is set, else nothing."""

    def __init__(self, rank: int):
        directory = os.environ.get(DEBUG_ENV)
        self.path = Path(directory) / f"rank{rank}.jsonl" if directory else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
