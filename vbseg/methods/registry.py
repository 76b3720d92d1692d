"""The method registry: every way of segmenting is one :class:`Method` with one signature.

A method takes the prepared inputs (:class:`vbseg.prepare.Prepared`) and the typed options
(:class:`vbseg.options.SegmentOptions`) and returns a :class:`MethodResult`: the probability
map on the first image's grid, posterior volume draws and how they were made, and the parts of
summary.json that are the method's own (options, parameters, diagnostics, ELBO, timings).
:func:`build_summary` is the one place that assembles summary.json around those parts (inputs,
modalities, the VOI, provenance), and :func:`result_posterior` the one place that turns a
result into a :class:`~vbseg.posterior.Posterior`.

Methods register themselves: a module of a model family (:data:`METHOD_FAMILIES`:
``vbseg/potts/``, ``vbseg/baselines/``, ...) calls :func:`register` when imported, and
:func:`load_methods` imports every module of those packages, so a new method is one new module
in its family (plus its test). A method of one's own outside the package is a module that
calls :func:`register`, named in ``$VBSEG_METHODS`` (comma-separated importable modules):
:func:`load_methods` imports those too, in every process that looks a method up, so spawned
``--jobs`` processes and Dask workers (which inherit or are given the variable) know it as well.
The CLI's ``--model`` choices and the experiment runner's model names come from
:func:`method_names`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from typing import Callable

import numpy as np

from vbseg.errors import InputError
from vbseg.io.writing import save_nifti
from vbseg.posterior import DisplayImage, Posterior, saved_posterior
from vbseg.prepare import Prepared
from vbseg.records import provenance, voi_text


@dataclasses.dataclass(frozen=True, eq=False)
class MethodResult:
    """What a method returns.

    probability: (I, J, K) float32 P(tumour) on the first image's grid, 0 outside the VOI.
    volume_draws_ml: (D,) posterior draws of the tumour volume; volume_method: how they were
    made; tlg_draws: (D,) draws of total lesion glycolysis (PET first) or None.
    model: the name summary.json gives the model; options, parameters, diagnostics: the
    method's own entries of those summary.json sections (the VOI's size and bounds are added);
    elbo: the ELBO trace or None; timings_s: {"compile", "run", ...} seconds.
    sections: further summary.json sections (e.g. "gp"); maps: further outputs, file name ->
    (I, J, K) float32 on the first grid, written beside prob.nii.gz.
    """

    probability: np.ndarray
    volume_draws_ml: np.ndarray
    volume_method: str
    tlg_draws: np.ndarray | None
    model: str
    options: dict
    parameters: dict
    diagnostics: dict
    elbo: list | None
    timings_s: dict
    sections: dict = dataclasses.field(default_factory=dict)
    maps: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Method:
    """name: what --model (or the experiment key ``name``) calls it; run(prepared, options) ->
    MethodResult; description: one line for the CLI's help; extra_outputs(options) -> the file
    names it writes beside the standard outputs (checked before any work); rank: where it is
    listed (lower first; ties in registration order); needs_pet: refused without a PET image;
    check_options(options, modalities): the checks of the method's own options, after the
    shared ones (:meth:`vbseg.options.SegmentOptions.check`), before any file is read;
    takes_prior: ``--prior`` is one of its options (else ``--prior`` selects the ``prior``
    method)."""

    name: str
    run: Callable
    description: str
    extra_outputs: Callable = lambda options: []
    rank: int = 50
    needs_pet: bool = False
    check_options: Callable | None = None
    takes_prior: bool = False

    def check_inputs(self, modalities) -> None:
        """InputError naming --model when the inputs cannot go with this method."""
        if self.needs_pet and "pet" not in modalities:
            raise InputError("--model", f"{self.name} is a PET method, and no image is PET")


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` under its name (a second registration of a name is a programming error)."""
    if method.name in REGISTRY and REGISTRY[method.name] is not method:
        raise ValueError(f"method {method.name!r} is registered twice")
    REGISTRY[method.name] = method
    return method


METHODS_ENV = "VBSEG_METHODS"


# The model families whose modules register vbseg's own methods: every module of each is
# imported (a new method in a family is one new module there; a method of your own goes in
# $VBSEG_METHODS instead)
METHOD_FAMILIES = ("vbseg.potts", "vbseg.pv_potts", "vbseg.gp", "vbseg.baselines", "vbseg.cohort")


def load_methods() -> dict[str, Method]:
    """Import every module of the packages in :data:`METHOD_FAMILIES` and of ``$VBSEG_METHODS``
    (each registers its methods); the registry."""
    for family in METHOD_FAMILIES:
        package = importlib.import_module(family)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{family}.{module.name}")
    for name in filter(None, (n.strip() for n in os.environ.get(METHODS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise InputError(f"${METHODS_ENV}", f"cannot import {name} ({error})") from None
    return REGISTRY


def method_names() -> tuple[str, ...]:
    """Every registered method's name, by rank, then in registration order."""
    methods = load_methods()
    return tuple(sorted(methods, key=lambda name: methods[name].rank))


def get_method(name: str) -> Method:
    """The method called ``name``; InputError naming --model when there is none."""
    methods = load_methods()
    if name not in methods:
        available = ", ".join(n for n in method_names() if n != "prior")
        raise InputError("--model", f"unknown model {name!r} (available: {available})")
    return methods[name]


def build_summary(result: MethodResult, prepared: Prepared) -> dict:
    """summary.json's sections (without the volume entries, which the Posterior adds): the
    method's parts, and the inputs, modalities, VOI and provenance every result records."""
    voi = prepared.voi
    options = {**result.options, "voi": voi_text(prepared.roi, prepared.box)}
    resampled = [{"path": p, "resampled": r} for p, r in zip(prepared.images, prepared.resampled)]
    if prepared.roi is not None:  # the VOI mask: a label on another grid is resampled
        options["voi_resampled"] = prepared.roi_resampling is not None
        resampled.append({"path": prepared.roi, "role": "roi", "resampled": options["voi_resampled"],
                          **(prepared.roi_resampling or {})})
    return {
        "model": result.model,
        "options": options,
        "parameters": result.parameters,
        "modality": list(prepared.modalities),
        "resampled": resampled,
        "elbo": result.elbo,
        "diagnostics": {**result.diagnostics, "voi_voxels": int(voi.sum()),
                        "voi_bounds": [[s.start, s.stop] for s in prepared.bounds]},
        "timings_s": result.timings_s,
        **result.sections,
        "warnings": [*prepared.warnings, *result.sections.get("warnings", [])],
        **provenance(prepared.images, prepared.modalities, prepared.roi, prepared.seed,
                     prepared.volumes),
    }


def display_images(prepared: Prepared) -> tuple[DisplayImage, ...]:
    """Every input as an overview panel on the first grid: the first image whole, the others
    as their crop (the VOI's bounding box), NaN where an image was not observed in the VOI."""
    names = [os.path.basename(os.path.normpath(path)) for path in prepared.images]
    first = DisplayImage(names[0], prepared.modalities[0], prepared.reference.data)
    return (first,) + tuple(
        DisplayImage(names[m], prepared.modalities[m],
                     np.where(prepared.observed[..., m], prepared.stack[..., m], np.nan), prepared.bounds)
        for m in range(1, len(prepared.images)))


def result_posterior(result: MethodResult, prepared: Prepared, out=None, levels_percent=(10, 50, 90),
                     title: str = "", reference_mask=None, reference_mask_path=None,
                     reference_mask_resampling=None) -> Posterior:
    """The result as a Posterior, saved into ``out`` (with the method's extra maps) when given.
    ``reference_mask``: (I, J, K) bool reference delineation (from ``reference_mask_path``;
    ``reference_mask_resampling``: how it was put on the first grid, None when it was on it)
    that the overview draws and summary.json compares the contours with."""
    posterior = saved_posterior(out, levels_percent, title, probability=result.probability,
                                reference=prepared.reference, voi=prepared.voi,
                                volume_draws_ml=result.volume_draws_ml,
                                volume_method=result.volume_method, tlg_draws=result.tlg_draws,
                                summary=build_summary(result, prepared),
                                images=display_images(prepared), reference_mask=reference_mask,
                                reference_mask_path=reference_mask_path,
                                reference_mask_resampling=reference_mask_resampling, maps=dict(result.maps))
    if out is not None:
        for name, values in result.maps.items():
            save_nifti(f"{out}/{name}", values, prepared.reference.affine)
    return posterior
