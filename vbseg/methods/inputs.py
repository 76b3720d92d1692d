"""What the label models (hidden Potts and GP, with or without a network) share before their
fit: which images enter the likelihood (``--fusion``), the PET whitened by ``--noise-fwhm``,
and the prior log-odds map from a
network (deep-potts, deep-gp) or a file (``--external-field``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from vbseg.deep.segment import FIELD_MODELS, map_prior_logit, network_prior_logit
from vbseg.options import FUSION_JOINT_TEXT, FUSION_PET_TEXT, fusion_columns, model_fusion
from vbseg.potts.psf import noise_sd_gain, whiten
from vbseg.prepare import Prepared


@dataclasses.dataclass(frozen=True, eq=False)
class LikelihoodInputs:
    """The images the label model's likelihood sees. stack/observed (x, y, z, M') and volumes,
    modalities: those images' columns of the prepared crop; columns: their indices among the
    inputs; record: summary.json's ``options.fusion``. With ``--noise-fwhm`` the PET columns
    of ``stack`` are whitened (:func:`vbseg.potts.psf.whiten`), ``measured`` keeps the images
    as measured (what TLG sums and the PET noise model reads) and ``noise_gain`` (M',) turns a
    noise sd fitted to ``stack`` into the measured image's (1 where nothing was whitened)."""

    stack: np.ndarray
    observed: np.ndarray
    volumes: tuple
    modalities: tuple[str, ...]
    columns: tuple[int, ...]
    record: dict
    measured: np.ndarray | None = None
    noise_gain: np.ndarray | None = None

    def __post_init__(self):
        if self.measured is None:
            object.__setattr__(self, "measured", self.stack)
        if self.noise_gain is None:
            object.__setattr__(self, "noise_gain", np.ones(self.stack.shape[-1]))


def likelihood_inputs(prepared: Prepared, options) -> LikelihoodInputs:
    """The inputs' columns that ``options.model.fusion`` (default:
    :func:`vbseg.options.default_fusion`) puts in the likelihood."""
    given = options.model.fusion is not None
    fusion = model_fusion(options.model, prepared.modalities)
    columns = tuple(fusion_columns(fusion, prepared.modalities))
    record = {"mode": fusion, "chosen": "given" if given else "default",
              "images_in_likelihood": [prepared.images[m] for m in columns],
              "rule": FUSION_PET_TEXT if fusion == "pet" else FUSION_JOINT_TEXT}
    measured, observed = prepared.stack[..., list(columns)], prepared.observed[..., list(columns)]
    modalities = tuple(prepared.modalities[m] for m in columns)
    noise_fwhm = options.model.noise_fwhm_mm
    stack, whitened = measured, [bool(noise_fwhm) and modality == "pet" for modality in modalities]
    spacing = prepared.reference.spacing
    if any(whitened):
        stack = np.stack([whiten(measured[..., m], observed[..., m], spacing, noise_fwhm) if white
                          else measured[..., m] for m, white in enumerate(whitened)], axis=-1)
    gain = np.array([noise_sd_gain(noise_fwhm, spacing) if white else 1.0 for white in whitened])
    return LikelihoodInputs(stack=stack, observed=observed,
                            volumes=tuple(prepared.volumes[m] for m in columns),
                            modalities=modalities, columns=columns, record=record, measured=measured,
                            noise_gain=gain)


def prior_log_odds(prepared: Prepared, options):
    """(prior logit (x, y, z) or None, where it came from (a dict) or None, network seconds):
    the network's logits for the deep models (the network sees every input), else the
    ``--external-field`` map cut to the crop, else nothing."""
    if options.model.name in FIELD_MODELS:
        return network_prior_logit(options.model.checkpoint, prepared.stack, prepared.observed,
                                   prepared.modalities)
    if options.model.external_field is not None:
        logit, record = map_prior_logit(options.model.external_field, prepared.reference, prepared.bounds)
        return logit, record, 0.0
    return None, None, 0.0
