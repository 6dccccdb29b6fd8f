"""One training run per run folder: an exclusive flock on ``RUN/.train.lock``, which the
system releases when the process ends, even by kill -9. The trainer holds it while it
trains (``run_lock``); train.py asks who holds it (``holder``) before Hydra writes into the
folder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from pathlib import Path

from .settings import TrainingError

log = logging.getLogger(__name__)

LOCK_FILE = ".train.lock"
# The lock files this process holds open. A forked child shares the lock (flock's lock is
# the open file's, not the process's): a data worker closes its copies
# (``close_inherited``), else the lock would outlive a trainer killed with -9 until its
# workers noticed and ended, refusing the resume meanwhile.
HELD: list = []


def close_inherited() -> None:
    """In a forked child of the trainer: close the lock files inherited from it, which
    leaves the trainer's lock to the trainer."""
    for f in HELD:
        f.close()
    HELD.clear()


def try_lock(f) -> str | None:
    """Take the exclusive lock on the open lock file ``f`` without waiting: None when taken,
    else who holds it, as the file names them. OSError where the filesystem has no locks
    (e.g. ENOLCK, EOPNOTSUPP)."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
    f.seek(0)
    return f.read().strip() or "another process"


def in_use(run_dir, owner: str) -> str:
    """The message that refuses a second run in ``run_dir``."""
    return (
        f"run_dir={run_dir} is in use by another training run ({owner}); wait for it to "
        "end, or use another run_dir"
    )


def holder(run_dir: Path) -> str | None:
    """Who holds ``run_dir``'s lock now, or None: no lock file, nobody holds it, or no
    locks on this filesystem (``run_lock`` warns then). Creates nothing; a lock it takes
    to find out is released at once."""
    try:
        f = open(Path(run_dir) / LOCK_FILE)
    except OSError:
        return None
    with f:
        try:
            return try_lock(f)
        except OSError:
            return None


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold the lock on ``run_dir`` while training in it; a TrainingError when another
    process holds it. Two runs in one folder resumed from the same checkpoint, or both
    started afresh, and each wrote every log row, checkpoint, best.pt and metrics.json over
    the other's (their step files mixing in the final average). A filesystem without locks
    is warned about, and the run goes on unlocked."""
    path = Path(run_dir) / LOCK_FILE
    f = open(path, "a+")
    try:
        owner = try_lock(f)
    except OSError as e:
        f.close()
        log.warning("cannot lock %s (%s): nothing stops a second run in it", path, e)
        yield
        return
    if owner is not None:
        f.close()
        raise TrainingError(in_use(run_dir, owner))
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    HELD.append(f)
    try:
        yield
    finally:
        HELD.remove(f)
        f.close()  # releases the lock; the file stays (removing it would race a new run)
