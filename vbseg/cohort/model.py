"""Population priors learned across delineated patients: what tumour (and its surroundings)
looks like in a feature space that means the same thing in every scan.

**Feature space** (fixed across patients, no per-scan standardisation; :func:`to_features`):

* PET: ``log(max(SUV, 0.1))``: SUV is absolute (body-weight SUV), the log makes the
  multiplicative spread of uptake between and within lesions roughly Gaussian, and the floor
  keeps air (SUV 0) finite.
* CT: ``clip(HU, -1000, 1500) / 100``: Hounsfield units, a fixed scale; the clip keeps metal
  and dense cortical bone from dominating a class's variance.
* MR: ``clip(y, 0, 2000) / 100``: the sarcoma T1 MR of ../shared/data is N4 bias-corrected
  and normalised to subcutaneous fat by the IBSI (arbitrary units, hundreds); that
  normalisation is what makes intensities comparable across patients, so only a fixed scale
  is applied here. MR from elsewhere needs the same normalisation first.

**Model** (hierarchical over patients p = 1..P; classes k = 0..K-1, the first
``num_tumour`` of them tumour, e.g. viable rim and necrotic core, the rest background,
e.g. air, fat, soft tissue, bone; modalities m):

    population:   mu_k  (K, M) population class means;  T_k = diag(spread_var_k) (K, M)
    patient p:    mu_pkm ~ Normal(mu_km, spread_var_km)       (class means vary by patient)
                  tau_pkm ~ Gamma(a0, a0 noise_var_km)        (E[tau] = 1 / noise_var)
                  pi_p ~ Dirichlet(1 + concentration * proportions)
                  z_p ~ Potts(beta) with external field log pi_p       (vbseg.potts.model)
                        or, with a class-interaction matrix J (K, K), the generalised
                        Potts prior exp(sum_v log pi_p(z_v) + sum_{v~w} w_vw J[z_v, z_w])
                  y_pvm | z_pv = k ~ Normal(mu_pkm, 1 / tau_pkm)
    output:       P(tumour at v) = sum_{k < num_tumour} q_v(k).

For a new patient this is the hidden Potts model of :mod:`vbseg.potts.model` with per-class
Normal-Gamma priors: m0 = mu_k, kappa0 = noise_var / spread_var (so that
Var(mu_pk) = 1 / (kappa0 E[tau]) = spread_var), a0 = ``NOISE_PSEUDO_COUNT``,
b0 = a0 noise_var (:meth:`PopulationPrior.normal_gamma_prior`). The population level is
fitted by empirical Bayes (:mod:`vbseg.cohort.empirical_bayes`). The coupling is one beta
(median of the training cases' pseudo-likelihood estimates) or, learned with
``interaction=True``, a symmetric K x K matrix J estimated by pseudo-likelihood jointly over
the training cases' label fields (:func:`vbseg.cohort.empirical_bayes.pool_interaction`):
it can favour a necrotic core inside its viable rim and disfavour it next to fat, which one
beta cannot express. (On the sarcomas it did not improve the held-out contours; see
benchmarks/results/bench_cohort.md.)

Shapes: class arrays (K, M) in feature units, columns in the order of ``modalities``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from vbseg.cohort.volume_error import check_calibration
from vbseg.errors import InputError
from vbseg.io.writing import write_text_atomic
from vbseg.potts.model import NormalGammaPrior

PRIOR_FORMAT = "vbseg-population-prior/2"
COHORT_MODALITIES = ("pet", "ct", "mr")
PET_SUV_FLOOR = 0.1
CT_HU_RANGE = (-1000.0, 1500.0)
CT_HU_PER_UNIT = 100.0
MR_RANGE = (0.0, 2000.0)
MR_PER_UNIT = 100.0
TRANSFORMS = {
    "pet": f"log(max(SUV, {PET_SUV_FLOOR:g}))",
    "ct": f"clip(HU, {CT_HU_RANGE[0]:g}, {CT_HU_RANGE[1]:g}) / {CT_HU_PER_UNIT:g}",
    "mr": (f"clip(y, {MR_RANGE[0]:g}, {MR_RANGE[1]:g}) / {MR_PER_UNIT:g}, y the IBSI's N4-corrected, "
           "subcutaneous-fat-normalised T1 intensity"),
}
# Shape a0 of the Gamma prior on each class's noise precision: the prior counts as this many
# voxels, so a scan's own noise level dominates once a class has a few dozen voxels.
NOISE_PSEUDO_COUNT = 5.0


def to_features(stack: np.ndarray, modalities) -> np.ndarray:
    """Map images (..., M) in their physical units to the fixed feature space (module doc)."""
    features = np.empty(stack.shape, np.float32)
    for m, modality in enumerate(modalities):
        y = stack[..., m].astype(np.float32)
        if modality == "pet":
            features[..., m] = np.log(np.maximum(y, PET_SUV_FLOOR))
        elif modality == "ct":
            features[..., m] = np.clip(y, *CT_HU_RANGE) / CT_HU_PER_UNIT
        elif modality == "mr":
            features[..., m] = np.clip(y, *MR_RANGE) / MR_PER_UNIT
        else:
            raise InputError("--modalities", f"no fixed feature transform for {modality!r} "
                                             f"(population priors take {', '.join(COHORT_MODALITIES)})")
    return features


def _array(value, name, shape=None) -> np.ndarray:
    array = np.asarray(value, np.float64)
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name}: shape {array.shape}, expected {shape}")
    return array


@dataclasses.dataclass(eq=False)
class PopulationPrior:
    """The population level of the hierarchical model (module doc), JSON (de)serialisable.

    Attributes:
        modalities: the inputs it was learned on, in order (pet/ct/mr).
        num_tumour: the first ``num_tumour`` classes are tumour.
        class_names: K names (e.g. "tumour 0 (hottest)", "background 0").
        mean: (K, M) population class means mu_k (feature units).
        spread_var: (K, M) between-patient variance of the class means (predictive for a new
            patient, floored; see :mod:`vbseg.cohort.empirical_bayes`).
        noise_var: (K, M) pooled within-patient variance of each class.
        proportions: (K,) mean class proportions over the training cases.
        concentration: Dirichlet strength of the proportions' prior (sum of its parameters).
        beta: Potts coupling (median over training cases of the pseudo-likelihood estimate).
        neighbourhood: 6 or 26.
        volume_calibration: None or the located-or-missed volume-error mixture learned by
            leave-one-out over the training cases (:mod:`vbseg.cohort.volume_error`).
        method_calibrations: the same mixture for other methods that use this prior, by method
            name (e.g. "locate-potts"): each training case segmented by that method with the
            prior pooled from the other cases (``vbseg fit-prior --calibrate-method``).
        cases: names of the training cases; case_index: the CASES.json they came from.
        spread_scale: multiplies spread_var when the prior is used (sensitivity analyses).
        interaction: None (the Potts coupling ``beta`` between equal labels) or the (K, K)
            symmetric class-interaction matrix J used in its place (module doc).
        per_case: per training case class means (K, M), noise variances and proportions.
        command: the command line that made it (``vbseg fit-prior ...``), "" when made in
            Python; training_digest: sha256 of its training case list and settings
            (:func:`training_digest`), which a packaged prior's test recomputes.
    """

    modalities: list
    num_tumour: int
    class_names: list
    mean: np.ndarray
    spread_var: np.ndarray
    noise_var: np.ndarray
    proportions: np.ndarray
    concentration: float
    beta: float
    neighbourhood: int = 6
    volume_calibration: dict | None = None
    cases: list = dataclasses.field(default_factory=list)
    case_index: str | None = None
    spread_scale: float = 1.0
    per_case: list = dataclasses.field(default_factory=list)
    fit_method: str = ""
    attribution: str = ""
    vbseg_version: str = ""
    transforms: dict = dataclasses.field(default_factory=dict)
    interaction: np.ndarray | None = None
    command: str = ""
    training_digest: str = ""
    method_calibrations: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.modalities = [str(m) for m in self.modalities]
        self.mean = _array(self.mean, "mean")
        shape = self.mean.shape
        if len(shape) != 2 or shape[1] != len(self.modalities):
            raise ValueError(f"mean: shape {shape}, expected (K, {len(self.modalities)})")
        self.spread_var = _array(self.spread_var, "spread_var", shape)
        self.noise_var = _array(self.noise_var, "noise_var", shape)
        self.proportions = _array(self.proportions, "proportions", shape[:1])
        if not 1 <= self.num_tumour < shape[0]:
            raise ValueError(f"num_tumour must be in 1..{shape[0] - 1}, got {self.num_tumour}")
        if len(self.class_names) != shape[0]:
            raise ValueError(f"class_names: {len(self.class_names)} names for {shape[0]} classes")
        if self.interaction is not None:
            self.interaction = _array(self.interaction, "interaction", (shape[0], shape[0]))
            if not np.all(np.isfinite(self.interaction)):
                raise ValueError("interaction: the matrix has non-finite entries")
            if not np.allclose(self.interaction, self.interaction.T):
                raise ValueError("interaction: the matrix must be symmetric")
            self.interaction = 0.5 * (self.interaction + self.interaction.T)
        if not self.transforms:
            self.transforms = {m: TRANSFORMS[m] for m in self.modalities if m in TRANSFORMS}
        check_calibration(self.volume_calibration)
        if not isinstance(self.method_calibrations, dict):
            raise ValueError("method_calibrations: expected an object of method name -> calibration")
        for calibration in self.method_calibrations.values():
            check_calibration(calibration)

    @property
    def num_classes(self) -> int:
        return int(self.mean.shape[0])

    def coupling(self) -> np.ndarray:
        """The label prior's coupling as the per-scan fit takes it: the (K, K) interaction
        matrix when there is one, else the scalar beta (float32)."""
        return np.asarray(self.beta if self.interaction is None else self.interaction, np.float32)

    def widened(self, factor: float) -> PopulationPrior:
        """The same prior with the between-patient spread (variance) multiplied by ``factor``."""
        return dataclasses.replace(self, spread_scale=self.spread_scale * float(factor))

    def normal_gamma_prior(self) -> NormalGammaPrior:
        """Per-class Normal-Gamma hyperparameters for one new scan, each (K, M) float32:
        m0 = mean, kappa0 = noise_var / (spread_scale spread_var), a0 = NOISE_PSEUDO_COUNT,
        b0 = a0 noise_var."""
        spread = self.spread_var * self.spread_scale
        shape = np.full(self.mean.shape, NOISE_PSEUDO_COUNT)
        return NormalGammaPrior(self.mean.astype(np.float32),
                                (self.noise_var / spread).astype(np.float32),
                                shape.astype(np.float32),
                                (shape * self.noise_var).astype(np.float32))

    def dirichlet_concentration(self) -> np.ndarray:
        """(K,) Dirichlet parameters of the class proportions: 1 + concentration * proportions
        (at least 1, so a class absent from the training cases keeps a proper prior)."""
        return (1.0 + self.concentration * self.proportions / self.proportions.sum()).astype(np.float32)

    def check_modalities(self, modalities, subject="--prior") -> None:
        """InputError (one line) unless the inputs are the prior's modalities, in its order."""
        given = [str(m) for m in modalities]
        if given != self.modalities:
            raise InputError(subject, f"this prior was learned on {'+'.join(self.modalities)} (in that "
                                      f"order) but the inputs are {'+'.join(given)}; give the same "
                                      "modalities or learn a prior for these with vbseg fit-prior")

    def to_dict(self) -> dict:
        record = {"format": PRIOR_FORMAT}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if (field.name == "interaction" and value is None) or (field.name == "method_calibrations"
                                                                   and not value):
                continue  # a record without them reads the same in vbseg versions without them
            record[field.name] = value.tolist() if isinstance(value, np.ndarray) else value
        return record

    @classmethod
    def from_dict(cls, record: dict) -> PopulationPrior:
        record = dict(record)
        found = record.pop("format", None)
        if found != PRIOR_FORMAT:
            older = isinstance(found, str) and found.startswith(PRIOR_FORMAT.split("/")[0] + "/")
            raise ValueError(f"format {found!r}, written by another vbseg: learn it again with "
                             "vbseg fit-prior" if older else f"not a {PRIOR_FORMAT} record")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(record) - names
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        return cls(**record)

    def save(self, path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")


def training_digest(cases, modalities, num_tumour: int, num_background: int, interaction: bool,
                    calibrated: bool, calibrated_methods=()) -> str:
    """sha256 of what a prior was learned from and how: its case names (sorted), modalities,
    class counts, coupling, whether it carries a volume calibration and for which other methods
    (the key is left out when none, so older priors keep their digest)."""
    settings = {"cases": sorted(cases), "modalities": list(modalities), "num_tumour": num_tumour,
                "num_background": num_background, "interaction": bool(interaction),
                "calibrated": bool(calibrated)}
    if calibrated_methods:
        settings["calibrated_methods"] = sorted(calibrated_methods)
    payload = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def load_prior(path) -> PopulationPrior:
    """Read a prior JSON; InputError (one line, naming the file) when it is missing or invalid."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        raise InputError(path, "prior file not found") from None
    except (OSError, ValueError) as error:
        raise InputError(path, f"cannot read the prior as JSON ({str(error).splitlines()[0]})") from None
    try:
        return PopulationPrior.from_dict(record)
    except (TypeError, ValueError) as error:
        raise InputError(path, f"not a valid population prior ({str(error).splitlines()[0]})") from None
