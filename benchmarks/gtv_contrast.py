"""How far apart are the sarcoma GTV and the tissue around it in each modality's own values?

For each delineated sarcoma of ``../shared/data`` and each modality (PET in SUV, CT in HU, T1 MR in
the data's fat-normalised units), on that modality's own grid against its own label: the median
(and interquartile range) of the image inside the manual GTV, and the median of the rest of the
crop; for CT also of the rest of the crop's soft tissue (-50 to 150 HU, so fat, air and bone do
not decide it). A class model of intensities alone can only find a GTV that differs in intensity
from what surrounds it: this table says where that holds (bench_cohort's single-modality rows).

Regenerate (a few seconds):
    python -m benchmarks.gtv_contrast
Writes benchmarks/results/gtv_contrast.{json,md}; skips with a message without ../shared/data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks.common import RESULTS, machine, write_report
from vbseg.io.cases import read_cases

SHARED_INDEX = Path(__file__).resolve().parents[2] / "shared" / "data" / "cases.json"
MODALITIES = ("pet", "ct", "mr")
SOFT_TISSUE_HU = (-50.0, 150.0)


def contrast(image: np.ndarray, label: np.ndarray, modality: str) -> dict:
    inside, outside = image[label], image[~label]
    row = {"gtv_median": float(np.median(inside)), "gtv_q25": float(np.percentile(inside, 25)),
           "gtv_q75": float(np.percentile(inside, 75)), "outside_median": float(np.median(outside)),
           "gtv_fraction": float(label.mean())}
    if modality == "ct":
        soft = outside[(outside > SOFT_TISSUE_HU[0]) & (outside < SOFT_TISSUE_HU[1])]
        row["outside_soft_tissue_median"] = float(np.median(soft))
    return row


def markdown(rows) -> str:
    lines = ["| case | modality | GTV median (IQR) | rest of crop, median | rest, soft tissue (CT) "
             "| GTV minus rest (soft tissue for CT) | GTV share of crop |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        reference = r.get("outside_soft_tissue_median", r["outside_median"])
        soft = f"{r['outside_soft_tissue_median']:.1f}" if "outside_soft_tissue_median" in r else "-"
        lines.append(f"| {r['case']} | {r['modality']} | {r['gtv_median']:.1f} ({r['gtv_q25']:.1f}-"
                     f"{r['gtv_q75']:.1f}) | {r['outside_median']:.1f} | {soft} | "
                     f"{r['gtv_median'] - reference:+.1f} | {r['gtv_fraction']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=str(SHARED_INDEX))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not Path(args.index).exists():
        print(f"gtv_contrast: {args.index} not found; nothing to measure")
        return None
    rows = []
    for modality in MODALITIES:
        for case in read_cases(args.index, [modality]):
            if not case.name.startswith("sts"):
                continue
            image = np.asarray(nib.load(case.images[0]).dataobj, np.float32)
            label = np.asarray(nib.load(case.label).dataobj) > 0
            rows.append({"case": case.name, "modality": modality, **contrast(image, label, modality)})
    record = {"benchmark": "gtv_contrast", "rows": rows, "machine": machine(),
              "command": "python -m benchmarks.gtv_contrast"}
    write_report(args.out, "gtv_contrast", record, __doc__, markdown(rows))
    return record


if __name__ == "__main__":
    main()
