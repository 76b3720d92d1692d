"""Ctrl-C: the command line's one line and exit status, holding it back for a few renames,
and the test hook that pauses a run at a named stage.

Light on purpose (the standard library only): the command line imports it before JAX and the
models, so that Ctrl-C in those first seconds is reported like Ctrl-C at any later moment.

Test hook: with ``VBSEG_TEST_PAUSE_AT=<stage>`` the run touches ``$VBSEG_TEST_PAUSE_FILE``
(when set) on reaching ``pause_point(<stage>)`` and sleeps there, so a test can interrupt it at
a known point. The stages: "import" (the command line's module, while its imports load),
"fit" (before a segmentation's method runs) and "publish" (before a result set's files, or a
prior, calibration or checkpoint, are moved into place). Unset, it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

INTERRUPTED_MESSAGE = "vbseg: interrupted"
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as shells report a command ended by Ctrl-C
PAUSE_STAGE_ENV = "VBSEG_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "VBSEG_TEST_PAUSE_FILE"
PAUSE_S = 600.0


def report_interrupted() -> int:
    """Print the one line of an interrupted command on stderr; returns its exit status."""
    print(INTERRUPTED_MESSAGE, file=sys.stderr)
    return INTERRUPTED_STATUS


def pause_point(stage: str) -> None:
    """The test hook of the module doc: inert unless $VBSEG_TEST_PAUSE_AT names ``stage``."""
    if os.environ.get(PAUSE_STAGE_ENV) != stage:
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        Path(marker).touch()
    time.sleep(PAUSE_S)


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C waits until the block is done (then raises as usual): a handful of renames
    either all happen or none. Only the main thread receives signals, so elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, None)
