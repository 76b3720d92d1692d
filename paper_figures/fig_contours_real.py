"""Probability contours (10 / 50 / 90 %) over the PET, CT and MR of a real sarcoma, next to the
manual contour.

Reads the fused PET + CT + MR runs of benchmarks/results/experiments/sts_fusion/ (written by
``python -m benchmarks.run``; the per-run folders under ``runs/`` are not committed, so this
figure needs that command run on a machine with ../shared/data). The case shown is the one with
the median Dice among the fused runs, so the figure is neither the best nor the worst case. Each
panel is the axial slice through the manual mask's centre, on that modality's own grid: the
probability map (on the PET grid) and the manual mask (drawn on the PET grid; the scoring
reference) are interpolated trilinearly onto it and contoured; the manual contour is the white
dashed line. Regenerate: python -m paper_figures.fig_contours_real (from the repository root)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from scipy import ndimage

from paper_figures.common import ROOT, MissingResults, figure_arguments, records, save
from vbseg.io.orientation import to_ras
from vbseg.io.volume import Volume, load_volume, resample_onto
from vbseg.overview import LEVEL_COLOURS

LEVELS = (10, 50, 90)
WINDOWS = {"pet": ("gray_r", (0.0, None)), "ct": ("gray", (-160.0, 240.0)), "mr": ("gray", (None, None))}


def local_path(path: str) -> str:
    """A case file recorded by another checkout: the same name in this checkout's ../shared/data."""
    if Path(path).is_file():
        return path
    fallback = ROOT.parent / "shared" / "data" / Path(path).name
    if not fallback.is_file():
        raise MissingResults(f"{path} (the case's image) not found, nor {fallback}")
    return str(fallback)


def chosen_run(rows: list[dict]) -> dict:
    """The run whose Dice is the median (the lower middle one for an even count)."""
    fused = [r for r in rows if len(r["case_spec"].get("modalities", [])) > 1] or rows
    ordered = sorted(fused, key=lambda r: r["dice50"])
    return ordered[(len(ordered) - 1) // 2]


def _axial(volume: Volume, arrays):
    """RAS-reoriented axial slices through the manual mask's centre: (image, *arrays), spacing."""
    image, orientation = to_ras(volume.data, volume.affine)
    reoriented = [to_ras(a, volume.affine)[0] for a in arrays]
    spacing = volume.spacing[np.argsort(orientation[:, 0])]
    k = int(round(ndimage.center_of_mass(reoriented[-1] >= 0.5)[2]))
    return [image[:, :, k]] + [a[:, :, k] for a in reoriented], spacing, k


def draw(run: dict, prob: np.ndarray, pet_affine: np.ndarray, manual: np.ndarray):
    spec = run["case_spec"]
    prob_volume = Volume(prob.astype(np.float32), pet_affine)
    manual_volume = Volume(manual.astype(np.float32), pet_affine)
    panels = len(spec["images"])
    figure, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.8), squeeze=False)
    for ax, path, modality in zip(axes[0], spec["images"], spec["modalities"]):
        volume = load_volume(local_path(path), modality)
        prob_here = resample_onto(prob_volume, volume)[0].data
        manual_here = resample_onto(manual_volume, volume)[0].data
        (image, p, m), spacing, k = _axial(volume, [prob_here, manual_here])
        h = np.arange(image.shape[0]) * spacing[0]
        v = np.arange(image.shape[1]) * spacing[1]
        cmap, (low, high) = WINDOWS.get(modality, ("gray", (None, None)))
        low = np.percentile(image, 1) if low is None else low
        high = np.percentile(image, 99.5) if high is None else high
        ax.imshow(image.T, cmap=cmap, origin="lower", vmin=low, vmax=high, interpolation="nearest",
                  extent=[h[0] - spacing[0] / 2, h[-1] + spacing[0] / 2,
                          v[0] - spacing[1] / 2, v[-1] + spacing[1] / 2])
        for level, colour in zip(LEVELS, LEVEL_COLOURS):
            if np.any(p >= level / 100):
                ax.contour(h, v, p.T, levels=[level / 100], colors=[colour], linewidths=1.3)
        ax.contour(h, v, m.T, levels=[0.5], colors=["white"], linewidths=1.3, linestyles="--")
        inside = np.nonzero(m >= 0.5)
        margin = 25.0
        ax.set_xlim(h[inside[0].max()] + margin, h[inside[0].min()] - margin)  # radiological: R on the left
        ax.set_ylim(v[inside[1].min()] - margin, v[inside[1].max()] + margin)
        ax.set_title(f"{modality.upper()} (axial RAS slice {k})")
        ax.set_xlabel("R  <-  mm  ->  L")
    handles = [plt.Line2D([], [], color=c, lw=2) for c in LEVEL_COLOURS[: len(LEVELS)]]
    handles.append(plt.Line2D([], [], color="white", lw=2, ls="--"))
    legend = axes[0, -1].legend(handles, [f"P(tumour) >= {x}%" for x in LEVELS] + ["manual GTV"],
                                loc="lower right", fontsize=7, facecolor="0.3", labelcolor="white")
    legend.get_frame().set_alpha(0.8)
    figure.suptitle(f"{run['case']}: {run['model']} ({run['variant']}); Dice50 {run['dice50']:.2f}, "
                    f"volume {run['vol_mean_ml']:.0f} mL [{run['vol_lower_ml']:.0f}, "
                    f"{run['vol_upper_ml']:.0f}] vs manual {run['vol_true_ml']:.0f} mL", fontsize=10)
    figure.tight_layout()
    return figure


def main(argv=None):
    results, out, experiments = figure_arguments(__doc__, argv)
    run = chosen_run(records(results, experiments["fusion"]))
    folder = results / "experiments" / experiments["fusion"] / "runs" / run["run_id"]
    prob_path = folder / "outputs" / "prob.nii.gz"
    if not prob_path.is_file():
        raise MissingResults(f"{prob_path} not found: run `python -m benchmarks.run` first")
    prob_image = nib.load(prob_path)
    manual = np.asarray(nib.load(local_path(run["case_spec"]["label"])).dataobj) > 0
    figure = draw(run, np.asarray(prob_image.dataobj), prob_image.affine, manual)
    return save(figure, out, "contours_real")


if __name__ == "__main__":
    main()
