"""Command-line front end: ``vbseg segment | demo | phantom | experiment | calibrate | convert |
fit-prior | train``.

The only module that prints or exits. A user's mistake (a bad file, option or output path)
is an :class:`~vbseg.errors.VbsegError` and is reported as one line,
``vbseg: error: <path or option>: <problem>``, with exit status 2. Ctrl-C is one line,
``vbseg: interrupted``, with exit status 130 (128 + SIGINT, as shells report it).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from vbseg import __version__
from vbseg.interrupts import pause_point, report_interrupted

# JAX and the models load here, the first seconds of every command: Ctrl-C then is one line and
# exit status 130 like Ctrl-C later (vbseg/__init__.py loads nothing heavy, so nothing before
# this block takes long).
try:
    from vbseg.calibration.calibrate import calibrate
    from vbseg.calibration.calibration_file import DEFAULT_STRATA_BINS, PACKAGED_CALIBRATIONS, strata_spec
    from vbseg.cohort.method_error import CALIBRATED_METHODS, check_calibrate_methods, method_calibrations
    from vbseg.cohort.population import fit_prior
    from vbseg.cohort.volume_error import describe
    from vbseg.deep.training import train_from_config
    from vbseg.errors import InputError, VbsegError
    from vbseg.experiment.batch import DONE, FAILED, SKIPPED, run_batch
    from vbseg.experiment.cluster import parse_cluster
    from vbseg.experiment.config import default_output, load_experiment
    from vbseg.experiment.runner import parse_shard, run_experiment
    from vbseg.io.dicom import (
        check_dicom_outputs,
        convert_rtstruct,
        default_modalities,
        write_posterior_dicom,
    )
    from vbseg.io.dicom.series import series_held
    from vbseg.io.result_folder import check_output_folder, check_outputs
    from vbseg.methods import method_names
    from vbseg.metrics import dice, expected_calibration_error
    from vbseg.options import OPTION_KEYWORDS, check_seed
    from vbseg.phantoms import NEMA_DIAMETERS_MM, PhantomSpec, make_phantom
    from vbseg.pipeline import segment
    from vbseg.potts.locate import default_model
    from vbseg.runtime import enable_compilation_cache
    pause_point("import")
except KeyboardInterrupt:
    sys.exit(report_interrupted())

DEMO_DIR = "demo_out"
HELP_EPILOG = ("A bad file, option or output path is reported in one line, 'vbseg: error: <path or "
               "option>: <problem>', with exit status 2; Ctrl-C prints 'vbseg: interrupted' and exits "
               "130, leaving the output folder as it was. 'vbseg COMMAND --help' describes a command.")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line, in the same form as input errors."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"vbseg: error: {message}\n")


def _number_list(option: str, text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(option, f"expected comma-separated numbers, got {text!r}") from None


def _beta(text):
    if text is None or text.strip().lower() == "auto":
        return None if text is None else "auto"
    try:
        return float(text)
    except ValueError:
        raise InputError("--beta", f"must be 'auto' or a number >= 0, got {text!r}") from None


def _weight(text):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise InputError("--field-weight", f"must be 'auto' or a number >= 0, got {text!r}") from None


def _add_segment(sub):
    p = sub.add_parser("segment", help="segment one image or a co-registered stack")
    for add in (_segment_inputs, _segment_model, _segment_seed_and_dicom, _segment_learned,
                _segment_calibration):
        add(p)  # in this order: the order --help lists them


def _segment_inputs(p):
    """The images, the batch index, the output folder, the modalities, the VOI and a reference."""
    p.add_argument("images", nargs="*", help="image files (NIfTI .nii/.nii.gz, NRRD .nrrd/.nhdr, "
                                             "MetaImage .mha/.mhd, MGH .mgz/.mgh, Analyze .hdr/.img) "
                                             "or DICOM series folders (PET in SUV); the first "
                                             "defines the output grid")
    p.add_argument("--batch", default=None, metavar="CASES.json",
                   help="segment every case of a CASES.json index instead (images, optional 'label' "
                        "and 'roi' per case) with the same options, each into --out/<case>/; "
                        "every case is checked before the first fit (exit 2, one line per bad "
                        "case); finished cases are skipped unless --overwrite; --out/batch.json "
                        "records each case; exit status 1 when a case failed while it ran "
                        "(docs/guide.md, Batches)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--modality", help="one per image, comma-separated: pet, ct, mr, other "
                                      "(default: pet for the first image, other for the rest)")
    voi = p.add_mutually_exclusive_group()
    voi.add_argument("--roi", help="mask (non-zero = inside) on the first image's grid, or a label "
                                   "mask on another grid (resampled onto it by nearest neighbour)")
    voi.add_argument("--box", help="i0:i1,j0:j1,k0:k1, 0-based half-open array index ranges")
    p.add_argument("--reference", default=None, metavar="MASK",
                   help="reference delineation (non-zero = inside) on the first image's grid, or a "
                        "label mask on another grid (resampled by nearest neighbour): drawn in "
                        "overview.png, Dice of each contour in summary.json")


def _segment_model(p):
    """The model and its fit settings (options of vbseg.options.OPTION_KEYWORDS, dest = keyword)."""
    p.add_argument("--model", dest="model",
                   help="the method (vbseg/methods/): " + ", ".join(
                       name for name in method_names() if name != "prior")
                   + " (default: locate-potts for PET, CT and MR in that order, else potts; --prior "
                     "selects the population prior)")
    p.add_argument("--classes", dest="num_classes", type=int, help="number of classes K (default 2)")
    p.add_argument("--fusion", dest="fusion",
                   help="which images enter the label model's likelihood: 'pet' (PET alone decides "
                        "tumour and background; the default with PET among several images: a class "
                        "split over CT or MR finds body/air or fat/muscle first) or 'joint' (every "
                        "image; the default without PET)")
    p.add_argument("--beta", dest="beta",
                   help="Potts coupling: a number >= 0, or 'auto' to learn it (pseudo-likelihood "
                        "variational EM); default 0.5, 1.5 with --psf-fwhm")
    p.add_argument("--neighbourhood", dest="neighbourhood", type=int,
                   help="Potts neighbourhood: 6 (faces) or 26 (faces, edges, corners); weights "
                        "by inverse voxel distance (default 6)")
    p.add_argument("--restarts", dest="restarts",
                   help="where the k-means restarts of the Potts fit run: 'full' on the image's "
                        "grid (default), or 'coarse' on a 2x2x2 coarser grid first with one "
                        "full-grid fit per distinct solution (faster on large grids, 3x at 144^3; "
                        "it can end in another mode: see benchmarks/results/bench_multiscale.md)")
    p.add_argument("--levels", default="10,50,90", help="contour levels in percent (default 10,50,90)")
    p.add_argument("--tumour-class", dest="tumour_class", type=int,
                   help="which class is tumour when no PET is given (classes ordered by mean "
                        "in the first image, 0 = darkest)")
    p.add_argument("--volume-draws", dest="volume_draws", type=int, help="posterior volume draws")
    p.add_argument("--psf-fwhm", dest="psf_fwhm_mm", type=float,
                   help="PET scanner PSF FWHM in mm: model the blur (for small lesions in a "
                        "uniform background, e.g. phantom spheres; on whole-image sarcoma PET it "
                        "lowered Dice 0.56 -> 0.36: see benchmarks/results/psf_sarcoma.md)")
    p.add_argument("--fraction-levels", dest="fraction_levels", type=int, metavar="L",
                   help="with --model pv-potts: tumour-fraction levels k/(L-1) per voxel (default 9)")
    p.add_argument("--wall-mm", dest="wall_mm", type=float, metavar="W",
                   help="with --model pv-potts: a cold shell of W mm around the lesion in the PET "
                        "forward model (NEMA IEC sphere glass walls, about 1 mm; default none)")
    p.add_argument("--envelope-mm", dest="envelope_mm", type=float, metavar="R",
                   help="the lesion's envelope: close the probability map with a ball of R mm and "
                        "fill its holes (grey levels, so every contour is the envelope of the "
                        "model's at its level; the volume draws follow), for GTVs that take the "
                        "whole mass, not only its hot part (default off; see README)")
    p.add_argument("--psf-sd", dest="psf_sd_mm", type=float, metavar="MM",
                   help="with --model pv-potts and --psf-fwhm: the given FWHM's uncertainty (sd, "
                        "mm); fits at five FWHMs are mixed by their prior weights so the volume "
                        "interval carries it (default: the FWHM as given)")
    p.add_argument("--noise-fwhm", dest="noise_fwhm_mm", type=float, metavar="MM",
                   help="with --psf-fwhm (potts, deep-potts, pv-potts): FWHM of the PET noise's "
                        "spatial correlation (part of the PSF, e.g. the reconstruction's "
                        "post-filter); the PET is whitened by it and fitted with the rest of the "
                        "PSF (default: noise taken as white)")
    p.add_argument("--pet-noise", dest="pet_noise",
                   help="with --psf-fwhm: PET noise variance 'poisson' (grows with uptake, "
                        "default) or 'constant'")
    p.add_argument("--sampler", dest="sampler",
                   help="vb (mean-field; volume interval from independent voxels, too narrow) or "
                        "gibbs (posterior draws of the label field from the VB start)")
    p.add_argument("--emission", dest="emission",
                   help="class intensity model: gaussian (default), student (Student-t, robust to "
                        "outlier voxels) or lognormal (PET on the log scale)")
    p.add_argument("--covariance", dest="covariance",
                   help="diagonal (modalities independent given the class, default) or full "
                        "(a covariance across modalities; images must cover the whole VOI)")
    p.add_argument("--dof", dest="dof", type=float,
                   help="Student-t degrees of freedom with --emission student (default 4)")


def _segment_seed_and_dicom(p):
    """The seed and the DICOM inputs and outputs."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--series", action="append", default=None, metavar="UID",
                   help="Series Instance UID to read from a DICOM folder holding several series "
                        "(repeat for several folders)")
    p.add_argument("--rtstruct", default=None, metavar="REFERENCE_DIR",
                   help="write contours_rtstruct.dcm: one ROI per contour level, on this DICOM "
                        "series (e.g. the input PET or the planning CT)")
    p.add_argument("--dicom-seg", action="store_true",
                   help="write prob_seg.dcm, a FRACTIONAL/PROBABILITY DICOM SEG of P(tumour) on the "
                        "first input's series (or on --rtstruct's when the first input is NIfTI)")


def _segment_learned(p):
    """What was learned from other cases: a population prior, a network, a locator, a map."""
    p.add_argument("--prior", dest="prior",
                   help="population prior learned from delineated cases (a JSON from vbseg fit-prior, "
                        "or 'sarcoma' for the packaged PET+CT+MR soft-tissue sarcoma prior)")
    p.add_argument("--checkpoint", dest="checkpoint",
                   help="network checkpoint (.eqx, with its .json) for the deep models; default: "
                        "the packaged one for pet; pet,ct; pet,ct,mr inputs")
    p.add_argument("--locator", dest="locator",
                   help="what locates the lesion for --model locate-potts: the population prior "
                        "(--prior, default the packaged sarcoma prior for pet,ct,mr inputs), the "
                        "network (--checkpoint) or both; default: prior where one fits, else network")
    p.add_argument("--locate-margin", dest="locate_margin_mm", type=float, metavar="MM",
                   help="margin around the located regions for --model locate-potts (default 20 mm)")
    p.add_argument("--external-field", dest="external_field", metavar="LOG_ODDS",
                   help="prior log-odds map of tumour (NIfTI on the first image's grid, e.g. an "
                        "atlas) added to the tumour class's prior of --model potts or gp")
    p.add_argument("--field-weight", dest="field_weight",
                   help="weight of the log-odds map: 'auto' (learned from the image, default) or "
                        "a number >= 0")
    p.add_argument("--intensity-field", dest="intensity_field",
                   help="fit a smooth GP intensity field with the labels (potts, deep-potts): 'all' "
                        "adds it to every class's mean in the first image (an MR bias field), "
                        "'tumour' to the tumour class's (heterogeneous uptake); writes "
                        "intensity_field.nii.gz")
    p.add_argument("--intensity-lengthscale", dest="intensity_lengthscale_mm", type=float, metavar="MM",
                   help="its length-scale in mm (default 60; keep it well above the lesion size)")


def _segment_calibration(p):
    """Conformal calibration and --overwrite."""
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="a calibration from 'vbseg calibrate' made with the same fit options, or a "
                        f"packaged one by name ({', '.join(PACKAGED_CALIBRATIONS)}): adds "
                        "conformal volume intervals (summary.json volume_ml_conformal) and contours "
                        "with a false-negative-rate guarantee (contour_crc<alpha>.nii.gz, a "
                        "probability level; contour_crcmargin<alpha>.nii.gz, a dilation) and a "
                        "calibrated margin that contains the lesion (contour_margin<alpha>.nii.gz)")
    p.add_argument("--conformal-levels", default=None, metavar="PERCENT",
                   help="levels of the conformal outputs in percent, comma-separated (default 90,95)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")

def _add_calibrate(sub):
    p = sub.add_parser("calibrate", help="conformal calibration of one model variant over cases "
                                         "with truth (an experiment config)")
    p.add_argument("config", help="experiment config (TOML) with [phantoms] or [real] cases and one "
                                  "[model] variant")
    p.add_argument("--out", required=True, help="calibration JSON to write (for segment --calibration)")
    p.add_argument("--strata", default="none",
                   help="Mondrian strata from each case's own fit: none (default), or one or more "
                        "of volume (the model's mean volume), contrast (the fitted contrast-to-noise) "
                        "and psf (the --psf-fwhm it was fitted with), comma-separated (e.g. "
                        "volume,psf); each non-empty stratum needs >= 19 cases, and segment "
                        "--calibration applies the new case's own stratum")
    for name, unit in (("volume", "ML"), ("contrast", "CNR"), ("psf", "MM")):
        default = ",".join(f"{edge:g}" for edge in DEFAULT_STRATA_BINS[name])
        p.add_argument(f"--{name}-bins", default=None, metavar=unit,
                       help=f"edges of the {name} strata ({unit}), comma-separated (default {default})")
    p.add_argument("--folds", default=None, metavar="FILE",
                   help="cross-fitted calibration over these folds (python -m vbseg.experiment.folds): each "
                        "case is fitted with a prior learned without its fold in place of the config's "
                        "[model] prior, which must be the deployed prior learned from every case; the "
                        "result is a cross-validation calibration, not split conformal (its guarantee "
                        "says so)")
    p.add_argument("--fold-priors", dest="fold_priors", default=None, metavar="DIR",
                   help="with --folds: the folder of the fold priors fold<k>.json (fitted when absent)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _run_calibrate(args) -> None:
    strata = strata_spec(args.strata, args.volume_bins, args.contrast_bins, args.psf_bins)
    record = calibrate(args.config, args.out, strata=strata, overwrite=args.overwrite, progress=print,
                       command=command_line(args), folds=args.folds, fold_priors=args.fold_priors)
    print(f"calibration of {len(record['cases'])} cases written to {args.out}")


def _add_fit_prior(sub):
    p = sub.add_parser("fit-prior", help="learn a population prior from delineated cases")
    p.add_argument("cases", help="CASES.json index (entries with 'modalities', or "
                                 "'modality'/'image'/'label')")
    p.add_argument("--modalities", required=True, help="comma-separated, e.g. pet,ct,mr (the first "
                                                       "modality's label is the reference)")
    p.add_argument("--out", required=True, help="prior JSON to write")
    p.add_argument("--cases", dest="names", default=None,
                   help="comma-separated case names (default: every patient case with these modalities)")
    p.add_argument("--tumour-classes", type=int, default=2, help="tumour classes (default 2)")
    p.add_argument("--background-classes", type=int, default=4, help="background classes (default 4)")
    p.add_argument("--interaction", choices=("potts", "matrix"), default="potts",
                   help="label coupling: one beta between equal labels (potts, default) or a learned "
                        "K x K class-interaction matrix (matrix)")
    p.add_argument("--attribution", default="", help="credit line stored in the prior (default: the cases' "
                                                    "'licence' entries in CASES.json)")
    p.add_argument("--calibrate-method", dest="calibrate_methods", action="append", default=[],
                   metavar="METHOD", help="also learn the volume error of this method with the prior "
                                          "(each training case segmented by it with the prior learned "
                                          "from the others; its own intervals then carry it): "
                                          f"{', '.join(CALIBRATED_METHODS)}; may be repeated")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _run_fit_prior(args) -> None:
    names = [n.strip() for n in args.names.split(",") if n.strip()] if args.names else None
    modalities = [m.strip().lower() for m in args.modalities.split(",") if m.strip()]
    methods = check_calibrate_methods(args.calibrate_methods, modalities)
    interaction = args.interaction == "matrix"

    def method_errors(cases, training, stats):
        return method_calibrations(methods, cases, training, stats, modalities,
                                   num_tumour=args.tumour_classes, interaction=interaction,
                                   progress=print)

    prior = fit_prior(args.cases, modalities, args.out, names=names,
                      classes=(args.tumour_classes, args.background_classes), overwrite=args.overwrite,
                      attribution=args.attribution, interaction=interaction,
                      progress=print, command=command_line(args),
                      method_errors=method_errors if methods else None)
    coupling = ("a K x K interaction matrix" if prior.interaction is not None
                else f"beta {prior.beta:.2f}")
    print(f"prior from {len(prior.cases)} cases ({', '.join(prior.cases)}); {coupling}; "
          f"{describe(prior.volume_calibration)}; written to {args.out}")
    for method in methods:  # none when too few cases: its draws then stay the model's own
        print(f"{method}: {describe(prior.method_calibrations.get(method))}")


def _add_convert(sub):
    p = sub.add_parser("convert", help="RTSTRUCT + its DICOM series -> NIfTI image and masks")
    p.add_argument("rtstruct", help="RTSTRUCT file (.dcm)")
    p.add_argument("series", help="folder of the image series the RTSTRUCT delineates")
    p.add_argument("--out", required=True, help="output folder: image.nii.gz, mask_<ROI>.nii.gz")
    p.add_argument("--roi", default=None, help="convert only this ROI (default: every ROI)")
    p.add_argument("--series-uid", default=None, metavar="UID",
                   help="Series Instance UID when the folder holds several series")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _run_convert(args) -> None:
    written = convert_rtstruct(args.rtstruct, args.series, args.out, roi=args.roi,
                               series_uid=args.series_uid, overwrite=args.overwrite)
    print(f"wrote {', '.join(p.name for p in written.values())} in {args.out}")


def _add_phantom(sub):
    p = sub.add_parser("phantom", help="write a synthetic PET/CT phantom with exact truth")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=("spheres", "heterogeneous"), default="spheres")
    p.add_argument("--diameters", default=None,
                   help="lesion diameters in mm, comma-separated (default 22; 'nema' for the six "
                        "NEMA IEC spheres)")
    p.add_argument("--contrast", type=float, default=4.0, help="lesion:background uptake")
    p.add_argument("--cv", type=float, default=0.10, help="noise coefficient of variation")
    p.add_argument("--noise", choices=("gaussian", "poisson"), default="gaussian")
    p.add_argument("--psf-fwhm", type=float, default=6.0, help="scanner PSF FWHM in mm")
    p.add_argument("--overwrite", action="store_true")


def _add_demo(sub):
    p = sub.add_parser("demo", help="phantom -> probabilities, contours, volume interval, figure")
    p.add_argument("--out", default=None, help=f"output directory (default ./{DEMO_DIR}, replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def _add_experiment(sub):
    p = sub.add_parser("experiment", help="run a TOML config: model variants x cases, resumable")
    p.add_argument("config", help="experiment config (TOML; see vbseg/experiment/config.py)")
    p.add_argument("--out", default=None, help="output folder (default results/<config name>)")
    p.add_argument("--jobs", type=int, default=1, help="cases run in parallel processes here, no "
                                                       "Dask needed (default 1)")
    p.add_argument("--cluster", default=None, metavar="SPEC",
                   help="run on a Dask cluster (pip install 'vbseg[cluster]'): local:N (N workers "
                        "here), local:gpus (one per GPU), tcp://HOST:PORT, scheduler-file:PATH "
                        "(SLURM), env ($DASK_SCHEDULER_ADDRESS, Kubernetes) or slurm:N "
                        "(dask-jobqueue, 'vbseg[slurm]'); see docs/cluster.md")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only the runs whose index in the full run list is I mod N (0-based), "
                        "e.g. one per job-array task")


def _run_experiment(args) -> int:
    if args.jobs < 1:
        raise InputError("--jobs", f"must be >= 1, got {args.jobs}")
    cluster = None if args.cluster is None else parse_cluster(args.cluster)
    if cluster is not None and args.jobs != 1:
        raise InputError("--jobs", "does not go with --cluster (the cluster's workers run the runs)")
    shard = None if args.shard is None else parse_shard(args.shard)
    experiment = load_experiment(args.config)
    out = args.out or default_output(args.config)
    check_output_folder(out)
    summary = run_experiment(experiment, out, jobs=args.jobs, cluster=cluster, shard=shard)
    share = (f"; compile {summary['compile_s']:.1f} s of {summary['fit_s']:.1f} s in fits "
             f"({summary['compile_s'] / summary['fit_s']:.0%})" if summary["fit_s"] > 0 else "")
    print(f"{summary['runs']} runs ({summary['skipped']} already finished, {summary['failed']} "
          f"failed){share}; table: {summary['table']}")
    return 1 if summary["failed"] else 0


def _add_train(sub):
    p = sub.add_parser("train", help="train the 3D U-Net (deep prior) from a TOML config")
    p.add_argument("config", help="training config (TOML; see vbseg/deep/training.py, "
                                  "experiments/train_*.toml)")
    p.add_argument("--out", default=None, help="checkpoint to write, PATH.eqx plus PATH.json "
                                               "(default results/<config name>.eqx)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")


def _run_train(args) -> None:
    out = train_from_config(args.config, args.out, overwrite=args.overwrite, progress=print)
    print(f"checkpoint written to {out} (+ {out.with_suffix('.json').name})")


def _package_version() -> str:
    try:
        return version("vbseg")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return __version__


def build_parser() -> argparse.ArgumentParser:
    # the module doc's first paragraph, whole: its first line stops mid-sentence
    description = " ".join(__doc__.split("\n\n")[0].split()).replace("``", "")
    parser = _Parser(prog="vbseg", description=description, epilog=HELP_EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_segment(sub)
    _add_demo(sub)
    _add_phantom(sub)
    _add_experiment(sub)
    _add_calibrate(sub)
    _add_convert(sub)
    _add_fit_prior(sub)
    _add_train(sub)
    return parser


def _modalities(args) -> list[str] | None:
    return [m.strip().lower() for m in args.modality.split(",")] if args.modality else None


def _segment_kwargs(args) -> dict:
    modalities = _modalities(args)
    if modalities is None and any(os.path.isdir(p) for p in args.images):
        modalities = default_modalities(args.images, args.series)  # from the DICOM headers
    return dict(
        option_values(args),
        modalities=modalities,
        roi=args.roi,
        box=args.box,
        levels_percent=_number_list("--levels", args.levels),
        seed=args.seed,
        series_uid=args.series,
        overwrite=args.overwrite,
        reference_mask=args.reference,
        calibration=args.calibration,
        conformal_levels_percent=(None if args.conformal_levels is None
                                  else _number_list("--conformal-levels", args.conformal_levels)),
    )


# the options whose text needs reading before it is an option value
OPTION_PARSERS = {"beta": _beta, "field_weight": _weight}


def command_line(args) -> str:
    """The command as typed (recorded in what it writes: calibrations, priors, experiments)."""
    return shlex.join(["vbseg", *args.argv])


def option_values(args) -> dict:
    """The options (:data:`vbseg.options.OPTION_KEYWORDS`) given on the command line, by keyword
    (each option's ``dest`` is its keyword; options not given keep their defaults)."""
    values = {}
    for keyword in OPTION_KEYWORDS:
        value = getattr(args, keyword, None)
        if value is not None:
            values[keyword] = OPTION_PARSERS.get(keyword, lambda text: text)(value)
    return values


BATCH_EXCLUDES = {"--roi": "roi", "--reference": "reference", "--series": "series",
                  "--rtstruct": "rtstruct", "--dicom-seg": "dicom_seg"}


def _run_batch(args) -> int:
    if args.images:
        raise InputError("--batch", "takes no image arguments (the index names each case's images)")
    for option, dest in BATCH_EXCLUDES.items():
        if getattr(args, dest):
            raise InputError(option, "does not go with --batch (a case's VOI and reference are its "
                                     "'roi' and 'label' in the index; DICOM outputs are per run)")
    kwargs = _segment_kwargs(args)
    for key in ("roi", "reference_mask", "series_uid", "overwrite", "modalities"):
        kwargs.pop(key)

    def progress(case, row):
        volume = row["volume_ml"]
        interval = (f": {volume['mean']:.2f} mL [{volume['lower']:.2f}, {volume['upper']:.2f}]"
                    if volume else "")
        print(f"{case.name}: {row['status']}{interval}" + (f": {row['error']}" if row["error"] else ""))

    summary = run_batch(args.batch, args.out, modalities=_modalities(args), overwrite=args.overwrite,
                        command=command_line(args), progress=progress, **kwargs)
    counts = summary["counts"]
    print(f"{len(summary['rows'])} cases: {counts[DONE]} done, {counts[SKIPPED]} finished before, "
          f"{counts[FAILED]} failed; record: {summary['record']}")
    return 1 if counts[FAILED] else 0


def _print_model_and_volume(posterior, options: dict) -> None:
    """The model line when the default rule chose it (or missed locate-potts only because of the
    images' order, with these flat ``options``) and the volume line, with what the volume is
    when locate-potts's learned between-patient error moved it."""
    summary = posterior.summary
    by_default = summary["options"].get("model_choice", {}).get("chosen") == "default"
    if by_default and summary["model"] != "potts":
        print(f"model {summary['model']} (the default for these images: "
              "summary.json options.model_choice; the packaged prior was learned from soft-tissue "
              "sarcomas, --model potts for other tumours)")
    in_order = ["pet", "ct", "mr"]
    if (by_default and summary["model"] == "potts" and summary["modality"] != in_order
            and sorted(summary["modality"]) == sorted(in_order)
            and default_model(in_order, options) == "locate-potts"):
        print("model potts: the PET + CT + MR default (locate-potts) needs the images in the order "
              f"pet, ct, mr (these came as {','.join(summary['modality'])})")
    volume = posterior.volume_interval()
    print(f"tumour volume {volume['mean']:.2f} mL, 95% interval "
          f"[{volume['lower']:.2f}, {volume['upper']:.2f}] mL")
    own = summary.get("diagnostics", {}).get("volume_error", {})
    if own.get("applied"):
        contour_ml = float(posterior.contour(0.5).sum()) * posterior.reference.voxel_volume_ml
        print(f"  (the manual GTV's volume predicted from the model's "
              f"{own['uncalibrated_volume_ml']['mean']:.2f} mL by the between-patient error its prior "
              f"learned; the 50 % contour holds {contour_ml:.2f} mL: summary.json diagnostics.volume_error)")


def _run_segment(args) -> int | None:
    if args.batch is not None:
        return _run_batch(args)
    if not args.images:
        raise InputError("segment", "needs at least one image (or --batch CASES.json)")
    dicom_outputs = args.rtstruct is not None or args.dicom_seg
    if dicom_outputs or any(os.path.isdir(p) for p in args.images):
        check_dicom_outputs(args.images, args.out, rtstruct_reference=args.rtstruct,
                            dicom_seg=args.dicom_seg, series_uid=args.series,
                            overwrite=args.overwrite)
    kwargs = _segment_kwargs(args)
    if args.series and args.rtstruct is not None:  # UIDs may name the reference series alone
        kwargs["series_uid"] = sorted(series_held(args.images, args.series)) or None
    dicom_written = {}

    def write_dicom(posterior, folder):
        dicom_written.update(write_posterior_dicom(
            posterior, folder, images=args.images, levels_percent=kwargs["levels_percent"],
            rtstruct_reference=args.rtstruct, dicom_seg=args.dicom_seg, series_uid=args.series))

    posterior = segment(args.images, args.out, also_write=write_dicom if dicom_outputs else None,
                        **kwargs)
    if dicom_written:
        print(f"DICOM: {', '.join(p.name for p in dicom_written.values())}")
    for warning in posterior.summary.get("warnings", []):
        print(f"vbseg: warning: {warning['code']}: {warning['message']}", file=sys.stderr)
    _print_model_and_volume(posterior, option_values(args))
    timings = posterior.summary["timings_s"]
    for entry in posterior.summary.get("volume_ml_conformal", []):
        print(f"conformal {entry['level']:.0%} interval [{entry['lower']:.2f}, {entry['upper']:.2f}] mL "
              f"(n = {entry['n']} calibration cases, stratum {entry['stratum']})")
        print("  " + "; ".join(_conformal_contour_text(entry)))
    print(f"compile {timings['compile']:.2f} s, run {timings['run']:.2f} s; outputs in {args.out}")


def _conformal_contour_text(entry) -> list[str]:
    """One phrase per conformal contour of a volume_ml_conformal entry: its file and what it is."""
    alpha = f"{1 - entry['level']:.2g}"

    def dilation(margin_mm):
        return "the whole map" if margin_mm is None else f"the 50 % contour + {margin_mm:g} mm"

    threshold = entry["contour_crc"]["threshold"]
    texts = [f"{entry['contour_crc']['file']}: P >= {threshold:.3g}"
             f"{' (the whole map)' if threshold <= 0 else ''} (E[FNR] <= {alpha})"]
    if "contour_crc_margin" in entry:
        texts.append(f"{entry['contour_crc_margin']['file']}: "
                     f"{dilation(entry['contour_crc_margin']['margin_mm'])} (E[FNR] <= {alpha})")
    texts.append(f"{entry['contour_margin']['file']}: {dilation(entry['contour_margin']['margin_mm'])} "
                 f"(contains the lesion: {entry['level']:.0%})")
    return texts


def _phantom_spec(args):
    if args.diameters is None:
        diameters = (22.0,)
    elif args.diameters.strip().lower() == "nema":
        diameters = NEMA_DIAMETERS_MM
    else:
        diameters = tuple(_number_list("--diameters", args.diameters))
    try:
        return PhantomSpec(kind=args.kind, diameters_mm=diameters, contrast=args.contrast,
                           cv=args.cv, noise=args.noise, psf_fwhm_mm=args.psf_fwhm)
    except ValueError as exc:
        raise InputError("phantom", str(exc)) from None


PHANTOM_FILES = ("pet.nii.gz", "ct.nii.gz", "truth.nii.gz", "truth_fraction.nii.gz")


def _check_free(folder: Path, names, overwrite: bool) -> None:
    check_outputs(folder, list(names), [], overwrite)


def _run_phantom(args) -> None:
    check_seed(args.seed)
    spec = _phantom_spec(args)
    out = check_output_folder(args.out)  # "" is no folder
    _check_free(out, PHANTOM_FILES, args.overwrite)
    phantom = make_phantom(spec, seed=args.seed)
    phantom.save(out)
    print(f"phantom ({spec.kind}, seed {args.seed}): lesion volume {phantom.volume_ml:.3f} mL; "
          f"files {', '.join(PHANTOM_FILES)} in {out}")


def _run_demo(args) -> None:
    check_seed(args.seed)
    out = check_output_folder(DEMO_DIR if args.out is None else args.out)  # "" is no folder
    overwrite = args.overwrite or args.out is None  # the demo may replace its own default folder
    _check_free(out / "inputs", PHANTOM_FILES, overwrite)
    spec = PhantomSpec()
    phantom = make_phantom(spec, seed=args.seed)
    paths = phantom.save(out / "inputs")
    title = (f"vbseg demo: {spec.diameters_mm[0]:g} mm sphere, {spec.contrast:g}:1, "
             f"CV {spec.cv:.0%}, PSF {spec.psf_fwhm_mm:g} mm (modelled), PET+CT")
    posterior = segment([paths["pet"], paths["ct"]], out, modalities=["pet", "ct"],
                        psf_fwhm_mm=spec.psf_fwhm_mm, seed=args.seed, overwrite=overwrite,
                        title=title)
    volume = posterior.volume_interval()
    timings = posterior.summary["timings_s"]
    rows = [
        ("phantom", f"{spec.diameters_mm[0]:g} mm sphere, contrast {spec.contrast:g}:1, CV "
                    f"{spec.cv:.0%}, PSF {spec.psf_fwhm_mm:g} mm; PET + CT (resampled)"),
        ("model", f"hidden Potts, PSF-blurred PET likelihood (--psf-fwhm {spec.psf_fwhm_mm:g}); "
                  "PET decides, the CT is resampled but not modelled (--fusion pet, the default)"),
        ("true volume", f"{phantom.volume_ml:.2f} mL"),
        ("posterior mean volume", f"{volume['mean']:.2f} mL"),
        ("95% credible interval", f"[{volume['lower']:.2f}, {volume['upper']:.2f}] mL "
                                  "(independent-voxel draws: too narrow, see summary.json)"),
        ("Dice of 50% contour", f"{dice(posterior.contour(0.5), phantom.truth):.3f}"),
        ("ECE (15 bins)", f"{expected_calibration_error(posterior.probability, phantom.truth):.4f}"),
        ("compile time", f"{timings['compile']:.2f} s"),
        ("run time", f"{timings['run']:.2f} s"),
        ("outputs", f"{out}/ (prob.nii.gz, contour_*.nii.gz, summary.json, overview.png)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by calibrate
    try:
        enable_compilation_cache()
        commands = {"segment": _run_segment, "demo": _run_demo, "phantom": _run_phantom,
                    "experiment": _run_experiment, "calibrate": _run_calibrate,
                    "convert": _run_convert,
                    "fit-prior": _run_fit_prior, "train": _run_train}
        status = commands[args.command](args)
    except VbsegError as error:  # one line per problem (several only from InputErrors)
        for line in str(error).splitlines():
            print(f"vbseg: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the writers have removed their partial files on the way out
        return report_interrupted()
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
