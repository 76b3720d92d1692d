"""The method registry (:mod:`vbseg.methods.registry`) and what the label models share
(:mod:`vbseg.methods.inputs`). The methods live with their model families and register
themselves: :mod:`~vbseg.potts.method` (potts, deep-potts), :mod:`~vbseg.potts.locate`
(locate-potts), :mod:`~vbseg.pv_potts.method` (pv-potts), :mod:`~vbseg.gp.method` (gp, deep-gp),
:mod:`~vbseg.baselines.method` (the baselines and the deep-uncertainty baselines),
:mod:`~vbseg.baselines.eanm41`, :mod:`~vbseg.cohort.method` (the population prior). A new method
is a new module in its family's folder that calls :func:`register`."""

from vbseg.methods.registry import (
    Method,
    MethodResult,
    build_summary,
    get_method,
    load_methods,
    method_names,
    register,
    result_posterior,
)

__all__ = ["Method", "MethodResult", "build_summary", "get_method", "load_methods", "method_names",
           "register", "result_posterior"]
