"""Every way of segmenting, one module per family, each registering its methods
(:mod:`vbseg.methods.registry`): :mod:`~vbseg.methods.potts` (potts, deep-potts),
:mod:`~vbseg.methods.gp` (gp, deep-gp), :mod:`~vbseg.methods.baselines` (the baselines and the
deep-uncertainty baselines), :mod:`~vbseg.methods.prior` (the population prior). A new method
is a new module here that calls :func:`register`."""

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
