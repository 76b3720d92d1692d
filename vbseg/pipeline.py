"""``vbseg.segment``: from image files to a saved :class:`~vbseg.posterior.Posterior`.

The steps, each at the edge where it belongs: validate the options and the planned outputs
(before any work), load and validate the images, put them on the first image's grid through
world coordinates, restrict to the volume of interest (``roi`` mask or ``box``)
(:mod:`vbseg.prepare`), run the chosen method (:mod:`vbseg.methods`: every model and baseline
is one registered method with one signature), and save its result with the one summary.json
builder (:func:`vbseg.methods.result_posterior`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

from vbseg.calibration.calibration_file import DEFAULT_CONFORMAL_LEVELS, ConformalPlan, plan_conformal
from vbseg.cohort.method import check_prior_options
from vbseg.envelope import apply_envelope
from vbseg.errors import InputError
from vbseg.interrupts import pause_point
from vbseg.io.dicom.series import check_series_requested
from vbseg.io.result_folder import result_folder
from vbseg.io.volume import read_mask
from vbseg.methods import Method, get_method, result_posterior
from vbseg.options import DEFAULT_LEVELS, SegmentOptions, check_psf_fits, check_seed
from vbseg.posterior import Posterior, output_names, result_set_names
from vbseg.potts.locate import DEFAULT_MODEL_RULE, default_model
from vbseg.prepare import prepare
from vbseg.trust import input_warnings


def check_distinct(images) -> None:
    """InputError when one file (or DICOM folder) is given twice: the same image twice is not
    a stack of two, and would double its weight in a joint fit."""
    seen = {}
    for number, path in enumerate(images, start=1):
        real = os.path.realpath(path)
        if real in seen:
            raise InputError(path, f"is given twice (images {seen[real]} and {number})")
        seen[real] = number


# the arguments of segment that do not enter its plan (plan_segment)
NOT_PLANNED = ("out", "overwrite", "title", "also_write", "series_uid")


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    """What :func:`segment` settles before reading a voxel: the method, its options, one
    modality per image, the conformal plan (or None), the contour levels, the file names of the
    result set and the files it reads (which it never writes); ``model_choice``: whether the
    method was given or chosen by the default rule (summary.json's ``options.model_choice``)."""

    method: Method
    options: SegmentOptions
    modalities: list
    conformal: ConformalPlan | None
    levels_percent: tuple
    outputs: list
    inputs: list
    model_choice: dict


def plan_segment(images, *, modalities=None, roi=None, box=None, levels_percent=DEFAULT_LEVELS,
                 seed: int = 0, reference_mask=None, calibration=None, conformal_levels_percent=None,
                 **options) -> SegmentPlan:
    """Every check of :func:`segment` (same arguments) that needs no voxel: the options alone
    and for these modalities, the method's own, the calibration; InputError naming the option
    or file. ``segment --batch`` runs it for every case before the first fit."""
    images = [os.fspath(p) for p in images]
    if not images:
        raise InputError("segment", "needs at least one image")
    check_distinct(images)
    check_seed(seed)
    given = options.get("model") is not None
    if not given:
        provisional = list(modalities) if modalities else ["pet"] + ["other"] * (len(images) - 1)
        options = {**options, "model": default_model(provisional, options)}
    model_choice = {"chosen": "given" if given else "default", "rule": DEFAULT_MODEL_RULE}
    options = SegmentOptions.from_values(**options)
    levels_percent = tuple(float(level) for level in levels_percent)
    method = get_method(options.model.name)
    if options.model.prior is not None and not method.takes_prior:
        method = get_method("prior")
        modalities = check_prior_options(options, len(images), modalities, levels_percent, roi, box)
    else:
        modalities = list(modalities) if modalities else ["pet"] + ["other"] * (len(images) - 1)
        method.check_inputs(modalities)
        options.check(num_images=len(images), modalities=modalities, levels_percent=levels_percent,
                      roi=roi, box=box)
        if method.check_options is not None:
            method.check_options(options, modalities)
    plan = None
    if calibration is not None:
        plan = plan_conformal(os.fspath(calibration), conformal_levels_percent or DEFAULT_CONFORMAL_LEVELS,
                              options, modalities)
    elif conformal_levels_percent is not None:
        raise InputError("--conformal-levels", "goes with --calibration")
    outputs = output_names(levels_percent) + method.extra_outputs(options) + (
        plan.output_names() if plan else [])
    inputs = images + [os.fspath(p) for p in (roi, reference_mask) if p is not None]
    return SegmentPlan(method, options, modalities, plan, levels_percent, outputs, inputs, model_choice)


def segment(images, out=None, *, modalities=None, roi=None, box=None, levels_percent=DEFAULT_LEVELS,
            seed: int = 0, series_uid=None, overwrite: bool = False, title: str = "",
            reference_mask=None, also_write=None, calibration=None, conformal_levels_percent=None,
            **options) -> Posterior:
    """Segment one image or a co-registered stack; write the outputs into ``out`` if given.

    Args:
        images: paths of NIfTI files or DICOM series folders (:mod:`vbseg.io.dicom`; PET in SUV);
            the first defines the output grid, others are resampled onto it.
        out: output directory (None: nothing is written).
        modalities: one of pet/ct/mr/other per image; default pet for the first, other after
            (with a population prior: the prior's).
        roi: path of a mask on the first image's grid, or a label mask on another grid
            (resampled onto it by nearest neighbour: :func:`vbseg.io.volume.read_mask`; summary.json's
            ``options.voi_resampled``); box: "i0:i1,j0:j1,k0:k1" (half-open).
        levels_percent: contour levels in percent.
        seed: seeds the volume draws (the fits themselves are deterministic).
        series_uid: Series Instance UID(s) choosing the series in DICOM folders that hold several;
            each must name a series of one of the image folders (InputError otherwise).
        overwrite: replace the existing result set in ``out`` (its files this run does not
            write are removed: :mod:`vbseg.io.result_folder`); title: the overview figure's title.
        also_write: ``also_write(posterior, folder)`` writes further files of the result set
            into ``folder`` (the CLI's DICOM outputs), before they all move into ``out``.
        calibration: path of a calibration JSON (``vbseg calibrate``;
            :mod:`vbseg.calibration.calibration_file`) made with these fit options: adds
            summary.json's ``volume_ml_conformal`` and the contour_crc*, contour_crcmargin* and
            contour_margin* masks for each of ``conformal_levels_percent`` (default 90, 95).
        reference_mask: path of a reference delineation on the first image's grid (or a label
            on another grid, resampled like ``roi``): drawn in the overview, and summary.json's
            ``reference_mask`` records each contour's Dice and whether it was resampled.
        **options: the fields of :class:`vbseg.options.SegmentOptions` (model, num_classes, beta,
            fusion, psf_fwhm_mm, ...), documented there.
    Raises:
        InputError naming the file or option for every problem with the input.
    """
    plan = plan_segment(images, modalities=modalities, roi=roi, box=box, levels_percent=levels_percent,
                        seed=seed, reference_mask=reference_mask, calibration=calibration,
                        conformal_levels_percent=conformal_levels_percent, **options)
    images = [os.fspath(p) for p in images]
    roi = os.fspath(roi) if roi is not None else None
    reference_mask = os.fspath(reference_mask) if reference_mask is not None else None
    method, options, modalities, levels_percent = (plan.method, plan.options, plan.modalities,
                                                   plan.levels_percent)
    if out is None:
        folder = contextlib.nullcontext(None)
    else:
        folder = result_folder(out, plan.outputs, plan.inputs, overwrite, previous_set=result_set_names)
    with folder as staging:
        prepared = prepare(images, modalities, roi, box, series_uid, seed)
        check_series_requested(images, series_uid)  # after the loader's own errors
        check_psf_fits(options.model.psf_fwhm_mm, prepared.reference)
        mask, mask_resampling = (None, None) if reference_mask is None else read_mask(
            reference_mask, prepared.reference, "reference mask")
        prepared = dataclasses.replace(
            prepared, warnings=tuple(input_warnings(levels_percent, prepared.volumes)))
        pause_point("fit")
        result = method.run(prepared, options)
        result = dataclasses.replace(result, options={**result.options, "model_choice": plan.model_choice})
        if options.model.envelope_mm:
            result = apply_envelope(result, prepared, float(options.model.envelope_mm))
        if plan.conformal is not None:
            result = plan.conformal.apply(result, prepared)
        posterior = result_posterior(result, prepared, staging, levels_percent, title,
                                     reference_mask=mask, reference_mask_path=reference_mask,
                                     reference_mask_resampling=mask_resampling)
        if staging is not None and also_write is not None:
            also_write(posterior, staging)
    return posterior
