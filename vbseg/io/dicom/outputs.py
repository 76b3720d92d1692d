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
  0 outside the segmented image; both must share a frame of reference. The RTSTRUCT's
  contours keep their volumes and stay nested (:func:`contours_on_series`, each voxel in a
  contour when at least half of it is; benchmarks/bench_dicom_export.py: within 0.4 % onto
  CT-like grids, 5 % onto coarser ones, where resampling P trilinearly and cutting it moved the
  10 % and 90 % contours by about +30 % and -30 %), the SEG's P(tumour) is interpolated
  trilinearly. What of a contour lies
  outside the reference's field of view cannot be drawn on it: summary.json's
  ``dicom_exports`` records how each file was resampled and, per contour level, its volume,
  what the RTSTRUCT holds of it and the part outside, and the warning
  ``contour-outside-reference`` fires when that part is more than ``OUTSIDE_REFERENCE_LIMIT``
  of a contour;
* :func:`convert_rtstruct`: an RTSTRUCT and its series -> ``image.nii.gz`` and one
  ``mask_<ROI>.nii.gz`` per ROI, so planning-system delineations become benchmark references.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from scipy import ndimage

from vbseg.errors import InputError, OutputError
from vbseg.io.dicom._deps import quietly
from vbseg.io.dicom.rtstruct import read_rtstruct_masks, rtstruct_roi_names, write_rtstruct
from vbseg.io.dicom.seg import write_probability_seg
from vbseg.io.dicom.series import VBSEG_MODALITY, check_series_requested, open_series, volume_from_series
from vbseg.io.image import AFFINE_ATOL_MM, Volume, resample_onto, within_field_of_view
from vbseg.io.result_files import RTSTRUCT_NAME, SEG_NAME
from vbseg.io.result_folder import check_outputs
from vbseg.io.writing import save_nifti, save_volume, write_text_atomic

CONVERTED_IMAGE_NAME = "image.nii.gz"
OUTSIDE_REFERENCE_LIMIT = 0.01  # share of a contour outside the reference series (module doc)
NEAREST = "nearest (each voxel takes the probability of the segmented voxel holding its centre)"
SHARE_RULE = "each voxel in a contour when at least half of it is, by samples inside it"
PROBABILITY_RESAMPLING = "P(tumour), trilinear (anti-aliased onto a coarser axis)"


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


def _on_segmented_grid(posterior, series) -> bool:
    """Whether ``series`` lies on the posterior's grid; refuses another frame of reference."""
    reference = posterior.reference
    frame = (reference.source or {}).get("frame_of_reference_uid")
    if frame and series.frame_of_reference_uid and frame != series.frame_of_reference_uid:
        raise InputError(series.path, f"frame of reference {series.frame_of_reference_uid} differs "
                                      f"from that of the segmented image {reference.name} ({frame})")
    return reference.shape == series.shape and np.allclose(reference.affine, series.affine,
                                                          atol=AFFINE_ATOL_MM)


def probability_on_series(posterior, series) -> tuple[np.ndarray, bool]:
    """P(tumour) on ``series``' grid (0 outside the segmented image) and whether it had to be
    resampled (module docstring)."""
    probability = np.asarray(posterior.probability, np.float32)
    if _on_segmented_grid(posterior, series):
        return probability, False
    reference = posterior.reference
    source = Volume(probability, reference.affine, "other", reference.path)
    target = Volume(np.zeros(series.shape, np.float32), series.affine, "other", series.path)
    on_grid, covered = resample_onto(source, target)
    return np.where(covered, np.clip(on_grid.data, 0.0, 1.0), 0.0).astype(np.float32), True


def _samples_per_axis(to_reference) -> np.ndarray:
    """Samples along each axis of a grid (``to_reference``: its voxel index -> the posterior's)
    for a voxel's share of a contour: 1 where a step spans at most one voxel of the
    posterior's grid, else enough for two per posterior voxel."""
    steps = np.linalg.norm(to_reference[:3, :3], axis=0)
    even_or_odd = np.ceil(2.0 * steps - 1e-9).astype(int)
    return np.where(steps <= 1.0 + 1e-6, 1, even_or_odd + 1 - even_or_odd % 2)  # odd: no ties at 1/2


def contours_on_series(posterior, series, levels_percent) -> tuple[dict[float, np.ndarray], str | None]:
    """{level: the contour {P >= level / 100} on ``series``' grid} and how they were resampled
    (None: the same grid). Each voxel of ``series`` is in a contour when at least half of it
    is: its share is sampled at a regular n_x x n_y x n_z lattice inside it, each sample taking
    the probability of the posterior's voxel holding it (0 outside the posterior's grid), with
    n = 1 along axes at least as fine as the posterior's (so onto a finer grid, PET onto CT,
    each voxel takes the probability of the voxel holding its centre and every contour keeps
    its volume exactly) and two samples per posterior voxel along coarser ones. The model's
    probability is per voxel of its own grid; resampling it trilinearly and cutting it spreads
    the levels of a near-binary map apart (benchmarks/bench_dicom_export.py). Odd sample counts
    leave no share at exactly 1/2. Contours stay nested. Only the box around the lowest contour
    is sampled."""
    probability = np.asarray(posterior.probability, np.float32)
    levels = sorted(float(level) for level in levels_percent)
    if _on_segmented_grid(posterior, series):
        return {level: probability >= np.float32(level / 100) for level in levels}, None
    reference = posterior.reference
    to_reference = np.linalg.inv(reference.affine) @ series.affine
    to_series = np.linalg.inv(to_reference)
    lowest = np.argwhere(probability >= np.float32(levels[0] / 100))
    masks = {level: np.zeros(series.shape, bool) for level in levels}
    counts = _samples_per_axis(to_reference)
    how = NEAREST if np.all(counts == 1) else f"{SHARE_RULE} ({'x'.join(map(str, counts))} samples a voxel)"
    if lowest.size == 0:
        return masks, how
    corners = np.array([[i, j, k] for i in (-0.5, 0.5) for j in (-0.5, 0.5) for k in (-0.5, 0.5)])
    ends = (to_series[:3, :3] @ (lowest[:, None, :] + corners[None]).reshape(-1, 3).T
            + to_series[:3, 3:]).T
    low = np.clip(np.floor(ends.min(axis=0)).astype(int), 0, np.asarray(series.shape) - 1)
    high = np.clip(np.ceil(ends.max(axis=0)).astype(int) + 1, 1, np.asarray(series.shape))
    offsets = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in counts], indexing="ij"),
                       axis=-1).reshape(-1, 3)
    cuts = np.asarray([level / 100 for level in levels], np.float32)[:, None]
    plane = np.stack(np.meshgrid(np.arange(low[0], high[0]), np.arange(low[1], high[1]), indexing="ij"),
                     axis=-1).reshape(-1, 2).astype(np.float64)
    for k in range(low[2], high[2]):  # one slice of the box at a time keeps the arrays small
        voxels = np.column_stack([plane, np.full(len(plane), float(k))])
        share = np.zeros((len(levels), len(voxels)))
        for offset in offsets:
            where = to_reference[:3, :3] @ (voxels + offset).T + to_reference[:3, 3:]
            values = (ndimage.map_coordinates(probability, where, order=0, mode="nearest")
                      * within_field_of_view(where, reference.shape))
            share += values[None, :] >= cuts
        for index, level in enumerate(levels):
            masks[level][low[0]:high[0], low[1]:high[1], k] = (
                share[index] >= 0.5 * len(offsets)).reshape(high[0] - low[0], high[1] - low[1])
    return masks, how


def contour_record(posterior, series, masks: dict[float, np.ndarray]) -> list[dict]:
    """Per contour level (mL): its volume on the segmented grid, what ``series`` holds of it
    (``drawn_ml``, exact) and the part of it whose segmented voxels' centres lie outside
    ``series``' field of view (``outside_ml``; a voxel cut by that border counts whole or not
    at all, so this is within half a voxel per cut face)."""
    reference = posterior.reference
    probability = np.asarray(posterior.probability)
    lowest = probability >= np.float32(min(masks) / 100)  # holds every contour
    where = np.nonzero(lowest)
    to_series = np.linalg.inv(series.affine) @ reference.affine
    position = to_series[:3, :3] @ np.stack(where).astype(np.float64) + to_series[:3, 3:]
    outside = np.zeros(reference.shape, bool)
    outside[where] = ~within_field_of_view(position, series.shape)
    voxel_ml = reference.voxel_volume_ml
    series_voxel_ml = float(abs(np.linalg.det(series.affine[:3, :3])) / 1000)
    rows = []
    for level, mask in masks.items():
        contour = probability >= np.float32(level / 100)
        rows.append({"level_percent": level, "contour_ml": float(contour.sum() * voxel_ml),
                     "drawn_ml": float(mask.sum() * series_voxel_ml),
                     "outside_ml": float((contour & outside).sum() * voxel_ml)})
    return rows


def _export_entry(name: str, series, resampled: bool, how: str) -> dict:
    return {"file": name, "series_path": os.fspath(series.path),
            "series_instance_uid": str(series.first.get("SeriesInstanceUID", "")),
            "resampling": how if resampled else "none (the segmented grid)"}


def outside_warning(rows: list[dict], series, name: str) -> list[dict]:
    """``contour-outside-reference`` when more than OUTSIDE_REFERENCE_LIMIT of a contour lies
    outside the series the file is drawn on (module docstring)."""
    shares = [r["outside_ml"] / r["contour_ml"] if r["contour_ml"] else 0.0 for r in rows]
    if not shares or max(shares) <= OUTSIDE_REFERENCE_LIMIT:
        return []
    share = max(shares)
    worst = rows[shares.index(share)]
    return [{"code": "contour-outside-reference", "message": (
        f"{share:.0%} of the {worst['level_percent']:g} % contour ({worst['outside_ml']:.1f} of "
        f"{worst['contour_ml']:.1f} mL) lies outside the field of view of {series.path}, so "
        f"{name} holds {worst['drawn_ml']:.1f} mL of it (limit {OUTSIDE_REFERENCE_LIMIT:.0%}; "
        "every level in summary.json dicom_exports)")}]


def _record_exports(posterior, out: Path, records: list[dict], warnings: list[dict]) -> None:
    """Put the DICOM files' records and warnings in the posterior's summary and in the
    summary.json already written in ``out`` (replacing those of an earlier export)."""
    def updated(summary):
        kept = [w for w in summary.get("warnings", []) if w.get("code") != "contour-outside-reference"]
        return {**summary, "dicom_exports": records, "warnings": kept + warnings}

    posterior.summary.update(updated(posterior.summary))
    path = out / "summary.json"
    if path.is_file():
        write_text_atomic(path, json.dumps(updated(json.loads(path.read_text())), indent=2) + "\n")


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
        masks, how = contours_on_series(posterior, series, levels_percent)
        resampled = how is not None
        rows = contour_record(posterior, series, masks) if resampled else []
        records.append({**_export_entry(RTSTRUCT_NAME, series, resampled, how), "contours": rows})
        warnings += outside_warning(rows, series, RTSTRUCT_NAME)
        rois, colours, descriptions = [], [], []
        for index, (level, mask) in enumerate(masks.items()):
            rois.append((f"vbseg p>={level / 100:g}", mask))
            colours.append(_level_colour(index / max(1, len(masks) - 1)))
            descriptions.append(f"P(tumour) >= {level / 100:g}, {model}"
                                + (", resampled onto this series" if resampled else ""))
        written["rtstruct"] = write_rtstruct(out / RTSTRUCT_NAME, series, rois, colours=colours,
                                             descriptions=descriptions)
    if dicom_seg:
        series = open_series(_seg_reference([os.fspath(p) for p in images], rtstruct_reference),
                             series_uid)
        probability, resampled = probability_on_series(posterior, series)
        records.append(_export_entry(SEG_NAME, series, resampled, PROBABILITY_RESAMPLING))
        written["seg"] = write_probability_seg(
            out / SEG_NAME, series, probability,
            description=f"P(tumour), {model}" + (", resampled" if resampled else ""))
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
    names = rtstruct_roi_names(rtstruct)
    if roi is not None:
        if roi not in names:
            raise InputError(rtstruct, f"no ROI named '{roi}' (ROIs: {', '.join(names) or 'none'})")
        names = [roi]
    if not names:
        raise InputError(rtstruct, "RTSTRUCT holds no ROI")
    files = _mask_file_names(names)
    check_outputs(out, [CONVERTED_IMAGE_NAME, *files.values()], [rtstruct, series_dir], overwrite)
    check_series_requested([series_dir], series_uid, "--series-uid")
    series = open_series(series_dir, series_uid)
    volume = volume_from_series(series)
    masks = read_rtstruct_masks(rtstruct, series, names)
    out = Path(out)
    written = {"image": save_volume(out / CONVERTED_IMAGE_NAME, volume)}
    for name, mask in masks.items():
        written[name] = save_nifti(out / files[name], mask.astype(np.uint8), volume.affine)
    return written
