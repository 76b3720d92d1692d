"""Are vbseg's probabilities and volume intervals calibrated? A phantom study over many noise draws.

Spheres of 10-37 mm at lesion:background contrasts 2:1-8:1 and noise CV 5-20 % (Gaussian,
6 mm PSF, 4 x 4 x 3 mm voxels, a crop of the lesion plus a 24 mm margin), ``--seeds`` noise
draws per configuration, pooled. Per draw and method: the 95 % volume interval and whether it
covers the physical sphere volume (the truth is the object, not its blurred image), its width
and Winkler interval score (width + 40 x the miss, so a wide interval does not win), ECE over
the crop (DESIGN.md: 15 bins, binary voxel-centre truth), Brier score, Dice of the 50 % contour,
relative volume error. Pooled: coverage with its exact (Clopper-Pearson) 95 % confidence
interval, per method and per sphere size; reliability curves against the binary truth and
against the true partial-volume fraction (figure).

Methods (each a ``vbseg.segment`` call on the saved PET):
* ``psf_fixed``: PSF modelled at the phantom's FWHM, beta fixed at the PSF default (1.5);
* ``psf_auto``: PSF modelled, beta learned (``--beta auto``);
* ``nopsf_fixed``: no PSF term, beta 0.5 (VB, independent voxel draws for the interval);
* ``nopsf_gibbs``: the same model sampled by checkerboard Gibbs from the VB start (whole
  label-field draws), on every ``--gibbs-every``-th draw.

Regenerate (about 25 minutes on 2 cores at the defaults):
    python -m benchmarks.bench_calibration
Writes benchmarks/results/bench_calibration.{json,md} and calibration_reliability.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

import vbseg
from benchmarks.common import machine
from vbseg.metrics import brier_score, dice, expected_calibration_error, interval_score, reliability
from vbseg.volume import save_nifti, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
DIAMETERS = (10.0, 13.0, 17.0, 22.0, 28.0, 37.0)
CONTRASTS = (2.0, 4.0, 8.0)
CVS = (0.05, 0.10, 0.20)
LEVEL = 0.95
METHODS = {
    "psf_fixed": dict(psf=True, beta=None, sampler="vb"),
    "psf_auto": dict(psf=True, beta="auto", sampler="vb"),
    "nopsf_fixed": dict(psf=False, beta=None, sampler="vb"),
    "nopsf_gibbs": dict(psf=False, beta=None, sampler="gibbs"),
}


def run_draw(config, seed, methods, folder, psf_fwhm):
    diameter, contrast, cv = config
    phantom = vbseg.make_phantom(vbseg.PhantomSpec(diameters_mm=(diameter,), contrast=contrast,
                                                   cv=cv, psf_fwhm_mm=psf_fwhm), seed=seed)
    path = save_nifti(Path(folder) / f"pet_{seed}.nii.gz", phantom.pet.data, phantom.pet.affine)
    truth_ml = phantom.volume_ml
    records, curves = [], {}
    for name in methods:
        spec = METHODS[name]
        start = time.perf_counter()
        posterior = vbseg.segment([path], modalities=["pet"], seed=seed, beta=spec["beta"],
                                  psf_fwhm_mm=psf_fwhm if spec["psf"] else None,
                                  sampler=spec["sampler"])
        seconds = time.perf_counter() - start
        volume = posterior.volume_interval(LEVEL)
        p = posterior.probability
        records.append({
            "method": name, "diameter_mm": diameter, "contrast": contrast, "cv": cv, "seed": seed,
            "true_ml": truth_ml, "mean_ml": volume["mean"], "lower_ml": volume["lower"],
            "upper_ml": volume["upper"],
            "covered": bool(volume["lower"] <= truth_ml <= volume["upper"]),
            "width_rel": (volume["upper"] - volume["lower"]) / truth_ml,
            "interval_score_rel": interval_score(volume["lower"], volume["upper"], truth_ml, LEVEL)
            / truth_ml,
            "volume_error": volume["mean"] / truth_ml - 1.0,
            "dice50": dice(p >= 0.5, phantom.truth),
            "ece": expected_calibration_error(p, phantom.truth),
            "brier": brier_score(p, phantom.truth),
            "beta": posterior.summary["parameters"]["beta"],
            "seconds": seconds,
        })
        curves[name] = (reliability(p, phantom.truth), reliability(p, phantom.truth_fraction))
    return records, curves


def _coverage(rows) -> dict:
    k, n = sum(r["covered"] for r in rows), len(rows)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact") if n else None
    return {"covered": k, "draws": n, "coverage": k / n if n else float("nan"),
            "ci_low": ci.low if ci else float("nan"), "ci_high": ci.high if ci else float("nan")}


def summarise(records, methods) -> dict:
    out = {}
    for name in methods:
        rows = [r for r in records if r["method"] == name]
        if not rows:
            continue
        large = [r for r in rows if r["diameter_mm"] >= 13.0]
        out[name] = {
            **_coverage(rows),
            "mean_width_rel": float(np.mean([r["width_rel"] for r in rows])),
            "mean_interval_score_rel": float(np.mean([r["interval_score_rel"] for r in rows])),
            "ece_mean": float(np.mean([r["ece"] for r in rows])),
            "ece_max": float(np.max([r["ece"] for r in rows])),
            "brier_mean": float(np.mean([r["brier"] for r in rows])),
            "dice50_mean": float(np.mean([r["dice50"] for r in rows])),
            "abs_volume_error_mean_ge13mm": float(np.mean([abs(r["volume_error"]) for r in large])),
            "abs_volume_error_p90_ge13mm": float(np.quantile([abs(r["volume_error"]) for r in large], 0.9)),
            "volume_error_mean": float(np.mean([r["volume_error"] for r in rows])),
            "seconds_median": float(np.median([r["seconds"] for r in rows])),
            "by_diameter": {f"{d:g}": _coverage([r for r in rows if r["diameter_mm"] == d])
                            for d in sorted({r["diameter_mm"] for r in rows})},
            "volume_error_by_diameter": {
                f"{d:g}": float(np.mean([r["volume_error"] for r in rows if r["diameter_mm"] == d]))
                for d in sorted({r["diameter_mm"] for r in rows})},
        }
    return out


def _pool(curves):
    """Sum reliability bins over draws: returns (predicted mean, observed mean, counts)."""
    predicted = observed = counts = 0.0
    for (_, p, o, c) in curves:
        predicted = predicted + np.nan_to_num(p * c)
        observed = observed + np.nan_to_num(o * c)
        counts = counts + c
    with np.errstate(invalid="ignore", divide="ignore"):
        return predicted / counts, observed / counts, counts


def figure(pooled, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), constrained_layout=True)
    for ax, index, title in ((axes[0], 0, "against the binary voxel-centre truth"),
                             (axes[1], 1, "against the true partial-volume fraction")):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
        for name, curves in pooled.items():
            predicted, observed, counts = curves[index]
            keep = counts >= 20
            ax.plot(predicted[keep], observed[keep], marker="o", ms=3, label=name)
        ax.set_xlabel("predicted P(tumour), bin mean")
        ax.set_ylabel("observed tumour frequency / fraction")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Reliability over all phantom draws (bins with >= 20 voxels)", fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(summary, args, total_s) -> str:
    lines = [
        f"Draws: {args.seeds} per configuration over diameters {args.diameters} mm x contrasts "
        f"{args.contrasts} x CV {args.cvs}; Gibbs on every {args.gibbs_every}th draw. "
        f"Total {total_s / 60:.1f} min on this machine.", "",
        "| method | coverage of 95 % interval (k/n) | 95 % CI | mean width / V | interval score / V "
        "| ECE mean (max) | Brier | Dice50 | mean abs vol. error, >= 13 mm (p90) | median s/draw |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['coverage']:.3f} ({s['covered']}/{s['draws']}) | "
            f"{s['ci_low']:.3f}-{s['ci_high']:.3f} | {s['mean_width_rel']:.3f} | "
            f"{s['mean_interval_score_rel']:.2f} | {s['ece_mean']:.4f} ({s['ece_max']:.4f}) | "
            f"{s['brier_mean']:.4f} | {s['dice50_mean']:.3f} | "
            f"{s['abs_volume_error_mean_ge13mm']:.3f} ({s['abs_volume_error_p90_ge13mm']:.3f}) | "
            f"{s['seconds_median']:.1f} |")
    diameters = sorted({d for s in summary.values() for d in s["by_diameter"]}, key=float)
    lines += ["", "Coverage (k/n) and mean volume error by sphere diameter:", "",
              "| method | " + " | ".join(f"{d} mm" for d in diameters) + " |",
              "|---|" + "---|" * len(diameters)]
    for name, s in summary.items():
        cells = []
        for d in diameters:
            c = s["by_diameter"].get(d)
            cells.append("-" if c is None else
                         f"{c['covered']}/{c['draws']}, {s['volume_error_by_diameter'][d]:+.0%}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _floats(text):
    return tuple(float(x) for x in text.split(","))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diameters", default=",".join(f"{d:g}" for d in DIAMETERS))
    parser.add_argument("--contrasts", default=",".join(f"{c:g}" for c in CONTRASTS))
    parser.add_argument("--cvs", default=",".join(f"{c:g}" for c in CVS))
    parser.add_argument("--seeds", type=int, default=4, help="noise draws per configuration")
    parser.add_argument("--gibbs-every", type=int, default=4)
    parser.add_argument("--psf-fwhm", type=float, default=6.0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    configs = list(itertools.product(_floats(args.diameters), _floats(args.contrasts),
                                     _floats(args.cvs)))
    started = time.perf_counter()
    records, pooled_curves = [], {name: ([], []) for name in methods}
    draw = 0
    with tempfile.TemporaryDirectory() as folder:
        for config in configs:
            for seed in range(args.seeds):
                chosen = [m for m in methods
                          if METHODS[m]["sampler"] != "gibbs" or draw % args.gibbs_every == 0]
                rows, curves = run_draw(config, seed, chosen, folder, args.psf_fwhm)
                records += rows
                for name, (binary, fraction) in curves.items():
                    pooled_curves[name][0].append(binary)
                    pooled_curves[name][1].append(fraction)
                draw += 1
            print(f"{config}: {len(records)} fits, {time.perf_counter() - started:.0f} s", flush=True)
    total_s = time.perf_counter() - started
    summary = summarise(records, methods)
    pooled = {name: (_pool(b), _pool(f)) for name, (b, f) in pooled_curves.items() if b}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure(pooled, out / "calibration_reliability.png")
    record = {
        "benchmark": "bench_calibration", "summary": summary, "records": records,
        "reliability": {name: {"binary": [x.tolist() for x in c[0]],
                               "fraction": [x.tolist() for x in c[1]]}
                        for name, c in pooled.items()},
        "total_s": total_s,
        "machine": machine(),
        "command": "python -m benchmarks.bench_calibration " + " ".join(argv or []),
    }
    write_text_atomic(out / "bench_calibration.json", json.dumps(record, indent=1) + "\n")
    table = markdown(summary, args, total_s)
    write_text_atomic(out / "bench_calibration.md", "# bench_calibration\n\n"
                      + __doc__.split("\n\n")[0] + "\n\n" + table
                      + "\n![reliability](calibration_reliability.png)\n"
                      + f"\nMachine: {record['machine']}\n")
    print(table)
    return record


if __name__ == "__main__":
    main()
