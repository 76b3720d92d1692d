"""Inputs made ready for a method: images loaded and checked, put on the first image's grid
through world coordinates, the volume of interest built and cut out, each modality
standardised. Every method of :mod:`vbseg.methods` starts from one :class:`Prepared`.

The first image defines the output grid; the others are resampled onto it
(:func:`vbseg.io.volume.resample_onto`); voxels outside an image's field of view are unobserved for
that image. The VOI is a mask (``roi``), a box of array index ranges (``box``) or the whole
image; its bounding box is the crop a model is fitted on.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vbseg.errors import InputError
from vbseg.io.image import Volume, parse_box, resample_onto
from vbseg.io.volume import load_volume, read_mask

# Crops are padded up to a multiple of this many voxels per axis (padding lies outside the VOI),
# so nearby crop sizes share one compiled program (the Potts and GP fits).
SHAPE_BUCKET = 8


def bucket_shape(shape, multiple: int = SHAPE_BUCKET) -> tuple[int, ...]:
    """Each size rounded up to a multiple of ``multiple``."""
    return tuple(int(-(-int(n) // multiple) * multiple) for n in shape)


def pad_to_shape(array: np.ndarray, shape, fill=0, first_axis: int = 0) -> np.ndarray:
    """``array`` padded with ``fill`` at the far end of the axes ``first_axis`` ..
    ``first_axis + len(shape) - 1`` up to ``shape`` (the other axes untouched)."""
    pad = [(0, 0)] * array.ndim
    for offset, target in enumerate(shape):
        axis = first_axis + offset
        pad[axis] = (0, int(target) - array.shape[axis])
    return np.pad(array, pad, constant_values=fill)


def pad_to_bucket(array: np.ndarray, fill, multiple: int = SHAPE_BUCKET) -> np.ndarray:
    """The first three axes of ``array`` padded with ``fill`` to :func:`bucket_shape`."""
    return pad_to_shape(array, bucket_shape(array.shape[:3], multiple), fill)


def voi_bounds(voi: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of a non-empty mask, as slices."""
    index = np.nonzero(voi)
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in index)


def load_inputs(images, modalities, roi=None, box=None, series_uid=None):
    """Load the images (NIfTI files or DICOM series folders; ``series_uid`` picks series in
    folders holding several), put them on the first image's grid, and build the VOI.

    Returns (volumes, voi (bool, first grid), channels [(I, J, K) float32 per image],
    coverage [bool per image: inside that image's field of view], resampled [bool per image],
    roi_resampling (how a label ``roi`` on another grid was put on the first, or None:
    :func:`vbseg.io.volume.read_mask`)).
    """
    volumes = [load_volume(path, modality, series_uid=series_uid)
               for path, modality in zip(images, modalities)]
    reference = volumes[0]
    roi_resampling = None
    if roi is not None:
        voi, roi_resampling = read_mask(roi, reference)
    elif box is not None:
        voi = np.zeros(reference.shape, bool)
        voi[parse_box(box, reference.shape)] = True
    else:
        voi = np.ones(reference.shape, bool)
    full = np.ones(reference.shape, bool)
    channels, coverage, resampled = [reference.data], [full], [False]
    for volume in volumes[1:]:
        if volume.same_grid(reference):
            channels.append(volume.data)
            coverage.append(full)
            resampled.append(False)
            continue
        on_grid, covered = resample_onto(volume, reference)
        if not (covered & voi).any():
            raise InputError(volume.name, "does not overlap the volume of interest in world space")
        channels.append(on_grid.data)
        coverage.append(covered)
        resampled.append(True)
    return volumes, voi, channels, coverage, resampled, roi_resampling


def standardise_features(data, observed):
    """Each modality of ``data`` (..., M): (y - median) / sd over the voxels where it is
    observed, zeros elsewhere; returns (features float32, centres (M,), scales (M,)).
    ValueError naming the modality's index when it is constant or unobserved."""
    centres, scales = [], []
    for m in range(data.shape[-1]):
        values = data[..., m][observed[..., m]]
        scale = float(values.std()) if values.size else 0.0
        if not scale > 0:
            raise ValueError(f"modality {m} is constant (or unobserved) in the voxel mask")
        centres.append(float(np.median(values)))
        scales.append(scale)
    centres, scales = np.asarray(centres, np.float32), np.asarray(scales, np.float32)
    return np.where(observed, (data - centres) / scales, 0.0).astype(np.float32), centres, scales


def standardise(stack, observed, volumes):
    """:func:`standardise_features` of the crop ``stack`` (x, y, z, M) over the observed VOI
    voxels; InputError naming the image (``volumes``) that is constant there."""
    try:
        return standardise_features(stack, observed)
    except ValueError:
        for m, volume in enumerate(volumes):
            values = stack[..., m][observed[..., m]]
            if not (float(values.std()) if values.size else 0.0) > 0:
                raise InputError(volume.name, "is constant inside the volume of interest") from None
        raise


def load_crop(images, modalities, roi=None, box=None, series_uid=None):
    """:func:`load_inputs`, then the VOI's bounding box cut out of every image.

    Returns (volumes, voi (first grid), bounds (slices), crop_voi, stack (x, y, z, M) float32,
    observed (x, y, z, M) bool: inside that image's field of view and the VOI, resampled,
    roi_resampling).
    """
    volumes, voi, channels, coverage, resampled, roi_resampling = load_inputs(
        images, modalities, roi, box, series_uid)
    bounds = voi_bounds(voi)
    crop_voi = voi[bounds]
    stack = np.stack([c[bounds] for c in channels], axis=-1).astype(np.float32)
    observed = np.stack([c[bounds] for c in coverage], axis=-1) & crop_voi[..., None]
    return volumes, voi, bounds, crop_voi, stack, observed, resampled, roi_resampling


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """What every method receives.

    images, modalities: the input paths (as given) and one modality each; roi, box: the VOI as
    given; seed: seeds the volume draws; volumes: the loaded images; voi (I, J, K) bool on the
    first grid; bounds: its bounding box; crop_voi (x, y, z) bool; stack (x, y, z, M) float32
    and observed (x, y, z, M) bool: the crop of every image on the first grid; resampled: per
    image, whether it was resampled onto that grid; roi_resampling: how a label ``roi`` on
    another grid was put on the first (None: it was on it); warnings: summary.json's warnings
    about the inputs ({code, message}; :func:`vbseg.trust.input_warnings`), before the fit's.
    """

    images: tuple[str, ...]
    modalities: tuple[str, ...]
    roi: str | None
    box: str | None
    seed: int
    volumes: tuple[Volume, ...]
    voi: np.ndarray
    bounds: tuple[slice, ...]
    crop_voi: np.ndarray
    stack: np.ndarray
    observed: np.ndarray
    resampled: tuple[bool, ...]
    roi_resampling: dict | None = None
    warnings: tuple[dict, ...] = ()

    @property
    def reference(self) -> Volume:
        """The first image: its grid and affine are the outputs'."""
        return self.volumes[0]

    @property
    def pet_first(self) -> bool:
        return self.modalities[0] == "pet"

    def within(self, box: tuple[slice, ...]) -> Prepared:
        """The same inputs with the VOI cut down to ``box`` (slices of the current crop): the
        crop, its VOI and every image's observed voxels become those of the smaller box. The
        images, the given roi/box and the warnings are kept (summary.json records the VOI as
        given; a method that narrows it records how)."""
        crop_voi = self.crop_voi[box]
        if not crop_voi.any():
            raise ValueError("the box holds no voxel of the volume of interest")
        bounds = tuple(slice(outer.start + inner.start, outer.start + inner.stop)
                       for outer, inner in zip(self.bounds, box))
        voi = np.zeros_like(self.voi)
        voi[bounds] = crop_voi
        return dataclasses.replace(self, voi=voi, bounds=bounds, crop_voi=crop_voi,
                                   stack=self.stack[box], observed=self.observed[box])

    def on_grid(self, crop: np.ndarray) -> np.ndarray:
        """(I, J, K) float32 on the first grid from an (x, y, z) crop map: the crop inside the
        VOI, 0 elsewhere."""
        full = np.zeros(self.reference.shape, np.float32)
        full[self.bounds] = np.where(self.crop_voi, crop, 0.0)
        return full


def prepare(images, modalities, roi=None, box=None, series_uid=None, seed: int = 0) -> Prepared:
    """:func:`load_crop` as a :class:`Prepared`."""
    volumes, voi, bounds, crop_voi, stack, observed, resampled, roi_resampling = load_crop(
        images, modalities, roi, box, series_uid)
    return Prepared(images=tuple(images), modalities=tuple(modalities), roi=roi, box=box, seed=seed,
                    volumes=tuple(volumes), voi=voi, bounds=bounds, crop_voi=crop_voi, stack=stack,
                    observed=observed, resampled=tuple(resampled), roi_resampling=roi_resampling)
