"""Test-only methods for the cluster tests, registered in every process that runs experiments
through ``$VBSEG_METHODS=tests.experiment.cluster_methods`` (vbseg.methods.registry) when
``$VBSEG_TEST_CONTROL`` is set (so collecting the tests registers nothing). Both behave as the
fast ``eanm41`` threshold unless a control file in ``$VBSEG_TEST_CONTROL`` arms them:

* ``test-pause-once``: with ``pause.armed`` present, the first caller renames it to
  ``pause.<pid>`` (exactly one wins) and sleeps, so a test can SIGKILL that process mid-fit;
* ``test-kill``: while ``kill.armed`` exists, SIGKILLs its own process every time.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from vbseg.baselines.eanm41 import run_eanm41
from vbseg.methods.registry import REGISTRY, Method, register

CONTROL_ENV = "VBSEG_TEST_CONTROL"
NAMES = ("test-pause-once", "test-kill")


def _control() -> Path:
    return Path(os.environ[CONTROL_ENV])


def run_pause_once(prepared, options):
    try:
        os.rename(_control() / "pause.armed", _control() / f"pause.{os.getpid()}")
    except FileNotFoundError:
        return run_eanm41(prepared, options)
    time.sleep(300)  # killed by the test long before
    raise RuntimeError("test-pause-once was not killed")


def run_kill(prepared, options):
    if (_control() / "kill.armed").exists():
        os.kill(os.getpid(), signal.SIGKILL)
    return run_eanm41(prepared, options)


METHODS = (Method(NAMES[0], run_pause_once, "test only: pauses once to be killed", needs_pet=True),
           Method(NAMES[1], run_kill, "test only: kills its process while armed", needs_pet=True))


def register_all() -> None:
    for method in METHODS:
        register(method)


def unregister() -> None:
    for name in NAMES:
        REGISTRY.pop(name, None)


if CONTROL_ENV in os.environ:  # a worker of the cluster tests (pytest's processes register in
    register_all()            # the tests' fixture, and unregister after them)
