"""``segment(..., model="gp")``: the GP logit-field model's fit as a saved Posterior.

Kept apart from :mod:`vbseg.pipeline` (which loads, validates and crops the inputs for every
model) so that module stays one concept. The fit is :func:`vbseg.inference.gp_fit.fit_gp_logit`
on the VOI crop: a latent Matern-3/2 field on an FFT torus, P(tumour) the label posterior
E_q[P(z_v = tumour | f, y_v)], volume draws straight from q (field draws, then labels).

With a prior logit ell on the crop grid (e.g. a CNN's tumour logits: ``--model deep-gp``) the
field is f = m + gamma ell + g with the weight gamma >= 0 learned
(:func:`vbseg.models.gp.gp_logit_model`), recorded as ``parameters.prior_logit_weight`` in
summary.json; without one the fit and summary are the plain ``gp`` model's.
"""

from __future__ import annotations

import numpy as np

from vbseg.posterior import Posterior, saved_posterior


def gp_posterior(stack, observed, crop_voi, voi, bounds, volumes, modalities, seed, volume_draws,
                 prior_logit=None):
    """(probability on the first grid, volume draws mL, TLG draws or None, summary parts).

    ``prior_logit``: optional (X, Y, Z) float tumour logits on the crop grid (the shape of
    ``crop_voi``), the offset ell whose weight the fit learns; its value joins the parameters
    as ``prior_logit_weight``."""
    from vbseg.inference.gp_fit import fit_gp_logit

    reference = volumes[0]
    pet_first = modalities[0] == "pet"
    fit = fit_gp_logit(np.moveaxis(stack, -1, 0), reference.spacing, seed=seed,
                       num_volume_draws=volume_draws, voxel_mask=crop_voi, observed=observed,
                       count_weights=stack[..., 0] if pet_first else None, prior_logit=prior_logit)
    probability = np.zeros(reference.shape, np.float32)
    probability[bounds] = np.where(crop_voi, fit.tumour_probability, 0.0)
    voxel_ml = reference.voxel_volume_ml
    volume_draws_ml = np.asarray(fit.volume_draws_voxels, np.float64) * voxel_ml
    tlg_draws = (None if fit.weighted_draws is None
                 else np.asarray(fit.weighted_draws, np.float64) * voxel_ml)
    parameters = {"lengthscale_mm": float(fit.lengthscale_mm), "amplitude": float(fit.amplitude),
                  "logit_mean": float(fit.logit_mean),
                  "class_means": np.asarray(fit.class_means).tolist(),
                  "class_sds": np.asarray(fit.class_sds).tolist(), "tumour_class": int(fit.tumour_class)}
    if fit.prior_logit_weight is not None:
        parameters["prior_logit_weight"] = float(fit.prior_logit_weight)
    return probability, volume_draws_ml, tlg_draws, {
        "parameters": parameters, "elbo": np.asarray(fit.elbo_trace).tolist(),
        "diagnostics": {k: v for k, v in fit.diagnostics.items()}, "method": dict(fit.method),
        "timings_s": dict(fit.timings)}


def build(stack, observed, crop_voi, voi, bounds, volumes, images, modalities, roi, box, resampled,
          seed, volume_draws, out, levels_percent, title, provenance, voi_text, prior_logit=None,
          model_name="gp", field_record=None, fusion=None) -> Posterior:
    """Fit, assemble summary.json (as the other models do) and save when ``out`` is given.

    ``prior_logit``: optional (X, Y, Z) tumour logits on the crop grid (:func:`gp_posterior`);
    ``model_name``: what summary.json calls the model (e.g. "deep-gp" with a CNN's logits);
    ``field_record``: where the prior logit came from (a JSON-able dict), recorded as
    ``options.prior_log_odds`` with the weight's rule as ``options.field_weight``; ``fusion``:
    which images the likelihood saw (``stack`` holds those), recorded as ``options.fusion``."""
    reference = volumes[0]
    probability, volume_draws_ml, tlg_draws, parts = gp_posterior(
        stack, observed, crop_voi, voi, bounds, volumes, modalities, seed, volume_draws, prior_logit)
    summary = {
        "model": model_name,
        "options": {"voi": voi_text, "volume_draws": volume_draws, "kernel": "matern32",
                    "structure": "fft", "family": "meanfield", "fusion": fusion},
        "parameters": parts["parameters"],
        "modality": modalities,
        "resampled": [{"path": p, "resampled": r} for p, r in zip(images, resampled)],
        "elbo": parts["elbo"],
        "gp": parts["method"],
        "diagnostics": dict(parts["diagnostics"], voi_voxels=int(voi.sum()),
                            voi_bounds=[[s.start, s.stop] for s in bounds]),
        "timings_s": parts["timings_s"],
        **provenance,
    }
    if prior_logit is not None or field_record is not None:
        from vbseg.models.gp import PRIOR_LOGIT_WEIGHT_SCALE

        summary["options"].update(prior_log_odds=field_record, field_weight=(
            f"learned: gamma ~ HalfNormal({PRIOR_LOGIT_WEIGHT_SCALE:g}), point estimate by SVI"
            if prior_logit is not None else None))
    method = parts["method"].get("volume", "field draws from q, then labels")
    return saved_posterior(out, levels_percent, title, probability=probability, reference=reference,
                           voi=voi, volume_draws_ml=volume_draws_ml, volume_method=method,
                           tlg_draws=tlg_draws, summary=summary)
