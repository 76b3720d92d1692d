"""The partial-volume hidden MRF (``--model pv-potts``): the program (:mod:`~vbseg.pv_potts.model`),
what its fit adds to the PSF Potts fit and sampler (:mod:`~vbseg.pv_potts.inference`) and the
method (:mod:`~vbseg.pv_potts.method`)."""
