"""The learned components: the equinox network and its checkpoints (:mod:`~vbseg.deep.model`),
prior log-odds maps and the deep-uncertainty baselines (:mod:`~vbseg.deep.segment`), and training
(:mod:`~vbseg.deep.training`, its settings and its data)."""
