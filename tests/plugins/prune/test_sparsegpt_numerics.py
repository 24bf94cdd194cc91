"""SparseGPT's numerical failures (issue 11, kind 4; field case 07): refused, retried, or named.

case07-singular-hessian.py: rank-deficient and collinear Hessians must give
a finite result or an error saying what to raise. case07-sparsegpt-no-damping
.yaml: ``dampening: 0`` is refused by validation with the reason; a damping
too small for the calibration is raised (x10 steps) and reported, naming the
modules; what no damping repairs is a one-line SparsifyError naming the module.
"""
from __future__ import annotations

import pytest
import torch
import transformers as T
from helpers import make_ctx, tiny_recipe, write
from pydantic import ValidationError

from sparsify_core.errors import RecipeError, SparsifyError
from sparsify_core.ffn import prunable_modules
from sparsify_plugins.prune import SparseGPT, damped_factor, hessian_factor, sparsegpt_prune

pytestmark = pytest.mark.usefixtures("one_thread")


def case07_hessians():
    """The two Hessians of case07-singular-hessian.py (float32, as SparseGPT accumulates them)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g)  # 8 tokens for 64 inputs: rank 8
    y = torch.randn(256, 64, generator=g)
    y[:, 1] = y[:, 0]  # two identical input features
    y[:, 5] *= 1e4  # one feature far larger than the rest
    return {"rank-deficient": x.t() @ x, "collinear": y.t() @ y}


@pytest.mark.parametrize("label", ["rank-deficient", "collinear"])
@pytest.mark.parametrize("dampening", [0.0, 1e-8, 0.01])
def test_case07_finite_result_or_what_to_raise(label, dampening):
    hessian = case07_hessians()[label]
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    try:
        factor = hessian_factor(hessian, dampening)
    except ValueError as exc:  # the pure function may refuse, but must say what to change
        assert "raise dampening or the calibration samples" in str(exc) and "\n" not in str(exc)
        assert dampening < 0.01
    else:
        new, keep = sparsegpt_prune(w, sparsity=0.5, factor=factor)
        assert torch.isfinite(new).all() and int((~keep).sum()) == 512
    # the retrying factor always gets there, from any dampening > 0 the validation lets through
    if dampening > 0:
        u, dead, used = damped_factor(hessian, dampening)
        assert torch.isfinite(u).all() and dampening <= used <= 1.0
        new, keep = sparsegpt_prune(w, sparsity=0.5, factor=(u, dead))
        assert torch.isfinite(new).all() and int((~keep).sum()) == 512


def test_zero_dampening_fails_on_a_singular_hessian():
    with pytest.raises(ValueError, match="not positive definite at dampening 0 .*raise dampening"):
        hessian_factor(case07_hessians()["rank-deficient"], 0.0)


def test_retry_steps_by_ten_until_the_factor_exists():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 32, generator=g, dtype=torch.float64)
    h = x.t() @ x  # rank 8: 24 zero eigenvalues, made negative below
    h -= 3e-3 * h.diagonal().mean() * torch.eye(32, dtype=torch.float64)  # needs a dampening above 3e-3
    u, _, used = damped_factor(h, 1e-8)
    assert used == pytest.approx(1e-2)  # 1e-8, 1e-7, ... 1e-3 fail, 1e-2 is the first to work
    damped = h + used * h.diagonal().mean() * torch.eye(32, dtype=torch.float64)
    torch.testing.assert_close(u.double().T @ u.double(), torch.linalg.inv(damped), rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match=r"not positive definite at dampening 1 .*\(retried from 0\.01\)"):
        damped_factor(-torch.eye(8), 0.01)  # negative definite: no dampening up to the bound helps
    with pytest.raises(ValueError, match="not finite"):
        damped_factor(torch.full((4, 4), float("nan")), 0.01)


@pytest.mark.parametrize("bad", [0.0, -0.01, float("nan"), float("inf")])
def test_dampening_must_be_positive(bad):
    with pytest.raises(ValidationError, match=r"dampening must be > 0 .*singular whenever there are fewer "
                                              r"calibration tokens than inputs"):
        SparseGPT.Params(sparsity=0.5, dampening=bad)


def _case07_ctx(tmp_path):
    """case07's setup: 16 calibration tokens for 64- and 128-wide inputs (every Hessian has rank <= 16)."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=100))
    return model, make_ctx(tmp_path, model, samples=1, seq_len=16)


def test_too_little_damping_is_raised_and_reported(tmp_path):
    model, ctx = _case07_ctx(tmp_path)
    lines = []
    ctx.info = lines.append
    result = SparseGPT().apply(ctx, SparseGPT.Params(sparsity=0.5, dampening=1e-9))
    raised = result.info["dampening_raised"]
    assert raised and result.metrics["dampening_raised"] == len(raised)
    assert all(1e-9 < d <= 1.0 for d in raised.values())
    for name in raised:  # every raise is named in a status line, with the damping used
        assert any(name in line and f"used {raised[name]:g}" in line for line in lines), name
    for _, module in prunable_modules(model):
        assert torch.isfinite(module.weight).all()
    assert result.metrics["sparsity"] == pytest.approx(0.5, abs=1e-9)
    # with SparseGPT's usual 1% nothing needs raising, and nothing is reported
    _, ctx = _case07_ctx(tmp_path)
    result = SparseGPT().apply(ctx, SparseGPT.Params(sparsity=0.5))
    assert result.metrics["dampening_raised"] == 0 and "dampening_raised" not in result.info


def test_what_damping_cannot_repair_names_the_module(tmp_path):
    model, ctx = _case07_ctx(tmp_path)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.fill_(float("inf"))  # the MLP inputs overflow
    with pytest.raises(SparsifyError) as info:
        SparseGPT().apply(ctx, SparseGPT.Params(sparsity=0.5))
    message = str(info.value)
    assert message.startswith("sparsegpt: model.layers.1.mlp.") and "not finite" in message
    assert "\n" not in message


def test_case07_recipe_refused_at_validation(workdir):
    from sparsify_core.recipe import load_recipe

    stages = "  - kind: prune\n    method: sparsegpt\n    params: {sparsity: 0.5, dampening: 0.0}\n"
    path = write(workdir / "case07.yaml", tiny_recipe(
        stages, name="case07", model={"hidden_size": 64, "intermediate_size": 128}, seq_len=16,
        splits={"calibration": {"samples": 1}, "eval": {"samples": 4}}))
    with pytest.raises(RecipeError, match=r"stages\.0\.params\.dampening.*dampening must be > 0"):
        load_recipe(path)
    assert load_recipe(path, ["stages.0.params.dampening=1.0e-6"])  # case07's control
