"""Inference machinery every family shares: SVI under one jit with compile time apart
(:mod:`~vbseg.inference.svi`) and the one chain driver with its diagnostics
(:mod:`~vbseg.inference.chains`). Each family keeps its own fits and samplers beside its model."""
