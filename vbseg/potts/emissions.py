"""Class-emission models of the hidden Potts model: what the intensities of a class look like.

Given the label z_v = k, the images at voxel v are drawn from the class's emission:

* **gaussian** (default): independent Gaussians per modality, y_vm ~ N(mu_km, 1 / tau_km),
  with one precision per modality shared by the classes (tied) or one per class.
* **student**: a multivariate Student-t with diagonal scale, written as a Gaussian scale
  mixture, y_vm ~ N(mu_km, 1 / (u_v tau_km)), u_v ~ Gamma(nu/2, nu/2): a voxel far from every
  class mean (a spike, a vessel, a misregistered edge) is explained by a small u_v instead of
  pulling a class towards it (Peel & McLachlan 2000, "Robust mixture modelling using the t
  distribution", Statistics and Computing 10:339).
* **full**: y_v ~ N(mu_k, Lambda_k^-1) with a full precision matrix over the modalities, per
  class or tied, so PET and CT (or several MR sequences) that covary are fused in one
  likelihood rather than multiplied as if independent.
* **log-normal** (PET): log y_vm follows the Gaussian model, i.e. y is log-normal, a skewed,
  positive uptake distribution whose spread grows with its level. Implemented as a transform
  of the PET images before fitting; the density of y differs from that of log y by the
  Jacobian -sum log y, which does not depend on labels or parameters, so the posterior is the
  same.

The NumPyro program is :func:`vbseg.potts.model.hidden_potts_model` (``emission``,
``log_modalities``); the variational updates are in :mod:`vbseg.potts.emission_updates`.
"""

from __future__ import annotations

import numpy as np

# PET values at or below this fraction of the VOI median are raised to it before the log
# (reconstructions put exact zeros and small negative values in cold regions).
LOG_FLOOR_FRACTION = 0.01
# --emission and --covariance: the class-conditional densities of the label models
EMISSION_OPTIONS = ("gaussian", "student", "lognormal")
COVARIANCES = ("diagonal", "full")


def log_transform_pet(stack: np.ndarray, observed: np.ndarray, log_flags) -> tuple[np.ndarray, int]:
    """log of the flagged channels of ``stack`` (X, Y, Z, M), floored at LOG_FLOOR_FRACTION of
    the channel's median over its observed voxels. Returns (new stack, voxels floored)."""
    out = stack.astype(np.float32, copy=True)
    floored = 0
    for m, flag in enumerate(log_flags):
        if not flag:
            continue
        values = stack[..., m][observed[..., m]]
        median = float(np.median(values)) if values.size else 0.0
        floor = LOG_FLOOR_FRACTION * median if median > 0 else LOG_FLOOR_FRACTION * float(values.max())
        if not floor > 0:
            floor = 1e-6
        low = observed[..., m] & (stack[..., m] < floor)
        floored += int(low.sum())
        out[..., m] = np.log(np.maximum(stack[..., m], floor))
    return out, floored


def describe_emission(emission: str, covariance: str, dof: float) -> str:
    """The summary.json wording of an emission choice."""
    if covariance == "full":
        text = "multivariate gaussian with a full covariance across modalities shared by the classes"
    elif emission == "student":
        text = (f"student-t ({dof:g} degrees of freedom, one scale variable per voxel shared by "
                "the modalities), diagonal scale, one precision per modality shared by the classes")
    else:
        text = "gaussian, independent across modalities, one precision per modality shared by the classes"
    if emission == "lognormal":
        text += "; PET on the log scale (log-normal uptake)"
    return text
