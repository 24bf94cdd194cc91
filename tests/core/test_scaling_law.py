"""The sparse scaling law: published check, fit recovery, uncertainty, held-out error, runs, plot."""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

from sparsify_core.registry import MetricRecord, RunRecord
from sparsify_core.scaling_law import (COEFFICIENTS, PUBLISHED, Points, ScalingLaw, cross_validate, fit, fit_runs,
                                       heldout_error, heldout_split, optimal_sparsity, plot_fit, points_from_runs)

T5 = PUBLISHED["t5-c4"]


def grid_points(law, noise=0.0, seed=0):
    S, N, D = np.meshgrid([0.0, 0.5, 0.75, 0.875], [20, 60, 150, 400], [0.5, 1.0, 2.0, 4.0], indexing="ij")
    S, N, D = S.ravel(), N.ravel(), D.ravel()
    L = law(S, N, D) * np.exp(np.random.default_rng(seed).normal(0, noise, S.shape))
    return Points(S, N, D, L)


def test_t5_check_from_published_coefficients():
    # docs/methods.md#sparse-scaling-law: 75% sparse, 604M non-zeros, D = 5: measured 1.483, predicted ~1.468
    assert T5(0.75, 604, 5) == pytest.approx(1.468, abs=5e-4)
    assert T5.a_D ** T5.b_D == pytest.approx(0.6336)  # the data term as printed: 0.6336 D^-0.2027
    vit = PUBLISHED["vit-jft"]
    assert vit(0.0, 86, 4) == pytest.approx((1.3049 + 2.0751) * 86 ** -0.3922 + 0.2782 * 4 ** -0.8898 + 4.5167)


def test_fit_recovers_known_coefficients():
    result = fit(grid_points(T5), restarts=3, seed=0)
    assert result.objective < 1e-12
    for k in COEFFICIENTS:
        assert getattr(result.law, k) == pytest.approx(getattr(T5, k), rel=1e-3), k


def test_uncertainty_covers_the_truth_with_noise():
    result = fit(grid_points(T5, noise=0.003, seed=1), restarts=3, seed=0, bootstrap=5)
    for k in COEFFICIENTS:
        true, got, se = getattr(T5, k), getattr(result.law, k), result.stderr[k]
        assert np.isfinite(se) and se > 0, k
        assert abs(got - true) < 5 * se + 0.05 * true, k
        lo, hi = result.bootstrap[k]
        assert lo <= got * 1.05 and hi >= got * 0.95, k


def test_heldout_error_on_extrapolation_in_size():
    points = grid_points(T5, noise=0.002, seed=2)
    mask = heldout_split(points, "largest")
    assert mask.sum() == 16 and np.all(points.N[mask] == 400)
    out = heldout_error(points, "largest", restarts=2)
    assert out["heldout"]["mean_abs_rel"] < 0.01 and out["heldout"]["points"] == 16
    assert heldout_split(points, 0.25).sum() == 16
    with pytest.raises(ValueError):
        heldout_split(points, "smallest")


def test_optimal_sparsity_rises_with_data():
    values = [optimal_sparsity(T5, 604, d) for d in (1, 50, 500, 5000)]
    assert values[0] == 0.0 and values == sorted(values) and values[-1] > 0.5
    # closed form agrees with a grid search of L(S, N, D (1 - S))
    S = np.linspace(0, 0.99, 9901)
    best = S[np.argmin(T5(S, 604, 500 * (1 - S)))]
    assert optimal_sparsity(T5, 604, 500) == pytest.approx(best, abs=2e-4)


def run_record(i, metrics, recipe=None, status="finished"):
    now = datetime.now(timezone.utc)
    import json
    return RunRecord(id=f"run{i}", recipe_name="sweep", recipe_hash=None, recipe_text=None,
                     recipe_json=json.dumps(recipe or {}), overrides=[], model=None, data=None, seed=0,
                     status=status, reason=None, started_at=now, ended_at=now, versions={}, git_commit=None,
                     host=None, pid=None, output_dir=None, workdir=None, attempts=1, sweep_id="s",
                     metrics=[MetricRecord(stage, idx, name, value) for stage, idx, name, value in metrics])


def test_fit_runs_extracts_points_from_the_registry(tmp_path):
    points = grid_points(T5, noise=0.001, seed=3)
    records = []
    for i, (s, n, d, l) in enumerate(zip(points.S, points.N, points.D, points.L)):
        records.append(run_record(i, [
            ("dense", -1, "perplexity", 1e6), ("dense", -1, "weight_sparsity", 0.0),  # not the final point
            ("gmp", 0, "perplexity", float(np.exp(l))), ("gmp", 0, "weight_sparsity", s),
            ("gmp", 0, "nonzero_parameters", n * 1e6)], recipe={"stages": [{"params": {"train": {"steps": d * 1e5}}}]}))
    records.append(run_record(99, [("gmp", 0, "perplexity", 3.0)], status="failed"))
    records.append(run_record(98, [("gmp", 0, "perplexity", 3.0)]))  # no sparsity metric: skipped
    got, skipped = points_from_runs(records, data="recipe:stages.0.params.train.steps", d_unit=1e5)
    np.testing.assert_allclose(got.L, points.L)
    np.testing.assert_allclose(got.D, points.D)
    assert skipped == ["run99", "run98"]

    result = fit_runs(records, data="recipe:stages.0.params.train.steps", d_unit=1e5, holdout="largest",
                      restarts=2)
    assert result.heldout_error["mean_abs_rel"] < 0.01 and len(result.summary()["heldout_runs"]) == 16
    assert result.fit.law.b_N == pytest.approx(T5.b_N, rel=0.1)

    path = tmp_path / "fit.png"
    plot_fit(result.fit.law, result.points, path, heldout=result.heldout_mask)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_points_validation():
    with pytest.raises(ValueError):
        Points([1.0], [1], [1], [1])
    with pytest.raises(ValueError, match="at least 7 points"):
        fit(Points([0.0] * 3, [1, 2, 3], [1] * 3, [2, 2, 2]))
    assert isinstance(ScalingLaw(*[1.0] * 7)(0.5, 1, 1), float)


def test_cross_validation_predicts_every_point_once_unseen():
    points = grid_points(T5, noise=0.002, seed=4)
    cv = cross_validate(points, folds=4, restarts=2)
    assert cv["folds"] == 4 and cv["predicted"].shape == (64,)
    assert cv["mean_abs_rel"] < 0.01 and cv["rmse_log"] > 0
    # a badly wrong point is predicted from the others, so its error shows up held out
    bad = grid_points(T5, noise=0.002, seed=4)
    bad.L[5] *= 1.5
    assert cross_validate(bad, folds=4, restarts=2)["max_abs_rel"] > 0.2
    with pytest.raises(ValueError, match="too few"):
        cross_validate(points.subset(np.arange(8)), folds=2)
