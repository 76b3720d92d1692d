"""Population priors end to end: learn one from delineated cases (``vbseg fit-prior``) and
contour a new patient with it (``vbseg.segment(..., prior=...)`` / ``vbseg segment --prior``).

The model and its feature space are in :mod:`vbseg.cohort.model`, the empirical-Bayes fit
and the per-scan VB in :mod:`vbseg.cohort.empirical_bayes`; this module reads cases, runs
those fits and turns the result into a :class:`~vbseg.posterior.Posterior`.

**Volume interval.** The mean-field marginals give volume draws from independent voxels,
whose spread (a few mL) ignores what dominates the error on real scans: the systematic
difference between the model's tumour and the expert's (the GTV follows the anatomical mass,
not uptake), and the odd case where the model contours something else. The prior therefore
also carries a volume-error model learned at fit time by leave-one-out over its training
cases (case j contoured with the prior pooled from the others): the located-or-missed mixture
of :mod:`vbseg.cohort.volume_error`. Priors learned from fewer than three cases carry no
calibration and keep the independent-voxel draws. The probability map (and so every contour)
is not changed by it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import time
from importlib import metadata, resources
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vbseg.cohort.empirical_bayes import (
    FORBIDDEN,
    SPREAD_FLOOR_SD,
    WEAK_SPREAD_SD,
    fit_case_classes,
    fit_with_population_prior,
    pool_population,
)
from vbseg.cohort.model import (
    PopulationPrior,
    load_prior,
    to_features,
    training_digest,
)
from vbseg.cohort.volume_error import (
    MIN_CALIBRATION_CASES,
    calibrated_draws,
    calibration_entry,
    calibration_from_entries,
)
from vbseg.errors import InputError
from vbseg.io.cases import DelineatedCase, case_files, read_cases
from vbseg.io.result_folder import output_files
from vbseg.io.volume import read_image_grid, read_label
from vbseg.io.writing import write_with
from vbseg.potts.model import neighbour_weights
from vbseg.prepare import bucket_shape, load_inputs, pad_to_shape
from vbseg.runtime import compile_and_run

DEFAULT_TUMOUR_CLASSES = 2
DEFAULT_BACKGROUND_CLASSES = 4
PACKAGED_PRIORS = {"sarcoma": "sarcoma_prior_pet_ct_mr.json"}
FIT_METHOD = (
    "empirical Bayes (vbseg.cohort.empirical_bayes): per training case a hidden Potts fit "
    "(mean-field VB, per-class precisions, beta by pseudo-likelihood variational EM) with the "
    "manual mask constraining tumour voxels to the tumour classes and the rest to background "
    "classes; classes ordered (tumour by decreasing PET, background by increasing CT); pooled "
    "by moments: population mean = mean of case means, spread = between-case variance minus "
    f"sampling variance, floored at {SPREAD_FLOOR_SD}^2 and times (1 + 1/n) ({WEAK_SPREAD_SD}^2 "
    "with < 2 cases), noise = count-weighted within-case variance, beta = median; volume "
    "error model (located-or-missed mixture) from leave-one-out over the training cases")
INTERACTION_METHOD = (
    "; class-interaction matrix J (K x K, used in place of beta) by pseudo-likelihood jointly over "
    "the training cases' most probable constrained label fields, a free class bias per case, "
    "in the gauge with equal row sums (vbseg.cohort.empirical_bayes.pool_interaction)")


class TrainingCase(NamedTuple):
    """A delineated case in feature space on its first modality's grid."""

    name: str
    features: np.ndarray  # (X, Y, Z, M)
    observed: np.ndarray  # (X, Y, Z, M) bool
    roi: np.ndarray  # (X, Y, Z) bool
    tumour: np.ndarray  # (X, Y, Z) bool
    spacing: tuple
    voxel_ml: float

    @property
    def true_ml(self) -> float:
        return float(self.tumour.sum()) * self.voxel_ml


def resolve_prior(prior) -> PopulationPrior:
    """A PopulationPrior from itself, a JSON path, or a packaged prior's name ("sarcoma")."""
    if isinstance(prior, PopulationPrior):
        return prior
    text = os.fspath(prior)
    if text in PACKAGED_PRIORS:
        resource = resources.files("vbseg") / "data" / PACKAGED_PRIORS[text]
        with resources.as_file(resource) as path:
            return load_prior(path)
    return load_prior(text)


def load_training_case(case: DelineatedCase) -> TrainingCase:
    """Images on the first modality's grid (others resampled), in feature space, and its label."""

    volumes, voi, channels, coverage, _, _ = load_inputs(list(case.images), list(case.modalities))
    stack = np.stack(channels, axis=-1)
    observed = np.stack(coverage, axis=-1)
    features = np.where(observed, to_features(stack, case.modalities), 0.0).astype(np.float32)
    tumour, _ = read_label(case.label)
    if not tumour.any():
        raise InputError(case.label, f"case {case.name}: label is empty")
    reference = volumes[0]
    return TrainingCase(case.name, features, observed, voi, tumour,
                        tuple(float(s) for s in reference.spacing), reference.voxel_volume_ml)


# Bulk fits (training, calibration, benchmarks) pad crops to multiples of this many voxels,
# coarser than the pipeline's bucket, so a cohort compiles a handful of programs.
BULK_BUCKET = 16


def _tumour_and_background_keys(modalities) -> tuple[int, int]:
    tumour_key = modalities.index("pet") if "pet" in modalities else 0
    background_key = modalities.index("ct") if "ct" in modalities else 0
    return tumour_key, background_key


def case_statistics(training: list[TrainingCase], modalities, *, num_tumour, num_background,
                    neighbourhood=6):
    """The constrained per-case fits; returns (stats, padded shape per case)."""
    shapes = [bucket_shape(t.roi.shape, BULK_BUCKET) for t in training]
    tumour_key, background_key = _tumour_and_background_keys(list(modalities))
    stats = []
    for case, shape in zip(training, shapes):
        stats.append(fit_case_classes(
            pad_to_shape(case.features, shape, 0.0), pad_to_shape(case.observed, shape, False),
            pad_to_shape(case.roi, shape, False), pad_to_shape(case.tumour, shape, False),
            neighbour_weights(case.spacing, neighbourhood), num_tumour=num_tumour,
            num_background=num_background, tumour_key=tumour_key, background_key=background_key))
    return stats, shapes


def _class_names(num_tumour, num_background, modalities) -> list[str]:
    tumour_key, background_key = _tumour_and_background_keys(list(modalities))
    return ([f"tumour {k} (by decreasing {modalities[tumour_key]})" for k in range(num_tumour)]
            + [f"background {k} (by increasing {modalities[background_key]})"
               for k in range(num_background)])


def _vbseg_version() -> str:
    try:
        return metadata.version("vbseg")
    except metadata.PackageNotFoundError:
        return "unknown"


def prior_from_statistics(stats, names, modalities, *, num_tumour, neighbourhood=6,
                          case_index=None, calibration=None, interaction=False) -> PopulationPrior:
    """Pool per-case statistics (:func:`~vbseg.cohort.empirical_bayes.pool_population`;
    ``interaction``: learn the K x K class-interaction matrix too)."""
    pooled = pool_population(stats, interaction=interaction)
    num_classes = pooled["mean"].shape[0]
    return PopulationPrior(
        modalities=list(modalities), num_tumour=num_tumour,
        class_names=_class_names(num_tumour, num_classes - num_tumour, modalities),
        mean=pooled["mean"], spread_var=pooled["spread_var"], noise_var=pooled["noise_var"],
        proportions=pooled["proportions"], concentration=float(num_classes), beta=pooled["beta"],
        neighbourhood=neighbourhood, volume_calibration=calibration, cases=list(names),
        case_index=case_index,
        per_case=[{"case": n, "means": s.means.tolist(), "variances": s.variances.tolist(),
                   "proportions": s.proportions.tolist(), "beta": s.beta}
                  for n, s in zip(names, stats)],
        fit_method=FIT_METHOD + (INTERACTION_METHOD if interaction else ""),
        vbseg_version=_vbseg_version(), interaction=pooled["interaction"])


def tumour_probability(prior: PopulationPrior, features, observed, roi, spacing, pad_shape=None):
    """P(tumour) (X, Y, Z) of one scan under ``prior`` and the fit record (means in feature
    units, proportions, ELBO trace, iterations, converged, timings)."""
    shape = tuple(pad_shape) if pad_shape is not None else bucket_shape(roi.shape)
    prior_ng = prior.normal_gamma_prior()
    args = (jnp.asarray(pad_to_shape(features, shape, 0.0)),
            jnp.asarray(pad_to_shape(observed, shape, False)),
            jnp.asarray(pad_to_shape(roi, shape, False)), jnp.asarray(prior.coupling()),
            jnp.asarray(neighbour_weights(spacing, prior.neighbourhood)),
            type(prior_ng)(*(jnp.asarray(p) for p in prior_ng)),
            jnp.asarray(prior.dirichlet_concentration()),
            # a flat class prior (fewer than two training cases) starts from its plug-in means
            jnp.asarray(np.where(prior.spread_var >= WEAK_SPREAD_SD**2, 1e12, prior_ng.kappa),
                        jnp.float32))
    if pad_shape is None:
        result, compile_s, run_s = compile_and_run(fit_with_population_prior, args)
    else:  # bulk fits on one shape: the jit cache compiles once
        start = time.perf_counter()
        result = jax.block_until_ready(fit_with_population_prior(*args))
        compile_s, run_s = 0.0, time.perf_counter() - start
    x, y, z = roi.shape
    marginals = np.asarray(result.marginals)[:x, :y, :z]
    probability = np.where(roi, marginals[..., : prior.num_tumour].sum(axis=-1), 0.0)
    iterations = int(result.num_iterations)
    alpha = np.asarray(result.proportions)
    record = {"class_means_features": np.asarray(result.emission.mean).tolist(),
              "class_sds_features": np.sqrt(np.asarray(result.emission.rate)
                                            / np.asarray(result.emission.shape)).tolist(),
              "class_proportions": (alpha / alpha.sum()).tolist(),
              "elbo": np.asarray(result.elbo_trace)[:iterations].tolist(),
              "iterations": iterations, "converged": bool(result.converged),
              "timings": {"compile": compile_s, "run": run_s}}
    return probability.astype(np.float32), record


def leave_one_out_entries(training: list[TrainingCase], stats, shapes, modalities, *, num_tumour,
                          neighbourhood=6, progress=None, interaction=False) -> list[dict]:
    """Each training case contoured with the prior pooled from the others' statistics: its
    :func:`~vbseg.cohort.volume_error.calibration_entry` (volumes, Dice, located, SUVmean)."""
    names = [t.name for t in training]
    return [calibration_entry_from_others(case, shapes[j], stats[:j] + stats[j + 1:],
                                          names[:j] + names[j + 1:], modalities, num_tumour=num_tumour,
                                          neighbourhood=neighbourhood, progress=progress,
                                          interaction=interaction)
            for j, case in enumerate(training)]


def calibration_entry_from_others(case: TrainingCase, shape, other_stats, other_names, modalities, *,
                                  num_tumour, neighbourhood=6, progress=None, interaction=False) -> dict:
    """``case`` contoured with the prior pooled from ``other_stats``: its calibration entry."""
    held_out = prior_from_statistics(other_stats, other_names, modalities, num_tumour=num_tumour,
                                     neighbourhood=neighbourhood, interaction=interaction)
    probability, _ = tumour_probability(held_out, case.features, case.observed, case.roi,
                                        case.spacing, pad_shape=shape)
    return held_out_entry(case, probability, modalities, progress)


def held_out_entry(case: TrainingCase, probability, modalities, progress=None, label="calibration") -> dict:
    """``case``'s :func:`~vbseg.cohort.volume_error.calibration_entry` from a probability map (on
    its first grid) made without it, said in one ``progress`` line starting with ``label``."""
    # PET features are log(max(SUV, 0.1)): exp gives SUV back inside any GTV
    suv = np.exp(case.features[..., 0]) if modalities[0] == "pet" else None
    entry = calibration_entry(case.name, probability, case.tumour, case.voxel_ml, suv)
    if progress:
        verdict = "located" if entry["located"] else "missed"
        progress(f"{label} {case.name}: manual {entry['manual_ml']:.1f} mL, model "
                 f"{entry['model_ml']:.1f} mL, Dice {entry['dice50']:.2f} ({verdict})")
    return entry


def held_out_prior(stats, entries, names, held_out: int, modalities, *, num_tumour,
                   neighbourhood=6, interaction=False) -> PopulationPrior:
    """The prior for case ``held_out`` in a leave-one-out study: pooled from the other cases'
    statistics, with the volume-error model of the other cases' leave-one-out ``entries``
    (:func:`leave_one_out_entries` over all cases: entry j used the prior pooled from all but j,
    which includes the held-out case, a small leak into the interval only, not into the
    probability map; nesting it would cost n - 1 more fits per fold)."""
    others = [j for j in range(len(names)) if j != held_out]
    return prior_from_statistics([stats[j] for j in others], [names[j] for j in others], modalities,
                                 num_tumour=num_tumour, neighbourhood=neighbourhood,
                                 interaction=interaction,
                                 calibration=calibration_from_entries([entries[j] for j in others]))


def source_digest(parts=None) -> str:
    """sha256 of every module of the installed vbseg package (paths and contents): a cached
    result is reused only by the code that made it, not by a later version of it. ``parts``
    (sub-folders and module files of the package) restricts it to those."""
    package = Path(__file__).resolve().parents[1]  # vbseg/
    paths = package.rglob("*.py") if parts is None else (
        path for part in parts for path in ((package / part).rglob("*.py") if (package / part).is_dir()
                                            else [package / part]))
    digest = hashlib.sha256()
    for path in sorted(set(paths)):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cache_folder(cache_dir, index, modalities, cohort, cases, num_tumour, num_background) -> Path:
    """The folder of :func:`leave_one_out_prior`'s cached fits: keyed by the index path, the
    modalities, the cohort, the class counts, vbseg's code (:func:`source_digest`) and each
    input file's path, size and modification time (a changed image or label is fitted again)."""
    files = [os.fspath(f) for c in cases for f in (*c.images, c.label)]
    stamps = [(f, stat.st_size, stat.st_mtime_ns) for f, stat in zip(files, map(os.stat, files))]
    key = json.dumps([os.path.abspath(os.fspath(index)), list(modalities), list(cohort), num_tumour,
                      num_background, source_digest(), stamps])
    return Path(cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:12]


def _cached(path: Path, compute):
    """``compute()`` pickled at ``path`` (written atomically) or read back from it."""
    if path.is_file():
        try:
            return pickle.loads(path.read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError):
            pass  # an unreadable cache entry is computed again
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_with(path, lambda tmp: tmp.write_bytes(pickle.dumps(value)))
    return value


class LeaveOneOutCohort:
    """The cached per-case fits behind leave-one-out priors over ``cohort`` (case names in
    ``index``, with ``modalities``), under ``cache_dir`` (pickles keyed by the index, modalities,
    cohort, classes, code and input files: :func:`cache_folder`).

    Two stages, each one fit per case: :meth:`statistics` (the case's constrained fit, which
    uses only that case) and :meth:`entry` (the case contoured with the prior pooled from the
    others' statistics: its volume-error entry). :meth:`prior` pools them for one held-out
    case. Each method computes what is missing and caches it (written atomically), so the n
    folds of a study cost n + n fits, not n^2, and an experiment runs the stages as separate
    tasks (every statistics before any entry) on as many workers as it has.
    """

    def __init__(self, index, modalities, cohort, cache_dir, *, num_tumour=DEFAULT_TUMOUR_CLASSES,
                 num_background=DEFAULT_BACKGROUND_CLASSES, progress=None):
        self.index, self.modalities = index, [str(m).lower() for m in modalities]
        self.cohort = sorted(cohort)
        self.num_tumour, self.num_background, self.progress = num_tumour, num_background, progress
        if len(self.cohort) < MIN_CALIBRATION_CASES + 1:
            raise InputError(os.fspath(index), f"leave-one-out priors need >= {MIN_CALIBRATION_CASES + 1} "
                                               f"cases with {'+'.join(self.modalities)}, found "
                                               f"{len(self.cohort)}")
        self.cases = read_cases(index, self.modalities, self.cohort)
        self.names = [c.name for c in self.cases]
        self.folder = cache_folder(cache_dir, index, self.modalities, self.cohort, self.cases,
                                   num_tumour, num_background)

    def _position(self, name: str) -> int:
        if name not in self.names:
            raise InputError(os.fspath(self.index), f"case {name!r} is not in the leave-one-out cohort")
        return self.names.index(name)

    def statistics(self, name: str):
        """Case ``name``'s constrained fit (:func:`case_statistics`)."""
        case = self.cases[self._position(name)]
        return _cached(self.folder / f"stats_{name}.pkl", lambda: case_statistics(
            [load_training_case(case)], self.modalities, num_tumour=self.num_tumour,
            num_background=self.num_background)[0][0])

    def entry(self, name: str) -> dict:
        """Case ``name`` contoured with the prior pooled from the others' statistics."""
        j = self._position(name)

        def compute():
            stats = [self.statistics(other) for other in self.names]
            shape = bucket_shape(read_image_grid(self.cases[j].label)[0], BULK_BUCKET)
            return calibration_entry_from_others(
                load_training_case(self.cases[j]), shape, stats[:j] + stats[j + 1:],
                self.names[:j] + self.names[j + 1:], self.modalities, num_tumour=self.num_tumour,
                progress=self.progress)
        return _cached(self.folder / f"entry_{name}.pkl", compute)

    def prior(self, held_out: str, *, interaction=False) -> PopulationPrior:
        """The prior for ``held_out``: :func:`held_out_prior` over the cached stages."""
        position = self._position(held_out)
        stats = [self.statistics(name) for name in self.names]
        entries = [self.entry(name) for name in self.names]
        return held_out_prior(stats, entries, self.names, position, self.modalities,
                              num_tumour=self.num_tumour, interaction=interaction)


def leave_one_out_prior(index, modalities, cohort, held_out: str, cache_dir, *,
                        num_tumour=DEFAULT_TUMOUR_CLASSES, num_background=DEFAULT_BACKGROUND_CLASSES,
                        interaction=False, progress=None) -> PopulationPrior:
    """The population prior for ``held_out`` learned from the other cases of ``cohort`` (names in
    ``index``, with ``modalities``): what an experiment config's ``prior = "leave-one-out"``
    uses (:class:`LeaveOneOutCohort`: each per-case fit computed once and cached)."""
    if held_out not in cohort:
        raise InputError(os.fspath(index), f"case {held_out!r} is not in the leave-one-out cohort")
    return LeaveOneOutCohort(index, modalities, cohort, cache_dir, num_tumour=num_tumour,
                             num_background=num_background, progress=progress
                             ).prior(held_out, interaction=interaction)


def fit_population_prior(training: list[TrainingCase], modalities, *,
                         num_tumour=DEFAULT_TUMOUR_CLASSES,
                         num_background=DEFAULT_BACKGROUND_CLASSES, neighbourhood=6,
                         calibrate=True, case_index=None, progress=None,
                         statistics=None, interaction=False) -> PopulationPrior:
    """Learn a PopulationPrior from delineated cases (module doc; empirical Bayes).

    ``statistics``: the (stats, shapes) of :func:`case_statistics` for ``training`` when
    already computed (a case's constrained fit uses only that case, so leave-one-out studies
    compute them once).
    """
    stats, shapes = statistics if statistics is not None else case_statistics(
        training, modalities, num_tumour=num_tumour, num_background=num_background,
        neighbourhood=neighbourhood)
    names = [t.name for t in training]
    calibration = None
    if calibrate and len(training) >= MIN_CALIBRATION_CASES:
        calibration = calibration_from_entries(leave_one_out_entries(
            training, list(stats), shapes, modalities, num_tumour=num_tumour,
            neighbourhood=neighbourhood, progress=progress, interaction=interaction))
    return prior_from_statistics(stats, names, modalities, num_tumour=num_tumour,
                                 neighbourhood=neighbourhood, case_index=case_index,
                                 interaction=interaction,
                                 calibration=calibration)


def fit_prior(index, modalities, out=None, *, names=None,
              classes=(DEFAULT_TUMOUR_CLASSES, DEFAULT_BACKGROUND_CLASSES), overwrite=False, calibrate=True,
              attribution="", progress=None, interaction=False, command="",
              method_errors=None) -> PopulationPrior:
    """``vbseg fit-prior``: read CASES.json, learn the prior, write it to ``out`` (None: not
    written) through :func:`vbseg.io.result_folder.output_files`: checked (not an input, not
    existing without ``overwrite``) and locked before the first fit, staged beside it and moved
    into place when complete; ``classes``: (tumour, background) class counts; ``interaction``:
    learn a K x K class-interaction matrix in place of one beta; ``command``: the command line
    recorded in the prior (beside the digest of its training list and settings,
    :func:`vbseg.cohort.model.training_digest`); ``method_errors``: None or
    ``method_errors(cases, training, stats)`` -> {method: volume calibration}, stored in the
    prior's ``method_calibrations`` (:func:`vbseg.cohort.method_error.method_calibrations`, which
    segments through the pipeline and so is passed in rather than imported here)."""
    num_tumour, num_background = classes
    if not (isinstance(num_tumour, int) and num_tumour >= 1 and isinstance(num_background, int)
            and num_background >= 1 and num_tumour + num_background <= 8):
        raise InputError("--classes", "needs >= 1 tumour and >= 1 background class, at most 8 in all")
    cases = read_cases(index, modalities, names)
    to_features(np.zeros((1, len(modalities)), np.float32), [m.lower() for m in modalities])
    written = (contextlib.nullcontext(None) if out is None
               else output_files([out], [index, *case_files(cases)], overwrite))
    with written as staging:
        training = [load_training_case(case) for case in cases]
        modalities = [m.lower() for m in modalities]
        statistics = case_statistics(training, modalities, num_tumour=num_tumour,
                                     num_background=num_background)
        prior = fit_population_prior(training, modalities, num_tumour=num_tumour,
                                     num_background=num_background, calibrate=calibrate,
                                     case_index=os.path.basename(os.fspath(index)), progress=progress,
                                     interaction=interaction, statistics=statistics)
        if method_errors is not None:
            prior.method_calibrations = method_errors(cases, training, statistics[0])
        prior.attribution = attribution or "; ".join(sorted({c.licence for c in cases if c.licence}))
        prior.command = command
        prior.training_digest = training_digest(prior.cases, prior.modalities, num_tumour,
                                                num_background, interaction,
                                                prior.volume_calibration is not None,
                                                sorted(prior.method_calibrations))
        if staging is not None:
            prior.save(staging / Path(out).name)
    return prior


__all__ = ["FORBIDDEN", "PopulationPrior", "TrainingCase", "calibrated_draws", "fit_population_prior",
           "fit_prior", "load_training_case", "resolve_prior", "tumour_probability"]
