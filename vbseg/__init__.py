"""vbseg: probabilistic tumour contouring with Bayesian spatial models fitted by variational
inference in JAX. ``vbseg.segment(...)`` is the Python entry point; ``vbseg`` the CLI.

The names below load on first use (PEP 562), so ``import vbseg`` (and the command line's start,
which imports this package first) does not load JAX: Ctrl-C in the first seconds of a command
is then the command line's to report (:mod:`vbseg.cli`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "InputError": "vbseg.errors",
    "OutputError": "vbseg.errors",
    "VbsegError": "vbseg.errors",
    "Volume": "vbseg.io.image",
    "Phantom": "vbseg.phantoms",
    "PhantomSpec": "vbseg.phantoms",
    "make_phantom": "vbseg.phantoms",
    "segment": "vbseg.pipeline",
    "Posterior": "vbseg.posterior",
    "load_mask": "vbseg.io.volume",
    "load_volume": "vbseg.io.volume",
}

__all__ = ["InputError", "OutputError", "Phantom", "PhantomSpec", "Posterior", "VbsegError", "Volume",
           "load_mask", "load_volume", "make_phantom", "segment"]  # the keys of _EXPORTS

if TYPE_CHECKING:  # what the names are, for readers and type checkers
    from vbseg.errors import InputError, OutputError, VbsegError
    from vbseg.io.image import Volume
    from vbseg.io.volume import load_mask, load_volume
    from vbseg.phantoms import Phantom, PhantomSpec, make_phantom
    from vbseg.pipeline import segment
    from vbseg.posterior import Posterior


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vbseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
