"""The product of every fit: a posterior over tumour delineations.

A :class:`Posterior` holds P(tumour) per voxel on the grid of the first input, the volume of
interest it was computed over, posterior draws of the tumour volume (and, for PET, of total
lesion glycolysis), and the record of how it was made. Hard masks are derived from it
(``contour(level)``), never stored as the primary result; volumes carry credible intervals
from the draws, and ``volume_method`` says what the draws are.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vbseg.io.display_image import DisplayImage  # noqa: F401  (re-exported: the overview panels)
from vbseg.io.image import Volume
from vbseg.io.result_files import DELINEATION_FILE, FRACTION_FILE, LOCATOR_FILE, RTSTRUCT_NAME, SEG_NAME
from vbseg.io.writing import save_nifti, sha256_file, write_text_atomic, write_with
from vbseg.metrics import dice
from vbseg.potts.intensity_field import INTENSITY_FILE
from vbseg.readouts import (
    POSTERIOR_NOTE,
    READOUT_UNITS,
    SUVPEAK_DEFINITION,
    level_readouts,
    suvmean_draws,
)
from vbseg.trust import fit_warnings

INDEPENDENT_DRAWS_METHOD = (
    "posterior draws of independent voxel labels from the mean-field marginals q_v "
    "(ignores spatial correlation between voxels, so the interval understates the spread)"
)


@partial(jax.jit, static_argnames=("num_draws",))
def _independent_label_sums(key, probability, weights, *, num_draws: int):
    """Draws of sum_v z_v * weights[:, j] with z_v ~ Bernoulli(p_v) independent: (D, J)."""

    def one(draw_key):
        labels = jax.random.uniform(draw_key, probability.shape) < probability
        return labels.astype(weights.dtype) @ weights

    return jax.lax.map(one, jax.random.split(key, num_draws))


def independent_label_draws(probability, weights, *, seed: int, num_draws: int) -> np.ndarray:
    """Posterior draws of weighted label sums under independent Bernoulli voxel labels.

    Args:
        probability: (N,) P(tumour) of the voxels that can be tumour (p > 0).
        weights: (N, J) per-voxel weights, e.g. voxel volume in mL and SUV x volume (TLG).
    Returns:
        (num_draws, J) float64 array.
    """
    key = jax.random.PRNGKey(seed)
    sums = _independent_label_sums(
        key, jnp.asarray(probability, jnp.float32), jnp.asarray(weights, jnp.float32),
        num_draws=num_draws,
    )
    return np.asarray(sums, dtype=np.float64)


def credible_interval(draws, level: float = 0.95) -> dict:
    """Posterior mean and equal-tailed interval of 1D draws."""
    draws = np.asarray(draws, np.float64)
    tail = (1.0 - level) / 2.0
    lower, upper = np.quantile(draws, [tail, 1.0 - tail])
    return {
        "mean": float(draws.mean()),
        "lower": float(lower),
        "upper": float(upper),
        "level": level,
        "interval": "equal-tailed",
    }


def output_names(levels_percent) -> list[str]:
    """File names a saved posterior writes, for checking before any work is done."""
    return (
        ["prob.nii.gz"]
        + [f"contour_{level:g}.nii.gz" for level in levels_percent]
        + ["summary.json", "overview.png"]
    )


def result_set_names(folder: Path) -> set[str]:
    """The names of the files a previous run may have written into ``folder``: the fixed ones,
    the contours of the levels its summary.json records and the conformal contours it names."""
    names = set(output_names([])) | {INTENSITY_FILE, FRACTION_FILE, LOCATOR_FILE, DELINEATION_FILE,
                                     RTSTRUCT_NAME, SEG_NAME}
    try:
        summary = json.loads((folder / "summary.json").read_text())
        names.update(output_names([float(level) for level in summary["levels_percent"]]))
        # the conformal contours (vbseg.calibration.calibration_file) it names
        names.update(value["file"] for entry in summary.get("volume_ml_conformal", [])
                     for value in entry.values() if isinstance(value, dict) and "file" in value)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no readable previous summary: its contours are unknown, so none is removed
    return names


@dataclasses.dataclass(eq=False)
class Posterior:
    """Posterior over the tumour delineation of one image (or co-registered stack).

    Attributes:
        probability: (I, J, K) float32 P(tumour) on the first input's grid; 0 outside the VOI.
        reference: the first input (grid, affine and image for display).
        voi: (I, J, K) bool volume of interest the model was fitted over.
        volume_draws_ml: (D,) posterior draws of the tumour volume (mL).
        volume_method: how the draws were made.
        tlg_draws: (D,) draws of total lesion glycolysis (SUV mL) when the first input is PET.
        summary: everything else summary.json records (model, parameters, elbo, ...).
        images: the inputs as :class:`DisplayImage` panels of the overview figure (empty: the
            first input alone).
        reference_mask: (I, J, K) bool reference delineation on the first grid, or None;
            reference_mask_path: its file; reference_mask_resampling: how it was put on the
            first grid (:func:`vbseg.io.volume.read_mask`), None when it was on it. The overview
            draws it and summary.json records the Dice of each contour with it.
        maps: the method's further maps, file name -> (I, J, K) float32 on the first grid (written
            beside prob.nii.gz; e.g. locate-potts's locator and delineation maps).
    """

    probability: np.ndarray
    reference: Volume
    voi: np.ndarray
    volume_draws_ml: np.ndarray
    volume_method: str
    tlg_draws: np.ndarray | None = None
    summary: dict = dataclasses.field(default_factory=dict)
    images: tuple = ()
    reference_mask: np.ndarray | None = None
    reference_mask_path: str | None = None
    reference_mask_resampling: dict | None = None
    maps: dict = dataclasses.field(default_factory=dict)

    def contour(self, level: float) -> np.ndarray:
        """The region {P(tumour) >= level}, level in (0, 1); nested for increasing levels."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"contour level must be in (0, 1), got {level}")
        return self.probability >= np.float32(level)

    def volume_interval(self, level: float = 0.95) -> dict:
        interval = credible_interval(self.volume_draws_ml, level)
        interval["method"] = self.volume_method
        return interval

    def pet_measures(self, level: float = 0.95) -> dict:
        """MTV (mL) and TLG (SUV x mL) with intervals; empty unless the first input is PET."""
        if self.tlg_draws is None:
            return {}
        return {
            "mtv_ml": credible_interval(self.volume_draws_ml, level),
            "tlg": credible_interval(self.tlg_draws, level),
        }

    def pet_readouts(self, levels_percent=(10, 50, 90), level: float = 0.95) -> dict:
        """SUVmax, SUVpeak, SUVmean, MTV and TLG inside each contour and its largest region
        (deterministic given the contour) and posterior intervals of MTV, TLG and SUVmean
        (:mod:`vbseg.readouts`); empty unless the first input is PET."""
        if self.tlg_draws is None or self.reference.modality != "pet":
            return {}
        image, spacing = self.reference.data, self.reference.spacing
        voxel_ml = self.reference.voxel_volume_ml
        suvmean = suvmean_draws(self.volume_draws_ml, self.tlg_draws)
        return {
            "levels": {f"{p:g}": level_readouts(image, self.contour(p / 100.0), spacing, voxel_ml)
                       for p in levels_percent},
            "posterior": {**self.pet_measures(level),
                          "suvmean": credible_interval(suvmean, level) if suvmean.size else None,
                          "note": POSTERIOR_NOTE},
            "suvpeak_definition": SUVPEAK_DEFINITION,
            "units": READOUT_UNITS,
        }

    def reference_comparison(self, levels_percent=(10, 50, 90)) -> dict:
        """Dice of each contour (and of the 50 % contour, ``dice_50``) with the reference mask,
        the mask's volume (mL) on the first grid, and whether it was resampled onto that grid;
        empty without a reference mask."""
        if self.reference_mask is None:
            return {}
        return {
            "path": self.reference_mask_path,
            "sha256": sha256_file(self.reference_mask_path) if self.reference_mask_path else None,
            "volume_ml": float(self.reference_mask.sum() * self.reference.voxel_volume_ml),
            "dice": {f"{p:g}": dice(self.contour(p / 100.0), self.reference_mask)
                     for p in levels_percent},
            "dice_50": dice(self.contour(0.5), self.reference_mask),
            "resampled": self.reference_mask_resampling is not None,
            **({"resampling": self.reference_mask_resampling} if self.reference_mask_resampling else {}),
        }

    def summary_dict(self, level: float = 0.95) -> dict:
        record = {"volume_ml": self.volume_interval(level)}
        record.update(self.pet_measures(level))
        record.update(self.summary)
        return record

    def save(self, out_dir, levels_percent=(10, 50, 90), *, title: str = "") -> dict[str, Path]:
        """Write prob.nii.gz, contour_<level>.nii.gz, summary.json and overview.png atomically.

        The caller checks beforehand that these may be written (see :func:`output_names`).
        """
        from vbseg.overview import draw_overview  # matplotlib only when saving

        out = Path(out_dir)
        affine = self.reference.affine
        written = {"prob": save_nifti(out / "prob.nii.gz", self.probability.astype(np.float32), affine)}
        for level in levels_percent:
            mask = self.contour(level / 100.0).astype(np.uint8)
            written[f"contour_{level:g}"] = save_nifti(out / f"contour_{level:g}.nii.gz", mask, affine)
        record = self.summary_dict()
        record["levels_percent"] = [float(level) for level in levels_percent]
        for key, value in (("pet_readouts", self.pet_readouts(levels_percent)),
                           ("reference_mask", self.reference_comparison(levels_percent))):
            if value:
                record[key] = value
        written["summary"] = write_text_atomic(
            out / "summary.json", json.dumps(record, indent=2, default=_json_default) + "\n"
        )
        figure = draw_overview(self, levels_percent, title=title, record=record)
        written["overview"] = write_with(out / "overview.png", lambda tmp: figure.savefig(tmp, dpi=110))
        import matplotlib.pyplot as plt

        plt.close(figure)
        return written


def _json_default(value):
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def saved_posterior(out, levels_percent, title: str = "", **fields) -> Posterior:
    """``Posterior(**fields)``, saved into ``out`` when it is given: the last step of every
    model's ``segment`` path. The summary gains ``warnings`` (:func:`vbseg.trust.fit_warnings`,
    after any the model put there itself)."""
    summary = dict(fields.pop("summary", {}))
    summary["warnings"] = list(summary.get("warnings", [])) + fit_warnings(
        fields["probability"], fields["voi"], summary)
    posterior = Posterior(summary=summary, **fields)
    if out is not None:
        posterior.save(out, levels_percent, title=title)
    return posterior
