"""ProSparse progressive L1: Algorithm 1's schedule, the penalty, and its effect."""
from __future__ import annotations

import math

import pytest
from helpers import make_ctx, tiny_model
from pydantic import ValidationError

from sparsify_plugins.activation import ReLU
from sparsify_plugins.regularize.l1 import ProgressiveL1
from sparsify_plugins.regularize.schedules import progressive_lambda

# The published LLaMA2-7B schedule as stage durations (cumulative 5000, 6000, 10000, 12000, 16000, 16500).
PUBLISHED = [(0.0, 5000), (5e-3, 1000), (5e-2, 4000), (5e-2, 2000), (2e-1, 4000), (2e-1, 500)]


def test_schedule_follows_algorithm_1():
    lam = lambda t: progressive_lambda(t, PUBLISHED)  # noqa: E731
    assert lam(0) == 0 and lam(4999) == 0  # warm-up holds lambda_1
    assert lam(5000) == pytest.approx(0.0)  # each ramp starts at the previous lambda...
    assert lam(5500) == pytest.approx(2.5e-3)  # ...is halfway at mid-stage (sine ramp)...
    assert lam(5250) == pytest.approx(5e-3 * (math.sin(-math.pi / 2 + math.pi * 0.25) + 1) / 2)
    assert lam(6000) == pytest.approx(5e-3)  # ...and reaches lambda_i at the stage's end
    assert lam(11000) == pytest.approx(5e-2)  # a flat stage stays flat
    assert lam(14000) == pytest.approx((5e-2 + 2e-1) / 2)
    assert lam(16499) == pytest.approx(2e-1) and lam(99999) == pytest.approx(2e-1)
    values = [lam(t) for t in range(0, 16500, 50)]
    assert all(b >= a for a, b in zip(values, values[1:]))  # monotone for a non-decreasing schedule


def test_params_check_schedule_against_steps():
    base = {"schedule": [{"lambda": 0, "steps": 2}, {"lambda": 0.1, "steps": 3}], "train": {"steps": 5}}
    ProgressiveL1.Params.model_validate(base)
    with pytest.raises(ValidationError, match="must equal"):
        ProgressiveL1.Params.model_validate({**base, "train": {"steps": 6}})
    with pytest.raises(ValidationError):
        ProgressiveL1.Params.model_validate({**base, "schedule": [{"lamda": 0.1, "steps": 5}]})


def _train(tmp_path, lam):
    model = tiny_model("llama")
    ctx = make_ctx(tmp_path, model, samples=32)
    ReLU().apply(ctx, ReLU.Params())
    params = ProgressiveL1.Params.model_validate({
        "schedule": [{"lambda": 0.0, "steps": 5}, {"lambda": lam, "steps": 25}],
        "train": {"steps": 30, "lr": 3e-3, "kd_weight": 1.0, "lm_weight": 0.0, "checkpoint_every": 0}})
    return ProgressiveL1().apply(ctx, params).metrics


def test_larger_lambda_gives_higher_sparsity(tmp_path):
    sparsities = [_train(tmp_path / str(lam), lam)["final_sparsity"] for lam in (0.0, 0.3, 3.0)]
    assert sparsities[0] < sparsities[1] < sparsities[2]
    assert sparsities[2] > 0.8


def test_blockwise_l1_sparsifies_each_ffn_locally(tmp_path):
    from sparsify_plugins.regularize.blockwise import BlockwiseL1, cache_ffn_io

    from sparsify_core.ffn import find_ffn_blocks

    model = tiny_model("llama")
    ctx = make_ctx(tmp_path, model, samples=16)
    ReLU().apply(ctx, ReLU.Params())
    # The cache holds exactly what each dense FFN computes.
    ref = ctx.reference_model()
    blocks = find_ffn_blocks(ref)
    xs, ys = cache_ffn_io(ref, blocks, ctx.split("train").input_ids[:2], 2, ctx.device)
    assert xs[0].shape == (32, 32) and ys[1].shape == (32, 32)
    with __import__("torch").no_grad():
        __import__("torch").testing.assert_close(blocks[0].forward(xs[0]), ys[0])
    res = BlockwiseL1().apply(ctx, BlockwiseL1.Params(l1=2.0, steps=60, lr=3e-3, tokens_per_step=128))
    m = res.metrics
    assert m["fit_sparsity_after"] > m["fit_sparsity_before"] + 0.15
    assert m["fit_rel_err_max"] < 0.5
