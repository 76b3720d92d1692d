"""Do contours exported onto another grid keep their volumes? sts001's PET segmentation
(the default model) written as RTSTRUCT contours onto synthetic reference grids like the
ones a physicist draws on: a planning CT finer in plane with the PET's slices or thicker
ones, an MR with 6 mm slices, coarser grids, rotated grids, each at three offsets.

For each grid and contour level: the contour's volume on the PET grid, the volume of its
voxels on the reference grid (:func:`vbseg.io.dicom.outputs.contours_on_series`, the rule
``vbseg segment --rtstruct`` uses) and their ratio; beside it, what resampling P(tumour)
trilinearly and cutting it at the level gives (the rule before 2026-12-06). Every grid covers
the whole PET crop, so nothing is lost to the field of view.

Regenerate (under a minute; skips with a message without ../shared/data):
    python -m benchmarks.bench_dicom_export
Writes benchmarks/results/bench_dicom_export.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import vbseg
from benchmarks.common import RESULTS, machine, write_report
from vbseg.io.dicom.outputs import contours_on_series, probability_on_series

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LEVELS = (10, 50, 90)
# name: (spacing mm, in-plane rotation degrees)
GRIDS = {
    "CT 0.98 x 0.98 x 3.27 mm": ((0.9766, 0.9766, 3.27), 0.0),
    "CT 0.98 x 0.98 x 5 mm": ((0.9766, 0.9766, 5.0), 0.0),
    "MR 0.9 x 0.9 x 6 mm": ((0.9, 0.9, 6.0), 0.0),
    "1 mm, rotated 30 degrees": ((1.0, 1.0, 1.0), 30.0),
    "6 x 6 x 3.27 mm, rotated 45 degrees": ((6.0, 6.0, 3.27), 45.0),
    "6.5 x 6.5 x 3.27 mm": ((6.5, 6.5, 3.27), 0.0),
}
OFFSETS_MM = (0.37, 1.1, 2.9)


def reference_grid(posterior, spacing, rotation_deg, offset_mm):
    """A grid of ``spacing`` (mm), rotated in plane, covering the posterior's crop with a
    margin, its origin moved by ``offset_mm`` along every axis."""
    affine = posterior.reference.affine
    shape = np.asarray(posterior.reference.shape)
    first, last = affine[:3, 3], (affine @ np.r_[shape - 1, 1.0])[:3]
    extent = np.abs(last - first) * 1.5 + 10.0
    c, s = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    grid = np.eye(4)
    grid[:3, :3] = rotation @ np.diag(spacing)
    size = tuple(int(np.ceil(e / sp)) for e, sp in zip(extent, spacing))
    grid[:3, 3] = (first + last) / 2 - grid[:3, :3] @ ((np.asarray(size) - 1) / 2) + offset_mm
    return SimpleNamespace(shape=size, affine=grid, path="synthetic", frame_of_reference_uid=None,
                           first={})


def run(case: str) -> list[dict]:
    posterior = vbseg.segment([SHARED / f"{case}_pet.nii.gz"])
    source_ml = posterior.reference.voxel_volume_ml
    rows = []
    for name, (spacing, rotation) in GRIDS.items():
        for offset in OFFSETS_MM:
            grid = reference_grid(posterior, spacing, rotation, offset)
            grid_ml = float(abs(np.linalg.det(grid.affine[:3, :3])) / 1000)
            masks, how = contours_on_series(posterior, grid, LEVELS)
            trilinear, _ = probability_on_series(posterior, grid)
            for level in LEVELS:
                contour_ml = float((posterior.probability >= np.float32(level / 100)).sum() * source_ml)
                rows.append({"grid": name, "offset_mm": offset, "level_percent": level, "rule": how,
                             "contour_ml": contour_ml, "exported_ml": float(masks[level].sum() * grid_ml),
                             "trilinear_p_ml": float((trilinear >= np.float32(level / 100)).sum() * grid_ml)})
    return rows


def table(rows) -> str:
    lines = ["| reference grid | level | contour mL (PET grid) | exported: change, min to max over offsets "
             "| P resampled trilinearly and cut |", "|---|---|---|---|---|"]
    for name in GRIDS:
        for level in LEVELS:
            chosen = [r for r in rows if r["grid"] == name and r["level_percent"] == level]
            exported = [100 * (r["exported_ml"] / r["contour_ml"] - 1) for r in chosen]
            trilinear = [100 * (r["trilinear_p_ml"] / r["contour_ml"] - 1) for r in chosen]
            lines.append(f"| {name} | {level} % | {chosen[0]['contour_ml']:.1f} | {min(exported):+.1f} to "
                         f"{max(exported):+.1f} % | {min(trilinear):+.1f} to {max(trilinear):+.1f} % |")
    rules = sorted({(r["grid"], r["rule"]) for r in rows})
    return "\n".join(lines) + "\n\nRule per grid: " + "; ".join(f"{g}: {rule}" for g, rule in rules) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="sts001")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (SHARED / f"{args.case}_pet.nii.gz").is_file():
        print(f"bench_dicom_export: skipped, {SHARED / (args.case + '_pet.nii.gz')} not found")
        return 0
    start = time.perf_counter()
    rows = run(args.case)
    record = {"machine": machine(), "case": args.case, "offsets_mm": list(OFFSETS_MM), "rows": rows,
              "total_s": time.perf_counter() - start}
    write_report(args.out, "bench_dicom_export", record, __doc__, table(rows),
                 f"\nCase {args.case}, PET alone, the default model; offsets {OFFSETS_MM} mm.\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
