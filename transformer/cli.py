"""Error reporting for the command-line entry points: one clear line, no traceback.

Expected faults (bad data, bad config values, unreadable checkpoints) are printed as
``error: <message>`` on stderr with exit status 1. ``HYDRA_FULL_ERROR=1`` shows the traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

from omegaconf.errors import OmegaConfBaseException

from .checkpoint import CheckpointError
from .data import DataError

EXPECTED = (
    DataError,
    CheckpointError,
    ValueError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,  # e.g. input=, ref= or output= naming a folder
    NotADirectoryError,
    OmegaConfBaseException,
    RuntimeError,
)


def one_line(e: BaseException, limit: int = 400) -> str:
    """The message of ``e`` on one line: its first line, and the next one too where the
    first only introduces it (ends with ':', as Hydra's "Error in call to target '...':" and
    torch's "Error(s) in loading state_dict for ...:" do)."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    msg = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def friendly_errors(fn):
    """Wrap a Hydra task function so expected errors end the program with one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
            sys.exit(130)
        except EXPECTED as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            logging.getLogger(__name__).debug("error", exc_info=True)
            print(f"error: {one_line(e)}", file=sys.stderr)
            sys.exit(1)

    return wrapper
