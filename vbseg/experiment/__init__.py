"""Many cases at once: experiment configs (:mod:`~vbseg.experiment.config`), the resumable
runner and its tasks, here or on Dask (:mod:`~vbseg.experiment.runner`,
:mod:`~vbseg.experiment.task`, :mod:`~vbseg.experiment.local_pool`,
:mod:`~vbseg.experiment.cluster`), their tables (:mod:`~vbseg.experiment.results`),
``segment --batch`` (:mod:`~vbseg.experiment.batch`) and the committed folds by case
(:mod:`~vbseg.experiment.folds`)."""
