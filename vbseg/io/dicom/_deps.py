"""Lazy imports of the optional DICOM packages (the ``vbseg[dicom]`` extra).

vbseg itself runs without pydicom and highdicom; only reading or writing DICOM needs them, so
they are imported on first use and a missing package becomes a one-line
:class:`~vbseg.errors.InputError` that says how to install it.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from contextlib import contextmanager

from vbseg.errors import InputError

INSTALL_HINT = "pip install 'vbseg[dicom]'"


def require(module: str, subject: str | os.PathLike):
    """Import ``module`` (pydicom, highdicom, skimage.measure) or raise InputError naming
    ``subject`` (the file being read or written) and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0].replace("skimage", "scikit-image")
        raise InputError(subject, f"DICOM support needs the optional package {package} "
                                  f"({INSTALL_HINT})") from None


@contextmanager
def quiet_pydicom():
    """Silence pydicom's value-validation warnings while reading or writing.

    Real scanner files often break VR length limits (a 17-character SH, say) in harmless
    attributes; pydicom warns for each one, which would bury the warnings that matter (contours
    placed by position, see :mod:`vbseg.io.dicom.rtstruct`). Only these warnings are filtered, and
    only inside the block (see :func:`quietly`).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
        for message in (r"The value length .* exceeds the maximum length", r"Invalid value for VR",
                        r"Value .* is not valid for VR"):  # attributed to the caller's frame
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        # highdicom's note that a copied Patient's Name such as "STS_001" has one component:
        # true of many anonymised series, and nothing vbseg can or should change.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name",
                                category=UserWarning)
        yield


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def quietly(function):
    """Run ``function`` inside :func:`quiet_pydicom`: pydicom decodes header values lazily, on
    first access, so the filter must cover every function that reads headers."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with quiet_pydicom():
            return function(*args, **kwargs)

    return wrapper
