"""Arrays in patient orientation: reorder and flip the axes of a voxel array to RAS+.

Figures show slices in patient orientation whatever the array order on disk; the overview and
the paper's contour figures both reorient with nibabel's closest-axis orientation of the affine.
"""

from __future__ import annotations

import nibabel as nib


def to_ras(array, affine):
    """``array`` (first three axes on the grid of ``affine``) with its axes permuted and flipped
    so that they run Right, Anterior, Superior; returns (array, orientation), the (3, 2)
    orientation of :func:`nibabel.orientations.io_orientation`."""
    orientation = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(array, orientation), orientation
