"""Reference sampler for the hidden Potts model: checkerboard Gibbs with conjugate updates.

The 6-neighbourhood is bipartite, so the voxels of one checkerboard colour are conditionally
independent given the other colour and the parameters, and a whole colour is drawn at once
(the 26-neighbourhood needs eight colours, by the parities of the three indices):

    z_v | rest ~ Categorical(softmax(log pi + e_v + log N(y_v | mu, tau) + beta sum_w w_vw 1[z_w = k])),

drawn with the Gumbel-max trick (argmax of logits + Gumbel noise). Given the labels, the class
parameters are drawn from their conjugate full conditionals: (mu, tau) from the Normal-Gamma
posterior (tied or per-class precision, :func:`~vbseg.potts.emission_updates.normal_gamma_update`
with one-hot labels) and pi from Dirichlet(alpha0 + class counts). Geman & Geman (1984) for
Gibbs sampling of Markov random fields; the two-colour schedule is the standard parallel one.

Student-t emissions (``emission="student"``) are sampled through their scale mixture (the
model of :mod:`vbseg.potts.model`): y_v | z_v = k, u_v ~ N(mu_k, 1 / (u_v tau_k)) per observed
modality with u_v ~ Gamma(nu/2, nu/2), so a sweep also draws

    u_v | z, mu, tau ~ Gamma((nu + D_v) / 2, (nu + sum_m tau_{z_v m} (y_vm - mu_{z_v m})^2) / 2)

(D_v the number of observed modalities), labels given u use the u-scaled Gaussian, and the
Normal-Gamma draw weights each voxel's precision by its u (Geweke 1993, J Appl Econometrics
8:S19, for the Student-t as a Gibbs scale mixture).

Each sampler is a blackjax-style pair ``init(...) -> State``, ``step(key, state) -> (State,
Info)`` (:func:`label_gibbs`, :func:`student_label_gibbs`, :func:`hidden_potts_gibbs`), run by the
shared driver :mod:`vbseg.inference.chains`: chains in parallel (``jax.vmap``), sweeps under
``lax.scan``; each sweep after burn-in records the class counts (volumes) and adds the one-hot
labels to running marginals. Classes
are renamed in every sweep by increasing mean in the first modality, as the VB fit orders them,
so a label switch between sweeps does not mix classes (the posterior is symmetric under a
renaming, so this is exact); with an external field the classes are no longer exchangeable,
the field itself pins their meaning, and no renaming is done.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vbseg.inference.chains import (
    EmptyInfo,
    LabelState,
    SamplingAlgorithm,
    burn_in_then_kept_keys,
    one_hot_labels,
    pooled_marginals,
    run_chain,
    run_chains,
    split_each,
)
from vbseg.potts.emission_updates import normal_gamma_update
from vbseg.potts.model import (
    NormalGammaPrior,
    colour_masks,
    coupling_field,
    gaussian_log_likelihood,
    neighbour_sum,
    potts_statistic,
)


def sample_labels(key, labels, unary, beta, weights, roi):
    """One sweep: each colour of :func:`~vbseg.potts.model.colour_masks` drawn from its full
    conditional in turn. Returns (X, Y, Z)."""
    num_classes = unary.shape[-1]
    colours = colour_masks(roi.shape, weights)
    for colour, colour_key in zip(colours, jax.random.split(key, len(colours))):
        onehot = jax.nn.one_hot(labels, num_classes, dtype=unary.dtype) * roi[..., None]
        logits = unary + coupling_field(neighbour_sum(onehot, weights), beta)
        draw = jnp.argmax(logits + jax.random.gumbel(colour_key, logits.shape, unary.dtype), axis=-1)
        labels = jnp.where(colour & roi, draw, labels)
    return labels


def label_gibbs(unary, beta, weights, roi) -> SamplingAlgorithm:
    """Checkerboard Gibbs kernel for p(z) ∝ exp(sum_v unary_v(z_v) + beta S(z)), unary (X, Y, Z, K)
    fixed: ``init(labels) -> LabelState``; ``step`` is one :func:`sample_labels` sweep."""

    def init(labels):
        return LabelState(labels)

    def step(key, state):
        return LabelState(sample_labels(key, state.labels, unary, beta, weights, roi)), EmptyInfo()

    return SamplingAlgorithm(init, step)


def label_marginal_summary(num_classes: int, dtype):
    """Summary for :func:`~vbseg.inference.chains.run_chain`: accumulate 1[z_v = k] over the
    whole grid (outside the ROI the label stays at its start), record nothing."""

    def summarise(state, info):
        return jax.nn.one_hot(state.labels, num_classes, dtype=dtype), ()

    return summarise


@partial(jax.jit, static_argnames=("num_sweeps", "burn_in"))
def gibbs_label_marginals(key, unary, beta, weights, roi, initial_labels, *, num_sweeps: int,
                          burn_in: int):
    """Gibbs for p(z) ∝ exp(sum_v unary_v(z_v) + beta S(z)) with a fixed unary (one chain).

    Returns the marginal estimate (X, Y, Z, K): the fraction of the ``num_sweeps`` sweeps after
    ``burn_in`` in which each voxel had each label.
    """
    sampler = label_gibbs(unary, beta, weights, roi)
    trace = run_chain(sampler.step, sampler.init(initial_labels),
                      jax.random.split(key, burn_in + num_sweeps),
                      label_marginal_summary(unary.shape[-1], unary.dtype), burn_in=burn_in)
    return trace.kept_sum / num_sweeps


class GibbsParameters(NamedTuple):
    mean: jax.Array  # (K, M)
    precision: jax.Array  # (K, M)
    proportions: jax.Array  # (K,)


class GibbsResult(NamedTuple):
    """marginals (X, Y, Z, K) pooled over chains; counts (C, S, K) voxels per class per kept
    sweep; weighted (C, S, K) sum of ``count_weights`` over each class's voxels; means and
    precisions (C, S, K, M) of the kept draws (precisions (C, S, M), one per modality, from the
    PSF sampler); label_switches (C, S) whether the class order by mean changed in that sweep
    (the classes were renamed back)."""

    marginals: jax.Array
    counts: jax.Array
    weighted: jax.Array
    means: jax.Array
    precisions: jax.Array
    label_switches: jax.Array


def _draw_parameters(key, labels, observations, observed, roi, prior, concentration, tied,
                     scales=None):
    num_classes = prior.mean.shape[0]
    onehot = jax.nn.one_hot(labels, num_classes, dtype=observations.dtype) * roi[..., None]
    weights = None if scales is None else jnp.broadcast_to(scales[..., None], onehot.shape)
    post = normal_gamma_update(onehot, observations, observed, prior, tied, precision_weights=weights)
    tau_key, mu_key, pi_key = jax.random.split(key, 3)
    tau = jax.random.gamma(tau_key, post.shape) / post.rate
    if tied:
        tau = jnp.broadcast_to(tau[:1], tau.shape)
    mu = post.mean + jax.random.normal(mu_key, post.mean.shape) / jnp.sqrt(post.kappa * tau)
    pi = jax.random.dirichlet(pi_key, concentration + jnp.sum(onehot, axis=(0, 1, 2)))
    return GibbsParameters(mu, tau, pi)


def scaled_log_likelihood(observations, observed, mean, precision, scales) -> jax.Array:
    """log N(y_vm | mean_km, 1 / (u_v precision_km)) over observed modalities: (X, Y, Z, K)."""
    return gaussian_log_likelihood(observations, observed, mean[None, None, None],
                                   precision[None, None, None] * scales[..., None, None])


def draw_scales(key, labels, observations, observed, mean, precision, dof) -> jax.Array:
    """u_v | z, mu, tau of the Student-t scale mixture (module docstring): (X, Y, Z)."""
    residual = observations - mean[labels]
    quadratic = jnp.sum(jnp.where(observed, precision[labels] * residual**2, 0.0), axis=-1)
    shape = 0.5 * (dof + jnp.sum(observed, axis=-1, dtype=observations.dtype))
    return jax.random.gamma(key, shape) / (0.5 * (dof + quadratic))


class StudentLabelState(NamedTuple):
    """labels (X, Y, Z) int; scales (X, Y, Z): the Student-t mixing weights u_v."""

    labels: jax.Array
    scales: jax.Array


def student_label_gibbs(observations, observed, roi, beta, weights, mean, precision, log_prior,
                        dof) -> SamplingAlgorithm:
    """Gibbs kernel over (z, u) with fixed class parameters and Student-t emissions (module
    docstring); ``observed`` already restricted to the ROI. ``init(labels)`` starts from u = 1
    (the Gaussian); ``step`` draws z | u, then u | z."""

    def init(labels):
        return StudentLabelState(labels, jnp.ones(roi.shape, mean.dtype))

    def step(key, state):
        label_key, scale_key = jax.random.split(key)
        unary = scaled_log_likelihood(observations, observed, mean, precision, state.scales) + log_prior
        labels = sample_labels(label_key, state.labels, unary, beta, weights, roi)
        scales = draw_scales(scale_key, labels, observations, observed, mean, precision, dof)
        return StudentLabelState(labels, scales), EmptyInfo()

    return SamplingAlgorithm(init, step)


@partial(jax.jit, static_argnames=("num_sweeps", "burn_in"))
def gibbs_student_label_marginals(key, observations, observed, roi, beta, weights, mean, precision,
                                  log_prior, dof, initial_labels, *, num_sweeps: int, burn_in: int):
    """Gibbs over (z, u) with fixed class parameters and Student-t emissions (one chain): the
    marginals (X, Y, Z, K) of p(z | y) ∝ exp(sum_v log_prior_v(z_v) + beta S(z)) prod_v t(y_v | z_v),
    u summed out by sampling it. ``log_prior``: (X, Y, Z, K) (log proportions plus any field)."""
    sampler = student_label_gibbs(observations, observed & roi[..., None], roi, beta, weights, mean,
                                  precision, log_prior, dof)
    trace = run_chain(sampler.step, sampler.init(initial_labels),
                      jax.random.split(key, burn_in + num_sweeps),
                      label_marginal_summary(mean.shape[0], mean.dtype), burn_in=burn_in)
    return trace.kept_sum / num_sweeps


def order_classes(labels, first_modality_means):
    """Rename classes by increasing mean in the first modality. Returns (renamed labels, the
    order (old class index of each new class), whether it changed: a label switch)."""
    order = jnp.argsort(first_modality_means)
    switched = jnp.any(order != jnp.arange(order.shape[0]))
    return jnp.argsort(order)[labels], order, switched


def _relabel(labels, parameters):
    labels, order, switched = order_classes(labels, parameters.mean[:, 0])
    return labels, GibbsParameters(parameters.mean[order], parameters.precision[order],
                                   parameters.proportions[order]), switched


class HiddenPottsState(NamedTuple):
    """labels (X, Y, Z) int; scales (X, Y, Z) Student-t weights u (ones for Gaussian emissions);
    parameters: the class means, precisions and proportions of the current draw."""

    labels: jax.Array
    scales: jax.Array
    parameters: GibbsParameters


class LabelSwitchInfo(NamedTuple):
    """label_switch: whether the sweep renamed the classes back into order by mean."""

    label_switch: jax.Array


def hidden_potts_gibbs(observations, observed, roi, beta, weights, prior, concentration,
                       external_field, *, tied: bool, emission: str, dof: float) -> SamplingAlgorithm:
    """Full conjugate Gibbs kernel for the hidden Potts model (module docstring); arguments as for
    :func:`gibbs_hidden_potts`, ``observed`` already restricted to the ROI.

    ``init(key, labels)`` draws the parameters given the start labels (u = 1); ``step(key,
    state)`` draws z, then u (Student-t only), then (mu, tau, pi), then renames the classes by
    mean (without an external field) and reports that renaming as :class:`LabelSwitchInfo`."""
    field = 0.0 if external_field is None else external_field
    student = emission == "student"

    def init(key, labels):
        parameters = _draw_parameters(key, labels, observations, observed, roi, prior,
                                      concentration, tied)
        # u = 1: the Gaussian start
        return HiddenPottsState(labels, jnp.ones(observations.shape[:3], observations.dtype),
                                parameters)

    def step(key, state):
        scales, parameters = state.scales, state.parameters
        label_key, scale_key, parameter_key = jax.random.split(key, 3)
        unary = (scaled_log_likelihood(observations, observed, parameters.mean,
                                       parameters.precision, scales)
                 + jnp.log(parameters.proportions) + field)
        labels = sample_labels(label_key, state.labels, unary, beta, weights, roi)
        if student:
            scales = draw_scales(scale_key, labels, observations, observed, parameters.mean,
                                 parameters.precision, dof)
        parameters = _draw_parameters(parameter_key, labels, observations, observed, roi, prior,
                                      concentration, tied, scales if student else None)
        switched = jnp.asarray(False)
        if external_field is None:
            # with a field the classes are not exchangeable and a renaming is not a valid move
            labels, parameters, switched = _relabel(labels, parameters)
        return HiddenPottsState(labels, scales, parameters), LabelSwitchInfo(switched)

    return SamplingAlgorithm(init, step)


def posterior_draw_summary(labels, mean, precision, label_switch, roi, count_weights, dtype,
                           design=None, num_labels=None):
    """What the conjugate Gibbs samplers keep from one sweep: the one-hot labels (X, Y, Z, K) of
    ``dtype`` to accumulate into marginals, and the record (class counts (K,), per-class sums of
    ``count_weights`` (K,), mean (K, M), precision, label_switch) of :class:`GibbsResult`.
    With a level ``design`` P (L, J) (``num_labels`` = L) the one-hot labels are over the L
    levels and counts and sums are over the design rows P[x_v] (e.g. the fraction sum)."""
    onehot = one_hot_labels(labels, mean.shape[0] if num_labels is None else num_labels, roi, dtype)
    rows = onehot if design is None else onehot @ design
    return onehot, (jnp.sum(rows, axis=(0, 1, 2)),
                    jnp.einsum("xyz,xyzk->k", count_weights, rows), mean, precision, label_switch)


def conjugate_gibbs_chains(key, sampler, initial_labels, summarise, *, num_chains: int,
                           num_sweeps: int, burn_in: int) -> GibbsResult:
    """Run ``num_chains`` chains of a conjugate Gibbs ``sampler`` (``init(key, labels)``) from
    ``initial_labels``; each chain key splits into (start, burn-in, kept) keys.
    ``summarise(state, info)`` returns the :func:`posterior_draw_summary` of the state."""
    chain_keys = split_each(jax.random.split(key, num_chains), 3)
    starts = jax.vmap(sampler.init, in_axes=(0, None))(chain_keys[:, 0], initial_labels)
    sweep_keys = jax.vmap(burn_in_then_kept_keys, in_axes=(0, 0, None, None))(
        chain_keys[:, 1], chain_keys[:, 2], burn_in, num_sweeps)
    trace = run_chains(sampler.step, starts, sweep_keys, summarise, burn_in=burn_in)
    return GibbsResult(pooled_marginals(trace.kept_sum, num_sweeps), *trace.records)


@partial(jax.jit, static_argnames=("num_chains", "num_sweeps", "burn_in", "tied", "emission", "dof"))
def gibbs_hidden_potts(key, observations, observed, roi, beta, weights, prior: NormalGammaPrior,
                       concentration, initial_labels, count_weights, external_field=None, *,
                       num_chains: int, num_sweeps: int, burn_in: int,
                       tied: bool = True, emission: str = "gaussian", dof: float = 4.0) -> GibbsResult:
    """Full conjugate Gibbs for the hidden Potts model with fixed beta.

    Args:
        observations, observed, roi, beta, weights, prior, concentration: as for
            :func:`~vbseg.potts.meanfield.fit_hidden_potts_vb` (prior broadcast to (K, M)).
        initial_labels: (X, Y, Z) start of every chain (e.g. the VB solution's argmax).
        count_weights: (X, Y, Z) per-voxel weights summed per class each sweep (e.g. SUV).
        external_field: optional (X, Y, Z, K) prior log-potentials added to the unary term.
        num_chains, num_sweeps (kept per chain), burn_in: static sizes.
        emission: "gaussian" or "student" (scale mixture with ``dof`` degrees of freedom).
    """
    sampler = hidden_potts_gibbs(observations, observed & roi[..., None], roi, beta, weights, prior,
                                 concentration, external_field, tied=tied, emission=emission,
                                 dof=dof)

    def summarise(state, info):
        return posterior_draw_summary(state.labels, state.parameters.mean,
                                      state.parameters.precision, info.label_switch, roi,
                                      count_weights, observations.dtype)

    return conjugate_gibbs_chains(key, sampler, initial_labels, summarise, num_chains=num_chains,
                                  num_sweeps=num_sweeps, burn_in=burn_in)


@partial(jax.jit, static_argnames=("num_classes", "num_fields", "num_sweeps"))
def sample_potts_prior(key, beta, roi, weights, *, num_classes: int, num_fields: int,
                       num_sweeps: int, prior_unary=None):
    """Label fields from the Potts prior p(z | beta) ∝ exp(sum_v e_v(z_v) + beta S(z)).

    ``num_fields`` independent chains, each from a uniform random start, run ``num_sweeps``
    checkerboard sweeps; returns (final labels (F, X, Y, Z), S after every sweep (F, sweeps)),
    the trace for judging burn-in (e.g. split R-hat of its second half across chains). Below
    the critical coupling the chains mix in tens of sweeps; near it they slow down sharply.
    """
    unary = (jnp.zeros(roi.shape + (num_classes,), jnp.float32) if prior_unary is None
             else prior_unary)
    sampler = label_gibbs(unary, beta, weights, roi)
    chain_keys = split_each(jax.random.split(key, num_fields), 2)
    starts = jax.vmap(lambda start_key: sampler.init(
        jax.random.randint(start_key, roi.shape, 0, num_classes)))(chain_keys[:, 0])

    def summarise(state, info):
        return (), potts_statistic(one_hot_labels(state.labels, num_classes, roi, unary.dtype),
                                   weights)

    trace = run_chains(sampler.step, starts, split_each(chain_keys[:, 1], num_sweeps), summarise,
                       burn_in=0)
    return trace.final_state.labels, trace.records
