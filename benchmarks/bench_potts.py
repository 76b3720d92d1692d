"""How fast is the hidden Potts fit, and what does JAX buy over the same algorithm in NumPy?

For cubic PET/CT crops of n^3 voxels (PET 4 x 4 x 3 mm with a 37 mm sphere, the phantom's CT
resampled onto it; K = 3 classes, two modalities), measures on this machine:

* VB (``fit_hidden_potts_vb``: 3 restarts, run to convergence): compile time and run time
  (median of ``--repeats`` runs), iterations; from ``--coarse-from`` (128) voxels per side on,
  also the opt-in restarts on a 2 x 2 x 2 coarser grid with one full-grid fit per distinct
  coarse solution (vbseg.potts.multiscale; ``segment --restarts coarse``): run time, the
  ratio, and its best ELBO minus the full-grid fit's (whether the two find the same solution
  over many phantoms: bench_multiscale);
* the same mean-field algorithm written in NumPy (checkerboard sweeps, tied Normal-Gamma and
  Dirichlet updates, ELBO every iteration), one restart, timed per iteration, for the
  side-by-side ratio per restart-iteration;
* checkerboard Gibbs (``gibbs_hidden_potts``, one chain): compile time and time per sweep.

Regenerate (about 7 minutes on 2 cores):
    python -m benchmarks.bench_potts
Writes benchmarks/results/bench_potts.json and bench_potts.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import digamma, gammaln, softmax

from benchmarks.common import machine, write_report
from vbseg.io.volume import resample_onto
from vbseg.phantoms import PhantomSpec, make_phantom
from vbseg.potts.gibbs import gibbs_hidden_potts
from vbseg.potts.meanfield import fit_hidden_potts_vb, kmeans_labels, restart_levels
from vbseg.potts.model import DEFAULT_PRIOR, NormalGammaPrior, neighbour_weights

RESULTS = Path(__file__).resolve().parent / "results"
NUM_CLASSES = 3


def phantom_features(n: int, seed: int = 0, **spec_args):
    """(features (n, n, n, 2) float32, phantom): an n^3 PET phantom (``spec_args`` go to
    PhantomSpec) with its CT resampled onto the PET grid, each modality standardised by its
    median and sd."""
    phantom = make_phantom(PhantomSpec(shape=(n, n, n), **spec_args), seed=seed)
    ct, _ = resample_onto(phantom.ct, phantom.pet)
    stack = np.stack([phantom.pet.data, ct.data], axis=-1)
    features = ((stack - np.median(stack, axis=(0, 1, 2))) / stack.std(axis=(0, 1, 2)))
    return features.astype(np.float32), phantom


def crop(n: int, seed: int = 0):
    features, phantom = phantom_features(n, seed, diameters_mm=(37.0,))
    return features, phantom.pet.spacing


# --- the same mean-field algorithm in NumPy (the baseline) ---------------------------------

def _numpy_neighbour_sum(q, w):
    total = np.zeros_like(q)
    for axis in range(3):
        lower = [slice(None)] * q.ndim
        upper = [slice(None)] * q.ndim
        lower[axis], upper[axis] = slice(0, -1), slice(1, None)
        total[tuple(upper)] += w[axis] * q[tuple(lower)]
        total[tuple(lower)] += w[axis] * q[tuple(upper)]
    return total


def numpy_meanfield(y, q, w, beta, iterations, prior=DEFAULT_PRIOR):
    """Checkerboard CAVI with tied Normal-Gamma and Dirichlet updates, as meanfield.py does."""
    m0, k0, a0, b0 = (float(p) for p in prior)
    idx = np.indices(q.shape[:3]).sum(axis=0) % 2
    colours = [idx == 0, idx == 1]
    for _ in range(iterations):
        count = q.sum(axis=(0, 1, 2))  # (K,)
        ybar = np.einsum("xyzk,xyzm->km", q, y) / count[:, None]
        scatter = np.einsum("xyzk,xyzkm->km", q, (y[..., None, :] - ybar) ** 2)
        kappa = k0 + count[:, None]
        mean = (k0 * m0 + count[:, None] * ybar) / kappa
        shape = a0 + 0.5 * count.sum()
        rate = b0 + (0.5 * scatter + 0.5 * k0 * count[:, None] * (ybar - m0) ** 2 / kappa).sum(0)
        alpha = 1.0 + count
        e_tau, e_log_tau = shape / rate, digamma(shape) - np.log(rate)
        unary = (0.5 * (e_log_tau - np.log(2 * np.pi))
                 - 0.5 * (e_tau * (y[..., None, :] - mean) ** 2 + 1 / kappa)).sum(-1)
        unary += digamma(alpha) - digamma(alpha.sum())
        for colour in colours:
            update = softmax(unary + beta * _numpy_neighbour_sum(q, w), axis=-1)
            q[colour] = update[colour]
        # ELBO pieces, as the JAX fit computes them every iteration
        _ = (np.sum(q * unary) - np.sum(q * np.log(np.maximum(q, 1e-30)))
             + gammaln(alpha).sum())
    return q


def bench_size(n: int, repeats: int, numpy_iterations: int, gibbs_sweeps: int,
               coarse_from: int = 128) -> dict:
    features, spacing = crop(n)
    observed = np.ones(features.shape, bool)
    roi = np.ones(features.shape[:3], bool)
    weights = neighbour_weights(spacing)
    args = (jnp.asarray(features), jnp.asarray(observed), jnp.asarray(roi), jnp.float32(0.5),
            jnp.asarray(weights), NormalGammaPrior(), jnp.float32(1.0))
    # the default fit (restarts on the crop's grid) and, from --coarse-from voxels per side on,
    # the opt-in coarse-grid restarts beside it (the side-by-side ratio of the two)
    vb_compile, runs, result = time_vb(args, repeats, multiscale=False)
    coarse = time_vb(args, repeats, multiscale=True) if n >= coarse_from else None
    iterations = int(result.num_iterations)
    restarts = int(restart_levels(NUM_CLASSES).shape[0])
    restart_iterations = [int(i) for i in np.asarray(result.restart_iterations)]
    vb_run = statistics.median(runs)
    # every restart runs to its own convergence: the run is sum(restart_iterations) iterations
    jax_per_iteration = vb_run / sum(restart_iterations)  # upper bound: includes k-means init
    coarse_record = {}
    if coarse is not None:
        coarse_compile, coarse_runs, coarse_result = coarse
        coarse_record = {
            "coarse_compile_s": coarse_compile, "coarse_runs_s": coarse_runs,
            "coarse_run_s_median": statistics.median(coarse_runs),
            "coarse_iterations": [int(i) for i in np.asarray(coarse_result.coarse_iterations)],
            "coarse_fine_iterations": [int(i) for i in np.asarray(coarse_result.restart_iterations)],
            "coarse_best_elbo_minus_full": float(np.max(coarse_result.restart_elbos)
                                                 - np.max(result.restart_elbos)),
        }

    labels = np.asarray(kmeans_labels(args[0], args[1], args[2], restart_levels(NUM_CLASSES)[1]))
    q = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    start = time.perf_counter()
    numpy_meanfield(features, q, weights, 0.5, numpy_iterations)
    numpy_per_iteration = (time.perf_counter() - start) / numpy_iterations

    prior = NormalGammaPrior(*(jnp.full((NUM_CLASSES, 2), p, jnp.float32) for p in NormalGammaPrior()))
    gibbs_args = (jax.random.PRNGKey(0), args[0], args[1], args[2], args[3], args[4], prior,
                  args[6], jnp.asarray(np.argmax(np.asarray(result.marginals), -1).astype(np.int32)),
                  jnp.ones(roi.shape, jnp.float32))
    static = dict(num_chains=1, num_sweeps=gibbs_sweeps, burn_in=1)
    start = time.perf_counter()
    gibbs = jax.jit(gibbs_hidden_potts, static_argnames=tuple(static)).lower(*gibbs_args, **static).compile()
    gibbs_compile = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(gibbs(*gibbs_args))
    gibbs_per_sweep = (time.perf_counter() - start) / (gibbs_sweeps + 1)
    return {
        "n": n, "voxels": n**3, "classes": NUM_CLASSES, "modalities": 2,
        "vb_compile_s": vb_compile, "vb_run_s_median": vb_run, "vb_runs_s": runs,
        "vb_iterations": iterations, "vb_restarts": restarts,
        "vb_restart_iterations": restart_iterations, **coarse_record,
        "jax_s_per_restart_iteration": jax_per_iteration,
        "numpy_s_per_iteration": numpy_per_iteration,
        "numpy_over_jax": numpy_per_iteration / jax_per_iteration,
        "gibbs_compile_s": gibbs_compile, "gibbs_s_per_sweep": gibbs_per_sweep,
    }


def time_vb(args, repeats, multiscale):
    """(compile s, run times s, result) of ``fit_hidden_potts_vb`` with or without coarse-grid
    restarts."""
    start = time.perf_counter()
    compiled = fit_hidden_potts_vb.lower(*args, num_classes=NUM_CLASSES, multiscale=multiscale).compile()
    compile_s = time.perf_counter() - start
    return (compile_s, *timed_runs(compiled, args, repeats))


def timed_runs(compiled, args, repeats):
    """(run times s, result of the last run) of ``repeats`` calls of a compiled fit."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - start)
    return runs, result


def markdown(rows) -> str:
    lines = [
        "| n^3 | VB compile (s) | VB run, median (s) | iterations of each restart | JAX s/iter | "
        "NumPy s/iter | NumPy / JAX | Gibbs s/sweep | coarse restarts: run (s) | coarse; fine "
        "iterations | VB / coarse | ELBO coarse - full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        coarse = "- | - | - | - |"
        if "coarse_run_s_median" in r:
            coarse = (f"{r['coarse_run_s_median']:.2f} | {' + '.join(map(str, r['coarse_iterations']))}; "
                      f"{' + '.join(map(str, r['coarse_fine_iterations']))} | "
                      f"{r['vb_run_s_median'] / r['coarse_run_s_median']:.1f} | "
                      f"{r['coarse_best_elbo_minus_full']:+.0f} |")
        lines.append(
            f"| {r['n']}^3 | {r['vb_compile_s']:.1f} | {r['vb_run_s_median']:.2f} | "
            f"{' + '.join(map(str, r['vb_restart_iterations']))} | {r['jax_s_per_restart_iteration']:.3f} | "
            f"{r['numpy_s_per_iteration']:.3f} | {r['numpy_over_jax']:.1f} | {r['gibbs_s_per_sweep']:.3f} | "
            + coarse
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,64,96,144,192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--numpy-iterations", type=int, default=5)
    parser.add_argument("--gibbs-sweeps", type=int, default=20)
    parser.add_argument("--coarse-from", type=int, default=128,
                        help="also time the opt-in coarse-grid restarts from this n on")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    rows = [bench_size(int(n), args.repeats, args.numpy_iterations, args.gibbs_sweeps, args.coarse_from)
            for n in args.sizes.split(",")]
    record = {
        "benchmark": "bench_potts", "rows": rows,
        "machine": machine(),
        "command": "python -m benchmarks.bench_potts " + " ".join(argv or []),
    }
    table = markdown(rows)
    write_report(args.out, "bench_potts", record, __doc__, table)
    print(table)
    return record


if __name__ == "__main__":
    main()
