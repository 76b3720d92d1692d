"""The warnings of summary.json (vbseg.trust): each code fires on an input built to trigger it
and stays silent on a well-separated lesion inside its VOI."""

from __future__ import annotations

import numpy as np
import pytest

from vbseg.potts.fitting import restart_agreement
from vbseg.trust import (
    CUT_SHARE_LIMIT,
    RESTART_ODDS_NATS,
    SEPARATION_LIMIT,
    VOI_SHARE_LIMIT,
    class_separation,
    fit_warnings,
    surface,
)

SHAPE = (20, 20, 20)


def ball(centre, radius, shape=SHAPE) -> np.ndarray:
    index = np.indices(shape).T
    return (np.sum((index - np.asarray(centre)) ** 2, axis=-1) <= radius ** 2).T


def codes(probability, voi=None, summary=None) -> list[str]:
    voi = np.ones(SHAPE, bool) if voi is None else voi
    return [w["code"] for w in fit_warnings(probability, voi, summary or {})]


SEPARATED = {"parameters": {"class_means": [[1.0], [6.0]], "class_sds": [[0.3], [0.6]], "tumour_class": 1}}


def test_a_lesion_inside_its_voi_gives_no_warning():
    probability = np.where(ball((10, 10, 10), 4), 0.97, 0.01).astype(np.float32)
    assert codes(probability, summary=SEPARATED) == []


def test_tumour_fills_voi():
    probability = np.zeros(SHAPE, np.float32)
    probability[:, :, 3:17] = 0.9  # expected volume 0.63 of the VOI, away from two faces
    share = probability.sum() / probability.size
    assert share > VOI_SHARE_LIMIT
    assert "tumour-fills-voi" in codes(probability)
    probability[:, :, 3:12] = 0.0  # now 0.32 of the VOI
    assert "tumour-fills-voi" not in codes(probability)


def test_tumour_on_voi_border():
    probability = np.where(ball((10, 10, 10), 6), 0.0, 0.8).astype(np.float32)  # all but a hole
    found = codes(probability)
    assert "tumour-on-voi-border" in found and "contour-cut-by-voi" not in found
    # a VOI mask: its border is where the mask ends, not the array's faces
    voi = ball((10, 10, 10), 8)
    shell = np.where(voi & ~ball((10, 10, 10), 6), 0.9, 0.0).astype(np.float32)
    assert "tumour-on-voi-border" in codes(shell, voi)
    core = np.where(ball((10, 10, 10), 3), 0.9, 0.0).astype(np.float32)
    assert codes(core, voi) == []


def test_contour_cut_by_voi():
    probability = np.where(ball((0, 10, 10), 6), 0.95, 0.0).astype(np.float32)  # a ball cut by a face
    contour = probability >= 0.5
    on_border = surface(np.ones(SHAPE, bool))[surface(contour)].mean()
    assert CUT_SHARE_LIMIT < on_border < 1.0
    assert codes(probability) == ["contour-cut-by-voi"]
    # the same ball inside a larger grid is not cut
    inside = np.where(ball((10, 10, 10), 6), 0.95, 0.0).astype(np.float32)
    assert codes(inside) == []


def test_no_contour():
    assert codes(np.full(SHAPE, 0.3, np.float32)) == ["no-contour"]


def test_classes_overlap():
    probability = np.where(ball((10, 10, 10), 4), 0.97, 0.01).astype(np.float32)
    # tumour class 2: 1.5 pooled sd from class 1 in image 1 and 0.5 in image 2; class 0 far
    close = {"parameters": {"class_means": [[0.0, 0.0], [2.0, 1.0], [3.5, 1.5]],
                            "class_sds": [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], "tumour_class": 2}}
    parameters = close["parameters"]
    assert class_separation(parameters["class_means"], parameters["class_sds"], 2) == pytest.approx(1.5)
    assert SEPARATION_LIMIT > 1.5
    assert codes(probability, summary=close) == ["classes-overlap"]
    # pooled sd: sqrt((0.3^2 + 0.6^2) / 2) = 0.474; 5 / 0.474 = 10.5 sd apart
    assert class_separation([[1.0], [6.0]], [[0.3], [0.6]], 1) == pytest.approx(5 / np.sqrt(0.225))
    # log-normal columns (medians against log-scale sds) are not compared
    logged = {"parameters": dict(close["parameters"], units="... the sd is on the log scale")}
    assert codes(probability, summary=logged) == []


@pytest.mark.parametrize("key, code", [("beta_at_prior_bound", "beta-at-bound"),
                                       ("field_weight_at_prior_bound", "field-weight-at-bound")])
def test_learned_parameter_at_its_bound(key, code):
    probability = np.where(ball((10, 10, 10), 4), 0.97, 0.01).astype(np.float32)
    assert codes(probability, summary={"diagnostics": {key: True}}) == [code]
    assert codes(probability, summary={"diagnostics": {key: False}}) == []
    # a PSF fit or a sampler after the VB fit keeps the VB fit's diagnostics under initial_fit
    nested = {"diagnostics": {"initial_fit": {key: True}, "rhat": 1.0}}
    assert codes(probability, summary=nested) == [code]



def test_a_rejected_learned_beta_is_reported():
    probability = np.where(ball((10, 10, 10), 4), 0.97, 0.01).astype(np.float32)
    rejected = {"used": "fixed", "reason": "the learned beta stopped at its prior's bound 3",
                "fixed_beta": 1.5}
    assert codes(probability, summary={"diagnostics": {"learned_beta": rejected}}) == [
        "learned-beta-rejected"]
    kept = dict(rejected, used="learned", reason=None)
    assert codes(probability, summary={"diagnostics": {"learned_beta": kept}}) == []


def test_restarts_that_disagree_are_reported():
    """restart_agreement: the gap from the best restart to the best one that found another
    solution (a class size off by more than 5 %), not to the runner-up overall; the warning
    fires when that gap is under log 20 nats (also from a first fit's diagnostics) and not when
    every restart found the same solution or the other one is far below."""
    elbos = np.array([-100.0, -100.5, -101.0])
    voxels = np.array([[900.0, 100.0], [902.0, 98.0], [800.0, 200.0]])  # restart 1 = restart 0's
    record = restart_agreement(elbos, voxels, best=0)
    assert record["restarts_agreeing_with_best"] == 2
    assert record["elbo_gap_to_runner_up"] == pytest.approx(0.5)
    assert record["elbo_gap_to_other_solution"] == pytest.approx(1.0)
    assert restart_agreement(elbos[:2], voxels[:2], best=0)["elbo_gap_to_other_solution"] is None
    probability = np.where(ball((10, 10, 10), 4), 0.97, 0.01).astype(np.float32)
    close = {"diagnostics": {"elbo_gap_to_other_solution": 1.0}}
    assert codes(probability, summary=close) == ["restarts-disagree"]
    nested = {"diagnostics": {"initial_fit": {"elbo_gap_to_other_solution": 1.0}}}
    assert codes(probability, summary=nested) == ["restarts-disagree"]
    for gap in (None, RESTART_ODDS_NATS + 0.01, 40.0):
        assert codes(probability, summary={"diagnostics": {"elbo_gap_to_other_solution": gap}}) == []
    assert RESTART_ODDS_NATS == pytest.approx(2.9957, abs=1e-4)
