"""Checkpoint save/load shared by training and translation.

A checkpoint is a dict of plain containers and tensors, loadable with
``torch.load(weights_only=True)`` so a file from elsewhere cannot run code when loaded.
Writes are atomic (temporary file in the same directory, fsync, rename), so a crash
never leaves a half-written ``last.pt``. The tokenizer is referenced by a path relative to
the run directory plus its sha256, checked on load.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, unsafe or incomplete."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save(path: str | Path, payload: dict) -> None:
    """Atomically write ``payload`` (plus the format version) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({**payload, "format_version": FORMAT_VERSION}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint safely; every failure is one CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load (not a plain-data checkpoint): {first}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a checkpoint of format version {FORMAT_VERSION}")
    return ckpt
