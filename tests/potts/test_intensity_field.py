"""The GP intensity field inside the hidden Potts mean-field fit
(vbseg.potts.intensity_field): its update is the exact GP posterior mean (dense float64
solve on a tiny grid), and as a bias field it recovers a smooth ramp and the labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vbseg.gp.kernels import circulant_embedding, dense_covariance, embedding_shape
from vbseg.potts.intensity_field import IntensityFieldSpec, field_step
from vbseg.potts.meanfield import fit_hidden_potts_vb
from vbseg.potts.model import NormalGammaPrior, neighbour_weights


def test_field_update_is_the_gp_posterior_mean():
    """With q and the class posteriors fixed, CG run to convergence gives b = L eps =
    K (I + D K)^-1 s (module doc), against a dense solve, to relative 1e-6 in float64."""
    grid, spacing = (6, 5, 4), (3.0, 3.0, 4.0)
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        # a torus past the kernel's reach: exact restriction, positive definite
        structure = circulant_embedding(grid, spacing, "matern52", 8.0, 0.7,
                                        shape=embedding_shape(grid, spacing, "matern52", 8.0))
        q = rng.dirichlet(np.ones(3), size=grid)
        y = rng.normal(size=grid + (2,))
        observed = rng.random(grid + (2,)) > 0.2
        post = NormalGammaPrior(rng.normal(size=(3, 2)), np.full((3, 2), 4.0),
                                rng.uniform(2, 5, (3, 2)), rng.uniform(0.5, 2, (3, 2)))
        classes = (1, 2)
        eps = field_step(jnp.zeros(structure.latent_shape), structure, jnp.asarray(q), jnp.asarray(y),
                         jnp.asarray(observed), NormalGammaPrior(*map(jnp.asarray, post)), classes, 400,
                         tol=1e-13)
        b = np.asarray(structure.sqrt_matvec(eps)).ravel()
        precision = post.shape[list(classes), 0] / post.rate[list(classes), 0]
        weight = q[..., list(classes)] * precision * observed[..., :1]
        d = weight.sum(-1).ravel()
        s = (weight * (y[..., :1] - post.mean[list(classes), 0])).sum(-1).ravel()
        k = np.asarray(dense_covariance(grid, spacing, "matern52", 8.0, 0.7))
        exact = k @ np.linalg.solve(np.eye(d.size) + d[:, None] * k, s)
    np.testing.assert_allclose(b, exact, rtol=1e-6, atol=1e-9 * np.abs(exact).max())


def _bias_phantom():
    grid, h = (16, 16, 12), (4.0, 4.0, 3.0)
    position = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), -1) * np.asarray(h)
    truth = np.linalg.norm(position - np.asarray(grid) * np.asarray(h) / 2, axis=-1) < 14.0
    bias = 1.4 * (position[..., 0] / 30.0 - 1.0) + 0.3 * (position[..., 2] / 36.0 - 0.5)
    y = (2.0 * truth + bias + 0.4 * np.random.default_rng(0).normal(size=grid))[..., None]
    return grid, h, truth, bias, y


def test_bias_field_in_the_potts_fit_recovers_the_ramp_and_the_labels():
    """The phantom of tests/gp/test_gp.py's mixture test (28 mm sphere 2 units above background,
    noise sd 0.4, linear bias ramp of +-1.4 across x): the Potts fit (K = 2, beta 0.5) without
    the field labels < 97 % of voxels right; with the bias field on both classes (Matern 5/2,
    60 mm, amplitude 1) >= 98 %, the field follows the ramp (correlation >= 0.95), and the
    objective climbs monotonically (float32 round-off allowed)."""
    grid, h, truth, bias, y = _bias_phantom()
    args = (jnp.asarray(y, jnp.float32), jnp.ones(y.shape, bool), jnp.ones(grid, bool), jnp.float32(0.5),
            jnp.asarray(neighbour_weights(h, 6)), NormalGammaPrior())
    plain = fit_hidden_potts_vb(*args, num_classes=2)
    spec = IntensityFieldSpec(classes=(0, 1), spacing_mm=h, kernel="matern52", lengthscale_mm=60.0,
                              amplitude=1.0)
    fitted = fit_hidden_potts_vb(*args, num_classes=2, intensity=spec)
    accuracy = [np.mean((np.asarray(r.marginals)[..., 1] >= 0.5) == truth) for r in (plain, fitted)]
    assert accuracy[0] < 0.97 and accuracy[1] >= 0.98, accuracy
    assert np.corrcoef(np.asarray(fitted.intensity).ravel(), bias.ravel())[0, 1] >= 0.95
    trace = np.asarray(fitted.elbo_trace)[: int(fitted.num_iterations)]
    assert np.all(np.diff(trace) >= -1e-5 * np.abs(trace).max()), np.diff(trace).min()
    assert plain.intensity is None
    # with beta learned, the second stage continues from the restarts' field
    learned = fit_hidden_potts_vb(*args, num_classes=2, intensity=spec, beta_estimator="pl")
    assert np.mean((np.asarray(learned.marginals)[..., 1] >= 0.5) == truth) >= 0.98


def test_segment_with_a_bias_field_writes_it_and_refuses_bad_combinations(tmp_path, capsys):
    """Through the command line on the bias phantom as an MR image (K = 2, the bright class
    tumour): Dice >= 0.95 with ``--intensity-field all`` against < 0.9 without, the field saved
    on the image grid in image units (correlation with the ramp >= 0.95), summary.json says
    how; bad combinations are one line each."""
    import json

    import nibabel as nib

    from vbseg.cli import main
    from vbseg.io.volume import save_nifti
    from vbseg.metrics import dice

    grid, h, truth, bias, y = _bias_phantom()
    affine = np.diag([*h, 1.0])
    image = tmp_path / "mr.nii.gz"
    save_nifti(image, (100.0 + 50.0 * y[..., 0]).astype(np.float32), affine)  # arbitrary MR units
    whole = ",".join(f"0:{n}" for n in y.shape[:3])  # MR alone needs a VOI: here the whole grid
    common = [str(image), "--modality", "mr", "--tumour-class", "1", "--volume-draws", "200", "--box", whole]
    assert main(["segment", *common, "--out", str(tmp_path / "plain")]) == 0
    assert main(["segment", *common, "--intensity-field", "all", "--out", str(tmp_path / "field")]) == 0
    scores = [dice(np.asarray(nib.load(tmp_path / name / "contour_50.nii.gz").dataobj) > 0, truth)
              for name in ("plain", "field")]
    assert scores[0] < 0.9 and scores[1] >= 0.95, scores
    field = np.asarray(nib.load(tmp_path / "field" / "intensity_field.nii.gz").dataobj)
    assert np.corrcoef(field.ravel(), bias.ravel())[0, 1] >= 0.95
    assert 0.7 < np.ptp(field) / np.ptp(50.0 * bias) < 1.3  # in image units
    summary = json.loads((tmp_path / "field" / "summary.json").read_text())
    assert summary["options"]["intensity_field"]["fit_classes"] == [0, 1]
    assert summary["parameters"]["intensity_field"]["file"] == "intensity_field.nii.gz"
    capsys.readouterr()
    field = ["--intensity-field", "all"]
    for extra in (["--intensity-field", "everything"], field + ["--emission", "student"],
                  ["--intensity-lengthscale", "40"], field + ["--intensity-lengthscale", "-3"],
                  field + ["--model", "gp"]):
        assert main(["segment", *common, *extra, "--out", str(tmp_path / "bad")]) == 2, extra
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "--intensity" in error, (extra, error)
    import vbseg

    for kwargs in (dict(intensity_field="tumour", tumour_class=None),
                   dict(intensity_field="all", prior="sarcoma")):
        with pytest.raises(vbseg.InputError, match="--intensity-field"):
            vbseg.segment([str(image)], modalities=["mr"], volume_draws=200, box=whole, **kwargs)
