"""FATReLU and CATS: exact thresholding, calibrated sparsity, rebuild from saved thresholds."""
from __future__ import annotations

import pytest
import torch
from helpers import make_ctx, tiny_model
from pydantic import ValidationError

from sparsify_core.ffn import capture_intermediates, find_ffn_blocks
from sparsify_plugins.activation import CATS, FATReLU, ReLU
from sparsify_plugins.activation.threshold import FATReLUModule, quantile_threshold


def test_fatrelu_definition():
    f = FATReLUModule(0.5)
    x = torch.tensor([-1.0, 0.0, 0.49, 0.5, 2.0])
    assert f(x).tolist() == [0.0, 0.0, 0.0, 0.5, 2.0]
    assert FATReLUModule(0.0)(x).tolist() == torch.relu(x).tolist()


def test_quantile_threshold_is_exact():
    v = torch.arange(1, 101, dtype=torch.float32)
    t = quantile_threshold(v, 0.3)
    assert (v < t).float().mean() == pytest.approx(0.3)
    assert quantile_threshold(v, 0.0) == 0.0


def _x1_sparsity(model, ids):
    zeros, total = 0, 0

    def rec(block, x1):
        nonlocal zeros, total
        zeros += int((x1 == 0).sum())
        total += x1.numel()
    with torch.no_grad(), capture_intermediates(find_ffn_blocks(model), rec):
        model(input_ids=ids)
    return zeros / total


def test_params_need_exactly_one_of_threshold_or_target():
    with pytest.raises(ValidationError):
        CATS.Params.model_validate({})
    with pytest.raises(ValidationError):
        CATS.Params.model_validate({"threshold": 0.1, "target_sparsity": 0.5})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cats_hits_its_target_on_calibration_data(tmp_path, arch):
    model = tiny_model(arch).eval()
    ctx = make_ctx(tmp_path, model)
    before = model(input_ids=ctx.split("eval").input_ids).logits
    res = CATS().apply(ctx, CATS.Params(target_sparsity=0.7))
    assert _x1_sparsity(model, ctx.split("calibration").input_ids) == pytest.approx(0.7, abs=0.02)
    after = model(input_ids=ctx.split("eval").input_ids).logits
    assert not torch.allclose(before, after)
    # A fresh model rebuilt from the saved thresholds computes the same thing.
    fresh = tiny_model(arch).eval()
    CATS().rebuild(make_ctx(tmp_path, fresh), CATS.Params(target_sparsity=0.7), res)
    torch.testing.assert_close(fresh(input_ids=ctx.split("eval").input_ids).logits, after)


def test_fatrelu_after_relu_raises_sparsity(tmp_path):
    model = tiny_model("llama").eval()
    ctx = make_ctx(tmp_path, model)
    ReLU().apply(ctx, ReLU.Params())
    ids = ctx.split("calibration").input_ids
    base = _x1_sparsity(model, ids)
    FATReLU().apply(ctx, FATReLU.Params(target_sparsity=0.85))
    assert base < 0.6 and _x1_sparsity(model, ids) == pytest.approx(0.85, abs=0.02)
    fixed = tiny_model("llama").eval()
    fctx = make_ctx(tmp_path, fixed)
    ReLU().apply(fctx, ReLU.Params())
    FATReLU().apply(fctx, FATReLU.Params(threshold=1e9))
    assert _x1_sparsity(fixed, ids) == 1.0


@pytest.mark.parametrize("method, first, second", [(FATReLU, 0.9, 0.75), (FATReLU, 0.6, 0.8), (CATS, 0.9, 0.7)])
def test_recalibrating_a_thresholded_model_moves_to_the_new_target(tmp_path, method, first, second):
    # Calibrating on the activation's output would read zeros below the first threshold and come out
    # at 0 (undoing it) whenever the new target is under the old sparsity; the input is what counts.
    model = tiny_model("llama").eval()
    ctx = make_ctx(tmp_path, model)
    if method is FATReLU:
        ReLU().apply(ctx, ReLU.Params())
    ids = ctx.split("calibration").input_ids
    method().apply(ctx, method.Params(target_sparsity=first))
    assert _x1_sparsity(model, ids) == pytest.approx(first, abs=0.02)
    method().apply(ctx, method.Params(target_sparsity=second))
    assert _x1_sparsity(model, ids) == pytest.approx(second, abs=0.02)
