"""What the command line writes in DICOM: ``segment --rtstruct / --dicom-seg`` and ``convert``.

Kept here so ``vbseg.cli`` stays a thin front end and Python users get the same:

* :func:`check_dicom_outputs`, before any work: the reference series opens, the outputs may be
  written (and do not land inside an input series folder);
* :func:`write_posterior_dicom`, after :func:`vbseg.segment`: ``contours_rtstruct.dcm`` (one
  ROI "vbseg p>=L" per contour level, {P(tumour) >= L}) on the ``--rtstruct`` reference
  series and ``prob_seg.dcm`` (FRACTIONAL / PROBABILITY SEG of P(tumour)) on the first input's
  series, or on the reference when the first input is NIfTI. When the reference grid is not
  the posterior's (say a PET segmentation contoured on the planning CT), P(tumour) is
  resampled onto it through world coordinates (:func:`vbseg.io.volume.resample_onto`) and is
  0 outside the segmented image; both must share a frame of reference. Onto a grid at least as
  fine along every axis (PET onto CT), each voxel takes the probability of the segmented voxel
  holding its centre: the model's probability is per voxel of its own grid, so every contour
  keeps its volume (trilinear interpolation of a near-binary map moved sts001's 10 % and 90 %
  contours on its CT by +16 % and -19 % in volume, the 50 % by -1 %); onto a coarser grid it
  is interpolated trilinearly after anti-aliasing. What of each contour lies outside the
  reference's field of view cannot be drawn on it: summary.json's ``dicom_exports`` records,
  per file and level, the contour's volume and the part outside, and the warning
  ``contour-outside-reference`` fires when that part is more than
  ``OUTSIDE_REFERENCE_LIMIT`` of a contour;
* :func:`convert_rtstruct`: an RTSTRUCT and its series -> ``image.nii.gz`` and one
  ``mask_<ROI>.nii.gz`` per ROI, so planning-system delineations become benchmark references.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from vbseg.errors import InputError, OutputError
from vbseg.io.dicom._deps import quietly
from vbseg.io.dicom.rtstruct import read_rtstruct_masks, rtstruct_roi_names, write_rtstruct
from vbseg.io.dicom.seg import write_probability_seg
from vbseg.io.dicom.series import VBSEG_MODALITY, check_series_requested, open_series, volume_from_series
from vbseg.io.image import AFFINE_ATOL_MM, Volume, resample_onto
from vbseg.io.result_files import RTSTRUCT_NAME, SEG_NAME
from vbseg.io.result_folder import check_outputs
from vbseg.io.writing import save_nifti, save_volume, write_text_atomic

CONVERTED_IMAGE_NAME = "image.nii.gz"
OUTSIDE_REFERENCE_LIMIT = 0.01  # share of a contour outside the reference series (module doc)


def dicom_output_names(rtstruct_reference=None, dicom_seg: bool = False) -> list[str]:
    return ([RTSTRUCT_NAME] if rtstruct_reference else []) + ([SEG_NAME] if dicom_seg else [])


@quietly
def default_modalities(images, series_uid=None) -> list[str] | None:
    """Modalities from the DICOM headers of folder inputs; for NIfTI files segment's default
    (pet for the first image, other after). None when no input is a folder."""
    if not any(os.path.isdir(p) for p in images):
        return None
    modalities = []
    for index, path in enumerate(images):
        if os.path.isdir(path):
            modalities.append(VBSEG_MODALITY.get(open_series(path, series_uid).modality, "other"))
        else:
            modalities.append("pet" if index == 0 else "other")
    return modalities


def _seg_reference(images, rtstruct_reference):
    first = os.fspath(images[0])
    return first if os.path.isdir(first) else rtstruct_reference


@quietly
def check_dicom_outputs(images, out, *, rtstruct_reference=None, dicom_seg: bool = False,
                        series_uid=None, overwrite: bool = False) -> None:
    """Refuse, before any work, DICOM outputs that cannot be made or written (see module doc)."""
    images = [os.fspath(p) for p in images]
    if dicom_seg and not _seg_reference(images, rtstruct_reference):
        raise InputError("--dicom-seg", "needs a DICOM series as the first image, or --rtstruct "
                                        "REFERENCE_DIR: the series whose grid the SEG lies on")
    check_series_requested(images + ([rtstruct_reference] if rtstruct_reference else []), series_uid)
    if rtstruct_reference:
        reference = open_series(rtstruct_reference, series_uid)
        if os.path.isdir(images[0]):  # a frame-of-reference clash is known before any work
            first = open_series(images[0], series_uid)
            if (first.frame_of_reference_uid and reference.frame_of_reference_uid
                    and first.frame_of_reference_uid != reference.frame_of_reference_uid):
                raise InputError(rtstruct_reference, f"frame of reference "
                                 f"{reference.frame_of_reference_uid} differs from that of "
                                 f"{images[0]} ({first.frame_of_reference_uid})")
    out_real = os.path.realpath(out)
    folders = [p for p in images if os.path.isdir(p)] + ([rtstruct_reference] if rtstruct_reference else [])
    for folder in folders:
        folder_real = os.path.realpath(folder)
        if out_real == folder_real or out_real.startswith(folder_real + os.sep):
            raise OutputError(out, f"is inside the input DICOM folder {folder}; choose another --out")
    check_outputs(out, dicom_output_names(rtstruct_reference, dicom_seg), images, overwrite)


def probability_on_series(posterior, series) -> tuple[np.ndarray, str | None]:
    """P(tumour) on ``series``' grid and how it was resampled: None (the same grid), "nearest"
    or "trilinear" (module docstring)."""
    reference = posterior.reference
    frame = (reference.source or {}).get("frame_of_reference_uid")
    if frame and series.frame_of_reference_uid and frame != series.frame_of_reference_uid:
        raise InputError(series.path, f"frame of reference {series.frame_of_reference_uid} differs "
                                      f"from that of the segmented image {reference.name} ({frame})")
    probability = np.asarray(posterior.probability, np.float32)
    if reference.shape == series.shape and np.allclose(reference.affine, series.affine,
                                                       atol=AFFINE_ATOL_MM):
        return probability, None
    source = Volume(probability, reference.affine, "other", reference.path)
    target = Volume(np.zeros(series.shape, np.float32), series.affine, "other", series.path)
    source_voxels_per_target = np.abs((np.linalg.inv(source.affine) @ target.affine)[:3, :3]).max(axis=1)
    nearest = bool(np.all(source_voxels_per_target <= 1.0 + 1e-6))
    on_grid, covered = resample_onto(source, target, nearest=nearest)
    return (np.where(covered, np.clip(on_grid.data, 0.0, 1.0), 0.0).astype(np.float32),
            "nearest" if nearest else "trilinear")


def outside_series(posterior, series, levels_percent) -> list[dict]:
    """Per contour level: its volume on the segmented grid and the part of it whose voxel
    centres lie outside ``series``' field of view (more than half a voxel beyond its outermost
    centres), in mL."""
    reference = posterior.reference
    to_series = np.linalg.inv(series.affine) @ reference.affine
    indices = np.indices(reference.shape).reshape(3, -1)
    position = to_series[:3, :3] @ indices + to_series[:3, 3:]
    limits = np.asarray(series.shape, np.float64)[:, None] - 0.5
    outside = np.any((position < -0.5) | (position > limits), axis=0).reshape(reference.shape)
    voxel_ml = reference.voxel_volume_ml
    rows = []
    for level in sorted(float(level) for level in levels_percent):
        contour = np.asarray(posterior.probability) >= np.float32(level / 100)
        rows.append({"level_percent": level, "contour_ml": float(contour.sum() * voxel_ml),
                     "outside_ml": float((contour & outside).sum() * voxel_ml)})
    return rows


def export_record(posterior, series, resampling, levels_percent, name: str) -> tuple[dict, list[dict]]:
    """(summary.json's record of one DICOM file written on ``series``, its warnings)."""
    rows = [] if resampling is None else outside_series(posterior, series, levels_percent)
    record = {"file": name, "series_path": os.fspath(series.path),
              "series_instance_uid": str(series.first.get("SeriesInstanceUID", "")),
              "resampling": resampling or "none (the segmented grid)", "contours": rows}
    shares = [r["outside_ml"] / r["contour_ml"] if r["contour_ml"] else 0.0 for r in rows]
    if not shares or max(shares) <= OUTSIDE_REFERENCE_LIMIT:
        return record, []
    share = max(shares)
    worst = rows[shares.index(share)]
    return record, [{"code": "contour-outside-reference", "message": (
        f"{share:.0%} of the {worst['level_percent']:g} % contour ({worst['outside_ml']:.1f} of "
        f"{worst['contour_ml']:.1f} mL) lies outside the field of view of {series.path}, on which "
        f"{name} is drawn, and is missing there (limit {OUTSIDE_REFERENCE_LIMIT:.0%}; per level in "
        "summary.json dicom_exports)")}]


def _record_exports(posterior, out: Path, records: list[dict], warnings: list[dict]) -> None:
    """Add the DICOM files' records and warnings to the posterior's summary and to the
    summary.json already written in ``out``."""
    posterior.summary["dicom_exports"] = records
    posterior.summary.setdefault("warnings", []).extend(warnings)
    path = out / "summary.json"
    if path.is_file():
        summary = json.loads(path.read_text())
        summary["dicom_exports"] = records
        summary["warnings"] = summary.get("warnings", []) + warnings
        write_text_atomic(path, json.dumps(summary, indent=2) + "\n")


def _level_colour(fraction: float) -> list[int]:
    """Blue (low level) to red (high level), so nested contours read from outside in."""
    return [int(round(255 * fraction)), int(round(160 * (1 - abs(2 * fraction - 1)))),
            int(round(255 * (1 - fraction)))]


@quietly
def write_posterior_dicom(posterior, out, *, images, levels_percent, rtstruct_reference=None,
                          dicom_seg: bool = False, series_uid=None) -> dict[str, Path]:
    """Write ``contours_rtstruct.dcm`` and/or ``prob_seg.dcm`` for a Posterior (module doc).

    Args:
        posterior: the result of :func:`vbseg.segment`.
        out: output folder (checked beforehand with :func:`check_dicom_outputs`).
        images: the segmented inputs (the first may be a DICOM folder: the SEG's grid).
        levels_percent: contour levels in percent, one ROI each.
        rtstruct_reference: series folder the RTSTRUCT references (None: no RTSTRUCT).
        dicom_seg: write the SEG.
        series_uid: Series Instance UID(s) choosing series in folders that hold several.
    Returns:
        {"rtstruct": path, "seg": path} for what was written.
    """
    out = Path(out)
    written, records, warnings = {}, [], []
    model = posterior.summary.get("model", "vbseg")
    if rtstruct_reference:
        series = open_series(rtstruct_reference, series_uid)
        probability, resampled = probability_on_series(posterior, series)
        record, found = export_record(posterior, series, resampled, levels_percent, RTSTRUCT_NAME)
        records.append(record)
        warnings += found
        levels = sorted(float(level) for level in levels_percent)
        rois, colours, descriptions = [], [], []
        for index, level in enumerate(levels):
            rois.append((f"vbseg p>={level / 100:g}", probability >= np.float32(level / 100)))
            colours.append(_level_colour(index / max(1, len(levels) - 1)))
            descriptions.append(f"P(tumour) >= {level / 100:g}, {model}"
                                + (f", resampled onto this series ({resampled})" if resampled else ""))
        written["rtstruct"] = write_rtstruct(out / RTSTRUCT_NAME, series, rois, colours=colours,
                                             descriptions=descriptions)
    if dicom_seg:
        series = open_series(_seg_reference([os.fspath(p) for p in images], rtstruct_reference),
                             series_uid)
        probability, resampled = probability_on_series(posterior, series)
        record, found = export_record(posterior, series, resampled, levels_percent, SEG_NAME)
        records.append(record)
        warnings += found
        written["seg"] = write_probability_seg(
            out / SEG_NAME, series, probability,
            description=f"P(tumour), {model}" + (f", resampled ({resampled})" if resampled else ""))
    _record_exports(posterior, out, records, warnings)
    return written


def _mask_file_names(roi_names) -> dict[str, str]:
    """ROI name -> mask_<name>.nii.gz, with characters unsafe in file names replaced and
    clashes numbered."""
    names, used = {}, set()
    for roi in roi_names:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", roi).strip("._") or "roi"
        candidate, n = f"mask_{stem}.nii.gz", 2
        while candidate in used:
            candidate, n = f"mask_{stem}_{n}.nii.gz", n + 1
        used.add(candidate)
        names[roi] = candidate
    return names


@quietly
def convert_rtstruct(rtstruct, series_dir, out, *, roi: str | None = None, series_uid=None,
                     overwrite: bool = False) -> dict[str, Path]:
    """Write a series as ``image.nii.gz`` and its RTSTRUCT ROIs as ``mask_<ROI>.nii.gz``.

    Args:
        rtstruct: the RTSTRUCT file; series_dir: the image series folder it delineates.
        out: output folder; roi: one ROI name (default every ROI).
        series_uid: picks a series in a folder that holds several.
        overwrite: replace existing outputs.
    Returns:
        {"image": path, <ROI name>: path, ...}; masks are uint8 (1 inside) on the image's grid.
    """
    check_series_requested([series_dir], series_uid)
    names = rtstruct_roi_names(rtstruct)
    if roi is not None:
        if roi not in names:
            raise InputError(rtstruct, f"no ROI named '{roi}' (ROIs: {', '.join(names) or 'none'})")
        names = [roi]
    if not names:
        raise InputError(rtstruct, "RTSTRUCT holds no ROI")
    files = _mask_file_names(names)
    check_outputs(out, [CONVERTED_IMAGE_NAME, *files.values()], [rtstruct, series_dir], overwrite)
    series = open_series(series_dir, series_uid)
    volume = volume_from_series(series)
    masks = read_rtstruct_masks(rtstruct, series, names)
    out = Path(out)
    written = {"image": save_volume(out / CONVERTED_IMAGE_NAME, volume)}
    for name, mask in masks.items():
        written[name] = save_nifti(out / files[name], mask.astype(np.uint8), volume.affine)
    return written
