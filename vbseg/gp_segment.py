"""``segment(..., model="gp")``: the GP logit-field model's fit as a saved Posterior.

Kept apart from :mod:`vbseg.pipeline` (which loads, validates and crops the inputs for every
model) so that module stays one concept. The fit is :func:`vbseg.inference.gp_fit.fit_gp_logit`
on the VOI crop: a latent Matern-3/2 field on an FFT torus, P(tumour) the label posterior
E_q[P(z_v = tumour | f, y_v)], volume draws straight from q (field draws, then labels).
"""

from __future__ import annotations

import numpy as np

from vbseg.posterior import Posterior, saved_posterior


def gp_posterior(stack, observed, crop_voi, voi, bounds, volumes, modalities, seed, volume_draws):
    """(probability on the first grid, volume draws mL, TLG draws or None, summary parts)."""
    from vbseg.inference.gp_fit import fit_gp_logit

    reference = volumes[0]
    pet_first = modalities[0] == "pet"
    fit = fit_gp_logit(np.moveaxis(stack, -1, 0), reference.spacing, seed=seed,
                       num_volume_draws=volume_draws, voxel_mask=crop_voi, observed=observed,
                       count_weights=stack[..., 0] if pet_first else None)
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
    return probability, volume_draws_ml, tlg_draws, {
        "parameters": parameters, "elbo": np.asarray(fit.elbo_trace).tolist(),
        "diagnostics": {k: v for k, v in fit.diagnostics.items()}, "method": dict(fit.method),
        "timings_s": dict(fit.timings)}


def build(stack, observed, crop_voi, voi, bounds, volumes, images, modalities, roi, box, resampled,
          seed, volume_draws, out, levels_percent, title, provenance, voi_text) -> Posterior:
    """Fit, assemble summary.json (as the other models do) and save when ``out`` is given."""
    reference = volumes[0]
    probability, volume_draws_ml, tlg_draws, parts = gp_posterior(
        stack, observed, crop_voi, voi, bounds, volumes, modalities, seed, volume_draws)
    summary = {
        "model": "gp",
        "options": {"voi": voi_text, "volume_draws": volume_draws, "kernel": "matern32",
                    "structure": "fft", "family": "meanfield"},
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
    method = parts["method"].get("volume", "field draws from q, then labels")
    return saved_posterior(out, levels_percent, title, probability=probability, reference=reference,
                           voi=voi, volume_draws_ml=volume_draws_ml, volume_method=method,
                           tlg_draws=tlg_draws, summary=summary)
