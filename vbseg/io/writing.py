"""Atomic output: every file vbseg writes goes through :func:`write_with` (a temporary file in
the target folder, renamed over the target only when complete, with the mode a plain ``open``
would give), so an interrupted run never leaves a half-written output; and the digests that
record inputs (:func:`sha256_file`)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from vbseg.io.image import Volume


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file; of a folder (a DICOM series), over the names and contents of the
    files directly in it, in sorted order."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).iterdir() if p.is_file()) if os.path.isdir(path) else [path]
    for file in files:
        if os.path.isdir(path):
            digest.update(Path(file).name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    """The process's umask (read by setting it and restoring it at once: there is no getter)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def write_with(path: str | os.PathLike, writer) -> Path:
    """Atomically create ``path`` by calling ``writer(tmp_path)``, then renaming.

    The temporary file sits in the target folder (so the rename is atomic on POSIX) and keeps
    the target's extension (``.nii.gz``, ``.png``, ...) for writers that infer the format from
    it. If ``writer`` fails or the process dies, the target is untouched. The file gets the
    mode a plain ``open`` would give it (0666 less the umask), not mkstemp's private 0600.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if target.name.endswith(".nii.gz") else target.suffix
    handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``array`` (dtype kept) with ``affine`` as NIfTI-1 (sform = qform), atomically."""
    affine = np.asarray(affine, np.float64)
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return write_with(path, lambda tmp: nib.save(image, tmp))


def save_volume(path: str | os.PathLike, volume: Volume) -> Path:
    return save_nifti(path, volume.data, volume.affine)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text))
