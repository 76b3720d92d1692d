"""Do coarse-grid restarts find the same hidden-Potts solution as full-grid restarts, and how much faster?

With ``multiscale=True`` (``vbseg segment --restarts coarse``) ``fit_hidden_potts_vb`` runs its
k-means restarts on a 2 x 2 x 2 coarser grid and continues one fine fit per distinct coarse
solution (:mod:`vbseg.potts.multiscale`). The risk is a mode the coarse grid cannot see
(a lesion of about one coarse voxel) or one it favours that the full grid does not. For
PET/CT phantoms over lesion sizes (10-37 mm spheres, a six-sphere NEMA-like ring and an
irregular lesion with a necrotic core), contrasts 2:1-8:1 and noise CV 10-20 % (4 x 4 x 3 mm
PET voxels, 6 mm PSF; K = 3, beta 0.5, the same inputs as ``bench_potts``), each fitted both
ways in one run on this machine: the fine-grid ELBO of the chosen solution (full-grid minus
coarse, per ROI voxel; positive means the full-grid restarts found a better solution), Dice
between the two fits' 50 % tumour contours and of each against the truth, tumour volumes, and
run times (compile apart, median of ``--repeats``).

Regenerate (about 25 minutes on 2 cores; ``--report-only`` rebuilds the table from the JSON):
    python -m benchmarks.bench_multiscale
Writes benchmarks/results/bench_multiscale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from benchmarks.bench_potts import phantom_features, timed_runs
from benchmarks.common import RESULTS, machine, write_report
from vbseg.metrics import dice
from vbseg.potts.meanfield import fit_hidden_potts_vb
from vbseg.potts.model import DEFAULT_PRIOR, neighbour_weights
from vbseg.runtime import enable_compilation_cache

NUM_CLASSES = 3
# two fits found the same solution when their 50 % tumour contours overlap at least this much
SAME_DICE = 0.97


def configurations(quick: bool):
    """(label, PhantomSpec keyword arguments) of the phantoms compared."""
    if quick:
        return [("sphere 13 mm, 4:1, CV 10 %", dict(diameters_mm=(13.0,)))]
    rows = [(f"sphere {d:g} mm, {c:g}:1, CV 10 %", dict(diameters_mm=(d,), contrast=c))
            for d in (10.0, 13.0, 22.0, 37.0) for c in (2.0, 4.0, 8.0)]
    rows += [(f"sphere {d:g} mm, 4:1, CV 20 %", dict(diameters_mm=(d,), cv=0.2)) for d in (10.0, 22.0)]
    rows += [("NEMA ring 10-37 mm, 4:1, CV 10 %", dict(diameters_mm=(10.0, 13.0, 17.0, 22.0, 28.0, 37.0))),
             ("irregular 37 mm with necrotic core, 4:1", dict(kind="heterogeneous", diameters_mm=(37.0,)))]
    return rows


def inputs(n: int, spec_args: dict, seed: int = 0):
    """The fit's arguments for bench_potts' standardised PET/CT features of an n^3 phantom, and
    the phantom (its truth)."""
    features, phantom = phantom_features(n, seed, **spec_args)
    args = (jnp.asarray(features), jnp.ones(features.shape, bool), jnp.ones(features.shape[:3], bool),
            jnp.float32(0.5), jnp.asarray(neighbour_weights(phantom.pet.spacing, 6)), DEFAULT_PRIOR,
            jnp.float32(1.0))
    return args, phantom


def compare(n: int, label: str, spec_args: dict, repeats: int, compiled: dict) -> dict:
    args, phantom = inputs(n, spec_args)
    row = {"n": n, "phantom": label, "true_ml": phantom.volume_ml}
    contours = {}
    for name, multiscale in (("single", False), ("multiscale", True)):
        key = (n, multiscale)
        if key not in compiled:
            start = time.perf_counter()
            compiled[key] = fit_hidden_potts_vb.lower(*args, num_classes=NUM_CLASSES,
                                                      multiscale=multiscale).compile()
            row[f"{name}_compile_s"] = time.perf_counter() - start
        runs, result = timed_runs(compiled[key], args, repeats)
        seconds = statistics.median(runs)
        # tumour: the class with the highest PET mean (the first modality)
        tumour = int(np.argmax(np.asarray(result.emission.mean)[:, 0]))
        probability = np.asarray(result.marginals[..., tumour])
        contours[name] = probability >= 0.5
        row.update({f"{name}_s": seconds, f"{name}_elbo": float(np.max(result.restart_elbos)),
                    f"{name}_ml": float(probability.sum()) * phantom.pet.voxel_volume_ml,
                    f"{name}_dice_truth": dice(contours[name], phantom.truth),
                    f"{name}_iterations": [int(i) for i in np.asarray(result.restart_iterations)]})
        if result.coarse_iterations is not None:
            row["coarse_iterations"] = [int(i) for i in np.asarray(result.coarse_iterations)]
    row["elbo_gap_per_voxel"] = (row["single_elbo"] - row["multiscale_elbo"]) / n**3
    row["dice_between"] = dice(contours["single"], contours["multiscale"])
    row["speed_up"] = row["single_s"] / row["multiscale_s"]
    print(f"{n}^3 {label}: gap {row['elbo_gap_per_voxel']:+.2e} nats/voxel, Dice between "
          f"{row['dice_between']:.3f}, {row['single_s']:.2f} s vs {row['multiscale_s']:.2f} s", flush=True)
    return row


def markdown(rows) -> str:
    lines = ["| grid | phantom | true mL | full-grid restarts: mL / Dice | coarse restarts: mL / Dice "
             "| Dice between | ELBO gap full - coarse (nats/voxel) | iterations full | coarse; fine "
             "| full s | coarse s | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['n']}^3 | {r['phantom']} | {r['true_ml']:.2f} | {r['single_ml']:.2f} / "
            f"{r['single_dice_truth']:.3f} | {r['multiscale_ml']:.2f} / {r['multiscale_dice_truth']:.3f} | "
            f"{r['dice_between']:.3f} | {r['elbo_gap_per_voxel']:+.1e} | "
            f"{' + '.join(map(str, r['single_iterations']))} | "
            f"{' + '.join(map(str, r['coarse_iterations']))}; "
            f"{' + '.join(map(str, r['multiscale_iterations']))} | "
            f"{r['single_s']:.2f} | {r['multiscale_s']:.2f} | {r['speed_up']:.1f} |")
    speed = np.array([r["speed_up"] for r in rows])
    same = [r for r in rows if r["dice_between"] >= SAME_DICE]
    lines += ["", f"{len(rows)} phantoms fitted both ways: the same solution (50 % contours with Dice >= "
              f"{SAME_DICE:g} between the two) in {len(same)}. The others:"]
    for r in rows:
        if r["dice_between"] < SAME_DICE:
            gap = r["elbo_gap_per_voxel"]
            better = ("full-grid restarts higher" if gap > 1e-5 else
                      "coarse restarts higher" if gap < -1e-5 else "level within tolerance")
            lines.append(f"* {r['n']}^3, {r['phantom']}: Dice between {r['dice_between']:.3f}, tumour "
                         f"{r['single_ml']:.2f} vs {r['multiscale_ml']:.2f} mL (truth {r['true_ml']:.2f}), "
                         f"ELBO {better} ({r['elbo_gap_per_voxel']:+.1e} nats/voxel)")
    lines += ["", "ELBO gap per ROI voxel: the fits stop when the ELBO changes by < 1e-5 nats per voxel "
              "in an iteration, so gaps within about 1e-5 are level. Tumour: the class with the highest "
              "PET mean (vbseg's rule), so with K = 3 a lesion split into rim and core counts only its "
              f"hottest class. Speed-up (full-grid time / coarse time): median {np.median(speed):.1f}x, "
              f"range {speed.min():.1f}-{speed.max():.1f}x."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="96,144",
                        help="cubic PET grid sizes (multiscale forced on at every size)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one phantom (the smoke test)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--note", default="", help="a line for the report (e.g. what else ran)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the markdown from OUT/bench_multiscale.json without fitting")
    args = parser.parse_args(argv)
    enable_compilation_cache()
    if args.report_only:
        record = json.loads((Path(args.out) / "bench_multiscale.json").read_text())
        record["note"] = args.note or record.get("note", "")
    else:
        started = time.perf_counter()
        compiled, rows = {}, []
        for n in (int(s) for s in args.sizes.split(",")):
            for label, spec_args in configurations(args.quick):
                rows.append(compare(n, label, spec_args, args.repeats, compiled))
        record = {"benchmark": "bench_multiscale", "rows": rows, "total_s": time.perf_counter() - started,
                  "machine": machine(), "command": "python -m benchmarks.bench_multiscale", "note": args.note}
    table = markdown(record["rows"])
    write_report(args.out, "bench_multiscale", record, __doc__, table,
                 note=record["note"] + "\n\n" if record["note"] else "")
    print(table, flush=True)
    return record


if __name__ == "__main__":
    main()
