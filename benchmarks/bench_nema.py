"""The physical check: per-sphere volumes on the real NEMA IEC body phantom PET scan (nema1).

The scan (../shared/data, MIT, pynemaiqpet) holds six hot spheres of known inner diameter
(10-37 mm) in a warm background, in arbitrary activity units, so only the per-scan models,
which use relative uptake, apply (not the SUV-based population prior). The truth for each
sphere is its *truth-fraction volume*: the data's ``nema1_truth_fraction.nii.gz`` (fraction of
each voxel inside a sphere, from the fitted sphere geometry) summed over the voxels within
the sphere's radius + 5 mm of its centre; it equals the physical volume pi d^3 / 6 of
cases.json to within the supersampling error (both are in the table).

Each sphere is contoured on its own in a spherical VOI of the sphere's radius + 15 mm around
its centre (as a user would draw it; no VOI reaches another sphere: adjacent centres are
57 mm apart on the ring). Per sphere and method: the posterior mean volume, its 95 %
interval, the relative volume error of the mean, whether the interval covers the truth and
the z-score z = (V_true - mean) / sd of the posterior volume draws (|z| <= 2 is what a
calibrated posterior gives about 95 % of the time), and Dice of the 50 % contour against
the sphere's label. Methods (all ``vbseg.segment`` on the saved VOI mask):

* ``nopsf_vb``: hidden Potts, K = 2, beta 0.5, no PSF term (mean-field VB, independent
  voxel draws);
* ``nopsf_gibbs``: the same model sampled by checkerboard Gibbs from the VB solution;
* ``psf_vb``: the PSF-blurred likelihood at the phantom's fitted PSF FWHM (4.23 mm,
  cases.json ``fitted``), beta 1.5 (mean-field);
* ``psf_gibbs``: the same PSF model sampled by the PSF-aware Gibbs sampler (labels, class
  means and precisions drawn jointly);
* ``threshold40``, ``threshold50``: 40 % / 50 % of the VOI's maximum (a mask; no interval);
* ``pv_wall0``, ``pv_wall1.0``, ``pv_wall1.5`` (not run by default): the partial-volume model
  (``--model pv-potts``) at the fitted PSF, with a cold glass wall of 0, 1.0 or 1.5 mm in
  its forward model (``--wall-mm``); run by ``benchmarks/bench_pv.py``'s NEMA part;
  ``pv_beta_auto`` (not run by default): pv-potts with ``--beta auto``, no wall, by
  ``python -m benchmarks.bench_nema --methods psf_vb,pv_wall0,pv_beta_auto --out
  benchmarks/results/pv_nema_beta``; ``pv_psf_sd`` (not run by default): pv-potts with the
  fitted FWHM given a 1 mm sd (``--psf-sd 1``), no wall, by ``python -m benchmarks.bench_nema
  --methods psf_vb,pv_wall0,pv_psf_sd --out benchmarks/results/pv_nema_psf_sd``;
  ``psf_noise`` and ``pv_noise`` (not run by default): the PSF Potts model and pv-potts with
  ``--noise-fwhm`` measured from the background's neighbour correlations
  (:func:`noise_kernel_fwhm`), no wall, by ``python -m benchmarks.bench_nema --methods
  psf_vb,psf_noise,pv_wall0,pv_noise --out benchmarks/results/pv_nema_noise``.

Regenerate (65 minutes on 2 busy cores, nearly all of it ``psf_gibbs``, ~10 minutes a sphere;
the other methods take seconds):
    python -m benchmarks.bench_nema
Writes benchmarks/results/bench_nema.{json,md}. ``--spheres`` / ``--methods`` choose a subset
(the smoke test runs one sphere, one method). Skips with a message when ../shared/data or its
NEMA scan is absent.

**Conformal volume intervals per sphere** (issue 22; ``--calibration FILE``): the chosen methods
are fitted with ``calibration=FILE`` (their fit options must be the calibration's) and each row
gains the conformal 90 % and 95 % volume intervals (``summary.json["volume_ml_conformal"]``),
whether each covers the truth and its width relative to the true volume; the report counts the
covered spheres with an exact Clopper-Pearson 95 % interval and summarises the calibration file
(what ``vbseg calibrate`` recorded: cases and conformal quantile per stratum, the model
interval's coverage over the calibration phantoms). The calibration of
benchmarks/configs/conformal_nema_matched.toml is matched to this one scan (its grid, fitted PSF,
image-estimated contrast and background noise; not its sphere labels) and segments each phantom
sphere as ``run_sphere`` segments a NEMA sphere (spherical VOI of radius + 15 mm, psf_vb's
options): a check of one scanner/reconstruction on the scan its nuisance parameters came from,
not an independent test. ``--voi-margin M`` changes the VOI (radius + M mm) to see how much the
scan's volumes depend on it. Regenerate (about 1 + 1 minutes on 2 busy cores):
    vbseg calibrate benchmarks/configs/conformal_nema_matched.toml --strata volume --volume-bins 2 \\
        --out benchmarks/results/nema_matched_calibration.json --overwrite
    python -m benchmarks.bench_nema --methods psf_vb \\
        --calibration benchmarks/results/nema_matched_calibration.json
Writes benchmarks/results/bench_nema_conformal.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

import vbseg
from benchmarks.bench_conformal import clopper_pearson
from benchmarks.common import RESULTS, machine, write_report
from vbseg.calibration.calibration_file import DEFAULT_CONFORMAL_LEVELS
from vbseg.calibration.conformal import conformal_quantile
from vbseg.io.volume import save_nifti
from vbseg.metrics import dice, interval_score
from vbseg.phantoms import world_coordinates
from vbseg.potts.psf import noise_fwhm_from_correlation

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LEVEL = 0.95
VOI_MARGIN_MM = 15.0
TRUTH_MARGIN_MM = 5.0
METHODS = {
    "nopsf_vb": dict(psf=False, sampler="vb"),
    "nopsf_gibbs": dict(psf=False, sampler="gibbs"),
    "psf_vb": dict(psf=True, sampler="vb"),
    "psf_gibbs": dict(psf=True, sampler="gibbs"),
    "threshold40": dict(model="threshold40"),
    "threshold50": dict(model="threshold50"),
    # the partial-volume model (--model pv-potts, 9 fraction levels) with a cold glass wall of
    # 0, 1.0 and 1.5 mm in its PET forward model (--wall-mm); not in the default --methods
    "pv_wall0": dict(model="pv-potts", psf=True),
    "pv_wall1.0": dict(model="pv-potts", psf=True, wall_mm=1.0),
    "pv_wall1.5": dict(model="pv-potts", psf=True, wall_mm=1.5),
    # pv-potts with --beta auto (the beta grid weighted by exp(ELBO - log Z)), no wall
    "pv_beta_auto": dict(model="pv-potts", psf=True, beta="auto"),
    # pv-potts with the fitted FWHM given a 1 mm sd (--psf-sd 1), no wall
    "pv_psf_sd": dict(model="pv-potts", psf=True, psf_sd_mm=1.0),
    # the PSF Potts model and pv-potts with --noise-fwhm measured from the background's
    # neighbour correlations (noise_kernel_fwhm), no wall
    "psf_noise": dict(psf=True, noise=True),
    "pv_noise": dict(model="pv-potts", psf=True, noise=True),
}
# the conformal levels a calibration adds (vbseg segment --calibration's default levels)
CONFORMAL_LEVELS = DEFAULT_CONFORMAL_LEVELS
REGENERATE_CONFORMAL = (
    "vbseg calibrate benchmarks/configs/conformal_nema_matched.toml --strata volume --volume-bins 2 "
    "--out benchmarks/results/nema_matched_calibration.json --overwrite",
    "python -m benchmarks.bench_nema --methods psf_vb --calibration "
    "benchmarks/results/nema_matched_calibration.json")
DEFAULT_METHODS = ("nopsf_vb", "nopsf_gibbs", "psf_vb", "psf_gibbs", "threshold40", "threshold50")


def load_nema(shared: Path) -> dict | None:
    """The NEMA case's record from cases.json plus its images, or None when absent."""
    index = shared / "cases.json"
    if not index.is_file():
        return None
    case = next((c for c in json.loads(index.read_text()) if c["case"] == "nema1"), None)
    if case is None:
        return None
    entry = case["modalities"]["pet"]
    paths = {key: shared / entry[key] for key in ("image", "label", "truth_fraction")}
    if not all(p.is_file() for p in paths.values()):
        return None
    image = nib.load(paths["image"])
    return {"case": case, "pet_path": paths["image"], "affine": image.affine,
            "shape": image.shape[:3], "spacing": np.asarray(image.header.get_zooms()[:3], float),
            "label": np.asarray(nib.load(paths["label"]).dataobj),
            "fraction": np.asarray(nib.load(paths["truth_fraction"]).dataobj, np.float64)}


def image_noise(nema) -> dict:
    """The background noise of the scan, from its image alone (what conformal_nema_matched.toml
    was set from): voxels >= 20 mm beyond every sphere, >= 45 mm from the ring axis (outside the
    lung insert), within 40 mm of the ring plane, whose 7-voxel local mean is within 25 % of the
    fitted background, eroded by 4 voxels; their COV and the correlation of neighbours at lags
    1-2 along each axis; and the COV in the 37 mm sphere's core (>= 6 mm inside its wall)."""
    image = np.asarray(nib.load(nema["pet_path"]).dataobj, np.float64)
    fitted, world = nema["case"]["fitted"], nema["world"]
    offset = world - np.asarray(fitted["ring_centre_ras_mm"])
    normal = np.asarray(fitted["ring_normal_ras"])
    axial = offset @ normal
    radial = np.linalg.norm(offset - axial[..., None] * normal, axis=-1)
    background = (radial > 45) & (np.abs(axial) < 40) & (
        np.abs(ndimage.uniform_filter(image, 7) / fitted["background"] - 1) < 0.25)
    for sphere in nema["case"]["spheres"]:
        distance = np.linalg.norm(world - np.asarray(sphere["centre_ras_mm"]), axis=-1)
        background &= distance > sphere["inner_diameter_mm"] / 2 + 20
    background = ndimage.binary_erosion(background, iterations=4)
    correlation = {}
    for axis in range(3):
        for lag in (1, 2):
            ahead, behind = [slice(None)] * 3, [slice(None)] * 3
            ahead[axis], behind[axis] = slice(lag, None), slice(0, -lag)
            both = background[tuple(ahead)] & background[tuple(behind)]
            pair = np.corrcoef(image[tuple(ahead)][both], image[tuple(behind)][both])[0, 1]
            correlation[f"axis{axis}_lag{lag}"] = float(pair)
    largest = max(nema["case"]["spheres"], key=lambda sphere: sphere["inner_diameter_mm"])
    core = image[np.linalg.norm(world - np.asarray(largest["centre_ras_mm"]), axis=-1)
                 < largest["inner_diameter_mm"] / 2 - 6]
    values = image[background]
    return {"background_voxels": int(background.sum()), "background_mean": float(values.mean()),
            "background_cov": float(values.std() / values.mean()), "correlation": correlation,
            "core_mean_over_background": float(core.mean() / values.mean()),
            "core_cov": float(core.std() / core.mean()),
            "core_sd_over_background_sd": float(core.std() / values.std())}


def noise_kernel_fwhm(nema) -> float:
    """The --noise-fwhm of the scan: the mean over the axes of the kernel FWHM whose neighbour
    correlation is the background's at lag 1 (:func:`image_noise`,
    :func:`vbseg.potts.psf.noise_fwhm_from_correlation`)."""
    correlation = image_noise(nema)["correlation"]
    return float(np.mean([noise_fwhm_from_correlation(correlation[f"axis{axis}_lag1"], spacing)
                          for axis, spacing in enumerate(nema["spacing"])]))


def conformal_columns(posterior, true_ml: float) -> dict:
    """The conformal volume intervals of a fit made with a calibration, by level: bounds,
    whether each covers ``true_ml``, width / true volume, and the stratum and its n."""
    columns = {}
    for entry in posterior.summary.get("volume_ml_conformal", []):
        key = f"conformal{round(entry['level'] * 100):d}"
        columns[key] = {"lower_ml": entry["lower"], "upper_ml": entry["upper"],
                        "covered": bool(entry["lower"] <= true_ml <= entry["upper"]),
                        "width_rel": (entry["upper"] - entry["lower"]) / true_ml,
                        "score": entry["score"], "stratum": entry["stratum"], "n": entry["n"]}
    return columns


def run_sphere(nema, sphere, methods, folder, psf_fwhm, calibration=None,
               voi_margin_mm=VOI_MARGIN_MM, noise_fwhm=None) -> list[dict]:
    radius = sphere["inner_diameter_mm"] / 2
    distance = np.linalg.norm(nema["world"] - np.asarray(sphere["centre_ras_mm"]), axis=-1)
    voi = distance <= radius + voi_margin_mm
    voi_path = save_nifti(Path(folder) / f"voi_{sphere['label']}.nii.gz", voi.astype(np.uint8),
                          nema["affine"])
    voxel_ml = float(np.prod(nema["spacing"])) / 1000
    true_ml = float(nema["fraction"][distance <= radius + TRUTH_MARGIN_MM].sum() * voxel_ml)
    label = nema["label"] == sphere["label"]
    rows = []
    for name in methods:
        spec = METHODS[name]
        start = time.perf_counter()
        posterior = vbseg.segment(
            [nema["pet_path"]], modalities=["pet"], roi=voi_path, model=spec.get("model", "potts"),
            psf_fwhm_mm=psf_fwhm if spec.get("psf") else None, sampler=spec.get("sampler", "vb"),
            wall_mm=spec.get("wall_mm"), beta=spec.get("beta"), psf_sd_mm=spec.get("psf_sd_mm"),
            noise_fwhm_mm=noise_fwhm if spec.get("noise") else None, calibration=calibration)
        seconds = time.perf_counter() - start
        volume = posterior.volume_interval(LEVEL)
        draws = np.asarray(posterior.volume_draws_ml, np.float64)
        sd = float(np.std(draws)) if np.ptp(draws) > 0 else 0.0  # a mask: no spread, no z
        rows.append({
            "method": name, "sphere": sphere["label"], "diameter_mm": sphere["inner_diameter_mm"],
            "true_ml": true_ml, "physical_ml": sphere["volume_ml"], "mean_ml": volume["mean"],
            "lower_ml": volume["lower"], "upper_ml": volume["upper"], "sd_ml": sd,
            "volume_error": volume["mean"] / true_ml - 1.0,
            "covered": bool(volume["lower"] <= true_ml <= volume["upper"]),
            "z": (true_ml - volume["mean"]) / sd if sd > 0 else None,
            "interval_score_ml": interval_score(volume["lower"], volume["upper"], true_ml, LEVEL),
            "dice50": dice(posterior.contour(0.5) & voi, label),
            "beta": posterior.summary.get("parameters", {}).get("beta"),
            "volume_method": volume["method"], "seconds": seconds,
            "width_rel": (volume["upper"] - volume["lower"]) / true_ml,
            **conformal_columns(posterior, true_ml),
        })
        print(f"sphere {sphere['inner_diameter_mm']:g} mm {name}: {volume['mean']:.3f} mL "
              f"[{volume['lower']:.3f}, {volume['upper']:.3f}] vs {true_ml:.3f}, {seconds:.1f} s",
              flush=True)
    return rows


def _cell(row) -> str:
    error = f"{row['volume_error']:+.0%}"
    if row["z"] is None:
        return f"{row['mean_ml']:.2f} ({error}; no interval)"
    return (f"{row['mean_ml']:.2f} [{row['lower_ml']:.2f}, {row['upper_ml']:.2f}] "
            f"({error}, z {row['z']:+.1f})")


def markdown(rows, methods, psf_fwhm, total_s, noise_fwhm=None) -> str:
    spheres = sorted({r["sphere"] for r in rows})
    by = {(r["sphere"], r["method"]): r for r in rows}
    noise = ("" if noise_fwhm is None else f" --noise-fwhm of the *_noise methods: {noise_fwhm:.2f} mm "
             "(from the background's neighbour correlations, noise_kernel_fwhm).")
    lines = [f"PSF FWHM for the PSF model: {psf_fwhm:g} mm (cases.json fitted value).{noise} "
             f"Total {total_s / 60:.1f} min on this machine.", "",
             "Posterior mean volume mL [95 % interval] (relative error of the mean, z-score of the "
             "truth in the posterior):", "",
             "| sphere | true mL (physical) | " + " | ".join(methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for s in spheres:
        first = by[(s, methods[0])]
        lines.append(f"| {first['diameter_mm']:g} mm | {first['true_ml']:.3f} ({first['physical_ml']:.3f}) | "
                     + " | ".join(_cell(by[(s, m)]) for m in methods) + " |")
    lines += ["", "Per method over the spheres (all six, and the five of >= 13 mm):", "",
              "| method | covered | mean abs vol. error (>= 13 mm) | mean interval score mL | "
              "mean abs z | Dice50 mean (>= 13 mm) | median s |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        own = [by[(s, m)] for s in spheres]
        large = [r for r in own if r["diameter_mm"] >= 13]
        zs = [abs(r["z"]) for r in own if r["z"] is not None]
        lines.append(
            f"| {m} | {sum(r['covered'] for r in own)}/{len(own)} | "
            f"{np.mean([abs(r['volume_error']) for r in own]):.1%} "
            f"({np.mean([abs(r['volume_error']) for r in large]) if large else float('nan'):.1%}) | "
            f"{np.mean([r['interval_score_ml'] for r in own]):.2f} | "
            f"{f'{np.mean(zs):.1f}' if zs else '-'} | "
            f"{np.mean([r['dice50'] for r in own]):.3f} "
            f"({np.mean([r['dice50'] for r in large]) if large else float('nan'):.3f}) | "
            f"{np.median([r['seconds'] for r in own]):.1f} |")
    return "\n".join(lines) + "\n"


def calibration_summary(path: Path) -> dict:
    """What ``vbseg calibrate`` recorded in the calibration file, summarised (no fit of its
    own): per stratum its n, how many of its phantoms the model's own 95 % interval covered
    (volume score <= 0) and the conformal log-volume quantile per level; per diameter the
    median relative error of the posterior mean over the phantoms."""
    record = json.loads(Path(path).read_text())
    cases = record["cases"]
    strata = {}
    for label in sorted({c["stratum"] for c in cases}):
        scores = [c["volume_score"] for c in cases if c["stratum"] == label]
        strata[label] = {"n": len(scores), "model_covered": sum(x <= 0 for x in scores),
                         "q": {f"{level:g}": conformal_quantile(scores, 1 - level / 100)
                               for level in CONFORMAL_LEVELS}}
    errors = {}
    for c in cases:
        errors.setdefault(c["case"]["spec"]["diameters_mm"], []).append(c["mean_ml"] / c["true_ml"] - 1)
    return {"path": str(path), "command": record["command"], "n": len(cases),
            "voi_margin_mm": sorted({c["case"].get("voi_margin_mm") for c in cases}, key=str),
            "options": record["options"], "strata_bins": record["strata"]["bins"], "strata": strata,
            "median_error_by_diameter": {f"{d:g}": float(np.median(e)) for d, e in sorted(errors.items())}}


def _interval_cell(lower, upper, covered, width) -> str:
    return f"[{lower:.2f}, {upper:.2f}] {'yes' if covered else 'NO'} ({width:.0%})"


def conformal_markdown(rows, methods, calibration, total_s) -> str:
    """Per sphere: truth, posterior mean, the model's 95 % and the conformal 90 % / 95 %
    intervals (covers? width / true volume); the counts over the spheres with exact CIs; the
    calibration file's own record."""
    keys = [f"conformal{level:g}" for level in CONFORMAL_LEVELS]
    lines = [f"Calibration: `{calibration['path']}`, {calibration['n']} phantoms, made by "
             f"`{calibration['command']}`. Total {total_s / 60:.1f} min for the fits on this machine.", "",
             "Regenerate: `" + "`, then `".join(REGENERATE_CONFORMAL) + "`.", "",
             "Interval [lower, upper] mL, whether it covers the true volume, and its width / true "
             "volume:", ""]
    for method in methods:
        own = sorted((r for r in rows if r["method"] == method), key=lambda r: r["diameter_mm"])
        lines += [f"**{method}**", "",
                  "| sphere | true mL | mean mL (error) | model 95 % | conformal 90 % | conformal 95 % | "
                  "stratum (n) |", "|---|---|---|---|---|---|---|"]
        for r in own:
            cells = [_interval_cell(r["lower_ml"], r["upper_ml"], r["covered"], r["width_rel"])]
            cells += [_interval_cell(r[k]["lower_ml"], r[k]["upper_ml"], r[k]["covered"], r[k]["width_rel"])
                      if k in r else "-" for k in keys]
            stratum = f"{r[keys[0]]['stratum']} ({r[keys[0]]['n']})" if keys[0] in r else "-"
            lines.append(f"| {r['diameter_mm']:g} mm | {r['true_ml']:.3f} | {r['mean_ml']:.3f} "
                         f"({r['volume_error']:+.1%}) | " + " | ".join(cells) + f" | {stratum} |")
        lines += ["", "| interval | covered | exact 95 % CI of the coverage (Clopper-Pearson) | "
                      "nominal level inside the CI |", "|---|---|---|---|"]
        for name, key, level in [("model 95 %", None, 95.0)] + [
                (f"conformal {level:g} %", k, level) for level, k in zip(CONFORMAL_LEVELS, keys)]:
            hits = sum(r["covered"] if key is None else r.get(key, {}).get("covered", False) for r in own)
            low, high = clopper_pearson(hits, len(own))
            inside = "yes" if low <= level / 100 <= high else "NO (CI excludes it)"
            lines.append(f"| {name} | {hits}/{len(own)} | [{low:.2f}, {high:.2f}] | {inside} |")
        lines.append("")
    lines += [f"With {len({r['sphere'] for r in rows})} spheres the counts cannot tell 90 % from "
              "95 % coverage (6/6 has CI [0.54, 1.00], 5/6 [0.36, 1.00]); they can show a gross "
              "failure.", "",
              "The calibration phantoms, from what `vbseg calibrate` recorded (no fit of their own): "
              f"strata by the model's mean volume, edges {calibration['strata_bins']} mL.", "",
              "| stratum | n | model 95 % interval covered | conformal factor e^q at 90 % | at 95 % |",
              "|---|---|---|---|---|"]
    for label, entry in calibration["strata"].items():
        q = entry["q"]
        lines.append(f"| {label} | {entry['n']} | {entry['model_covered']}/{entry['n']} | "
                     + " | ".join(f"{np.exp(q[f'{level:g}']):.3f}" for level in CONFORMAL_LEVELS) + " |")
    lines += ["", "Median relative error of the posterior mean over the calibration phantoms, by "
              "diameter (the NEMA spheres' own errors are in the table above): "
              + ", ".join(f"{d} mm {e:+.1%}" for d, e in calibration["median_error_by_diameter"].items())
              + ".", ""]
    return "\n".join(lines) + "\n"


def noise_markdown(noise) -> str:
    lags = ", ".join(f"{'xyz'[a]} {noise['correlation'][f'axis{a}_lag1']:+.2f} / "
                     f"{noise['correlation'][f'axis{a}_lag2']:+.2f}" for a in range(3))
    return ("The scan's noise, from its image alone (`image_noise`; what the matched config was set "
            f"from): background COV {noise['background_cov']:.3f} over {noise['background_voxels']} "
            f"voxels (mean {noise['background_mean']:.0f}); neighbour correlation at lag 1 / 2: {lags}; "
            f"37 mm sphere core: mean {noise['core_mean_over_background']:.1f} x background, COV "
            f"{noise['core_cov']:.3f}, sd {noise['core_sd_over_background_sd']:.1f} x the background's "
            "(Poisson noise: sd ratio sqrt(mean ratio); Gaussian noise of a fixed CV: the mean ratio).\n\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder")
    parser.add_argument("--spheres", default="10,13,17,22,28,37", help="inner diameters in mm")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--voi-margin", type=float, default=VOI_MARGIN_MM,
                        help="each sphere's VOI: radius + this many mm (default %(default)g)")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="a vbseg calibration JSON: fit the methods with it and report the conformal "
                             "volume intervals per sphere (bench_nema_conformal.{json,md})")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    nema = load_nema(args.shared)
    if nema is None:
        print(f"bench_nema: skipped, the NEMA scan nema1 is not in {args.shared}")
        return 0
    wanted = {float(d) for d in args.spheres.split(",")}
    spheres = [s for s in nema["case"]["spheres"] if s["inner_diameter_mm"] in wanted]
    if not spheres:
        parser.error(f"--spheres: none of {sorted(wanted)} mm is a NEMA sphere")
    nema["world"] = world_coordinates(nema["affine"], nema["shape"])
    psf_fwhm = float(nema["case"]["fitted"]["psf_fwhm_mm"])
    noise_fwhm = noise_kernel_fwhm(nema) if any(METHODS[m].get("noise") for m in methods) else None
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for sphere in spheres:
            rows += run_sphere(nema, sphere, methods, folder, psf_fwhm, args.calibration, args.voi_margin,
                               noise_fwhm)
    total = time.perf_counter() - start
    record = {"machine": machine(), "psf_fwhm_mm": psf_fwhm, "noise_fwhm_mm": noise_fwhm,
              "voi_margin_mm": args.voi_margin,
              "truth_margin_mm": TRUTH_MARGIN_MM, "level": LEVEL, "total_s": total, "rows": rows}
    if args.calibration is None:
        name, table = "bench_nema", markdown(rows, methods, psf_fwhm, total, noise_fwhm)
    else:
        name = "bench_nema_conformal"
        record["calibration"] = calibration_summary(args.calibration)
        record["image_noise"] = image_noise(nema)
        if record["calibration"]["voi_margin_mm"] != [args.voi_margin]:
            print(f"bench_nema: note: the calibration's phantoms were fitted with VOI margins "
                  f"{record['calibration']['voi_margin_mm']} mm, the spheres here with "
                  f"{args.voi_margin:g} mm")
        table = conformal_markdown(rows, methods, record["calibration"], total) + noise_markdown(
            record["image_noise"])
    write_report(args.out, name, record, __doc__, table)
    print(f"wrote {args.out / (name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
