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
  benchmarks/results/pv_nema_beta``.

Regenerate (65 minutes on 2 busy cores, nearly all of it ``psf_gibbs``, ~10 minutes a sphere;
the other methods take seconds):
    python -m benchmarks.bench_nema
Writes benchmarks/results/bench_nema.{json,md}. ``--spheres`` / ``--methods`` choose a subset
(the smoke test runs one sphere, one method). Skips with a message when ../shared/data or its
NEMA scan is absent.
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

import vbseg
from benchmarks.common import RESULTS, machine, write_report
from vbseg.io.volume import save_nifti
from vbseg.metrics import dice, interval_score

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
}
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


def world_coordinates(affine, shape) -> np.ndarray:
    """(X, Y, Z, 3) RAS millimetre coordinates of every voxel centre."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def run_sphere(nema, sphere, methods, folder, psf_fwhm) -> list[dict]:
    radius = sphere["inner_diameter_mm"] / 2
    distance = np.linalg.norm(nema["world"] - np.asarray(sphere["centre_ras_mm"]), axis=-1)
    voi = distance <= radius + VOI_MARGIN_MM
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
            wall_mm=spec.get("wall_mm"), beta=spec.get("beta"))
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


def markdown(rows, methods, psf_fwhm, total_s) -> str:
    spheres = sorted({r["sphere"] for r in rows})
    by = {(r["sphere"], r["method"]): r for r in rows}
    lines = [f"PSF FWHM for the PSF model: {psf_fwhm:g} mm (cases.json fitted value). "
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder")
    parser.add_argument("--spheres", default="10,13,17,22,28,37", help="inner diameters in mm")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--out", type=Path, default=RESULTS)
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
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for sphere in spheres:
            rows += run_sphere(nema, sphere, methods, folder, psf_fwhm)
    total = time.perf_counter() - start
    record = {"machine": machine(), "psf_fwhm_mm": psf_fwhm, "voi_margin_mm": VOI_MARGIN_MM,
              "truth_margin_mm": TRUTH_MARGIN_MM, "level": LEVEL, "total_s": total, "rows": rows}
    write_report(args.out, "bench_nema", record, __doc__, markdown(rows, methods, psf_fwhm, total))
    print(f"wrote {args.out / 'bench_nema.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
