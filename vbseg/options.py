"""The options of ``vbseg segment``, typed by concern: :class:`ModelOptions` (what the model is),
:class:`FitOptions` (how its posterior is computed) and :class:`OutputOptions` (what is drawn
from it), together a :class:`SegmentOptions`. The defaults of a model family live beside its
model (the Potts coupling in :mod:`vbseg.potts.model`, the learned-beta start in
:mod:`vbseg.potts.beta`, the fraction levels in :mod:`vbseg.pv_potts.model`, ...); this module
names them once, keyword by keyword, and validates every option (alone and in combination)
before any file is read (the output folder's checks are in :mod:`vbseg.io.result_folder`).
Every problem is an InputError naming the option.

The command line and experiment configs name options by flat keywords (``model``,
``num_classes``, ``sampler``, ``volume_draws``, ...): :data:`OPTION_KEYWORDS` maps each to its
concern and field, and :meth:`SegmentOptions.from_values` builds the typed options from them.
A calibration (:mod:`vbseg.calibration.calibration_file`) is valid for the model and fit
options it was made with; the output options may differ."""

from __future__ import annotations

import dataclasses

import numpy as np

from vbseg.baselines.classic import BASELINES
from vbseg.deep.segment import DEEP_MODELS, FIELD_MODELS
from vbseg.errors import InputError
from vbseg.io.image import MODALITIES
from vbseg.posterior import output_names
from vbseg.potts.emission_updates import DEFAULT_STUDENT_DOF
from vbseg.potts.emissions import COVARIANCES, EMISSION_OPTIONS
from vbseg.potts.intensity_field import INTENSITY_FIELDS
from vbseg.potts.model import DEFAULT_POTTS_BETA, DEFAULT_POTTS_BETA_PSF, NEIGHBOURHOODS, SAMPLERS
from vbseg.potts.multiscale import RESTARTS
from vbseg.potts.psf import PET_NOISE_MODELS
from vbseg.pv_potts.model import DEFAULT_FRACTION_LEVELS, MAX_FRACTION_LEVELS

# the Potts couplings used when none is given live beside the Potts model
DEFAULT_BETA, DEFAULT_BETA_PSF = DEFAULT_POTTS_BETA, DEFAULT_POTTS_BETA_PSF
DEFAULT_LEVELS = (10, 50, 90)
DEFAULT_VOLUME_DRAWS = 2000
# More draws than this do not sharpen a 95 % interval further (its Monte Carlo error at 2000
# draws is already far below the model's own) but cost time and memory linearly: 10^8 draws
# ran for minutes at gigabytes.
MAX_VOLUME_DRAWS = 100_000
# Seeds go to jax.random.PRNGKey, which takes an unsigned 32-bit integer.
SEED_LIMIT = 2**32
# --fusion: which images enter the label model's likelihood. "pet": PET alone decides tumour and
# background, the other images are loaded, checked and resampled but not modelled; "joint": every
# image enters one class split. With PET and other images the default is "pet": a joint class split
# over PET + CT (+ MR) separates body from air (or fat from muscle) before tumour from tissue, and
# on the 21 sarcomas in ../shared/data the joint two-class default called the body tumour
# (sts001: 5.5 L against a 366 mL GTV; benchmarks/results/fusion_default.md). Without PET every
# image enters (nothing else can decide). The models whose likelihood this chooses:
FUSIONS = ("pet", "joint")
# locate, then delineate (vbseg.potts.locate): a locator's map as the Potts model's field
LOCATE_MODEL = "locate-potts"
# the models whose PSF likelihood --noise-fwhm whitens (vbseg.potts.method.noise_model)
NOISE_KERNEL_MODELS = ("potts", "deep-potts", "pv-potts")
FUSION_MODELS = ("potts", "pv-potts", "gp", LOCATE_MODEL) + FIELD_MODELS + BASELINES
FUSION_PET_TEXT = (
    "PET alone decides tumour and background (the other images are loaded, checked and resampled, "
    "but do not enter the likelihood): a class split over all images separates body from air or "
    "fat from muscle before tumour from tissue (benchmarks/results/fusion_default.md); "
    "--fusion joint puts every image in the likelihood"
)
FUSION_JOINT_TEXT = "every image enters the likelihood of one class split"


NO_PET_NO_VOI = (
    "required without a PET image: CT and MR intensity classes do not find a tumour by themselves "
    "(on 15 tumour-centred sarcoma crops, CT alone Dice 0.11, MR alone 0.22, learned CT and MR "
    "priors 0.00 and 0.15); give a volume of interest drawn around the lesion")


def default_fusion(model: str, modalities, covariance: str = "diagonal") -> str:
    """The ``fusion`` used when none is given: "pet" for a label model with PET among several
    images, else "joint" (see FUSIONS); "joint" also with ``covariance`` "full", which asks for
    a model of how the images covary."""
    several = len(modalities) > 1
    pet_decides = model in FUSION_MODELS and "pet" in modalities and several
    return "pet" if pet_decides and covariance != "full" else "joint"


def model_fusion(model: "ModelOptions", modalities) -> str:
    """The fusion a fit of ``model`` uses: the given one, else :func:`default_fusion`."""
    return model.fusion or default_fusion(model.name, modalities, model.covariance)


def fusion_columns(fusion: str, modalities) -> list[int]:
    """Indices of the images that enter the likelihood under ``fusion``."""
    if fusion == "pet":
        return [m for m, modality in enumerate(modalities) if modality == "pet"]
    return list(range(len(modalities)))


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """What the model is: the method and the settings that change its posterior.

    name: a registered method (:func:`vbseg.methods.method_names`; keyword ``model``): potts,
        gp, deep-potts, deep-gp, locate-potts, pv-potts, a baseline or a network baseline.
    num_classes: K.
    beta: Potts coupling; None: DEFAULT_BETA, or DEFAULT_BETA_PSF with ``psf_fwhm_mm``; "auto":
        learned by variational EM with a pseudo-likelihood step (from
        :data:`vbseg.potts.beta.AUTO_BETA_START`), then kept for the PSF fit or sampler; with
        pv-potts, a grid of fits weighted by exp(ELBO - log Z(beta)) (:mod:`vbseg.pv_potts.method`).
    neighbourhood: 6 or 26 (weights by inverse distance).
    tumour_class: class index that is tumour (required without PET).
    psf_fwhm_mm: the PET scanner's PSF FWHM in mm: PET images get the PSF-blurred likelihood
        (:mod:`vbseg.potts.meanfield_psf`) and ``pet_noise`` says how PET noise varies:
        "poisson" (variance proportional to the local mean) or "constant".
    emission: "gaussian", "student" (Student-t with ``dof`` degrees of freedom) or "lognormal"
        (PET on the log scale); covariance: "diagonal" or "full" (a full covariance per class
        across the images; every image must cover the whole VOI).
    prior: a population prior (JSON path, "sarcoma" for the packaged one, or a
        :class:`~vbseg.cohort.model.PopulationPrior`): the hidden Potts model with the prior's
        classes, class priors and beta (:mod:`vbseg.cohort.population`).
    checkpoint: the network of the deep models; default: the packaged one for the inputs.
    external_field: path of a prior log-odds map (NIfTI on the first image's grid) for potts or
        gp, added to the tumour class's prior with weight ``field_weight`` ("auto": learned).
    intensity_field: "all" or "tumour": a smooth GP field added to the first image's mean of
        every class or of the tumour class (:mod:`vbseg.potts.intensity_field`), length-scale
        ``intensity_lengthscale_mm`` (default 60 mm); saved as intensity_field.nii.gz.
    fusion: which images enter the label model's likelihood: "pet" or "joint"; None:
        :func:`default_fusion` (FUSION_PET_TEXT says why).
    locator, locate_margin_mm: the locator of ``locate-potts`` ("prior", "network" or "both";
        None: the prior when one is given or packaged for the inputs, else the network) and
        the margin around its regions (None: 20 mm); :mod:`vbseg.potts.locate`.
    fraction_levels: pv-potts's number of tumour-fraction levels L (None: DEFAULT_FRACTION_LEVELS
        with pv-potts; :mod:`vbseg.pv_potts.model`).
    wall_mm: pv-potts: a cold shell of this thickness (mm) around the lesion in the PET forward
        model (NEMA IEC sphere walls; None: none).
    psf_sd_mm: pv-potts with ``psf_fwhm_mm``: how uncertain the given FWHM is (the sd of a
        normal prior, mm); the fits at five FWHM nodes are mixed by their prior weights, so the
        volume interval carries the PSF's uncertainty (None or 0: the FWHM as given;
        :func:`vbseg.pv_potts.method.psf_grid`).
    noise_fwhm_mm: with ``psf_fwhm_mm`` (potts, deep-potts, pv-potts): the FWHM of the PET
        noise's spatial correlation (a Gaussian kernel, part of the PSF: the reconstruction's
        post-filter, say). The PET image is whitened by it and fitted with the rest of the PSF,
        sqrt(F^2 - N^2) (:func:`vbseg.potts.psf.whiten`); below F, PET first. None or 0: noise
        taken as white.
    envelope_mm: the lesion's envelope (any method): the probability map closed by a ball of
        this radius (mm) and its holes filled, in grey levels, so each contour is the envelope of
        the model's contour at its level; the volume draws follow (:mod:`vbseg.envelope`). None or
        0: the model's map as it is.
    """

    name: str = dataclasses.field(default="potts", metadata={"keyword": "model"})
    num_classes: int = 2
    beta: float | str | None = None
    neighbourhood: int = 6
    tumour_class: int | None = None
    psf_fwhm_mm: float | None = None
    pet_noise: str = "poisson"
    emission: str = "gaussian"
    covariance: str = "diagonal"
    dof: float = DEFAULT_STUDENT_DOF
    prior: object = None
    checkpoint: object = None
    external_field: object = None
    field_weight: float | str = "auto"
    intensity_field: str | None = None
    intensity_lengthscale_mm: float | None = None
    fusion: str | None = None
    locator: str | None = None
    locate_margin_mm: float | None = None
    fraction_levels: int | None = None
    wall_mm: float | None = None
    psf_sd_mm: float | None = None
    noise_fwhm_mm: float | None = None
    envelope_mm: float | None = None


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How the model's posterior is computed.

    sampler: "vb" (mean-field marginals; volume draws from independent voxels) or "gibbs"
        (checkerboard Gibbs from the VB solution: marginals and volume draws from posterior
        draws of the whole label field).
    restarts: where the Potts fit's k-means restarts run: "full" (the image's grid) or "coarse"
        (a 2x2x2 coarser grid, then one full-grid fit per distinct solution;
        :mod:`vbseg.potts.multiscale`: faster on large grids, but it can end in another mode).
    """

    sampler: str = "vb"
    restarts: str = "full"


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """What is drawn from the posterior (a calibration holds whatever these are).

    volume_draws: number of posterior volume draws.
    """

    volume_draws: int = DEFAULT_VOLUME_DRAWS


# the concerns of SegmentOptions: attribute -> its dataclass
CONCERNS = {"model": ModelOptions, "fit": FitOptions, "outputs": OutputOptions}


def _keyword_map() -> dict:
    """keyword -> (concern, field) for every field of every concern (the field's name, or its
    metadata's "keyword"); each keyword once."""
    keywords = {}
    for concern, kind in CONCERNS.items():
        for field in dataclasses.fields(kind):
            keyword = field.metadata.get("keyword", field.name)
            assert keyword not in keywords, f"option keyword {keyword!r} named twice"
            keywords[keyword] = (concern, field)
    return keywords


# The one list of the options: keyword (vbseg segment's option dest, segment()'s keyword, the
# experiment config's [model] key up to KEY_ALIASES there) -> (concern, dataclasses.Field).
OPTION_KEYWORDS = _keyword_map()


@dataclasses.dataclass(frozen=True)
class SegmentOptions:
    """The options that choose and configure the method of ``vbseg.segment`` / ``vbseg segment``,
    by concern (the images, VOI, output folder, levels and seed are arguments of their own).
    Build them from flat keywords with :meth:`from_values`."""

    model: ModelOptions = dataclasses.field(default_factory=ModelOptions)
    fit: FitOptions = dataclasses.field(default_factory=FitOptions)
    outputs: OutputOptions = dataclasses.field(default_factory=OutputOptions)

    def __post_init__(self):
        for concern, kind in CONCERNS.items():
            if not isinstance(getattr(self, concern), kind):
                raise TypeError(f"SegmentOptions.{concern} must be a {kind.__name__} (flat keywords "
                                f"go through SegmentOptions.from_values), got {getattr(self, concern)!r}")

    @classmethod
    def from_values(cls, **values) -> "SegmentOptions":
        """The options from flat keywords (:data:`OPTION_KEYWORDS`); the rest keep their
        defaults. TypeError for a keyword that is no option."""
        return cls().replace(**values)

    def replace(self, **values) -> "SegmentOptions":
        """A copy with the flat keywords ``values`` replaced, each in its concern."""
        unknown = sorted(set(values) - set(OPTION_KEYWORDS))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)} (options: {', '.join(OPTION_KEYWORDS)})")
        changes = {}
        for keyword, value in values.items():
            concern, field = OPTION_KEYWORDS[keyword]
            changes.setdefault(concern, {})[field.name] = value
        return dataclasses.replace(self, **{concern: dataclasses.replace(getattr(self, concern), **fields)
                                            for concern, fields in changes.items()})

    def values(self, concerns=tuple(CONCERNS)) -> dict:
        """The flat keyword -> value of the options of ``concerns``."""
        return {keyword: getattr(getattr(self, concern), field.name)
                for keyword, (concern, field) in OPTION_KEYWORDS.items() if concern in concerns}

    def check(self, *, num_images, modalities, levels_percent, roi=None, box=None) -> None:
        """:func:`check_options` on these options for ``num_images`` inputs named ``modalities``
        (fusion and beta at their defaults where None). The options of one method alone
        (``locator``, ``locate_margin_mm``) are refused here for the other methods and checked
        by their method (:attr:`vbseg.methods.registry.Method.check_options`)."""
        model = self.model
        if model.name != LOCATE_MODEL:
            for name, value in (("--locator", model.locator), ("--locate-margin", model.locate_margin_mm)):
                if value is not None:
                    raise InputError(name, f"goes with --model {LOCATE_MODEL}, not {model.name}")
        resolved = dataclasses.replace(self, model=dataclasses.replace(
            model, beta=default_beta(model),
            fusion=model_fusion(model, modalities)))
        check_options(resolved, num_images=num_images, modalities=list(modalities),
                      levels_percent=levels_percent, roi=roi, box=box)


def fixed_beta(model: ModelOptions) -> float:
    """The default fixed coupling: DEFAULT_BETA, or DEFAULT_BETA_PSF with a PSF."""
    return DEFAULT_BETA if model.psf_fwhm_mm is None else DEFAULT_BETA_PSF


def default_beta(model: ModelOptions) -> float | str:
    """The coupling a fit uses: the given one ("auto" or a number), else :func:`fixed_beta`."""
    return model.beta if model.beta is not None else fixed_beta(model)


def levels_for(model: ModelOptions) -> int:
    """pv-potts's number of fraction levels: the given one, else DEFAULT_FRACTION_LEVELS."""
    return DEFAULT_FRACTION_LEVELS if model.fraction_levels is None else model.fraction_levels


def check_options(options: SegmentOptions, *, num_images, modalities, levels_percent, roi=None,
                  box=None) -> None:
    """Validate every option of ``segment`` that needs no file, alone and in combination, for
    ``num_images`` inputs named ``modalities``; ``options`` with beta and fusion resolved (as
    :meth:`SegmentOptions.check` passes them). InputError names the option. The model's name
    is checked where it is looked up (:func:`vbseg.methods.get_method`)."""
    model = options.model
    _check_model(model, modalities)
    _check_fit(options.fit, model)
    _check_levels(levels_percent)
    _check_inputs(model, num_images, modalities, roi, box)
    _check_outputs(options.outputs)


def _check_model(model: ModelOptions, modalities) -> None:
    """The model options, alone and against the images."""
    _check_fusion(model, modalities)
    _check_partial_volume(model, modalities)
    _check_envelope(model)
    _check_intensity(model, modalities)
    if model.name in ("gp", "deep-gp"):
        _check_gp(model, modalities)
    _check_field(model, modalities)
    if not isinstance(model.num_classes, int) or not 2 <= model.num_classes <= 8:
        raise InputError("--classes", f"must be an integer from 2 to 8, got {model.num_classes!r}")
    beta = model.beta
    if beta != "auto" and (isinstance(beta, str) or not np.isfinite(beta) or beta < 0):
        raise InputError("--beta", f"must be 'auto' or a finite number >= 0, got {model.beta!r}")
    if model.neighbourhood not in NEIGHBOURHOODS:
        raise InputError("--neighbourhood", f"must be 6 or 26, got {model.neighbourhood!r}")
    if model.tumour_class is not None and not 0 <= model.tumour_class < model.num_classes:
        raise InputError("--tumour-class", f"must be in 0..{model.num_classes - 1}, "
                                           f"got {model.tumour_class}")
    if model.psf_fwhm_mm is not None:
        if not np.isfinite(model.psf_fwhm_mm) or model.psf_fwhm_mm < 0:
            raise InputError("--psf-fwhm", f"must be a finite number of mm >= 0, got {model.psf_fwhm_mm!r}")
        if "pet" not in modalities:
            raise InputError("--psf-fwhm", "applies to PET images, and no image is PET")
    _check_noise_kernel(model, modalities)
    if model.pet_noise not in PET_NOISE_MODELS:
        raise InputError("--pet-noise", f"must be one of {', '.join(PET_NOISE_MODELS)}, "
                                        f"got {model.pet_noise!r}")
    _check_emission(model, modalities)


def _check_fit(fit: FitOptions, model: ModelOptions) -> None:
    """The fit options, alone and against the model they fit."""
    if fit.restarts not in RESTARTS:
        raise InputError("--restarts", f"must be one of {', '.join(RESTARTS)}, got {fit.restarts!r}")
    if fit.sampler not in SAMPLERS:
        raise InputError("--sampler", f"must be one of {', '.join(SAMPLERS)}, got {fit.sampler!r}")
    if model.name == "pv-potts":
        for flag, given in (("--sampler", fit.sampler != "vb"), ("--restarts", fit.restarts != "full")):
            if given:
                raise InputError(flag, "does not apply to --model pv-potts (Gaussian diagonal emissions; "
                                       "its volume draws come from its own sampler)")
    if model.name in ("gp", "deep-gp") and fit.sampler != "vb":
        raise InputError("--sampler", "applies to --model potts; gp has Gaussian diagonal emissions, "
                                      "no PSF term and its own variational fit")
    if fit.restarts == "coarse" and model.name not in ("potts", "deep-potts"):
        raise InputError("--restarts", f"coarse restarts are for the hidden Potts fit (potts, "
                                       f"deep-potts), not --model {model.name}")
    if fit.restarts == "coarse" and model.intensity_field is not None:
        raise InputError("--restarts", "coarse restarts do not go with --intensity-field (its GP "
                                       "field lives on the image's grid)")
    if fit.sampler == "gibbs" and model.intensity_field is not None:
        raise InputError("--intensity-field", f"cannot be combined with --sampler gibbs: {INTENSITY_FIT}")
    # log-normal PET is the Gaussian model on log PET, which the Gaussian sampler draws
    if fit.sampler == "gibbs" and model.covariance == "full":
        raise InputError("--sampler", "gibbs samples diagonal-covariance models; it cannot be "
                                      "combined with --covariance full yet")


def _check_outputs(outputs: OutputOptions) -> None:
    draws = outputs.volume_draws
    if isinstance(draws, bool) or not isinstance(draws, int) or not 100 <= draws <= MAX_VOLUME_DRAWS:
        raise InputError("--volume-draws", f"must be an integer from 100 to {MAX_VOLUME_DRAWS}, "
                                           f"got {outputs.volume_draws!r}")


def _check_levels(levels_percent) -> None:
    if not levels_percent:
        raise InputError("--levels", "needs at least one level")
    for level in levels_percent:
        if not 0 < level < 100:
            raise InputError("--levels", f"each level must be strictly between 0 and 100, got {level:g}")
    names = output_names(levels_percent)
    if len(set(levels_percent)) != len(levels_percent) or len(set(names)) != len(names):
        raise InputError("--levels", "levels must be distinct (two levels give the same file name)")


def _check_inputs(model: ModelOptions, num_images, modalities, roi, box) -> None:
    """The modalities against the images, and what a run without PET needs."""
    if len(modalities) != num_images:
        raise InputError(
            "--modality", f"names {len(modalities)} modalities for {num_images} images (one each)"
        )
    for name in modalities:
        if name not in MODALITIES:
            raise InputError("--modality", f"unknown modality {name!r} (one of {', '.join(MODALITIES)})")
    if "pet" not in modalities and roi is None and box is None:
        raise InputError("--roi/--box", NO_PET_NO_VOI)
    if "pet" not in modalities and model.tumour_class is None:
        raise InputError(
            "--tumour-class",
            "required without a PET image: classes are numbered 0..K-1 by increasing mean in the "
            f"first image; say which is tumour (e.g. --tumour-class {model.num_classes - 1} for the "
            "brightest)",
        )
    if roi is not None and box is not None:
        raise InputError("--roi", "give either --roi or --box, not both")


def _check_fusion(model: ModelOptions, modalities):
    if model.fusion not in FUSIONS:
        raise InputError("--fusion", f"must be one of {', '.join(FUSIONS)}, got {model.fusion!r}")
    if model.fusion == "pet" and "pet" not in modalities:
        raise InputError("--fusion", "pet needs a PET image, and no image is PET")
    if model.fusion == "pet" and model.name not in FUSION_MODELS:
        raise InputError("--fusion", f"chooses the images of the label models and baselines, not of "
                                     f"--model {model.name}")
    if model.fusion == "pet" and model.intensity_field is not None and modalities[0] != "pet":
        raise InputError("--intensity-field", "is fitted on the first image, which --fusion pet leaves "
                                              "out of the likelihood (PET is not first); add --fusion "
                                              "joint or put PET first")
    if model.fusion == "pet" and model.covariance == "full" and modalities.count("pet") < 2:
        raise InputError("--covariance", "full models how several images covary, and with --fusion pet "
                                         "only PET enters the likelihood (add --fusion joint)")


MAX_ENVELOPE_MM = 100.0


def _is_mm(value, low: float = 0.0, high: float = np.inf) -> bool:
    """Whether ``value`` is a finite real number of mm (not a bool) with low <= value <= high."""
    return (not isinstance(value, bool) and isinstance(value, (int, float, np.floating))
            and bool(np.isfinite(value)) and low <= value <= high)


def _check_envelope(model: ModelOptions) -> None:
    value = model.envelope_mm
    if value is None:
        return
    if model.name == "pv-potts":
        raise InputError("--envelope-mm", "closes a tumour region, and pv-potts's volume is a sum "
                                          "of fractions (its E[f] map has no envelope); use it with "
                                          "label models")
    if not _is_mm(value, high=MAX_ENVELOPE_MM):
        raise InputError("--envelope-mm", f"must be a number of mm from 0 to {MAX_ENVELOPE_MM:g}, "
                                          f"got {value!r}")


def _check_partial_volume(model: ModelOptions, modalities):
    """--fraction-levels and --wall-mm belong to pv-potts, a two-class Gaussian model that draws
    its own joint samples (:mod:`vbseg.pv_potts.method`)."""
    if model.fraction_levels is not None:
        if model.name != "pv-potts":
            raise InputError("--fraction-levels", f"goes with --model pv-potts, not {model.name} (contour "
                                                  "levels are --levels)")
        levels = model.fraction_levels
        if (isinstance(levels, bool) or not isinstance(levels, (int, np.integer))
                or not 2 <= levels <= MAX_FRACTION_LEVELS):
            raise InputError("--fraction-levels", f"must be an integer from 2 to "
                                                  f"{MAX_FRACTION_LEVELS}, got {model.fraction_levels!r}")
    if model.wall_mm is not None:
        if model.name != "pv-potts":
            raise InputError("--wall-mm", f"goes with --model pv-potts (a cold shell in its PET "
                                          f"forward model), not {model.name}")
        if not _is_mm(model.wall_mm):
            raise InputError("--wall-mm", f"must be a finite number of mm >= 0, got {model.wall_mm!r}")
        if "pet" not in modalities:
            raise InputError("--wall-mm", "is a cold shell in the PET forward model, and no image is PET")
    if model.psf_sd_mm is not None:
        if model.name != "pv-potts" or not model.psf_fwhm_mm:
            raise InputError("--psf-sd", "goes with --model pv-potts and a --psf-fwhm above 0 (the "
                                         "uncertainty of the given PSF FWHM)")
        if not _is_mm(model.psf_sd_mm, high=model.psf_fwhm_mm):
            raise InputError("--psf-sd", f"must be a number of mm from 0 to --psf-fwhm "
                                         f"({model.psf_fwhm_mm:g}), got {model.psf_sd_mm!r}")
    if model.name != "pv-potts":
        return
    if model.num_classes != 2:
        raise InputError("--classes", f"pv-potts is a two-class (tumour fraction) model, "
                                      f"got {model.num_classes}")
    for flag, given in (("--emission", model.emission != "gaussian"),
                        ("--covariance", model.covariance != "diagonal"),
                        ("--external-field", model.external_field is not None),
                        ("--intensity-field", model.intensity_field is not None)):
        if given:
            raise InputError(flag, "does not apply to --model pv-potts (Gaussian diagonal emissions; "
                                   "its volume draws come from its own sampler)")


def _check_field(model: ModelOptions, modalities):
    if model.checkpoint is not None and model.name not in DEEP_MODELS + (LOCATE_MODEL,):
        raise InputError("--checkpoint", f"goes with a deep model ({', '.join(DEEP_MODELS)}), "
                                         f"not {model.name}")
    if model.external_field is not None and model.name not in ("potts", "gp"):
        raise InputError("--external-field", f"goes with --model potts or gp, not {model.name} (the "
                                             "deep models take the network's logits)")
    if model.name in DEEP_MODELS and modalities[0] != "pet":
        raise InputError("--model", f"{model.name} needs the first image to be PET (the networks take "
                                    "pet; pet,ct; pet,ct,mr)")
    uses_field = model.name in FIELD_MODELS or model.external_field is not None
    if uses_field and modalities[0] != "pet" and model.tumour_class is None:
        raise InputError("--tumour-class", "a prior log-odds map without a PET first image needs "
                                           "--tumour-class: the class that carries the map")
    weight = model.field_weight
    if weight != "auto" and (isinstance(weight, str) or not np.isfinite(weight) or weight < 0):
        raise InputError("--field-weight", f"must be 'auto' or a finite number >= 0, "
                                           f"got {model.field_weight!r}")
    if model.name == "deep-gp" and model.field_weight != "auto":
        raise InputError("--field-weight", "the GP fit learns the weight; a fixed weight applies "
                                           "to Potts models")


# why the GP intensity field refuses the options below (:mod:`vbseg.potts.intensity_field`)
INTENSITY_FIT = ("the field is fitted in the PSF-free mean-field model with Gaussian (or log-normal "
                 "PET) diagonal emissions")


def _check_intensity(model: ModelOptions, modalities):
    """The GP intensity field lives in the PSF-free mean-field fit with Gaussian diagonal
    emissions (:mod:`vbseg.potts.intensity_field`)."""
    if model.intensity_field is None:
        if model.intensity_lengthscale_mm is not None:
            raise InputError("--intensity-lengthscale", "goes with --intensity-field")
        return
    if model.intensity_field not in INTENSITY_FIELDS:
        raise InputError("--intensity-field", f"must be one of {', '.join(INTENSITY_FIELDS)}, "
                                              f"got {model.intensity_field!r}")
    if model.name not in ("potts", "deep-potts"):
        raise InputError("--intensity-field", f"goes with --model potts or deep-potts, not {model.name}")
    lengthscale = model.intensity_lengthscale_mm
    if lengthscale is not None and (not isinstance(lengthscale, (int, float)) or isinstance(lengthscale, bool)
                                    or not np.isfinite(lengthscale) or lengthscale <= 0):
        raise InputError("--intensity-lengthscale", f"must be a number of mm > 0, got {lengthscale!r}")
    for flag, used in (("--psf-fwhm", model.psf_fwhm_mm is not None),
                       ("--emission student", model.emission == "student"),
                       ("--covariance full", model.covariance != "diagonal")):
        if used:
            raise InputError("--intensity-field", f"cannot be combined with {flag}: {INTENSITY_FIT}")
    if model.intensity_field == "tumour" and modalities[0] != "pet" and model.tumour_class is None:
        raise InputError("--intensity-field", "tumour needs PET as the first image (the hottest class "
                                              "is tumour) or --tumour-class")


def _check_gp(model: ModelOptions, modalities):
    """The GP logit field is a two-class model whose tumour class is the hotter one in image 1."""
    if not modalities or modalities[0] != "pet":
        raise InputError("--model", "gp needs PET as the first image (its tumour class is the hotter one)")
    if model.num_classes != 2:
        raise InputError("--classes", f"gp is a two-class model (tumour / background), "
                                      f"got {model.num_classes}")
    for flag, given in (("--psf-fwhm", model.psf_fwhm_mm is not None),
                        ("--emission", model.emission != "gaussian"),
                        ("--covariance", model.covariance != "diagonal")):
        if given:
            raise InputError(flag, "applies to --model potts; gp has Gaussian diagonal emissions, "
                                   "no PSF term and its own variational fit")


def _check_noise_kernel(model: ModelOptions, modalities) -> None:
    """--noise-fwhm: a part of the PSF, so it needs one (on a model with the PSF likelihood), is
    narrower than it, and whitens PET on its own grid (the first image's). 0: white noise."""
    noise = model.noise_fwhm_mm
    if noise is None or (_is_mm(noise) and noise == 0):
        return
    if model.name not in NOISE_KERNEL_MODELS or not model.psf_fwhm_mm:
        raise InputError("--noise-fwhm", f"goes with --model {' or '.join(NOISE_KERNEL_MODELS)} and a "
                                         "--psf-fwhm above 0 (the noise kernel is part of the PSF)")
    if not _is_mm(noise, high=model.psf_fwhm_mm) or noise == model.psf_fwhm_mm:
        raise InputError("--noise-fwhm", f"must be a number of mm from 0 to below --psf-fwhm "
                                         f"({model.psf_fwhm_mm:g}), got {noise!r}")
    if not modalities or modalities[0] != "pet":
        raise InputError("--noise-fwhm", "needs PET as the first image: its noise is whitened on its "
                                         "own grid, not after resampling onto another image's")


def _check_emission(model: ModelOptions, modalities):
    if model.emission not in EMISSION_OPTIONS:
        raise InputError("--emission", f"must be one of {', '.join(EMISSION_OPTIONS)}, "
                                       f"got {model.emission!r}")
    if model.covariance not in COVARIANCES:
        raise InputError("--covariance", f"must be one of {', '.join(COVARIANCES)}, "
                                         f"got {model.covariance!r}")
    if not np.isfinite(model.dof) or model.dof <= 0:
        raise InputError("--dof", f"must be a finite number > 0, got {model.dof!r}")
    if model.emission == "student" and model.covariance == "full":
        raise InputError("--covariance", "full covariance is Gaussian; it cannot be combined "
                                         "with --emission student")
    if model.emission == "lognormal" and "pet" not in modalities:
        raise InputError("--emission", "lognormal applies to PET images, and no image is PET")
    if model.covariance == "full" and len(modalities) < 2:
        raise InputError("--covariance", "full needs two or more images (it models how they covary)")
    if model.emission != "gaussian" or model.covariance != "diagonal":
        chosen = f"--emission {model.emission}" if model.emission != "gaussian" else "--covariance full"
        if model.psf_fwhm_mm is not None:
            raise InputError("--psf-fwhm", f"the PSF likelihood is Gaussian in linear units; it "
                                           f"cannot be combined with {chosen} yet")


def check_seed(seed, option: str = "--seed") -> None:
    """InputError unless 0 <= seed < 2**32 (what jax.random.PRNGKey accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < SEED_LIMIT:
        raise InputError(option, f"must be an integer with 0 <= seed < 2**32, got {seed!r}")


def check_psf_fits(psf_fwhm_mm, reference) -> None:
    """InputError when the PSF is wider than the longest side of the first image's field of
    view: such a blur is not a scanner's, and its kernels cost minutes and gigabytes."""
    if psf_fwhm_mm is None:
        return
    field_of_view_mm = float(np.max(np.asarray(reference.shape) * reference.spacing))
    if psf_fwhm_mm > field_of_view_mm:
        raise InputError("--psf-fwhm", f"{psf_fwhm_mm:g} mm is wider than the field of view of "
                                       f"{reference.name} ({field_of_view_mm:g} mm); it must be no "
                                       "larger")
