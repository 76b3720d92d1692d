"""Is the partial-volume model's volume posterior unbiased and honest? pv-potts against the PSF
hidden Potts model (psf_fixed) on the same phantom draws that are NOT the model's own.

Phantoms (:func:`non_native_phantom`): a sphere of given diameter and contrast (background 1)
as a continuous object, sampled 4 x 4 x 4 per voxel, blurred at that fine resolution by the
scanner's Gaussian PSF (6 mm FWHM), averaged onto 4 x 4 x 3 mm voxels, then noise: Poisson
counts (scaled so the background CV is 10 %) on even seeds, Gaussian noise of CV 10 %
correlated by a 4 mm kernel on odd seeds. The FWHM given to the fits is the true one, 1 mm
less or 1 mm more, cycling with the seed. The sphere centre is offset by a random sub-voxel
shift. Truth: the physical volume pi d^3 / 6, the voxel-centre mask (Dice, ECE) and the
supersampled fraction.

Per draw and method: posterior mean volume, 95 % interval, its coverage of the physical
volume and Winkler interval score, Dice of the 50 % contour, ECE (15 bins, binary truth),
fit time (compile apart). Pooled per (diameter, contrast) cell: mean volume error, coverage
with its Clopper-Pearson 95 % CI, mean interval score / V, Dice, ECE, median run and compile
seconds.

Regenerate (the design committed; minutes depend on the machine's load):
    python -m benchmarks.bench_pv --diameters 13,17,22,28 --contrasts 4,8 --seeds 25
then pv-potts with ``--psf-sd 1`` (the FWHM's prior sd, five fits mixed) on the same draws, kept
beside them (about 95 minutes on 2 busy cores):
    python -m benchmarks.bench_pv --diameters 13,17,22,28 --contrasts 4,8 --seeds 25 \\
        --methods psf_fixed,pv_potts,pv_psf_sd --extend
then both models with ``--noise-fwhm 4`` on the correlated draws (the noise kernel known, as a
user who knows the reconstruction's post-filter would give it; none on the Poisson draws):
    python -m benchmarks.bench_pv --diameters 13,17,22,28 --contrasts 4,8 --seeds 25 \\
        --methods psf_fixed,pv_potts,pv_psf_sd,psf_noise,pv_noise --extend
then pv-potts with both (``--psf-sd 1 --noise-fwhm 4``) at 13 mm only (the worst cells; about
20 minutes), and the report of every method over the whole design. On the Poisson draws a
``--noise-fwhm`` method is its plain twin's fit (no kernel given, same seed), so ``--extend``
copies the twin's row when it is stored (``copied_from``) rather than fitting it again:
    python -m benchmarks.bench_pv --diameters 13 --contrasts 4,8 --seeds 25 \\
        --methods psf_fixed,pv_potts,pv_psf_sd,psf_noise,pv_noise,pv_psf_sd_noise --extend
    python -m benchmarks.bench_pv --diameters 13,17,22,28 --contrasts 4,8 --seeds 25 \\
        --methods psf_fixed,pv_potts,pv_psf_sd,psf_noise,pv_noise,pv_psf_sd_noise --report
and the NEMA part (pv-potts with --wall-mm 0, 1.0, 1.5 beside the PSF Potts model on nema1;
skips with a message when ../shared/data has no NEMA scan):
    python -m benchmarks.bench_nema --methods psf_vb,pv_wall0,pv_wall1.0,pv_wall1.5 \\
        --spheres 13,17,22 --out benchmarks/results/pv_nema
Writes benchmarks/results/bench_pv.{json,md} (after every draw, so a stopped run keeps its draws;
``--report`` rewrites the .md from the .json without fitting). ``--beta auto`` (the beta grid weighted by
exp(ELBO - log Z)) beside both, on fewer draws (50-120 s a fit on 2 busy cores):
    python -m benchmarks.bench_pv --diameters 13,22 --contrasts 4,8 --seeds 6 \\
        --methods psf_fixed,pv_potts,pv_beta_auto --name bench_pv_beta
which writes benchmarks/results/bench_pv_beta.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.stats import binomtest

import vbseg
from benchmarks.common import RESULTS, machine, write_report
from vbseg.io.volume import save_nifti
from vbseg.metrics import dice, expected_calibration_error, interval_score
from vbseg.potts.psf import FWHM_TO_SIGMA

LEVEL = 0.95
SUPERSAMPLE = 4
SPACING = (4.0, 4.0, 3.0)
PSF_FWHM = 6.0
CV = 0.10
MARGIN_MM = 24.0
NOISE_FWHM = 4.0  # the kernel correlating the Gaussian noise of odd seeds
# a method's noise_fwhm_mm = KNOWN_NOISE: --noise-fwhm NOISE_FWHM on the correlated draws, none
# on the Poisson ones (a user who knows the reconstruction's noise correlation says so)
KNOWN_NOISE = "known"
# name: (model, further segment options); --methods picks them (default the first two)
METHODS = {"psf_fixed": ("potts", {}), "pv_potts": ("pv-potts", {}),
           "pv_beta_auto": ("pv-potts", {"beta": "auto"}),
           "pv_psf_sd": ("pv-potts", {"psf_sd_mm": 1.0}),
           "psf_noise": ("potts", {"noise_fwhm_mm": KNOWN_NOISE}),
           "pv_noise": ("pv-potts", {"noise_fwhm_mm": KNOWN_NOISE}),
           "pv_psf_sd_noise": ("pv-potts", {"psf_sd_mm": 1.0, "noise_fwhm_mm": KNOWN_NOISE})}
DEFAULT_METHODS = "psf_fixed,pv_potts"
KNOWN_NOISE_METHODS = [name for name, (_, extra) in METHODS.items()
                       if extra.get("noise_fwhm_mm") == KNOWN_NOISE]
# each KNOWN_NOISE method and the method it equals on white-noise draws
NOISE_TWINS = {"psf_noise": "psf_fixed", "pv_noise": "pv_potts", "pv_psf_sd_noise": "pv_psf_sd"}


def non_native_phantom(diameter_mm, contrast, seed):
    """(image (X, Y, Z), fraction, voxel-centre mask, physical volume mL, noise kind)."""
    rng = np.random.default_rng(seed)
    spacing = np.asarray(SPACING)
    shape = tuple(int(np.ceil((diameter_mm + 2 * MARGIN_MM) / s)) for s in spacing)
    fine_spacing = spacing / SUPERSAMPLE
    centre = np.asarray(shape) * spacing / 2 + rng.uniform(-0.5, 0.5, 3) * spacing
    axes = [(np.arange(n * SUPERSAMPLE) + 0.5) * f for n, f in zip(shape, fine_spacing)]
    grid = np.meshgrid(*axes, indexing="ij", sparse=True)
    inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= (diameter_mm / 2) ** 2
    activity = 1.0 + (contrast - 1.0) * inside
    sigma = PSF_FWHM * FWHM_TO_SIGMA / fine_spacing
    blurred = ndimage.gaussian_filter(activity, sigma, mode="nearest")

    def block_mean(values):
        return values.reshape(shape[0], SUPERSAMPLE, shape[1], SUPERSAMPLE, shape[2],
                              SUPERSAMPLE).mean(axis=(1, 3, 5))

    mean, fraction = block_mean(blurred), block_mean(inside.astype(np.float64))
    centres = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
    cgrid = np.meshgrid(*centres, indexing="ij", sparse=True)
    truth = sum((g - c) ** 2 for g, c in zip(cgrid, centre)) <= (diameter_mm / 2) ** 2
    if seed % 2 == 0:  # Poisson counts with background CV = CV
        scale = 1.0 / CV**2
        image, noise = rng.poisson(mean * scale) / scale, "poisson"
    else:  # Gaussian, CV relative to the local mean, correlated by a 4 mm kernel
        white = rng.normal(size=shape)
        correlated = ndimage.gaussian_filter(white, NOISE_FWHM * FWHM_TO_SIGMA / spacing)
        image, noise = mean * (1 + CV * correlated / correlated.std()), "correlated gaussian"
    volume_ml = np.pi * diameter_mm**3 / 6 / 1000
    return image.astype(np.float32), fraction, truth, volume_ml, noise


def twin_rows(rows, diameter, contrast, seed, methods) -> list[dict]:
    """On a white-noise (Poisson, even seed) draw a KNOWN_NOISE method is its twin (the same
    options without --noise-fwhm, the same seed: the same fit), so the twin's row is copied
    under its name (``copied_from`` says so) instead of fitted again."""
    if seed % 2 == 1:
        return []
    copies = []
    for name in methods:
        twin = NOISE_TWINS.get(name)
        found = [r for r in rows if r["method"] == twin and r["diameter_mm"] == diameter
                 and r["contrast"] == contrast and r["seed"] == seed]
        if found:
            copies.append(dict(found[0], method=name, copied_from=twin))
    return copies


def run_draw(diameter, contrast, seed, folder, methods):
    if not methods:
        return []
    image, fraction, truth, volume_ml, noise = non_native_phantom(diameter, contrast, seed)
    fwhm_given = PSF_FWHM + (0.0, -1.0, 1.0)[seed % 3]
    affine = np.diag(list(SPACING) + [1.0])
    path = save_nifti(Path(folder) / f"pet_{seed}.nii.gz", image, affine)
    rows = []
    for name in methods:
        model, extra = METHODS[name]
        if extra.get("noise_fwhm_mm") == KNOWN_NOISE:
            extra = dict(extra, noise_fwhm_mm=NOISE_FWHM if noise == "correlated gaussian" else None)
        start = time.perf_counter()
        posterior = vbseg.segment([path], modalities=["pet"], seed=seed, model=model,
                                  psf_fwhm_mm=fwhm_given, **extra)
        seconds = time.perf_counter() - start
        volume = posterior.volume_interval(LEVEL)
        p = posterior.probability
        timings = posterior.summary["timings_s"]
        rows.append({
            "method": name, "diameter_mm": diameter, "contrast": contrast, "seed": seed,
            "noise": noise, "psf_given_mm": fwhm_given, "true_ml": volume_ml,
            "fraction_ml": float(fraction.sum() * np.prod(SPACING) / 1000),
            "mean_ml": volume["mean"], "lower_ml": volume["lower"], "upper_ml": volume["upper"],
            "covered": bool(volume["lower"] <= volume_ml <= volume["upper"]),
            "interval_score_rel": interval_score(volume["lower"], volume["upper"], volume_ml, LEVEL)
            / volume_ml,
            "volume_error": volume["mean"] / volume_ml - 1.0,
            "dice50": dice(p >= 0.5, truth), "ece": expected_calibration_error(p, truth),
            "compile_s": timings["compile"], "run_s": timings["run"], "wall_s": seconds,
            **chain_record(posterior.summary["diagnostics"]),
        })
        print(f"{diameter:g} mm {contrast:g}:1 seed {seed} ({noise}, PSF {fwhm_given:g}) {name}: "
              f"{volume['mean']:.2f} [{volume['lower']:.2f}, {volume['upper']:.2f}] vs "
              f"{volume_ml:.2f} mL, {seconds:.1f} s", flush=True)
    return rows


def _median_of(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.median(values)) if values else None


def chain_record(diagnostics) -> dict:
    """Split R-hat and ESS of the volume trace (pv-potts's fraction sum; None for psf_fixed,
    whose volume draws are not a Markov chain)."""
    chains = diagnostics.get("fraction_sum_chains") or {}
    return {"r_hat": chains.get("r_hat"), "ess": chains.get("ess")}


def cell_summary(rows) -> dict:
    k, n = sum(r["covered"] for r in rows), len(rows)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return {"draws": n, "covered": k, "coverage": k / n, "ci_low": ci.low, "ci_high": ci.high,
            "volume_error_mean": float(np.mean([r["volume_error"] for r in rows])),
            "volume_error_sd": float(np.std([r["volume_error"] for r in rows])),
            "interval_score_rel": float(np.mean([r["interval_score_rel"] for r in rows])),
            "dice50": float(np.mean([r["dice50"] for r in rows])),
            "ece": float(np.mean([r["ece"] for r in rows])),
            "run_s_median": float(np.median([r["run_s"] for r in rows])),
            "ess_median": _median_of(rows, "ess"), "r_hat_median": _median_of(rows, "r_hat"),
            "compile_s_median": float(np.median([r["compile_s"] for r in rows]))}


def _chains(summary) -> str:
    if summary["ess_median"] is None:
        return "-"
    return f"{summary['ess_median']:.0f} ({summary['r_hat_median']:.2f})"


def markdown(rows, cells, total_s, args) -> str:
    lines = [f"Design: diameters {args.diameters} mm x contrasts {args.contrasts} x "
             f"{args.seeds} seeds; draws done: " + ", ".join(
                 f"{name} {sum(r['method'] == name for r in rows)}" for name in args.method_names) + ". "
             f"Total {total_s / 60:.1f} min.", "",
             "| cell | method | draws | mean vol. error (sd) | 95 % coverage (k/n) | CP 95 % CI | "
             "interval score / V | Dice50 | ECE | median run s (compile s) | median ESS (R-hat) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (diameter, contrast, name), s in cells.items():
        lines.append(
            f"| {diameter:g} mm {contrast:g}:1 | {name} | {s['draws']} | "
            f"{s['volume_error_mean']:+.1%} ({s['volume_error_sd']:.1%}) | "
            f"{s['coverage']:.2f} ({s['covered']}/{s['draws']}) | {s['ci_low']:.2f}-{s['ci_high']:.2f} | "
            f"{s['interval_score_rel']:.3f} | {s['dice50']:.3f} | {s['ece']:.4f} | "
            f"{s['run_s_median']:.2f} ({s['compile_s_median']:.2f}) | {_chains(s)} |")
    lines += ["", "Pooled over all cells:", "", "| method | draws | mean abs vol. error | coverage (k/n) "
              "| CP 95 % CI | interval score / V | Dice50 | ECE | median run s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in args.method_names:
        own = [r for r in rows if r["method"] == name]
        s = cell_summary(own)
        lines.append(f"| {name} | {s['draws']} | "
                     f"{np.mean([abs(r['volume_error']) for r in own]):.1%} | {s['coverage']:.2f} "
                     f"({s['covered']}/{s['draws']}) | {s['ci_low']:.2f}-{s['ci_high']:.2f} | "
                     f"{s['interval_score_rel']:.3f} | {s['dice50']:.3f} | {s['ece']:.4f} | "
                     f"{s['run_s_median']:.2f} |")
    lines += noise_lines(rows, args.method_names)
    targets = [line for model in ("pv_potts", "pv_psf_sd", "pv_beta_auto", "pv_noise", "pv_psf_sd_noise")
               for line in target_lines(rows, cells, args, model)]
    return "\n".join(lines + targets) + "\n"


def noise_lines(rows, method_names) -> list[str]:
    """Each method on the correlated-noise draws alone, by diameter (the ``--noise-fwhm`` methods
    differ from their plain twins only there): mean volume error and coverage."""
    correlated = [r for r in rows if r["noise"] == "correlated gaussian"]
    diameters = sorted({r["diameter_mm"] for r in correlated})
    if not any(name in KNOWN_NOISE_METHODS for name in method_names) or not correlated:
        return []
    lines = ["", "Correlated-noise draws only (where --noise-fwhm acts), mean volume error and "
             "coverage (k/n) by diameter:", "",
             "| method | " + " | ".join(f"{d:g} mm" for d in diameters) + " |",
             "|---|" + "---|" * len(diameters)]
    for name in method_names:
        cells = []
        for d in diameters:
            own = [r for r in correlated if r["method"] == name and r["diameter_mm"] == d]
            cells.append("-" if not own else f"{np.mean([r['volume_error'] for r in own]):+.1%} "
                                             f"({sum(r['covered'] for r in own)}/{len(own)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def target_lines(rows, cells, args, model: str = "pv_potts", reference: str = "psf_fixed") -> list[str]:
    """The partial-volume issue's targets for ``model`` against ``reference``, measured on these
    draws: mean volume error within +-5 % in every cell; pooled 95 % coverage >= 0.85 with an
    interval score no worse; Dice and ECE no worse; median fit time within 3x."""
    if model not in args.method_names or reference not in args.method_names:
        return []
    # paired: the reference on the model's own draws only (a method added later may have fewer)
    drawn = {(r["diameter_mm"], r["contrast"], r["seed"]) for r in rows if r["method"] == model}
    own = {name: cell_summary([r for r in rows if r["method"] == name
                               and (r["diameter_mm"], r["contrast"], r["seed"]) in drawn])
           for name in (model, reference)}
    errors = {key[:2]: s["volume_error_mean"] for key, s in cells.items() if key[2] == model}
    worst = max(errors.items(), key=lambda item: abs(item[1]))
    checks = [
        (f"mean volume error within +-5 % in every cell (worst {worst[0][0]:g} mm {worst[0][1]:g}:1: "
         f"{worst[1]:+.1%})", all(abs(e) <= 0.05 for e in errors.values())),
        (f"pooled 95 % coverage >= 0.85 ({own[model]['coverage']:.2f}, CP {own[model]['ci_low']:.2f}-"
         f"{own[model]['ci_high']:.2f})", own[model]["coverage"] >= 0.85),
        (f"interval score / V no worse than {reference}'s ({own[model]['interval_score_rel']:.3f} vs "
         f"{own[reference]['interval_score_rel']:.3f})",
         own[model]["interval_score_rel"] <= own[reference]["interval_score_rel"]),
        (f"Dice50 and ECE no worse ({own[model]['dice50']:.3f} vs {own[reference]['dice50']:.3f}; "
         f"{own[model]['ece']:.4f} vs {own[reference]['ece']:.4f})",
         own[model]["dice50"] >= own[reference]["dice50"] and own[model]["ece"] <= own[reference]["ece"]),
        (f"median fit time within 3x ({own[model]['run_s_median']:.2f} s vs "
         f"{own[reference]['run_s_median']:.2f} s)",
         own[model]["run_s_median"] <= 3 * own[reference]["run_s_median"]),
    ]
    return ["", f"Targets of the partial-volume issue, {model} against {reference} on these "
            f"{own[model]['draws']} draws:", ""] + [f"* {text}: **{'met' if ok else 'not met'}**"
                                                    for text, ok in checks]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diameters", default="13,22")
    parser.add_argument("--contrasts", default="4,8")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated, from {', '.join(METHODS)} (default {DEFAULT_METHODS})")
    parser.add_argument("--name", default="bench_pv",
                        help="the report's name: writes NAME.json and NAME.md (default bench_pv)")
    parser.add_argument("--extend", action="store_true",
                        help="keep the draws already in NAME.json and fit only the (draw, method) "
                             "pairs it lacks (e.g. a method added to --methods)")
    parser.add_argument("--report", action="store_true",
                        help="rewrite NAME.md from the draws in NAME.json (same design options), no fits")
    args = parser.parse_args(argv)
    args.method_names = args.methods.split(",")
    unknown = sorted(set(args.method_names) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(METHODS)})")
    diameters = [float(d) for d in args.diameters.split(",")]
    contrasts = [float(c) for c in args.contrasts.split(",")]
    if args.report:
        stored = args.out / f"{args.name}.json"
        if not stored.is_file():
            parser.error(f"--report: {stored} not found (run the benchmark first)")
        record = json.loads(stored.read_text())
        report(record["rows"], diameters, contrasts, record["total_s"], args)
        return 0
    start = time.perf_counter()
    kept, earlier_s = stored_rows(args) if args.extend else ([], 0.0)
    rows = list(kept)
    done = {(r["diameter_mm"], r["contrast"], r["seed"], r["method"]) for r in rows}
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.seeds):  # seeds outermost: a stopped run has every cell
            for diameter in diameters:
                for contrast in contrasts:
                    missing = [m for m in args.method_names if (diameter, contrast, seed, m) not in done]
                    copies = twin_rows(rows, diameter, contrast, seed, missing)
                    rows += copies + run_draw(diameter, contrast, seed, folder,
                                              [m for m in missing if m not in {c["method"] for c in copies}])
                    report(rows, diameters, contrasts, earlier_s + time.perf_counter() - start, args)
    print(f"wrote {args.out / (args.name + '.md')}")
    return 0


def stored_rows(args) -> tuple[list, float]:
    """--extend: (every row of NAME.json, its total seconds); none when it is absent."""
    stored = args.out / f"{args.name}.json"
    if not stored.is_file():
        return [], 0.0
    record = json.loads(stored.read_text())
    return list(record["rows"]), float(record["total_s"])


def report(rows, diameters, contrasts, total, args) -> None:
    """Write the results so far (after every draw, so a stopped run leaves its draws)."""
    cells = {(d, c, name): cell_summary(own) for d in diameters for c in contrasts
             for name in args.method_names
             if (own := [r for r in rows if r["diameter_mm"] == d and r["contrast"] == c
                         and r["method"] == name])}
    record = {"machine": machine(), "total_s": total, "rows": rows,
              "cells": [{"diameter_mm": d, "contrast": c, "method": n, **s}
                        for (d, c, n), s in cells.items()]}
    write_report(args.out, args.name, record, __doc__, markdown(rows, cells, total, args))


if __name__ == "__main__":
    raise SystemExit(main())
