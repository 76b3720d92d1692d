"""How fast is the GP logit-field fit, how does it scale, and how accurate and calibrated is it?

Speed, on PET crops of n^3 voxels (4 x 4 x 3 mm, a 37 mm sphere at 4:1, as bench_potts), for
the two grid structures (FFT: isotropic Matern 3/2 on the compact torus; Kronecker: separable
Matern 3/2), mean-field family, one draw per step:

* compile time of the SVI program; time per SVI step (median over ``--repeats`` runs of one
  25-step chunk, started from the fit's own start); the start (EM + kriging) run time;
* steps and time to convergence (the fit's own test: chunk-mean ELBO gain < 1e-4 nats per
  voxel, cap 400 steps; one run, sizes up to ``--converge-max``), and the noise-robust step
  after which the 25-step mean ELBO stays within 1e-3 nats per voxel of its final value
  ("plateau");
* the same model with a dense N x N covariance (Cholesky every step, since the length-scale is
  learned) on the sizes it can handle, and the ratio dense / FFT and dense / Kronecker per step;
  also one LAPACK Cholesky of that covariance, a lower bound on any dense step.

Accuracy and calibration, on ``--seeds`` noise draws of the 22 mm sphere (4:1, CV 10 %, 6 mm
PSF, the default 24^3 crop), next to the hidden Potts model through ``vbseg.segment`` (VB
without the PSF term, like the GP; method ``potts_psf6`` adds the PSF model): Dice of the 50 %
contour, ECE over the crop, volume error of the posterior mean, coverage of the 95 % volume
interval (2000 draws), for the GP with both probability maps (``gp_label``: E_q[P(z_v | f,
y_v)], the default; ``gp_field``: E_q[sigmoid(f_v)]; each with its own volume draws).

Regenerate (about 25 minutes on 2 cores, 10 of them the 192^3 runs):
    python -m benchmarks.bench_gp
Writes benchmarks/results/bench_gp.json and bench_gp.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

import vbseg
from benchmarks.common import RESULTS, machine, write_report
from vbseg.gp import fit as gp_fit
from vbseg.gp import start as gp_start
from vbseg.gp.kernels import cholesky, stationary_kernel
from vbseg.gp.model import FieldPrior, GPLogitModel, GridGP
from vbseg.inference.svi import fit_svi, steps_to_converge
from vbseg.io.volume import save_nifti
from vbseg.metrics import dice, expected_calibration_error
from vbseg.phantoms import PhantomSpec, make_phantom
from vbseg.prepare import standardise_features
from vbseg.runtime import compile_and_run

KERNEL = "matern32"
CHUNK = 25
MAX_STEPS = 400
# "plateau": the 25-step mean ELBO stays within this many nats per voxel of its final value
PLATEAU_NATS_PER_VOXEL = 1e-3


class DenseCovariance(eqx.Module):
    """The baseline: the isotropic kernel's N x N covariance and its Cholesky factor."""

    factor: jax.Array
    grid_shape: tuple = eqx.field(static=True)

    @property
    def latent_shape(self):
        return self.grid_shape

    def sqrt_matvec(self, eps):
        return (self.factor @ eps.reshape(-1)).reshape(self.grid_shape)


@dataclasses.dataclass(frozen=True)
class DenseGrid:
    """Stands in for :class:`~vbseg.gp.model.GridGP` in the model: builds the dense factor."""

    grid_shape: tuple
    spacing_mm: tuple
    kernel: str = KERNEL

    @property
    def latent_shape(self):
        return self.grid_shape

    def build(self, lengthscale, amplitude):
        index = np.stack(np.meshgrid(*[np.arange(n) for n in self.grid_shape], indexing="ij"), -1)
        points = jnp.asarray(index.reshape(-1, 3) * np.asarray(self.spacing_mm), jnp.float32)
        squared = jnp.sum((points[:, None, :] - points[None, :, :]) ** 2, axis=-1)
        distance = jnp.sqrt(squared + 1e-12)
        covariance = stationary_kernel(self.kernel, distance, lengthscale, amplitude)
        jitter = 1e-4 * amplitude**2 * jnp.eye(distance.shape[0])
        # the Cholesky with the faster reverse-mode rule the Kronecker structure uses
        return DenseCovariance(cholesky(covariance + jitter), tuple(self.grid_shape))


def pet_crop(n: int, seed: int = 0):
    phantom = make_phantom(PhantomSpec(diameters_mm=(37.0,), shape=(n, n, n)), seed=seed)
    y = phantom.pet.data[..., None]
    observed = np.ones(y.shape, bool)
    features, _, _ = standardise_features(y, observed)
    return features, observed, np.ones(y.shape[:3], bool), phantom.pet.spacing


def _model(structure, shape, spacing):
    shape, spacing = tuple(int(n) for n in shape), tuple(float(h) for h in spacing)
    if structure == "dense":
        return GPLogitModel(DenseGrid(shape, spacing))
    torus = gp_fit.torus_shape(shape, spacing, KERNEL, FieldPrior()) if structure == "fft" else None
    return GPLogitModel(GridGP(shape, spacing, KERNEL, structure, torus))


def bench_speed(n: int, structure: str, repeats: int, converge: bool) -> dict:
    """Compile, time per step, start time and (optionally) time to convergence for one size."""
    features, observed, voi, spacing = pet_crop(n)
    model = _model(structure, features.shape[:3], spacing)
    arrays = tuple(jnp.asarray(a) for a in (features, observed, voi))
    start_program = jax.jit(lambda f, o, v: gp_start.start_values(f, o, v, model))
    (init_hyper, init_field), _, start_run = compile_and_run(start_program, arrays)
    scale = jnp.float32(voi.sum())
    static = dict(model=model, field_sites=gp_fit.FIELD_SITES, family="meanfield",
                  max_steps=MAX_STEPS, check_every=CHUNK)

    def args(tol, min_steps):
        return (jax.random.PRNGKey(0), arrays, init_hyper, init_field, jnp.float32(0.05),
                jnp.float32(tol), scale, jnp.float32(0.1), jnp.int32(min_steps))

    begin = time.perf_counter()
    compiled = fit_svi.lower(*args(np.inf, CHUNK), **static).compile()
    compile_s = time.perf_counter() - begin
    runs = []
    for _ in range(repeats):
        begin = time.perf_counter()
        result = jax.block_until_ready(compiled(*args(np.inf, CHUNK)))
        runs.append(time.perf_counter() - begin)
    per_step = statistics.median(runs) / int(result.num_steps)
    row = {"n": n, "voxels": n**3, "structure": structure,
           "latent_size": int(np.prod(model.grid.latent_shape)),
           "latent_shape": list(model.grid.latent_shape), "compile_s": compile_s,
           "start_run_s": start_run, "s_per_step": per_step, "step_runs_s": runs}
    if converge:
        begin = time.perf_counter()
        fit = jax.block_until_ready(compiled(*args(1e-4, 100)))
        row["converge_run_s"] = time.perf_counter() - begin
        row["converge_steps"] = int(fit.num_steps)
        row["converged"] = bool(fit.converged)
        row["steps_to_plateau"] = steps_to_converge(np.asarray(fit.elbo_trace),
                                                    PLATEAU_NATS_PER_VOXEL * n**3, CHUNK)
    return row


def lapack_cholesky_seconds(n: int, spacing, repeats: int = 3) -> float:
    """Median time of one LAPACK (SciPy) Cholesky of the n^3 x n^3 covariance in float32: a
    lower bound on a dense step, which needs at least one factorisation per step once the
    length-scale is learned."""
    index = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    points = index * np.asarray(spacing, np.float64)
    distance = np.sqrt(np.sum((points[:, None, :] - points[None, :, :]) ** 2, axis=-1))
    r = np.sqrt(3.0) * distance / 10.0
    covariance = ((1.0 + r) * np.exp(-r) + 1e-4 * np.eye(len(points))).astype(np.float32)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        scipy.linalg.cholesky(covariance, lower=True, check_finite=False)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def bench_dense(n: int, steps: int) -> dict:
    """Per-step time of the dense-Cholesky model (one chunk of ``steps`` steps) and the LAPACK
    factorisation bound."""
    features, observed, voi, spacing = pet_crop(n)
    model = _model("dense", features.shape[:3], spacing)
    arrays = tuple(jnp.asarray(a) for a in (features, observed, voi))
    static = dict(model=model, field_sites=gp_fit.FIELD_SITES, family="meanfield",
                  max_steps=steps, check_every=steps)
    init_hyper = {"field_lengthscale": 10.0, "field_amplitude": 4.0, "field_mean": -2.0}
    call = (jax.random.PRNGKey(0), arrays, init_hyper, None, jnp.float32(0.05), jnp.float32(np.inf),
            jnp.float32(voi.sum()), jnp.float32(0.1), jnp.int32(steps))
    result, compile_s, run_s = compile_and_run(fit_svi, call, **static)
    return {"n": n, "voxels": n**3, "structure": "dense", "compile_s": compile_s,
            "s_per_step": run_s / int(result.num_steps),
            "lapack_cholesky_s": lapack_cholesky_seconds(n, spacing)}


def _interval(draws, truth):
    lower, upper = np.quantile(draws, [0.025, 0.975])
    return float(np.mean(draws)), float(lower), float(upper), bool(lower <= truth <= upper)


def bench_accuracy(seeds: int, methods: list[str], steps: int, volume_draws: int) -> list[dict]:
    """Per phantom draw and method: Dice50, ECE, volume mean / interval / coverage, run time."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(seeds):
            phantom = make_phantom(PhantomSpec(), seed=seed)
            voxel_ml = phantom.pet.voxel_volume_ml
            truth = phantom.volume_ml
            gp = None
            if any(m.startswith("gp") for m in methods):
                gp = gp_fit.fit_gp_logit(phantom.pet.data, phantom.pet.spacing, seed=seed,
                                         steps=steps, num_volume_draws=volume_draws)
            for method in methods:
                if method.startswith("gp_"):
                    use = method.split("_", 1)[1]
                    probability = gp.label_probability if use == "label" else gp.field_probability
                    draws = gp.volume_draws_by_map[use] * voxel_ml
                    timings = gp.timings
                else:
                    path = save_nifti(Path(folder) / f"pet{seed}.nii.gz", phantom.pet.data,
                                      phantom.pet.affine)
                    posterior = vbseg.segment([path], modalities=["pet"], seed=seed,
                                              psf_fwhm_mm=6.0 if method == "potts_psf6" else None,
                                              volume_draws=volume_draws)
                    probability, draws = posterior.probability, posterior.volume_draws_ml
                    timings = posterior.summary["timings_s"]
                mean, lower, upper, covered = _interval(draws, truth)
                rows.append({"seed": seed, "method": method,
                             "dice50": dice(probability >= 0.5, phantom.truth),
                             "ece": expected_calibration_error(probability, phantom.truth),
                             "volume_true_ml": truth, "volume_mean_ml": mean,
                             "volume_lower_ml": lower, "volume_upper_ml": upper,
                             "covered": covered, "volume_error": mean / truth - 1,
                             "compile_s": timings["compile"], "run_s": timings["run"]})
    return rows


def summarise(rows) -> dict:
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        summary[method] = {
            "draws": len(mine),
            "dice50_mean": float(np.mean([r["dice50"] for r in mine])),
            "dice50_min": float(np.min([r["dice50"] for r in mine])),
            "ece_mean": float(np.mean([r["ece"] for r in mine])),
            "volume_error_mean": float(np.mean([r["volume_error"] for r in mine])),
            "volume_abs_error_mean": float(np.mean([abs(r["volume_error"]) for r in mine])),
            "coverage": float(np.mean([r["covered"] for r in mine])),
            "interval_width_ml_mean": float(np.mean([r["volume_upper_ml"] - r["volume_lower_ml"]
                                                     for r in mine])),
            "run_s_median": float(np.median([r["run_s"] for r in mine])),
        }
    return summary


def markdown(speed, dense, summary) -> str:
    lines = ["## Speed (mean-field family, Matern 3/2, one draw per step)", "",
             "| n^3 | structure | latent | compile (s) | s / step | start (s) | steps to converge "
             "(plateau) | time to converge (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in speed:
        conv = (f"{r['converge_steps']} ({r['steps_to_plateau']})" if "converge_steps" in r else "-")
        time_conv = f"{r['start_run_s'] + r['converge_run_s']:.1f}" if "converge_run_s" in r else "-"
        lines.append(f"| {r['n']}^3 | {r['structure']} | {'x'.join(map(str, r['latent_shape']))} | "
                     f"{r['compile_s']:.1f} | {r['s_per_step']:.4f} | {r['start_run_s']:.2f} | "
                     f"{conv} | {time_conv} |")
    lines += ["", "## Dense Cholesky baseline (same model, N x N covariance)", "",
              "| n^3 | dense s / step (JAX) | one LAPACK Cholesky (s) | FFT s / step | "
              "Kronecker s / step | dense / FFT | dense / Kronecker |",
              "|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in dense:
        lines.append(f"| {r['n']}^3 | {r['s_per_step']:.4f} | {r['lapack_cholesky_s']:.4f} | "
                     f"{r.get('fft_s_per_step', nan):.4f} | {r.get('kronecker_s_per_step', nan):.4f} | "
                     f"{r.get('dense_over_fft', nan):.1f} | {r.get('dense_over_kronecker', nan):.1f} |")
    lines += ["", "## Accuracy and calibration (22 mm sphere, 4:1, CV 10 %, 6 mm PSF, 24^3 crop)", "",
              "| method | draws | Dice50 mean (min) | ECE | volume error | coverage of 95 % CI | "
              "CI width (mL) | run (s) |", "|---|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        lines.append(f"| {method} | {s['draws']} | {s['dice50_mean']:.3f} ({s['dice50_min']:.3f}) | "
                     f"{s['ece_mean']:.4f} | {100 * s['volume_error_mean']:+.1f} % | "
                     f"{s['coverage']:.2f} | {s['interval_width_ml_mean']:.2f} | "
                     f"{s['run_s_median']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,64,96,128,192")
    parser.add_argument("--structures", default="fft,kronecker")
    parser.add_argument("--converge-max", type=int, default=192)
    parser.add_argument("--dense-sizes", default="8,12,16")
    parser.add_argument("--dense-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--methods", default="gp_label,gp_field,potts")
    parser.add_argument("--steps", type=int, default=MAX_STEPS)
    parser.add_argument("--volume-draws", type=int, default=2000)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 8^3, one repeat, one phantom draw, GP and Potts")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.converge_max, args.dense_sizes, args.dense_steps = "8", 8, "8", 2
        args.repeats, args.seeds, args.steps, args.volume_draws = 1, 1, 50, 100
        args.methods = "gp_label,potts"
    structures = args.structures.split(",")
    speed = [bench_speed(int(n), s, args.repeats, int(n) <= args.converge_max)
             for n in args.sizes.split(",") for s in structures]
    dense = []
    for n in args.dense_sizes.split(","):
        row = bench_dense(int(n), args.dense_steps)
        for s in structures:
            same = [r for r in speed if r["n"] == int(n) and r["structure"] == s]
            timed = same[0] if same else bench_speed(int(n), s, args.repeats, False)
            row[f"{s}_s_per_step"] = timed["s_per_step"]
            row[f"dense_over_{s}"] = row["s_per_step"] / row[f"{s}_s_per_step"]
        dense.append(row)
    rows = bench_accuracy(args.seeds, args.methods.split(","), args.steps, args.volume_draws)
    summary = summarise(rows)
    record = {
        "benchmark": "bench_gp", "speed": speed, "dense": dense, "accuracy": rows,
        "summary": summary,
        "machine": machine(),
        "command": "python -m benchmarks.bench_gp " + " ".join(argv or []),
    }
    table = markdown(speed, dense, summary)
    write_report(args.out, "bench_gp", record, __doc__, table)
    print(table)
    return record


if __name__ == "__main__":
    main()
