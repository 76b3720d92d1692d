"""Posterior draws and credible intervals (vbseg.posterior) against closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from vbseg.posterior import credible_interval, independent_label_draws


def test_credible_interval_of_uniform_draws_is_its_quantiles():
    draws = np.arange(1, 10_001, dtype=float)  # 1..10000
    interval = credible_interval(draws, 0.9)
    assert interval["mean"] == pytest.approx(5000.5)
    assert interval["lower"] == pytest.approx(np.quantile(draws, 0.05))
    assert interval["upper"] == pytest.approx(np.quantile(draws, 0.95))
    assert interval["level"] == 0.9 and interval["interval"] == "equal-tailed"


def test_independent_label_draws_match_the_bernoulli_sum():
    """sum_v w_v z_v with z_v ~ Bernoulli(p_v) independent: mean sum w p, variance sum w^2 p (1 - p).
    With 20,000 draws the sample mean is within 4 standard errors and the variance within 5 %."""
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 500).astype(np.float32)
    w = np.stack([np.full(500, 0.064), rng.uniform(0, 5, 500)], axis=1).astype(np.float32)
    draws = independent_label_draws(p, w, seed=3, num_draws=20_000)
    mean = (w * p[:, None]).sum(axis=0)
    variance = (w ** 2 * (p * (1 - p))[:, None]).sum(axis=0)
    assert np.all(np.abs(draws.mean(axis=0) - mean) <= 4 * np.sqrt(variance / 20_000))
    np.testing.assert_allclose(draws.var(axis=0), variance, rtol=0.05)
    # a 0/1 map has one volume
    certain = independent_label_draws(np.array([1.0, 0.0, 1.0], np.float32),
                                      np.ones((3, 1), np.float32), seed=0, num_draws=100)
    assert np.all(certain == 2.0)
