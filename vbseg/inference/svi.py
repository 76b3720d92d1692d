"""Stochastic variational inference for models with whitened Gaussian fields (optax, one jit).

A model (a NumPyro program) has *field* sites, whitened latent fields with a standard normal
prior eps ~ N(0, I) (the GP fields of :mod:`vbseg.gp.model`), and *hyper* sites, every other
latent site (length-scales, amplitudes, means, class parameters), continuous. The variational
family is

    q(eps, u) = q_field(eps) q_hyper(u),   eps = all field sites raveled into one vector (D,),

with u the hyper sites mapped to the real line (``biject_to`` of each support), and

* ``family`` of q_field: "meanfield" N(m, diag(s^2)); "lowrank" N(m, W W^T + diag(s^2)) with
  W (D, R) (as NumPyro's AutoLowRankMultivariateNormal, written out here); "fullrank"
  N(m, C C^T), C lower triangular (small D only: tests and reference fits);
* ``hyper``: "point", a point estimate u* (a delta q), i.e. type-II MAP in the unconstrained
  space: the objective includes log p(T(u)) + log |T'(u)|, the prior density of u; or
  "gaussian", a mean-field Gaussian in unconstrained space (log-normal for positive
  parameters), whose entropy enters the ELBO.

The ELBO (Jordan et al. 1999; reparameterisation gradients, Kingma & Welling 2014; Titsias &
Lazaro-Gredilla 2014) is

    ELBO = E_q[ log p(y, T(u) | eps) + log |T'(u)| ] - KL(q_field || N(0, I)) + H[q_hyper],

where log p(y, T(u) | eps) is the model's log joint without the field sites' standard normal
terms; their expectation is in the closed-form KL (less Monte Carlo noise: D is ~10^6 for a
torus). The expectation is estimated by ``num_particles`` reparameterised draws per step
(``estimator="mc"``) or, for tests and tiny problems, by the spherical cubature rule on the 2B
points +-sqrt(B) e_i of the B-dimensional base noise (Arasaratnam & Haykin 2009, IEEE TAC 54:1254;
``estimator="cubature"``): it integrates polynomials of degree <= 3 exactly, so for a model whose
log joint is quadratic in (eps, u) (conjugate GP regression) it is the exact ELBO and the
optimum is deterministic.

The whole optimisation runs in one ``jax.jit``: chunks of ``check_every`` optax steps in
``lax.scan`` inside a ``lax.while_loop`` that stops when the mean ELBO of a chunk improves on
the previous chunk's by less than ``tol`` x ``scale`` nats (``scale``: e.g. the number of VOI
voxels, so ``tol`` is per voxel), after ``min_steps``, or at ``max_steps``. Optimisers: "adam"
(learning rate a traced argument, so changing it does not recompile) or "lbfgs" (optax's
L-BFGS with a zoom line search; for deterministic objectives, i.e. the cubature estimator).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer import init_to_median

FAMILIES = ("meanfield", "lowrank", "fullrank")
HYPER_MODES = ("point", "gaussian")
OPTIMIZERS = ("adam", "lbfgs")
ESTIMATORS = ("mc", "cubature")


class SVIResult(NamedTuple):
    """Output of :func:`fit_svi`.

    params: variational parameters {"field": {...}, "hyper": {"loc": {site: u}, ["scale": ...]}}
        (scales stored as softplus-inverse values; read them with :func:`field_scales`).
    elbo_trace: (max_steps rounded up to a multiple of check_every,) the ELBO estimate at
        each step (before its update), NaN after the last step run.
    num_steps: steps run. converged: whether the last chunk's mean-ELBO gain was below tol
        (the loop stops then, or at max_steps).
    """

    params: dict
    elbo_trace: jax.Array
    num_steps: jax.Array
    converged: jax.Array


class _Layout(NamedTuple):
    field_names: tuple
    field_shapes: tuple
    hyper_names: tuple
    hyper_shapes: tuple
    transforms: dict


def _softplus_inverse(x):
    return x + jnp.log(-jnp.expm1(-x))


def _describe(model, model_args, field_sites, init_hyper=None, *, need_start=False):
    """The field and hyper sites of the model, their shapes and transforms and, with
    ``need_start``, the initial hyper values (unconstrained): ``init_hyper`` {site: constrained
    value} where given, else the prior median (NumPyro's init_to_median).

    The model is traced abstractly (``jax.eval_shape``), so none of its operations enter the
    program being compiled; only a start without given values traces it for real. Hyper
    sites' supports must therefore not depend on traced values (true of every support here)."""
    init_hyper = init_hyper or {}
    captured = {}

    def abstract_trace(*args):
        trace = handlers.trace(handlers.seed(model, rng_seed=0)).get_trace(*args)
        latent = {name: site for name, site in trace.items()
                  if site["type"] == "sample" and not site["is_observed"]}
        missing = [name for name in field_sites if name not in latent]
        if missing:
            raise ValueError(f"field sites {missing} are not latent sample sites of the model")
        hyper_names = tuple(sorted(name for name in latent if name not in field_sites))
        for name in hyper_names:
            if latent[name]["fn"].support.is_discrete:
                raise ValueError(f"site {name!r} is discrete; sum it out in the model")
        transforms = {name: biject_to(latent[name]["fn"].support) for name in hyper_names}
        captured["layout"] = _Layout(
            tuple(field_sites), tuple(latent[n]["value"].shape for n in field_sites), hyper_names,
            tuple(transforms[n].inverse_shape(latent[n]["value"].shape) for n in hyper_names),
            transforms)
        return 0

    jax.eval_shape(abstract_trace, *model_args)
    layout = captured["layout"]
    if not need_start:
        return layout, None
    values = {name: layout.transforms[name].inv(jnp.asarray(init_hyper[name]))
              for name in layout.hyper_names if name in init_hyper}
    if len(values) < len(layout.hyper_names):
        def initial(site):
            if site["type"] != "sample" or site["is_observed"] or site["name"] in field_sites:
                return None
            return init_hyper.get(site["name"], init_to_median(site))

        # seed innermost: it must give each site its key before the substitution draws the median
        seeded = handlers.substitute(handlers.seed(model, rng_seed=0), substitute_fn=initial)
        trace = handlers.trace(seeded).get_trace(*model_args)
        for name in layout.hyper_names:
            if name not in values:
                values[name] = layout.transforms[name].inv(trace[name]["value"])
    return layout, values


def _field_size(layout) -> int:
    return sum(math.prod(shape) for shape in layout.field_shapes)


def _unravel_field(layout, vector):
    values, start = {}, 0
    for name, shape in zip(layout.field_names, layout.field_shapes):
        size = math.prod(shape)
        values[name] = vector[start:start + size].reshape(shape)
        start += size
    return values


def _base_dims(layout, family, rank, hyper):
    d = _field_size(layout)
    field = d + rank if family == "lowrank" else d
    hyper_dim = sum(math.prod(s) for s in layout.hyper_shapes) if hyper == "gaussian" else 0
    return field, hyper_dim


def field_scales(params: dict, family: str) -> dict:
    """The family's scale parameters in natural units: {"diagonal": s (D,)} plus "factor" W
    (lowrank) or {"cholesky": C} (fullrank)."""
    field = params["field"]
    if family == "fullrank":
        raw = field["tril"]
        return {"cholesky": jnp.tril(raw, -1) + jnp.diag(jax.nn.softplus(jnp.diagonal(raw)))}
    scales = {"diagonal": jax.nn.softplus(field["scale"])}
    if family == "lowrank":
        scales["factor"] = field["factor"]
    return scales


def field_covariance_diagonal(params: dict, family: str) -> jax.Array:
    """diag Cov_q(eps): (D,)."""
    scales = field_scales(params, family)
    if family == "fullrank":
        return jnp.sum(scales["cholesky"] ** 2, axis=1)
    diagonal = scales["diagonal"] ** 2
    if family == "lowrank":
        diagonal = diagonal + jnp.sum(scales["factor"] ** 2, axis=1)
    return diagonal


def _field_draw(params, family, base):
    """eps = m + (scale transform of the base noise): base (D,) or (D + R,) for lowrank."""
    scales = field_scales(params, family)
    loc = params["field"]["loc"]
    if family == "fullrank":
        return loc + scales["cholesky"] @ base
    d = loc.shape[0]
    draw = loc + scales["diagonal"] * base[:d]
    if family == "lowrank":
        draw = draw + scales["factor"] @ base[d:]
    return draw


def field_kl(params: dict, family: str) -> jax.Array:
    """KL(q_field || N(0, I)) in closed form."""
    scales = field_scales(params, family)
    loc = params["field"]["loc"]
    d = loc.shape[0]
    if family == "fullrank":
        chol = scales["cholesky"]
        return 0.5 * (jnp.sum(chol**2) + jnp.sum(loc**2) - d) - jnp.sum(jnp.log(jnp.diagonal(chol)))
    s = scales["diagonal"]
    trace = jnp.sum(s**2)
    logdet = 2.0 * jnp.sum(jnp.log(s))
    if family == "lowrank":
        w = scales["factor"]
        trace = trace + jnp.sum(w**2)
        capacitance = jnp.eye(w.shape[1], dtype=w.dtype) + (w / s[:, None] ** 2).T @ w
        # capacitance I + W^T diag(s^-2) W is positive definite (matrix determinant lemma)
        logdet = logdet + 2.0 * jnp.sum(jnp.log(jnp.diagonal(jnp.linalg.cholesky(capacitance))))
    return 0.5 * (trace + jnp.sum(loc**2) - d - logdet)


def _hyper_values(layout, params, base):
    """Constrained hyper values and sum of log |T'(u)| at u = loc (+ scale * base)."""
    loc = params["hyper"]["loc"]
    values, log_jacobian, start = {}, 0.0, 0
    for name, shape in zip(layout.hyper_names, layout.hyper_shapes):
        u = loc[name]
        if base is not None:
            size = math.prod(shape)
            u = u + jax.nn.softplus(params["hyper"]["scale"][name]) * base[start:start + size].reshape(shape)
            start += size
        transform = layout.transforms[name]
        value = transform(u)
        values[name] = value
        log_jacobian = log_jacobian + jnp.sum(transform.log_abs_det_jacobian(u, value))
    return values, log_jacobian


def conditional_log_joint(model, model_args, values, exclude) -> jax.Array:
    """sum of the log densities of every sample site (observed ones and factors included)
    except those in ``exclude``, with the latent sites at ``values`` (constrained)."""
    trace = handlers.trace(handlers.substitute(model, data=values)).get_trace(*model_args)
    total = jnp.zeros(())
    for name, site in trace.items():
        if site["type"] != "sample" or name in exclude:
            continue
        log_prob = site["fn"].log_prob(site["value"])
        if site.get("scale") is not None:
            log_prob = site["scale"] * log_prob
        total = total + jnp.sum(log_prob)
    return total


def elbo_estimate(params, key, model_args, *, model, layout, family, hyper, estimator,
                  num_particles) -> jax.Array:
    """The ELBO (module docstring) at ``params``: reparameterised Monte Carlo over
    ``num_particles`` draws, or the spherical cubature rule."""
    field_dim, hyper_dim = _base_dims(layout, family, _rank(params, family), hyper)
    dims = field_dim + hyper_dim
    dtype = params["field"]["loc"].dtype
    if estimator == "cubature":
        eye = math.sqrt(dims) * jnp.eye(dims, dtype=dtype)
        base = jnp.concatenate([eye, -eye])
    else:
        base = jax.random.normal(key, (num_particles, dims), dtype)

    def particle(noise):
        eps = _field_draw(params, family, noise[:field_dim])
        hyper_values, log_jacobian = _hyper_values(
            layout, params, noise[field_dim:] if hyper == "gaussian" else None)
        values = {**_unravel_field(layout, eps), **hyper_values}
        return conditional_log_joint(model, model_args, values, layout.field_names) + log_jacobian

    expected = jnp.mean(jax.vmap(particle)(base))
    entropy = 0.0
    if hyper == "gaussian":
        for name in layout.hyper_names:
            scale = jax.nn.softplus(params["hyper"]["scale"][name])
            entropy = entropy + jnp.sum(jnp.log(scale)) + 0.5 * scale.size * (1 + math.log(2 * math.pi))
    return expected - field_kl(params, family) + entropy


def _rank(params, family):
    return params["field"]["factor"].shape[1] if family == "lowrank" else 0


def initial_params(key, layout, hyper_init, init_field_loc, init_scale, *, family, rank, hyper,
                   dtype):
    """Variational parameters at the start: field mean ``init_field_loc`` (dict by site, or
    zeros), scales ``init_scale``; lowrank factor N(0, (0.1 init_scale)^2 / rank) entries (a
    zero factor is a stationary point); hyper locations at ``hyper_init`` (unconstrained)."""
    d = _field_size(layout)
    if init_field_loc:
        loc = jnp.concatenate([jnp.asarray(init_field_loc[n], dtype).ravel()
                               for n in layout.field_names])
    else:
        loc = jnp.zeros((d,), dtype)
    raw = _softplus_inverse(jnp.asarray(init_scale, dtype))
    if family == "fullrank":
        field = {"loc": loc, "tril": jnp.diag(jnp.full((d,), raw, dtype))}
    else:
        field = {"loc": loc, "scale": jnp.full((d,), raw, dtype)}
        if family == "lowrank":
            field["factor"] = (0.1 * init_scale / math.sqrt(rank)) * jax.random.normal(
                key, (d, rank), dtype)
    hyper_params = {"loc": {n: jnp.asarray(hyper_init[n], dtype) for n in layout.hyper_names}}
    if hyper == "gaussian":
        hyper_params["scale"] = {n: jnp.full(s, _softplus_inverse(jnp.asarray(0.1, dtype)), dtype)
                                 for n, s in zip(layout.hyper_names, layout.hyper_shapes)}
    return {"field": field, "hyper": hyper_params}


def _optimizer(name: str, learning_rate):
    if name == "adam":
        return optax.with_extra_args_support(
            optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate))
    if name == "lbfgs":
        return optax.lbfgs()
    raise ValueError(f"unknown optimizer {name!r} (available: {', '.join(OPTIMIZERS)})")


def _check(family, hyper, estimator):
    for value, options, what in ((family, FAMILIES, "family"), (hyper, HYPER_MODES, "hyper"),
                                 (estimator, ESTIMATORS, "estimator")):
        if value not in options:
            raise ValueError(f"unknown {what} {value!r} (available: {', '.join(options)})")


@partial(jax.jit, static_argnames=("model", "field_sites", "family", "rank", "hyper", "optimizer",
                                   "estimator", "num_particles", "max_steps", "check_every"))
def fit_svi(key, model_args, init_hyper=None, init_field_loc=None, learning_rate=0.05,
            tol=1e-4, scale=1.0, init_scale=0.1, min_steps=100, *, model, field_sites: tuple,
            family="meanfield", rank=8, hyper="point", optimizer="adam", estimator="mc",
            num_particles=1, max_steps=1000, check_every=25) -> SVIResult:
    """Fit q (module docstring) to ``model(*model_args)`` by maximising the ELBO.

    Args:
        key: PRNG key (draws and the lowrank factor's start).
        model_args: the model's positional arguments (arrays). The model itself is static: a
            hashable callable whose settings are fixed (e.g. a frozen dataclass).
        init_hyper: {site: constrained value} starts for hyper sites (others: prior median).
        init_field_loc: {field site: array} start of the field mean (default 0, the prior).
        learning_rate: Adam step size (traced). tol, scale: convergence when the chunk-mean
            ELBO improves by < tol x scale. init_scale: initial sd of q_field. min_steps: no
            convergence test before this many steps (traced: ``tol=inf`` runs exactly min_steps
            rounded up to a chunk, ``tol=-inf`` runs max_steps, neither recompiles).
        field_sites: names of the whitened standard-normal sites (static).
        family, rank, hyper, optimizer, estimator, num_particles: see the module docstring.
        max_steps, check_every: step budget (the ELBO trace's length) and chunk length.
    """
    _check(family, hyper, estimator)
    layout, hyper_start = _describe(model, model_args, field_sites, init_hyper, need_start=True)
    dtype = jnp.result_type(float)
    init_key, run_key = jax.random.split(key)
    params = initial_params(init_key, layout, hyper_start, init_field_loc, init_scale,
                            family=family, rank=rank, hyper=hyper, dtype=dtype)
    opt = _optimizer(optimizer, learning_rate)

    def objective(p, k):
        return -elbo_estimate(p, k, model_args, model=model, layout=layout, family=family,
                              hyper=hyper, estimator=estimator, num_particles=num_particles)

    def step(carry, k):
        p, state = carry
        value, grads = jax.value_and_grad(objective)(p, k)
        updates, state = opt.update(grads, state, p, value=value, grad=grads,
                                    value_fn=lambda q: objective(q, k))
        return (optax.apply_updates(p, updates), state), -value

    num_chunks = -(-max_steps // check_every)
    trace0 = jnp.full((num_chunks * check_every,), jnp.nan, dtype)

    def body(carry):
        p, state, trace, chunk, previous, _, k = carry
        k, sub = jax.random.split(k)
        (p, state), elbos = jax.lax.scan(step, (p, state), jax.random.split(sub, check_every))
        trace = jax.lax.dynamic_update_slice(trace, elbos.astype(dtype), (chunk * check_every,))
        current = jnp.mean(elbos)
        return p, state, trace, chunk + 1, current, (current - previous) / scale, k

    def cond(carry):
        chunk, change = carry[3], carry[5]
        return (chunk < num_chunks) & ((chunk * check_every < min_steps) | (change > tol))

    init = (params, opt.init(params), trace0, jnp.int32(0), jnp.asarray(-jnp.inf, dtype),
            jnp.asarray(jnp.inf, dtype), run_key)
    params, _, trace, chunks, _, change, _ = jax.lax.while_loop(cond, body, init)
    return SVIResult(params, trace, chunks * check_every, change <= tol)


def guide_draw(key, params, model_args, *, model, field_sites, family, hyper) -> dict:
    """One draw from q: {site: constrained value} for every latent site (field sites at their
    shapes). Jittable; use inside ``lax.scan``/``lax.map`` for many draws."""
    layout, _ = _describe(model, model_args, field_sites)
    field_dim, hyper_dim = _base_dims(layout, family, _rank(params, family), hyper)
    base = jax.random.normal(key, (field_dim + hyper_dim,), params["field"]["loc"].dtype)
    eps = _field_draw(params, family, base[:field_dim])
    hyper_values, _ = _hyper_values(layout, params, base[field_dim:] if hyper == "gaussian" else None)
    return {**_unravel_field(layout, eps), **hyper_values}


def guide_location(params, model_args, *, model, field_sites) -> dict:
    """q's location: the field means and the hyper locations T(u) (the point estimates, or the
    medians of the log-normal / Gaussian hyper posteriors), constrained, by site."""
    layout, _ = _describe(model, model_args, field_sites)
    values, _ = _hyper_values(layout, params, None)
    return {**_unravel_field(layout, params["field"]["loc"]), **values}


def model_sites(model, model_args, values, names) -> dict:
    """The values of sites ``names`` (e.g. deterministic ones) with latent sites at ``values``."""
    trace = handlers.trace(handlers.substitute(model, data=values)).get_trace(*model_args)
    return {name: trace[name]["value"] for name in names}


def steps_to_converge(elbo_trace, tolerance_nats: float, window: int = 25) -> int | None:
    """First step after which the ``window``-step mean ELBO stays within ``tolerance_nats`` of
    its final value (the last window's mean); None if the trace is shorter than two windows.
    A noise-robust time-to-convergence for benchmarks (the NaN tail is ignored)."""
    trace = np.asarray(elbo_trace, np.float64)
    trace = trace[np.isfinite(trace)]
    if trace.size < 2 * window:
        return None
    means = np.convolve(trace, np.ones(window) / window, mode="valid")
    far = np.flatnonzero(np.abs(means - means[-1]) > tolerance_nats)
    return int(window if far.size == 0 else far[-1] + 1 + window)
