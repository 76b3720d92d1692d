"""How well is the Potts coupling beta estimated? Bias of pseudo-likelihood and thermodynamic
integration on label fields drawn from the Potts prior with known beta.

For K = 2 and K = 3 classes on an n^3 grid (6-neighbourhood, unit weights, uniform
proportions), at couplings below the critical one (about 0.44 for K = 2 and 0.55 for K = 3 on
the simple cubic lattice) plus one near it:

* simulation: ``--fields`` independent checkerboard Gibbs chains from random starts,
  ``--sweeps`` sweeps each, the last state kept; burn-in judged by the split R-hat of S(z)
  over the second half of the sweeps, across chains (reported);
* complete data (the labels themselves): the pseudo-likelihood estimate (Besag) and the
  thermodynamic-integration estimate (E[S | beta] path simulated on the same grid, the mode of
  p(beta | z)), with the TI posterior sd and how often its 95 % interval covers the truth;
* hidden labels: y = (class index) x ``--separation`` + N(0, 1) per voxel, fitted by
  mean-field VB with beta learned by variational EM, with the pseudo-likelihood step and with
  the thermodynamic-integration step (the same path); voxel accuracy of the labels.

Regenerate (about 10 minutes on 2 cores at the defaults):
    python -m benchmarks.bench_beta
Writes benchmarks/results/bench_beta.json and bench_beta.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine
from vbseg.inference.chains import chain_diagnostics
from vbseg.io.volume import write_text_atomic
from vbseg.potts import beta as beta_estimation
from vbseg.potts.gibbs import sample_potts_prior
from vbseg.potts.meanfield import fit_hidden_potts_vb
from vbseg.potts.model import NormalGammaPrior, neighbour_weights, potts_statistic

RESULTS = Path(__file__).resolve().parent / "results"
BETAS = {2: (0.1, 0.2, 0.3, 0.4, 0.45), 3: (0.1, 0.2, 0.3, 0.4, 0.5, 0.55)}
PATH_STEP = 0.025


def _summary(estimates, truth) -> dict:
    estimates = np.asarray(estimates, np.float64)
    return {"mean": float(estimates.mean()), "bias": float(estimates.mean() - truth),
            "sd": float(estimates.std(ddof=1)) if estimates.size > 1 else 0.0,
            "rmse": float(np.sqrt(np.mean((estimates - truth) ** 2)))}


def study(num_classes, true_beta, path, n, num_fields, sweeps, separation, seed):
    weights = jnp.asarray(neighbour_weights((1.0, 1.0, 1.0)))
    roi = jnp.ones((n, n, n), bool)
    start = time.perf_counter()
    fields, statistics = sample_potts_prior(
        jax.random.PRNGKey(seed), true_beta, roi, weights, num_classes=num_classes,
        num_fields=num_fields, num_sweeps=sweeps)
    fields = np.asarray(fields)
    simulate_s = time.perf_counter() - start
    burn = chain_diagnostics(np.asarray(statistics)[:, sweeps // 2:])

    pl, ti, ti_sd, covered, hidden = [], [], [], [], {"pl": [], "ti": []}
    accuracy = {"pl": [], "ti": []}
    beta_path = (jnp.asarray(path.betas, jnp.float32), jnp.asarray(path.mean, jnp.float32))
    rng = np.random.default_rng(seed)
    for labels in fields:
        onehot = jax.nn.one_hot(labels, num_classes)
        pl.append(float(beta_estimation.estimate_beta_pl(onehot, jnp.zeros(num_classes),
                                                         weights, roi)))
        statistic = float(potts_statistic(onehot, weights))
        ti.append(beta_estimation.estimate_beta_ti(statistic, path.betas, path.mean))
        mean, sd = beta_estimation.beta_posterior_ti(statistic, path.betas, path.mean)
        ti_sd.append(sd)
        covered.append(abs(mean - true_beta) <= 1.96 * sd)
        y = separation * labels + rng.normal(size=labels.shape)
        y = ((y - y.mean()) / y.std()).astype(np.float32)[..., None]
        for estimator in ("pl", "ti"):
            result = fit_hidden_potts_vb(
                jnp.asarray(y), jnp.ones(y.shape, bool), roi, 0.1, weights, NormalGammaPrior(),
                1.0, None, beta_path, num_classes=num_classes, beta_estimator=estimator)
            hidden[estimator].append(float(result.beta))
            accuracy[estimator].append(
                float(np.mean(np.argmax(np.asarray(result.marginals), -1) == labels)))
    return {
        "classes": num_classes, "true_beta": true_beta, "n": n, "fields": num_fields,
        "sweeps": sweeps, "burn_in_r_hat": burn["r_hat"], "simulate_s": simulate_s,
        "complete_pl": _summary(pl, true_beta), "complete_ti": _summary(ti, true_beta),
        "ti_posterior_sd_mean": float(np.mean(ti_sd)), "ti_interval_coverage": float(np.mean(covered)),
        "hidden_separation": separation,
        "hidden_pl": _summary(hidden["pl"], true_beta), "hidden_ti": _summary(hidden["ti"], true_beta),
        "hidden_accuracy_pl": float(np.mean(accuracy["pl"])),
        "hidden_accuracy_ti": float(np.mean(accuracy["ti"])),
    }


def markdown(rows, paths) -> str:
    lines = [
        "| K | true beta | burn-in R-hat | PL bias (sd) | TI bias (sd) | TI post. sd | TI 95% cover "
        "| hidden PL bias (sd) | hidden TI bias (sd) | accuracy PL / TI |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        def cell(key, r=r):
            return f"{r[key]['bias']:+.3f} ({r[key]['sd']:.3f})"
        lines.append(
            f"| {r['classes']} | {r['true_beta']:.2f} | {r['burn_in_r_hat']:.3f} | {cell('complete_pl')} | "
            f"{cell('complete_ti')} | {r['ti_posterior_sd_mean']:.3f} | {r['ti_interval_coverage']:.2f} | "
            f"{cell('hidden_pl')} | {cell('hidden_ti')} | "
            f"{r['hidden_accuracy_pl']:.3f} / {r['hidden_accuracy_ti']:.3f} |")
    lines += ["", "E[S | beta] paths (max split R-hat across the grid; simulation time):", ""]
    for k, p in paths.items():
        lines.append(f"- K = {k}: {len(p['betas'])} betas from 0 to {p['betas'][-1]:.3f}, "
                     f"max R-hat {max(p['r_hat']):.3f} at beta {p['betas'][int(np.argmax(p['r_hat']))]:.3f}, "
                     f"{p['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="grid side (n^3 voxels)")
    parser.add_argument("--fields", type=int, default=20, help="label fields per setting")
    parser.add_argument("--sweeps", type=int, default=1000, help="Gibbs sweeps per field")
    parser.add_argument("--path-sweeps", type=int, default=400, help="kept sweeps per path point")
    parser.add_argument("--separation", type=float, default=3.0,
                        help="class mean spacing in noise sd for the hidden-label fits")
    parser.add_argument("--classes", default="2,3")
    parser.add_argument("--betas", default=None, help="override: comma-separated betas")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows, paths = [], {}
    weights = jnp.asarray(neighbour_weights((1.0, 1.0, 1.0)))
    roi = jnp.ones((args.n,) * 3, bool)
    for k in (int(c) for c in args.classes.split(",")):
        betas = (tuple(float(b) for b in args.betas.split(",")) if args.betas else BETAS[k])
        grid = np.arange(0.0, max(betas) + 0.15 + 1e-9, PATH_STEP)
        start = time.perf_counter()
        path = beta_estimation.statistic_path(
            jax.random.PRNGKey(100 + k), grid, roi, weights, num_classes=k,
            num_sweeps=args.path_sweeps, burn_in=args.path_sweeps // 2)
        paths[k] = {"betas": grid.tolist(), "mean": path.mean.tolist(),
                    "standard_error": path.standard_error.tolist(), "r_hat": path.r_hat.tolist(),
                    "seconds": time.perf_counter() - start}
        for i, true_beta in enumerate(betas):
            rows.append(study(k, true_beta, path, args.n, args.fields, args.sweeps,
                              args.separation, seed=10 * k + i))
            print(rows[-1]["classes"], rows[-1]["true_beta"], rows[-1]["complete_pl"]["bias"],
                  rows[-1]["complete_ti"]["bias"], rows[-1]["hidden_pl"]["bias"], flush=True)
    record = {
        "benchmark": "bench_beta", "rows": rows, "paths": paths,
        "total_s": time.perf_counter() - started,
        "machine": machine(),
        "command": "python -m benchmarks.bench_beta " + " ".join(argv or []),
    }
    out = Path(args.out)
    write_text_atomic(out / "bench_beta.json", json.dumps(record, indent=2) + "\n")
    table = markdown(rows, paths)
    write_text_atomic(out / "bench_beta.md", "# bench_beta\n\n" + __doc__.split("\n\n")[0]
                      + f"\n\nGrid {args.n}^3, {args.fields} fields per setting, hidden-label "
                      f"separation {args.separation:g} noise sd; total {record['total_s']:.0f} s."
                      "\n\n" + table + f"\nMachine: {record['machine']}\n")
    print(table)
    return record


if __name__ == "__main__":
    main()
