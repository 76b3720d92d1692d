"""overview.png: a QA figure of every input, the probability map and the contours.

Layout: one column per input image (on the first input's grid) and one for P(tumour); one
row per orientation (axial, coronal, sagittal). Each view is the slice of that orientation
with the largest area of the lesion: the largest connected region of the 50 % contour (of
the lowest contour when the 50 % contour is empty), zoomed on it. Every panel carries the
contours (one colour per level) and, when given, the reference mask (dashed); each column
has a colour bar with its units (SUV for PET, HU for CT, a.u. otherwise; P(tumour) 0-1).

Windows: PET from 0 SUV to the maximum inside the lesion (the lowest contour's region around
the 50 % region shown), so the lesion's uptake is not saturated (hotter uptake elsewhere may
be); other images from the 1st to the 99th percentile of their values inside the lesion and
a 10 mm shell around it. Without any contour: 0 to the 99.5th percentile (PET), 1st to 99th
percentile (others), inside the VOI.

Slices are shown in patient orientation, whatever the array order on disk: the arrays are
reoriented to RAS+ with nibabel, axial and coronal views use the radiological convention
(patient's right on the viewer's left), and pixels have their physical aspect ratio.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from vbseg.io.display_image import DisplayImage  # noqa: E402
from vbseg.io.orientation import to_ras  # noqa: E402
from vbseg.readouts import largest_region  # noqa: E402

LEVEL_COLOURS = ("#00b0f0", "#ff8c00", "#e00000", "#2ca02c", "#9467bd", "#8c564b")
REFERENCE_STYLE = {"colors": ["#ff00ff"], "linestyles": ["--"], "linewidths": 1.6}
SHELL_MM = 10.0
UNITS = {"pet": "SUV", "ct": "HU", "mr": "a.u.", "other": "a.u."}
VIEWS = (  # name, RAS axis sliced, (horizontal, vertical) RAS axes, side labels (left, right)
    ("axial", 2, (0, 1), ("R", "L")),
    ("coronal", 1, (0, 2), ("R", "L")),
    ("sagittal", 0, (1, 2), ("P", "A")),
)


def lesion_view(prob, levels_percent):
    """(slice index per RAS axis, lesion) on the RAS probability map: per orientation the slice
    with the largest area of the lesion (module doc); ``lesion`` (bool) is the lowest contour's
    region(s) holding it (None when every contour is empty)."""
    lowest = prob >= min(levels_percent) / 100.0
    lesion = largest_region(prob >= 0.5) if (prob >= 0.5).any() else largest_region(lowest)
    if not lesion.any():
        return [n // 2 for n in prob.shape], None
    areas = [lesion.sum(axis=tuple(a for a in range(3) if a != axis)) for axis in range(3)]
    centre = [int(np.argmax(area)) for area in areas]
    if lowest[lesion].all():
        components, _ = ndimage.label(lowest)
        lesion = np.isin(components, np.unique(components[lesion]))
    return centre, lesion


def _window(data, modality, lesion, box, spacing, voi):
    """(vmin, vmax) of an image's colour scale (module doc)."""
    finite = np.isfinite(data)
    if lesion is None:
        values = data[voi & finite] if (voi & finite).any() else data[finite]
        pet = modality == "pet"
        low, high = (0.0, np.percentile(values, 99.5)) if pet else np.percentile(values, [1, 99])
    elif modality == "pet":
        low, high = 0.0, data[lesion & finite].max(initial=0.0)
    else:  # the lesion and a 10 mm shell around it, inside the zoomed box
        near = ndimage.distance_transform_edt(~lesion[box], sampling=spacing) <= SHELL_MM
        values = data[box][near & finite[box]]
        low, high = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    return float(low), float(high if high > low else low + 1.0)


def _full_grid(image, shape):
    if image.bounds is None:
        return np.asarray(image.data, np.float32)
    full = np.full(shape, np.nan, np.float32)
    full[tuple(image.bounds)] = image.data
    return full


def _title(posterior, record, title):
    volume = posterior.volume_interval()
    case = os.path.basename(posterior.reference.name).removesuffix(".gz").removesuffix(".nii")
    lines = [title or case,
             f"model {posterior.summary.get('model', '?')}: volume {volume['mean']:.2f} mL, 95% "
             f"interval [{volume['lower']:.2f}, {volume['upper']:.2f}] mL"]
    level = record.get("pet_readouts", {}).get("levels", {}).get("50")
    if level and level["voxels"]:
        readouts = level["largest_region"]
        where = ("50% contour" if level["regions"] == 1
                 else f"largest of the {level['regions']} regions of the 50% contour")
        lines.append(f"{where}: SUVmax {readouts['suvmax']:.2f}, SUVpeak "
                     f"{readouts['suvpeak']:.2f}, SUVmean {readouts['suvmean']:.2f}, MTV "
                     f"{readouts['mtv_ml']:.2f} mL, TLG {readouts['tlg']:.1f} SUV mL")
    reference = record.get("reference_mask")
    if reference:
        lines.append(f"reference {os.path.basename(reference['path'] or '')} "
                     f"({reference['volume_ml']:.2f} mL): Dice of the 50% contour "
                     f"{reference['dice_50']:.3f}")
    return "\n".join(lines)


def draw_overview(posterior, levels_percent, *, title: str = "", record=None):
    """Return the QA Figure (module doc). ``record``: the saved summary (its ``pet_readouts``
    and ``reference_mask`` go into the title; computed from ``posterior`` when None)."""
    if record is None:
        record = {"pet_readouts": posterior.pet_readouts(levels_percent),
                  "reference_mask": posterior.reference_comparison(levels_percent)}
    affine, shape = posterior.reference.affine, posterior.reference.shape
    prob, orientation = to_ras(posterior.probability, affine)
    voi, _ = to_ras(posterior.voi, affine)
    reference = None if posterior.reference_mask is None else to_ras(posterior.reference_mask, affine)[0]
    # io_orientation maps input axis i to RAS axis o[i, 0]; RAS axis j came from argsort(o)[j]
    spacing = posterior.reference.spacing[np.argsort(orientation[:, 0])]
    centre, lesion = lesion_view(prob, levels_percent)
    if lesion is None:
        box = (slice(None),) * 3
    else:
        region = np.nonzero(lesion)
        margin = [max(int(np.ceil(15.0 / s)), int(i.max() - i.min() + 1)) for i, s in zip(region, spacing)]
        box = tuple(slice(max(int(i.min()) - m, 0), int(i.max()) + m + 1) for i, m in zip(region, margin))

    images = posterior.images or (DisplayImage(os.path.basename(posterior.reference.name),
                                               posterior.reference.modality, posterior.reference.data),)
    panels = [(f"{image.name} ({image.modality.upper()})", image.modality,
               to_ras(_full_grid(image, shape), affine)[0]) for image in images]
    panels.append(("P(tumour)", "probability", prob))
    columns = len(panels)
    figure, axes = plt.subplots(3, columns, figsize=(3.6 * columns + 0.6, 11.5), squeeze=False,
                                layout="constrained")
    for column, (name, modality, data) in enumerate(panels):
        if modality == "probability":
            cmap, (vmin, vmax), label = "viridis", (0.0, 1.0), "P(tumour)"
        else:
            cmap = "gray_r" if modality == "pet" else "gray"
            vmin, vmax = _window(data, modality, lesion, box, spacing, voi)
            label = UNITS.get(modality, "a.u.")
        for row, (view, axis, (h_axis, v_axis), (left, right)) in enumerate(VIEWS):
            ax = axes[row, column]
            ax.set_facecolor("0.85")  # where an image was not observed
            index = tuple(centre[axis] if a == axis else slice(None) for a in range(3))
            h = np.arange(prob.shape[h_axis]) * spacing[h_axis]
            v = np.arange(prob.shape[v_axis]) * spacing[v_axis]
            half_h, half_v = spacing[h_axis] / 2, spacing[v_axis] / 2
            shown = ax.imshow(data[index].T, cmap=cmap, origin="lower", vmin=vmin, vmax=vmax,
                              extent=[h[0] - half_h, h[-1] + half_h, v[0] - half_v, v[-1] + half_v],
                              interpolation="nearest")
            for level, colour in zip(levels_percent, LEVEL_COLOURS):
                if np.any(prob[index] >= level / 100.0):
                    ax.contour(h, v, prob[index].T, levels=[level / 100.0], colors=[colour],
                               linewidths=1.3)
            if reference is not None and reference[index].any():
                ax.contour(h, v, reference[index].T.astype(np.float32), levels=[0.5], **REFERENCE_STYLE)
            hw, vw = h[box[h_axis]], v[box[v_axis]]
            ax.set_xlim(hw[0] - half_h, hw[-1] + half_h)
            ax.set_ylim(vw[0] - half_v, vw[-1] + half_v)
            if view != "sagittal":
                ax.invert_xaxis()  # radiological convention: patient's right on the viewer's left
            ax.set_title(f"{name}\n{view}, RAS slice {centre[axis]}" if row == 0
                         else f"{view}, RAS slice {centre[axis]}", fontsize=9)
            ax.set_xlabel(f"{left}  <-  mm  ->  {right}", fontsize=8)
            ax.tick_params(labelsize=7)
            if column == 0:
                ax.set_ylabel("mm", fontsize=8)
        bar = figure.colorbar(shown, ax=list(axes[:, column]), location="bottom", shrink=0.85,
                              aspect=25, pad=0.01)
        bar.set_label(label, fontsize=9)
    handles = [plt.Line2D([], [], color=c, lw=2) for c in LEVEL_COLOURS[: len(levels_percent)]]
    labels = [f"P(tumour) >= {level:g}%" for level in levels_percent]
    comparison = record.get("reference_mask")
    if comparison:
        handles.append(plt.Line2D([], [], color=REFERENCE_STYLE["colors"][0], lw=2, ls="--"))
        labels.append(f"reference (Dice 50%: {comparison['dice_50']:.3f})")
    figure.legend(handles, labels, loc="outside lower center", fontsize=9, ncols=len(labels))
    figure.suptitle(_title(posterior, record, title), fontsize=11)
    return figure
