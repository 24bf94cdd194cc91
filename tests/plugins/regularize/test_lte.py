"""LTE: the loss terms, the two phases, and the effect of eta."""
from __future__ import annotations

import pytest
import torch
from helpers import make_ctx, tiny_model
from pydantic import ValidationError

from sparsify_core.errors import SparsifyError
from sparsify_core.training import TrainCallback, TrainConfig, train
from sparsify_plugins.moeify import ParamCluster
from sparsify_plugins.regularize import LTE
from sparsify_plugins.moeify import routed_modules
from sparsify_plugins.regularize.lte import LTECallback, efficiency_loss, separability_loss


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def test_loss_terms_follow_the_definitions():
    g = torch.tensor([[0.0, 1.0], [0.25, 0.75]])
    assert float(efficiency_loss(g)) == pytest.approx((0 + 1 + 0.0625 + 0.5625) / 4)
    assert float(separability_loss(g, 0.5)) == pytest.approx((4 + 4 + 16 + 16) / 4)
    assert torch.isfinite(separability_loss(torch.tensor([0.5]), 0.5))  # floored at sep_eps
    # the separability gradient pushes scores away from tau
    g = torch.tensor([0.4, 0.6], requires_grad=True)
    separability_loss(g, 0.5).backward()
    assert g.grad[0] > 0 and g.grad[1] < 0
    # The paper's literal form (docs/methods.md#lte) sums over the experts (mean over tokens): E times the mean
    g = torch.tensor([[0.0, 1.0], [0.25, 0.75]])
    assert float(efficiency_loss(g, "sum")) == pytest.approx((1 + 0.625) / 2)
    assert float(separability_loss(g, 0.5, reduction="sum")) == pytest.approx(2 * float(separability_loss(g, 0.5)))


def test_params_check_phases():
    base = {"stage1_steps": 3, "train": {"steps": 5}, "lambda": 0.5}
    assert LTE.Params.model_validate(base).lam == 0.5
    with pytest.raises(ValidationError, match="exceeds train.steps"):
        LTE.Params.model_validate({**base, "stage1_steps": 6})
    with pytest.raises(ValidationError):
        LTE.Params.model_validate({**base, "etaa": 1.0})


def _moeified(tmp_path, router="lte", margin=3.0):
    model = tiny_model("llama")
    ctx = make_ctx(tmp_path, model, samples=16)
    params = {"expert_size": 8, "router": router, "fit": {"epochs": 2}, "init_margin": margin}
    if router == "mlp":
        params["top_k"] = 4
    ParamCluster().apply(ctx, ParamCluster.Params.model_validate(params))
    return ctx


def test_needs_lte_routers(tmp_path):
    params = LTE.Params.model_validate({"stage1_steps": 1, "train": {"steps": 1}})
    with pytest.raises(SparsifyError, match="moeify stage with router: lte"):
        LTE().apply(make_ctx(tmp_path, tiny_model("llama")), params)
    with pytest.raises(SparsifyError, match="set router: lte"):
        LTE().apply(_moeified(tmp_path / "mlp", "mlp"), params)


def test_phases_soft_then_frozen_hard_threshold(tmp_path):
    ctx = _moeified(tmp_path)
    modules = routed_modules(ctx.model)
    seen = {}

    class Spy(TrainCallback):
        def after_step(self, step):
            seen[step] = (modules[0].routing, modules[0].router.proj.weight.detach().clone(),
                          modules[0].part("up").weight.detach().clone())
            return {}

    cb = LTECallback(modules, eta=1.0, lam=0.5, tau=0.5, stage1_steps=3, sep_eps=1e-4)
    cfg = TrainConfig(steps=6, lr=1e-2, kd_weight=1.0, lm_weight=0.0, checkpoint_every=0, log_every=3)
    final = train(ctx, cfg, [cb, Spy()])
    assert [seen[s][0] for s in range(6)] == ["soft"] * 3 + ["threshold"] * 3
    assert not torch.equal(seen[0][1], seen[2][1])  # stage 1 trains the routers...
    assert torch.equal(seen[2][1], seen[5][1])  # ...stage 2 keeps them frozen
    assert not torch.equal(seen[2][2], seen[5][2])  # ...while the model trains on
    assert final["phase"] == 2 and "l_sep" not in final  # the last window: stage 2, no penalty
    assert all(m.routing == "threshold" and m.tau == 0.5 and m.path == "gather" for m in modules)
    assert all(p.requires_grad for m in modules for p in m.router.parameters())


@pytest.mark.parametrize("to_model", [False, True])
def test_penalty_reaches_the_model_only_when_asked(tmp_path, to_model):
    ctx = _moeified(tmp_path, margin=0.05)
    modules = routed_modules(ctx.model)
    cb = LTECallback(modules, eta=1.0, lam=0.5, tau=0.5, stage1_steps=3, sep_eps=1e-4,
                     penalty_to_model=to_model)
    cb.start(None)
    cb.before_step(0)
    ctx.model(torch.randint(0, ctx.model.config.vocab_size, (2, 16)))
    pen, info = cb.penalty(0)
    cb.stop()
    ctx.model.zero_grad(set_to_none=True)
    pen.backward()
    assert info["l_sep"] > 0 and all(m.router.proj.weight.grad is not None for m in modules)
    embed = ctx.model.get_input_embeddings().weight.grad
    assert (embed is not None and embed.abs().sum() > 0) == to_model


def test_larger_eta_gives_higher_expert_sparsity(tmp_path):
    from sparsify_core.evaluation import evaluate
    from sparsify_plugins.moeify import ExpertSparsity

    sparsity = []
    for eta in (0.0, 5.0):
        ctx = _moeified(tmp_path / str(eta), margin=0.05)  # the paper's regime: scores start near tau
        params = LTE.Params.model_validate({"eta": eta, "lambda": 0.0, "stage1_steps": 15, "train": {
            "steps": 16, "lr": 3e-2, "kd_weight": 1.0, "lm_weight": 0.0, "checkpoint_every": 0}})
        LTE().apply(ctx, params)
        (value, *_) = evaluate(ctx, [ExpertSparsity()], ctx.split("eval"), batch_size=8)
        sparsity.append(value.value)
    assert sparsity[1] > sparsity[0] + 0.2
