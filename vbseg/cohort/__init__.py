"""Population priors learned from delineated cases: the cohort model (:mod:`~vbseg.cohort.model`),
the between-patient volume error (:mod:`~vbseg.cohort.volume_error`), empirical Bayes
(:mod:`~vbseg.cohort.empirical_bayes`), fitting and resolving priors
(:mod:`~vbseg.cohort.population`) and the prior method (:mod:`~vbseg.cohort.method`)."""
