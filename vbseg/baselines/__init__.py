"""The methods vbseg is compared with: thresholds and clustering (:mod:`~vbseg.baselines.classic`),
kernel spatial clustering (:mod:`~vbseg.baselines.kspc`), the graph-cut MAP
(:mod:`~vbseg.baselines.graphcut`), EANM 41 % (:mod:`~vbseg.baselines.eanm41`), registered in
:mod:`~vbseg.baselines.method`."""
