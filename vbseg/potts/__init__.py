"""The hidden Potts family: the NumPyro program and the PSF operator (:mod:`~vbseg.potts.model`,
:mod:`~vbseg.potts.psf`, :mod:`~vbseg.potts.emissions`), its fits (mean-field VB with and without
the PSF, coarse restarts, beta, the GP intensity field), its reference samplers (Gibbs, PSF Gibbs,
Swendsen-Wang, the prior sampler) and exact enumeration for tests, and its methods
(:mod:`~vbseg.potts.method`: potts, deep-potts; :mod:`~vbseg.potts.locate`: locate-potts)."""
