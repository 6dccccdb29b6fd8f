"""Checkpoint save/load shared by training and translation.

A checkpoint is a dict of plain containers and tensors, loadable with
``torch.load(weights_only=True)`` so a file from elsewhere cannot run code when loaded.

Guarantees:
- Writes are atomic: a temporary file in the same directory is written, flushed and
  fsynced, then renamed over the target (and the directory fsynced), so a crash or
  ``kill -9`` never leaves a half-written checkpoint under the final name.
- Every load first checks the zip CRC32 of every record (torch itself would load a
  bit-flipped tensor silently), then unpickles with ``weights_only=True``, then checks the
  format version and the sha256 of the stored config. Any failure is one CheckpointError
  naming the file.
- The tokenizer is referenced by a path relative to the run directory plus its sha256,
  checked by whoever loads it (trainer resume, translate.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

FORMAT_VERSION = 2  # 2 adds config_sha256
READABLE_VERSIONS = (1, 2)
STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, unsafe or incomplete."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DistributedDataParallel (``.module``) and torch.compile
    (``._orig_mod``) wrappers, nested in either order."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def config_sha256(config: dict) -> str:
    """A stable hash of a plain-container config (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make a rename or link itself durable
    finally:
        os.close(dir_fd)


def save(path: str | Path, payload: dict) -> None:
    """Atomically write ``payload`` (plus format version and config hash) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "format_version": FORMAT_VERSION}
    if "config" in payload:
        payload["config_sha256"] = config_sha256(payload["config"])
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # disk full, quota, file size limit; the file at
        # ``path``, if any, is untouched. torch's writer raises RuntimeError for some, in its
        # own words ("[enforce fail at inline_container.cc:672] . unexpected pos ...")
        reason = getattr(e, "strerror", None) or f"the write failed, is the disk full? ({e})"
        raise CheckpointError(f"cannot write {path}: {reason}") from e
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when the write itself failed
    _fsync_dir(path.parent)


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` another name for the finished file ``src`` (a hard link: no extra disk;
    a later atomic save over ``src`` replaces the name, not the linked data). Nothing to do
    when ``dst`` is ``src`` already: rename(2) over another link of the same file does
    nothing, and left the temporary link behind, a whole checkpoint's bytes on disk."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # filesystems without hard links
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(1 << 24):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    os.replace(tmp, dst)
    tmp.unlink(missing_ok=True)  # (gone, unless dst became a link of src meanwhile)
    _fsync_dir(dst.parent)


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files that ``save`` and ``link_or_copy`` leave in ``directory``
    when killed mid-write (``.NAME.tmpPID``; a whole checkpoint's size each); only while no
    other process writes there (the run's lock is held). Returns those deleted."""
    stale = sorted(directory.glob(".*.pt.tmp*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def step_checkpoints(directory: Path) -> list[Path]:
    """``step_*.pt`` files in ``directory``, newest (highest step) first."""
    found = [
        (int(m[1]), p) for p in directory.glob("step_*.pt") if (m := STEP_PATTERN.match(p.name))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def resume_candidates(directory: Path) -> list[Path]:
    """The checkpoints a run resumes from, in the order tried: last.pt, then the step files
    newest first."""
    last = directory / "last.pt"
    older = [p for p in step_checkpoints(directory) if p != last]
    return [last, *older] if last.is_file() else older


def prune(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest step checkpoints."""
    for old in step_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)


def verify(path: Path) -> None:
    """Check the zip container and every record's CRC32; CheckpointError when damaged."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({e})") from e
    if bad is not None:
        raise CheckpointError(f"{path}: corrupted checkpoint (CRC mismatch in record {bad})")


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint safely; every failure is one CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    verify(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load (not a plain-data checkpoint): {first}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({e})") from e
    version = ckpt.get("format_version") if isinstance(ckpt, dict) else None
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {version}; this version reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if version >= 2 and ckpt.get("config_sha256") != config_sha256(ckpt.get("config")):
        raise CheckpointError(f"{path}: stored config does not match its sha256")
    return ckpt


def require(ckpt: dict, path: Path, keys: tuple[str, ...], what: str = "") -> None:
    """Every one of ``keys`` is in ``ckpt`` (a loaded checkpoint, or a part of one named by
    ``what``), else one CheckpointError naming the first missing (was a KeyError traceback)."""
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        where = f"its {what} " if what else ""
        raise CheckpointError(
            f"{path}: {where}has no {missing[0]!r} entry (not a complete checkpoint)"
        )


def load_latest(candidates: list[Path], map_location="cpu") -> tuple[Path, dict] | None:
    """The first of ``candidates`` (newest first) that loads; damaged ones are skipped with a
    warning naming them. None when there are no candidates; CheckpointError when every
    candidate is damaged."""
    errors = []
    for path in candidates:
        try:
            ckpt = load(path, map_location)
        except CheckpointError as e:
            log.warning("%s; trying an older checkpoint", e)
            errors.append(str(e))
            continue
        return path, ckpt
    if errors:
        raise CheckpointError(
            f"no usable checkpoint among {len(errors)} found ({errors[0]}); "
            "delete them to start over, or use another run_dir"
        )
    return None


def parameter_names(state_dict: dict, buffers=frozenset()) -> list[str]:
    """The names of a saved model's parameters in ``named_parameters`` order: ``buffers``
    (the model's buffer names) are left out, and a tensor tied to an earlier one is counted
    once."""
    names, seen = [], set()
    for name, tensor in state_dict.items():
        if name in buffers:
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen or tensor.numel() == 0:
            seen.add(key)
            names.append(name)
    return names


def elementwise(value) -> bool:
    """Whether an optimizer state value is kept per element of its parameter (Adam's
    moments), else it is a scalar such as the step count."""
    return torch.is_tensor(value) and value.dim() > 0


def optimizer_state_for(
    model: torch.nn.Module, saved_names: list[str], saved_optim: dict, stacked_from
):
    """``saved_optim`` (one parameter group) re-indexed for ``model``'s parameters, for a
    checkpoint whose parameters were laid out otherwise (e.g. before the attention
    projections were stacked). ``saved_names`` are the saved model's parameter names
    (``parameter_names``), in the order of the saved group; a parameter of ``model`` that is
    new concatenates the states of the names ``stacked_from(name)`` gives. Raises
    CheckpointError when a parameter cannot be matched."""
    if len(saved_optim["param_groups"]) != 1:
        raise CheckpointError("cannot re-index an optimizer state with several parameter groups")
    group_ids = saved_optim["param_groups"][0]["params"]
    if len(saved_names) != len(group_ids):
        raise CheckpointError(
            f"the saved optimizer has {len(group_ids)} parameters, its model {len(saved_names)}"
        )
    state = {name: saved_optim["state"].get(i, {}) for name, i in zip(saved_names, group_ids)}
    new_state = {}
    for i, (name, param) in enumerate(model.named_parameters()):
        parts = [name] if name in state else stacked_from(name)
        if not parts or any(p not in state for p in parts):
            raise CheckpointError(f"no saved optimizer state for parameter {name}")
        entries = [state[p] for p in parts]
        merged = {}
        for key, value in entries[0].items():
            if elementwise(value):
                value = torch.cat([e[key] for e in entries])
                if value.shape != param.shape:
                    raise CheckpointError(
                        f"saved optimizer state {key} of {name} has shape "
                        f"{tuple(value.shape)}, the parameter {tuple(param.shape)}"
                    )
            merged[key] = value
        new_state[i] = merged
    n = len(new_state)
    return {
        "state": new_state,
        "param_groups": [{**saved_optim["param_groups"][0], "params": list(range(n))}],
    }
