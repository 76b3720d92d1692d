"""The options of ``vbseg segment``: their defaults, and one validation of all of them (alone
and in combination) that runs before any file is read (the output folder's checks are in
:mod:`vbseg.io.result_folder`). Every problem is an InputError naming the option."""

from __future__ import annotations

import dataclasses

import numpy as np

from vbseg.baselines.classic import BASELINES
from vbseg.deep.segment import DEEP_MODELS, FIELD_MODELS
from vbseg.errors import InputError
from vbseg.io.image import MODALITIES
from vbseg.posterior import output_names
from vbseg.potts.beta import BETA_MAX
from vbseg.potts.emission_updates import DEFAULT_STUDENT_DOF
from vbseg.potts.model import DEFAULT_POTTS_BETA, DEFAULT_POTTS_BETA_PSF, NEIGHBOURHOODS
from vbseg.pv_potts.model import DEFAULT_FRACTION_LEVELS

# the Potts couplings used when none is given live beside the Potts model
DEFAULT_BETA, DEFAULT_BETA_PSF = DEFAULT_POTTS_BETA, DEFAULT_POTTS_BETA_PSF
# --beta auto: where the learned-beta fit starts. Below the critical coupling of the
# 6-neighbourhood Potts model (~0.44 for K = 2), so the restarts cannot lock onto a one-class
# ordered state that the beta step would then confirm (see tests/potts/test_beta.py).
AUTO_BETA_START = 0.1
EMISSION_OPTIONS = ("gaussian", "student", "lognormal")
COVARIANCES = ("diagonal", "full")
BETA_LEARNED_TEXT = (
    f"beta learned (uniform prior on [0, {BETA_MAX:g}]; variational EM from beta = "
    f"{AUTO_BETA_START:g}, restarts at that value, then a mean-field pseudo-likelihood step "
    "after each parameter update, Celeux, Forbes & Peyrard 2003)"
)
DEFAULT_LEVELS = (10, 50, 90)
DEFAULT_VOLUME_DRAWS = 2000
# More draws than this do not sharpen a 95 % interval further (its Monte Carlo error at 2000
# draws is already far below the model's own) but cost time and memory linearly: 10^8 draws
# ran for minutes at gigabytes.
MAX_VOLUME_DRAWS = 100_000
# Seeds go to jax.random.PRNGKey, which takes an unsigned 32-bit integer.
SEED_LIMIT = 2**32
PET_NOISE_MODELS = ("poisson", "constant")
SAMPLERS = ("vb", "gibbs")
# --restarts: where the Potts fit's k-means restarts run: "full" on the crop's grid (default),
# "coarse" on a 2x2x2 coarser grid first, one full-grid fit per distinct solution
# (vbseg.potts.multiscale; faster, but can end in other modes: bench_multiscale)
RESTARTS = {"full": False, "coarse": True}
# --intensity-field: which classes' first-modality mean carries a GP field
# (vbseg.potts.intensity_field): every class (a bias field) or the tumour class
INTENSITY_FIELDS = ("all", "tumour")
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
FUSION_MODELS = ("potts", "pv-potts", "gp", LOCATE_MODEL) + FIELD_MODELS + BASELINES
FUSION_PET_TEXT = (
    "PET alone decides tumour and background (the other images are loaded, checked and resampled, "
    "but do not enter the likelihood): a class split over all images separates body from air or "
    "fat from muscle before tumour from tissue (benchmarks/results/fusion_default.md); "
    "--fusion joint puts every image in the likelihood"
)
FUSION_JOINT_TEXT = "every image enters the likelihood of one class split"
# --fraction-levels: the partial-volume model's number of fraction levels L (phi = k / (L - 1));
# its cost grows with L only in elementwise terms (the blurs act on the two design columns)
MAX_FRACTION_LEVELS = 33


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


def fusion_columns(fusion: str, modalities) -> list[int]:
    """Indices of the images that enter the likelihood under ``fusion``."""
    if fusion == "pet":
        return [m for m, modality in enumerate(modalities) if modality == "pet"]
    return list(range(len(modalities)))


@dataclasses.dataclass(frozen=True)
class SegmentOptions:
    """The options that choose and configure the model of ``vbseg.segment`` / ``vbseg segment``
    (the images, VOI, output folder, levels and seed are arguments of their own).

    model: a registered method (:func:`vbseg.methods.method_names`): potts, gp, deep-potts,
        deep-gp, a baseline or a network baseline. num_classes: K.
    beta: Potts coupling; None: DEFAULT_BETA, or DEFAULT_BETA_PSF with ``psf_fwhm_mm``; "auto":
        learned by variational EM with a pseudo-likelihood step (from AUTO_BETA_START;
        :mod:`vbseg.potts.beta`), then kept for the PSF fit or sampler; with pv-potts, a
        grid of fits weighted by exp(ELBO - log Z(beta)) (:mod:`vbseg.pv_potts.method`).
    neighbourhood: 6 or 26 (weights by inverse distance).
    restarts: where the Potts fit's k-means restarts run: "full" (the image's grid) or "coarse"
        (a 2x2x2 coarser grid, then one full-grid fit per distinct solution;
        :mod:`vbseg.potts.multiscale`: faster on large grids, but it can end in another mode).
    tumour_class: class index that is tumour (required without PET).
    volume_draws: number of posterior volume draws.
    psf_fwhm_mm: the PET scanner's PSF FWHM in mm: PET images get the PSF-blurred likelihood
        (:mod:`vbseg.potts.meanfield_psf`) and ``pet_noise`` says how PET noise varies:
        "poisson" (variance proportional to the local mean) or "constant".
    sampler: "vb" (mean-field marginals; volume draws from independent voxels) or "gibbs"
        (checkerboard Gibbs from the VB solution: marginals and volume draws from posterior
        draws of the whole label field).
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
    """

    model: str = "potts"
    num_classes: int = 2
    beta: float | str | None = None
    neighbourhood: int = 6
    restarts: str = "full"
    tumour_class: int | None = None
    volume_draws: int = DEFAULT_VOLUME_DRAWS
    psf_fwhm_mm: float | None = None
    pet_noise: str = "poisson"
    sampler: str = "vb"
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

    def check(self, *, num_images, modalities, levels_percent, roi=None, box=None) -> None:
        """:func:`check_options` on these options for ``num_images`` inputs named ``modalities``
        (fusion and beta at their defaults where None). The options of one method alone
        (``locator``, ``locate_margin_mm``) are refused here for the other methods and checked
        by their method (:attr:`vbseg.methods.registry.Method.check_options`)."""
        if self.model != LOCATE_MODEL:
            for name, value in (("--locator", self.locator), ("--locate-margin", self.locate_margin_mm)):
                if value is not None:
                    raise InputError(name, f"goes with --model {LOCATE_MODEL}, not {self.model}")
        resolved = dataclasses.replace(
            self, beta=default_beta(self),
            fusion=self.fusion or default_fusion(self.model, modalities, self.covariance))
        check_options(resolved, num_images=num_images, modalities=list(modalities),
                      levels_percent=levels_percent, roi=roi, box=box)


def fixed_beta(options: SegmentOptions) -> float:
    """The default fixed coupling: DEFAULT_BETA, or DEFAULT_BETA_PSF with a PSF."""
    return DEFAULT_BETA if options.psf_fwhm_mm is None else DEFAULT_BETA_PSF


def default_beta(options: SegmentOptions) -> float | str:
    """The coupling a fit uses: the given one ("auto" or a number), else :func:`fixed_beta`."""
    return options.beta if options.beta is not None else fixed_beta(options)


def check_options(options: SegmentOptions, *, num_images, modalities, levels_percent, roi=None,
                  box=None) -> None:
    """Validate every option of ``segment`` that needs no file, alone and in combination, for
    ``num_images`` inputs named ``modalities``; ``options`` with beta and fusion resolved (as
    :meth:`SegmentOptions.check` passes them). InputError names the option. The model's name
    is checked where it is looked up (:func:`vbseg.methods.get_method`)."""
    _check_fusion(options, modalities)
    _check_partial_volume(options, modalities)
    _check_intensity(options, modalities)
    if options.model in ("gp", "deep-gp"):
        _check_gp(options, modalities)
    _check_field(options, modalities)
    if not isinstance(options.num_classes, int) or not 2 <= options.num_classes <= 8:
        raise InputError("--classes", f"must be an integer from 2 to 8, got {options.num_classes!r}")
    beta = options.beta
    if beta != "auto" and (isinstance(beta, str) or not np.isfinite(beta) or beta < 0):
        raise InputError("--beta", f"must be 'auto' or a finite number >= 0, got {options.beta!r}")
    if options.restarts not in RESTARTS:
        raise InputError("--restarts", f"must be one of {', '.join(RESTARTS)}, got {options.restarts!r}")
    if options.restarts == "coarse" and options.model not in ("potts", "deep-potts"):
        raise InputError("--restarts", f"coarse restarts are for the hidden Potts fit (potts, "
                                       f"deep-potts), not --model {options.model}")
    if options.restarts == "coarse" and options.intensity_field is not None:
        raise InputError("--restarts", "coarse restarts do not go with --intensity-field (its GP "
                                       "field lives on the image's grid)")
    if options.neighbourhood not in NEIGHBOURHOODS:
        raise InputError("--neighbourhood", f"must be 6 or 26, got {options.neighbourhood!r}")
    if not levels_percent:
        raise InputError("--levels", "needs at least one level")
    for level in levels_percent:
        if not 0 < level < 100:
            raise InputError("--levels", f"each level must be strictly between 0 and 100, got {level:g}")
    names = output_names(levels_percent)
    if len(set(levels_percent)) != len(levels_percent) or len(set(names)) != len(names):
        raise InputError("--levels", "levels must be distinct (two levels give the same file name)")
    if len(modalities) != num_images:
        raise InputError(
            "--modality", f"names {len(modalities)} modalities for {num_images} images (one each)"
        )
    for name in modalities:
        if name not in MODALITIES:
            raise InputError("--modality", f"unknown modality {name!r} (one of {', '.join(MODALITIES)})")
    if "pet" not in modalities and roi is None and box is None:
        raise InputError("--roi/--box", NO_PET_NO_VOI)
    if "pet" not in modalities and options.tumour_class is None:
        raise InputError(
            "--tumour-class",
            "required without a PET image: classes are numbered 0..K-1 by increasing mean in the "
            f"first image; say which is tumour (e.g. --tumour-class {options.num_classes - 1} for the "
            "brightest)",
        )
    if options.tumour_class is not None and not 0 <= options.tumour_class < options.num_classes:
        raise InputError("--tumour-class", f"must be in 0..{options.num_classes - 1}, "
                                           f"got {options.tumour_class}")
    if not isinstance(options.volume_draws, int) or not 100 <= options.volume_draws <= MAX_VOLUME_DRAWS:
        raise InputError("--volume-draws", f"must be an integer from 100 to {MAX_VOLUME_DRAWS}, "
                                           f"got {options.volume_draws!r}")
    if roi is not None and box is not None:
        raise InputError("--roi", "give either --roi or --box, not both")
    if options.psf_fwhm_mm is not None:
        if not np.isfinite(options.psf_fwhm_mm) or options.psf_fwhm_mm < 0:
            raise InputError("--psf-fwhm", f"must be a finite number of mm >= 0, got {options.psf_fwhm_mm!r}")
        if "pet" not in modalities:
            raise InputError("--psf-fwhm", "applies to PET images, and no image is PET")
    if options.sampler not in SAMPLERS:
        raise InputError("--sampler", f"must be one of {', '.join(SAMPLERS)}, got {options.sampler!r}")
    if options.pet_noise not in PET_NOISE_MODELS:
        raise InputError("--pet-noise", f"must be one of {', '.join(PET_NOISE_MODELS)}, "
                                        f"got {options.pet_noise!r}")
    _check_emission(options, modalities)


def _check_fusion(options, modalities):
    if options.fusion not in FUSIONS:
        raise InputError("--fusion", f"must be one of {', '.join(FUSIONS)}, got {options.fusion!r}")
    if options.fusion == "pet" and "pet" not in modalities:
        raise InputError("--fusion", "pet needs a PET image, and no image is PET")
    if options.fusion == "pet" and options.model not in FUSION_MODELS:
        raise InputError("--fusion", f"chooses the images of the label models and baselines, not of "
                                     f"--model {options.model}")
    if options.fusion == "pet" and options.intensity_field is not None and modalities[0] != "pet":
        raise InputError("--intensity-field", "is fitted on the first image, which --fusion pet leaves "
                                              "out of the likelihood (PET is not first); add --fusion "
                                              "joint or put PET first")
    if options.fusion == "pet" and options.covariance == "full" and modalities.count("pet") < 2:
        raise InputError("--covariance", "full models how several images covary, and with --fusion pet "
                                         "only PET enters the likelihood (add --fusion joint)")


def levels_for(options: SegmentOptions) -> int:
    """pv-potts's number of fraction levels: the given one, else DEFAULT_FRACTION_LEVELS."""
    return DEFAULT_FRACTION_LEVELS if options.fraction_levels is None else options.fraction_levels


def _check_partial_volume(options, modalities):
    """--fraction-levels and --wall-mm belong to pv-potts, a two-class Gaussian model that draws
    its own joint samples (:mod:`vbseg.pv_potts.method`)."""
    if options.fraction_levels is not None:
        if options.model != "pv-potts":
            raise InputError("--fraction-levels", f"goes with --model pv-potts, not {options.model} (contour "
                                                  "levels are --levels)")
        levels = options.fraction_levels
        if (isinstance(levels, bool) or not isinstance(levels, (int, np.integer))
                or not 2 <= levels <= MAX_FRACTION_LEVELS):
            raise InputError("--fraction-levels", f"must be an integer from 2 to "
                                                  f"{MAX_FRACTION_LEVELS}, got {options.fraction_levels!r}")
    if options.wall_mm is not None:
        if options.model != "pv-potts":
            raise InputError("--wall-mm", f"goes with --model pv-potts (a cold shell in its PET "
                                          f"forward model), not {options.model}")
        if (isinstance(options.wall_mm, bool) or not isinstance(options.wall_mm, (int, float, np.floating))
                or not np.isfinite(options.wall_mm) or options.wall_mm < 0):
            raise InputError("--wall-mm", f"must be a finite number of mm >= 0, got {options.wall_mm!r}")
        if "pet" not in modalities:
            raise InputError("--wall-mm", "is a cold shell in the PET forward model, and no image is PET")
    if options.model != "pv-potts":
        return
    if options.num_classes != 2:
        raise InputError("--classes", f"pv-potts is a two-class (tumour fraction) model, "
                                      f"got {options.num_classes}")
    for flag, given in (("--sampler", options.sampler != "vb"),
                        ("--emission", options.emission != "gaussian"),
                        ("--covariance", options.covariance != "diagonal"),
                        ("--external-field", options.external_field is not None),
                        ("--intensity-field", options.intensity_field is not None),
                        ("--restarts", options.restarts != "full")):
        if given:
            raise InputError(flag, "does not apply to --model pv-potts (Gaussian diagonal emissions; "
                                   "its volume draws come from its own sampler)")


def _check_field(options, modalities):
    if options.checkpoint is not None and options.model not in DEEP_MODELS + (LOCATE_MODEL,):
        raise InputError("--checkpoint", f"goes with a deep model ({', '.join(DEEP_MODELS)}), "
                                         f"not {options.model}")
    if options.external_field is not None and options.model not in ("potts", "gp"):
        raise InputError("--external-field", f"goes with --model potts or gp, not {options.model} (the "
                                             "deep models take the network's logits)")
    if options.model in DEEP_MODELS and modalities[0] != "pet":
        raise InputError("--model", f"{options.model} needs the first image to be PET (the networks take "
                                    "pet; pet,ct; pet,ct,mr)")
    uses_field = options.model in FIELD_MODELS or options.external_field is not None
    if uses_field and modalities[0] != "pet" and options.tumour_class is None:
        raise InputError("--tumour-class", "a prior log-odds map without a PET first image needs "
                                           "--tumour-class: the class that carries the map")
    weight = options.field_weight
    if weight != "auto" and (isinstance(weight, str) or not np.isfinite(weight) or weight < 0):
        raise InputError("--field-weight", f"must be 'auto' or a finite number >= 0, "
                                           f"got {options.field_weight!r}")
    if options.model == "deep-gp" and options.field_weight != "auto":
        raise InputError("--field-weight", "the GP fit learns the weight; a fixed weight applies "
                                           "to Potts models")


def _check_intensity(options, modalities):
    """The GP intensity field lives in the PSF-free mean-field fit with Gaussian diagonal
    emissions (:mod:`vbseg.potts.intensity_field`)."""
    if options.intensity_field is None:
        if options.intensity_lengthscale_mm is not None:
            raise InputError("--intensity-lengthscale", "goes with --intensity-field")
        return
    if options.intensity_field not in INTENSITY_FIELDS:
        raise InputError("--intensity-field", f"must be one of {', '.join(INTENSITY_FIELDS)}, "
                                              f"got {options.intensity_field!r}")
    if options.model not in ("potts", "deep-potts"):
        raise InputError("--intensity-field", f"goes with --model potts or deep-potts, not {options.model}")
    lengthscale = options.intensity_lengthscale_mm
    if lengthscale is not None and (not isinstance(lengthscale, (int, float)) or isinstance(lengthscale, bool)
                                    or not np.isfinite(lengthscale) or lengthscale <= 0):
        raise InputError("--intensity-lengthscale", f"must be a number of mm > 0, got {lengthscale!r}")
    for flag, used in (("--psf-fwhm", options.psf_fwhm_mm is not None),
                       ("--sampler gibbs", options.sampler == "gibbs"),
                       ("--emission student", options.emission == "student"),
                       ("--covariance full", options.covariance != "diagonal")):
        if used:
            raise InputError("--intensity-field", f"cannot be combined with {flag}: the field is fitted "
                                                  "in the PSF-free mean-field model with Gaussian "
                                                  "(or log-normal PET) diagonal emissions")
    if options.intensity_field == "tumour" and modalities[0] != "pet" and options.tumour_class is None:
        raise InputError("--intensity-field", "tumour needs PET as the first image (the hottest class "
                                              "is tumour) or --tumour-class")


def _check_gp(options, modalities):
    """The GP logit field is a two-class model whose tumour class is the hotter one in image 1."""
    if not modalities or modalities[0] != "pet":
        raise InputError("--model", "gp needs PET as the first image (its tumour class is the hotter one)")
    if options.num_classes != 2:
        raise InputError("--classes", f"gp is a two-class model (tumour / background), "
                                      f"got {options.num_classes}")
    for flag, given in (("--psf-fwhm", options.psf_fwhm_mm is not None),
                        ("--sampler", options.sampler != "vb"),
                        ("--emission", options.emission != "gaussian"),
                        ("--covariance", options.covariance != "diagonal")):
        if given:
            raise InputError(flag, "applies to --model potts; gp has Gaussian diagonal emissions, "
                                   "no PSF term and its own variational fit")


def _check_emission(options, modalities):
    if options.emission not in EMISSION_OPTIONS:
        raise InputError("--emission", f"must be one of {', '.join(EMISSION_OPTIONS)}, "
                                       f"got {options.emission!r}")
    if options.covariance not in COVARIANCES:
        raise InputError("--covariance", f"must be one of {', '.join(COVARIANCES)}, "
                                         f"got {options.covariance!r}")
    if not np.isfinite(options.dof) or options.dof <= 0:
        raise InputError("--dof", f"must be a finite number > 0, got {options.dof!r}")
    if options.emission == "student" and options.covariance == "full":
        raise InputError("--covariance", "full covariance is Gaussian; it cannot be combined "
                                         "with --emission student")
    if options.emission == "lognormal" and "pet" not in modalities:
        raise InputError("--emission", "lognormal applies to PET images, and no image is PET")
    if options.covariance == "full" and len(modalities) < 2:
        raise InputError("--covariance", "full needs two or more images (it models how they covary)")
    if options.emission != "gaussian" or options.covariance != "diagonal":
        chosen = f"--emission {options.emission}" if options.emission != "gaussian" else "--covariance full"
        if options.psf_fwhm_mm is not None:
            raise InputError("--psf-fwhm", f"the PSF likelihood is Gaussian in linear units; it "
                                           f"cannot be combined with {chosen} yet")
        # log-normal PET is the Gaussian model on log PET, which the Gaussian sampler draws
        if options.sampler == "gibbs" and options.covariance == "full":
            raise InputError("--sampler", "gibbs samples diagonal-covariance models; it cannot be "
                                          "combined with --covariance full yet")


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
