"""The GP logit-field model as a method: ``gp`` and ``deep-gp`` (a network's logits as the
prior mean's offset).

The fit is :func:`vbseg.gp.fit.fit_gp_logit` on the VOI crop: a latent Matern-3/2
field on an FFT torus, P(tumour) the label posterior E_q[P(z_v = tumour | f, y_v)], volume draws
straight from q (field draws, then labels). With a prior logit ell on the crop grid (a CNN's
tumour logits for ``deep-gp``, or ``--external-field``) the field is f = m + gamma ell + g with
the weight gamma >= 0 learned (:func:`vbseg.gp.model.gp_logit_model`), recorded as
``parameters.prior_logit_weight``.
"""

from __future__ import annotations

import numpy as np

from vbseg.gp.fit import fit_gp_logit
from vbseg.gp.model import PRIOR_LOGIT_WEIGHT_SCALE
from vbseg.methods.inputs import likelihood_inputs, prior_log_odds
from vbseg.methods.registry import Method, MethodResult, register


def gp_fit_parts(stack, observed, crop_voi, spacing, pet_first, seed, volume_draws, prior_logit=None):
    """The GP fit on a crop and its parameters for summary.json: (the fit, parameters).
    ``stack``/``observed`` (x, y, z, M): the images of the likelihood, PET first when
    ``pet_first`` (its uptake weights the TLG draws); ``prior_logit``: optional (x, y, z) tumour
    logits whose weight the fit learns."""
    fit = fit_gp_logit(np.moveaxis(stack, -1, 0), spacing, seed=seed,
                       num_volume_draws=volume_draws, voxel_mask=crop_voi, observed=observed,
                       count_weights=stack[..., 0] if pet_first else None, prior_logit=prior_logit)
    parameters = {"lengthscale_mm": float(fit.lengthscale_mm), "amplitude": float(fit.amplitude),
                  "logit_mean": float(fit.logit_mean),
                  "class_means": np.asarray(fit.class_means).tolist(),
                  "class_sds": np.asarray(fit.class_sds).tolist(), "tumour_class": int(fit.tumour_class)}
    if fit.prior_logit_weight is not None:
        parameters["prior_logit_weight"] = float(fit.prior_logit_weight)
    return fit, parameters


def run_gp(prepared, options) -> MethodResult:
    """The GP logit field on the prepared crop (module doc)."""
    prior_logit, field_record, _ = prior_log_odds(prepared, options)
    likelihood = likelihood_inputs(prepared, options)
    fit, parameters = gp_fit_parts(likelihood.stack, likelihood.observed, prepared.crop_voi,
                                   prepared.reference.spacing, prepared.pet_first, prepared.seed,
                                   options.outputs.volume_draws, prior_logit)
    voxel_ml = prepared.reference.voxel_volume_ml
    run_options = {"volume_draws": options.outputs.volume_draws, "kernel": "matern32", "structure": "fft",
                   "family": "meanfield", "fusion": likelihood.record}
    if prior_logit is not None:
        run_options.update(prior_log_odds=field_record, field_weight=(
            f"learned: gamma ~ HalfNormal({PRIOR_LOGIT_WEIGHT_SCALE:g}), point estimate by SVI"))
    method = dict(fit.method)
    return MethodResult(
        probability=prepared.on_grid(fit.tumour_probability),
        volume_draws_ml=np.asarray(fit.volume_draws_voxels, np.float64) * voxel_ml,
        volume_method=method.get("volume", "field draws from q, then labels"),
        tlg_draws=(None if fit.weighted_draws is None
                   else np.asarray(fit.weighted_draws, np.float64) * voxel_ml),
        model=options.model.name, options=run_options, parameters=parameters,
        diagnostics=dict(fit.diagnostics), elbo=np.asarray(fit.elbo_trace).tolist(),
        timings_s=dict(fit.timings), sections={"gp": method})


register(Method("gp", run_gp, "GP logit field (Matern 3/2, FFT), PET first", rank=2))
register(Method("deep-gp", run_gp, "GP logit field with a 3D CNN's logits as the prior mean's "
                                    "offset, its weight learned", rank=5))
