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
    OmegaConfBaseException,
    RuntimeError,
)


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
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(1)

    return wrapper
