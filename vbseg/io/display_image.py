"""An input image as a panel of the overview figure: apart from :mod:`vbseg.posterior` (which
holds the panels) and :mod:`vbseg.overview` (which draws them), so that neither imports the
other at run time."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class DisplayImage(NamedTuple):
    """One input image for the overview figure, on the first input's grid.

    name: what the panel is called (the file name); modality: pet, ct, mr or other; data: the
    image values (NaN where not observed); bounds: where ``data`` lies in the first grid
    (slices), None when ``data`` is the whole grid.
    """

    name: str
    modality: str
    data: np.ndarray
    bounds: tuple | None = None
