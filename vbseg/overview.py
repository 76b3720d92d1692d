"""overview.png: three orthogonal slices through the lesion with the probability contours.

Slices are shown in patient orientation, whatever the array order on disk: the arrays are
reoriented to RAS+ with nibabel, axial and coronal views use the radiological convention
(patient's right on the viewer's left), and pixels have their physical aspect ratio.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from vbseg.orientation import to_ras as _to_ras  # noqa: E402

LEVEL_COLOURS = ("#1f77b4", "#ff7f0e", "#d62728", "#2ca02c", "#9467bd", "#8c564b")


def draw_overview(posterior, levels_percent, *, title: str = ""):
    """Return a matplotlib Figure with axial, coronal and sagittal slices and contours."""
    image, orientation = _to_ras(posterior.reference.data, posterior.reference.affine)
    prob, _ = _to_ras(posterior.probability, posterior.reference.affine)
    voi, _ = _to_ras(posterior.voi.astype(np.uint8), posterior.reference.affine)
    # io_orientation maps input axis i to RAS axis o[i, 0]; RAS axis j came from argsort(o)[j]
    spacing = posterior.reference.spacing[np.argsort(orientation[:, 0])]
    components, count = ndimage.label(prob >= min(levels_percent) / 100.0)
    if count:
        # centre on the largest region (a centroid of several lesions may fall between them)
        sizes = ndimage.sum_labels(np.ones(prob.shape), components, index=np.arange(1, count + 1))
        largest = components == 1 + int(np.argmax(sizes))
        centre = [int(round(c)) for c in ndimage.center_of_mass(largest)]
    else:
        centre = [n // 2 for n in prob.shape]
    inside = image[voi > 0] if voi.any() else image
    # zoom: the lowest contour's bounding box grown by its own size (at least 15 mm) per side
    region = prob >= min(levels_percent) / 100.0
    if region.any():
        index = np.nonzero(region)
        margin = [max(int(np.ceil(15.0 / s)), int(i.max() - i.min() + 1)) for i, s in zip(index, spacing)]
        window = [slice(max(int(i.min()) - m, 0), int(i.max()) + m + 1) for i, m in zip(index, margin)]
    else:
        window = [slice(None)] * 3
    vmin, vmax = np.percentile(inside, [1, 99.5])

    views = [  # name, slice, (horizontal, vertical) axes, slice number, side labels (left, right)
        ("axial", (slice(None), slice(None), centre[2]), (0, 1), centre[2], ("R", "L")),
        ("coronal", (slice(None), centre[1], slice(None)), (0, 2), centre[1], ("R", "L")),
        ("sagittal", (centre[0], slice(None), slice(None)), (1, 2), centre[0], ("P", "A")),
    ]
    pet = posterior.reference.modality == "pet"
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.8), constrained_layout=True)
    for ax, (name, index, (h_axis, v_axis), number, (left, right)) in zip(axes, views):
        h = np.arange(image.shape[h_axis]) * spacing[h_axis]
        v = np.arange(image.shape[v_axis]) * spacing[v_axis]
        half_h, half_v = spacing[h_axis] / 2, spacing[v_axis] / 2
        ax.imshow(image[index].T, cmap="gray_r" if pet else "gray", origin="lower",
                  extent=[h[0] - half_h, h[-1] + half_h, v[0] - half_v, v[-1] + half_v],
                  vmin=vmin, vmax=vmax, interpolation="nearest")
        for level, colour in zip(levels_percent, LEVEL_COLOURS):
            if np.any(prob[index] >= level / 100.0):
                ax.contour(h, v, prob[index].T, levels=[level / 100.0], colors=[colour],
                           linewidths=1.4)
        hw, vw = h[window[h_axis]], v[window[v_axis]]
        ax.set_xlim(hw[0] - half_h, hw[-1] + half_h)
        ax.set_ylim(vw[0] - half_v, vw[-1] + half_v)
        if name != "sagittal":
            ax.invert_xaxis()  # radiological convention: patient's right on the viewer's left
        ax.set_title(f"{name}, RAS slice {number}")
        ax.set_xlabel(f"{left}  <-  mm  ->  {right}")
        ax.set_ylabel("mm")
    handles = [plt.Line2D([], [], color=c, lw=2) for c in LEVEL_COLOURS[: len(levels_percent)]]
    axes[-1].legend(handles, [f"P(tumour) >= {level:g}%" for level in levels_percent],
                    loc="lower right", fontsize=8, framealpha=0.8)
    if title:
        figure.suptitle(title)
    return figure
