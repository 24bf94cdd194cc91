"""SSD: the stability metric, switch rule and FLOP accounting alone; then dense -> sparse -> dense on a tiny model."""
from __future__ import annotations

import pytest
import torch
from helpers import make_ctx, tiny_model
from pydantic import ValidationError

from sparsify_core import StageResult
from sparsify_core.ffn import find_ffn_blocks
from sparsify_core.output import load_output, save_output
from sparsify_core.training import TrainCallback
from sparsify_plugins.moeify import RoutedFFN
from sparsify_plugins.moeify import Routing
from sparsify_plugins.train.ssd import SSD, SSDParams
from sparsify_plugins.train.ssd.flops import FFNShape, dense_training_flops, ffn_forward_flops, ffn_training_flops
from sparsify_plugins.train.ssd.method import neuron_dim
from sparsify_plugins.train.ssd.monitor import active_neurons, jaccard, pack_pattern, pattern_similarity, unpack_pattern
from sparsify_plugins.train.ssd.schedule import SwitchRule, phase_at, switch_reason


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


# -- stability metric -------------------------------------------------------------------


def test_active_neurons_top_fraction_by_magnitude_or_nonzero():
    x1 = torch.tensor([[0.0, -3.0, 1.0, 2.0], [0.5, 0.0, 0.0, -0.1]])
    assert active_neurons(x1, 0.5).tolist() == [[False, True, False, True], [True, False, False, True]]
    assert active_neurons(x1).tolist() == [[False, True, True, True], [True, False, False, True]]
    assert active_neurons(x1.reshape(1, 2, 4), 0.25).shape == (2, 4)  # tokens on the leading dimensions


def test_jaccard_and_pattern_similarity():
    a = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert jaccard(a, b).tolist() == pytest.approx([1 / 3, 1.0, 1.0])  # two empty sets are identical
    assert pattern_similarity([a, a], [a, a]) == 1.0
    assert pattern_similarity([a, b], [b, b]) == pytest.approx((7 / 9 + 1) / 2)
    assert pattern_similarity([a[:2]], [~a[:2]]) == 0.0
    with pytest.raises(ValueError):
        jaccard(a, b[:2])


def test_random_patterns_are_dissimilar_and_packing_round_trips():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 200, generator=gen), torch.randn(256, 200, generator=gen)
    sim = pattern_similarity([active_neurons(x, 0.1)], [active_neurons(y, 0.1)])
    assert sim == pytest.approx(0.1 / 1.9, abs=0.01)  # unrelated sets of 10%: f / (2 - f)
    pattern = [active_neurons(x[:5, :13], 0.3), active_neurons(y[:3, :7])]
    back = unpack_pattern(pack_pattern(pattern))
    assert all(torch.equal(p, q) for p, q in zip(pattern, back))


# -- switch rule ------------------------------------------------------------------------


def test_switch_rule_from_fractions():
    rule = SwitchRule.from_fractions(100, threshold=0.9, patience=2, min_dense=0.1, max_dense=0.5, final_dense=0.2)
    assert (rule.earliest, rule.latest, rule.final_start) == (10, 50, 80)


def test_switch_needs_patience_points_above_threshold_after_earliest():
    rule = SwitchRule(threshold=0.9, patience=2, earliest=20, latest=None, final_start=80)
    assert switch_reason(10, [0.95, 0.95], rule) is None  # stable, but too early
    assert switch_reason(20, [0.5, 0.95], rule) is None  # one point is not enough
    assert switch_reason(30, [0.5, 0.95, 0.9], rule) == "stable"
    assert switch_reason(40, [0.95, 0.95, 0.89], rule) is None  # the last one dropped
    assert switch_reason(80, [0.95, 0.95], rule) is None  # no sparse steps would be left


def test_switch_is_forced_at_latest_and_phases_follow_the_switch():
    rule = SwitchRule(threshold=0.9, patience=1, earliest=0, latest=50, final_start=80)
    assert switch_reason(40, [0.1], rule) is None
    assert switch_reason(50, [0.1], rule) == "forced"
    assert switch_reason(50, [0.95], rule) == "stable"
    assert [phase_at(s, None, 80) for s in (0, 79, 99)] == ["dense"] * 3
    assert [phase_at(s, 50, 80) for s in (49, 50, 79, 80, 99)] == ["dense", "sparse", "sparse", "final_dense",
                                                                     "final_dense"]


def test_params_reject_phases_that_leave_no_sparse_training():
    base = {"train": {"steps": 10}}
    with pytest.raises(ValidationError, match="no steps"):
        SSDParams(**base, min_dense=0.5, final_dense=0.5)
    with pytest.raises(ValidationError, match="below min_dense"):
        SSDParams(**base, min_dense=0.4, max_dense=0.3)
    with pytest.raises(ValidationError, match="coactivation"):
        SSDParams(**base, experts={"expert_fraction": 0.5, "active_fraction": 0.1})
    SSDParams(**base, clustering="coactivation", experts={"expert_fraction": 0.5, "active_fraction": 0.1})


# -- FLOP accounting -------------------------------------------------------------------


def test_flop_accounting():
    gated, plain = FFNShape(d_model=4, d_ff=8, matrices=3), FFNShape(d_model=4, d_ff=8, matrices=2)
    assert ffn_forward_flops(gated, 8) == 2 * 4 * 8 * 3
    assert ffn_training_flops(gated, 8) == 3 * 192  # backward = 2x forward
    assert ffn_training_flops(plain, 8, routed_tokens=2, router_flops=10.0) == 3 * 128 + 20
    assert dense_training_flops([gated, plain], tokens=5) == 5 * (3 * 192 + 3 * 128)
    # half the neurons of every token: half the FFN work
    assert ffn_training_flops(gated, 4 * 5) == dense_training_flops([gated], 5) / 2


def test_neuron_dimension_of_each_parameter():
    assert [neuron_dim(r, "weight", False) for r in ("gate", "up", "down")] == [0, 0, 1]
    assert [neuron_dim(r, "weight", True) for r in ("up", "down")] == [1, 0]  # Conv1D stores [in, out]
    assert [neuron_dim(r, "bias", False) for r in ("up", "down")] == [0, None]


# -- training on a tiny model ----------------------------------------------------------------

STEPS = 12


def _params(**kw) -> SSDParams:
    return SSDParams(**{
        "monitor": {"every": 2, "threshold": 0.01, "patience": 1, "samples": 4},
        "min_dense": 0.25, "max_dense": None, "final_dense": 0.25,  # switch at step 4, dense again from step 9
        "experts": {"expert_size": 8, "router": "mlp", "top_k": 2, "fit": {"epochs": 2}},
        "train": {"steps": STEPS, "batch_size": 1, "lr": 1e-2, "checkpoint_every": 0, "log_every": 1}, **kw})


class _UpdateCheck(TrainCallback):
    """Independently of SSD: during routed steps, experts no token selected must not change at all."""

    def __init__(self, ctx):
        self.ctx, self.hooked, self.sparse_steps = ctx, set(), []
        self.idle_checked = self.used_changed = 0
        self.before = None

    def _record(self, module, x, scores, selected):
        if torch.is_grad_enabled() and id(module) in self.used:
            self.used[id(module)] |= selected.reshape(-1, selected.shape[-1]).any(0)

    def before_step(self, step):
        self.before, self.used = None, {}
        routed = [b.module for b in find_ffn_blocks(self.ctx.model) if isinstance(b.module, RoutedFFN)]
        if not routed or routed[0].routing == "dense":
            return
        for m in routed:
            if id(m) not in self.hooked:
                m.register_selection_hook(self._record)
                self.hooked.add(id(m))
            self.used[id(m)] = torch.zeros(m.num_experts, dtype=torch.bool)
        self.before = [(m, {r: m.part(r).weight.detach().clone() for r in ("gate", "up", "down")}) for m in routed]

    def after_step(self, step):
        if self.before is None:
            return {}
        self.sparse_steps.append(step)
        for m, old in self.before:
            for e in range(m.num_experts):
                s = m.expert_slice(e)
                changed = any(not torch.equal(m.part(r).weight[s] if r != "down" else m.part(r).weight[:, s],
                                              old[r][s] if r != "down" else old[r][:, s])
                              for r in ("gate", "up", "down"))
                if self.used[id(m)][e]:
                    self.used_changed += int(changed)
                else:
                    assert not changed, f"step {step}: expert {e}, selected by no token, was updated"
                    self.idle_checked += 1
        return {}


def _also(monkeypatch, *extra: TrainCallback) -> None:
    """SSD's training loop runs ``extra`` after its own callbacks (test probes)."""
    import sparsify_plugins.train.ssd.method as ssd_method
    from sparsify_core.training import train

    monkeypatch.setattr(ssd_method, "train", lambda ctx, cfg, callbacks=None: train(ctx, cfg, [*(callbacks or []),
                                                                                           *extra]))


def test_ssd_goes_dense_sparse_dense_records_switches_and_flops_and_loads_back(tmp_path, monkeypatch):
    model = tiny_model()
    ctx = make_ctx(tmp_path, model)
    logged = []
    ctx.log_callback = lambda stage, step, values: logged.append((step, values))
    check = _UpdateCheck(ctx)
    _also(monkeypatch, check)
    params = _params()
    result = SSD().apply(ctx, params)
    m = result.metrics

    assert (m["switch_to_sparse_step"], m["switch_to_dense_step"], m["sparse_steps"]) == (4, 9, 5)
    assert check.sparse_steps == [4, 5, 6, 7, 8]
    assert check.idle_checked > 0 and check.used_changed > 0
    curve = [(s, v["pattern_similarity"]) for s, v in logged if "pattern_similarity" in v]
    assert [s for s, _ in curve] == [2, 4] and all(0 < v <= 1 for _, v in curve)
    assert [(s, v["ssd_switch"]) for s, v in logged if "ssd_switch" in v] == [(4, 1.0), (9, 2.0)]
    assert result.info["monitor_curve"] == [list(c) for c in curve]

    # top_k 2 of 8 experts: 5 of 12 steps compute a quarter of the neurons, plus the mlp router's forward
    shapes = [FFNShape(32, 64, 3)] * 2
    assert m["ffn_train_flops_dense"] == pytest.approx(STEPS * dense_training_flops(shapes, 16))
    router = 2.0 * (32 * 8 + 8 * 8)
    assert m["ffn_train_flops_saved"] == pytest.approx(5 / STEPS * (0.75 - router / (3 * 2 * 32 * 64 * 3)))
    assert m["ffn_overhead_flops"] > 0
    assert m["ffn_train_flops_saved_with_overhead"] < m["ffn_train_flops_saved"]

    routed = [b.module for b in find_ffn_blocks(model)]
    assert all(isinstance(r, RoutedFFN) and r.routing == "dense" for r in routed)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    stage = {"index": 0, "name": "ssd", "kind": "train", "method": "ssd",
             "params": params.model_dump(mode="json"), "rebuild": True}
    save_output(tmp_path / "out", model, None, ctx.masks, {"task": "causal_lm", "stages": [stage]}, "", {0: result})
    out = load_output(tmp_path / "out")
    model.eval()
    with torch.no_grad():
        dense = model(ids).logits
        torch.testing.assert_close(out.model(ids).logits, dense)
        route = Routing.Params(routing="top_k", expert_fraction=0.25)  # the same model as an MoE
        for c in (ctx, make_ctx(tmp_path, out.model)):
            Routing().apply(c, route)
        moe = model(ids).logits
        torch.testing.assert_close(out.model(ids).logits, moe)
        assert not torch.allclose(moe, dense)


class _Stop(Exception):
    pass


class _Crash(TrainCallback):
    def __init__(self, at: int):
        self.at = at

    def after_step(self, step):
        if step == self.at:
            raise _Stop()
        return {}


# checkpoint at step 3 (dense, monitor pattern pending) or 5 (sparse), crash before the next one
@pytest.mark.parametrize("checkpoint_every,crash", [(3, 4), (5, 7)])
def test_ssd_resumes_mid_stage_like_an_uninterrupted_run(tmp_path, monkeypatch, checkpoint_every, crash):
    params = _params(train={"steps": STEPS, "batch_size": 1, "lr": 1e-2, "checkpoint_every": checkpoint_every})
    full = tiny_model()
    expected = SSD().apply(make_ctx(tmp_path / "a", full), params)

    ctx = make_ctx(tmp_path / "b", tiny_model())
    with monkeypatch.context() as patch:
        _also(patch, _Crash(crash))
        with pytest.raises(_Stop):
            SSD().apply(ctx, params)
    resumed = tiny_model()  # a fresh process loads the dense model anew
    ctx = make_ctx(tmp_path / "b", resumed)
    ctx.resume_stage = ctx.stage_index
    got = SSD().apply(ctx, params)
    assert [s for s, _ in got.info["monitor_curve"]] == [2, 4]
    assert [v for _, v in got.info["monitor_curve"]] == pytest.approx([v for _, v in expected.info["monitor_curve"]])
    for k in ("switch_to_sparse_step", "ffn_train_flops", "ffn_overhead_flops"):
        assert got.metrics[k] == pytest.approx(expected.metrics[k]), k
    assert all(isinstance(b.module, RoutedFFN) for b in find_ffn_blocks(resumed))
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, msg=n)


def test_no_switch_without_stability_or_a_forced_one(tmp_path):
    model = tiny_model()
    params = _params(monitor={"every": 2, "threshold": 1.0, "patience": 1, "samples": 4})
    result = SSD().apply(make_ctx(tmp_path, model), params)
    assert result.metrics["sparse_steps"] == 0 and result.metrics["ffn_train_flops_saved"] == 0
    assert result.info["blocks"] == {} and result.metrics["monitor_points"] == 5
    assert not any(isinstance(b.module, RoutedFFN) for b in find_ffn_blocks(model))
    SSD().rebuild(make_ctx(tmp_path, tiny_model()), params, StageResult(info=result.info))  # nothing to rebuild


def test_ssd_recipe_and_its_dense_baseline_train_the_same_model_on_the_same_data():
    from helpers import RECIPES

    from sparsify_core.recipe import load_recipe

    ssd, dense = load_recipe(RECIPES / "ssd.yaml"), load_recipe(RECIPES / "ssd-dense.yaml")
    assert ssd.recipe.model == dense.recipe.model and ssd.recipe.model.source == "tiny"
    assert ssd.recipe.data == dense.recipe.data and ssd.recipe.data.source == "pydoc"
    assert ssd.stages[0].params.train == dense.stages[0].params.train
    assert [(s.kind, s.method) for s in ssd.recipe.stages] == [("train", "ssd"), ("moeify", "routing")]
    assert [(s.kind, s.method) for s in dense.recipe.stages] == [("train", "finetune")]


def test_routers_are_refitted_every_n_sparse_steps(tmp_path):
    plain = SSD().apply(make_ctx(tmp_path / "a", tiny_model()), _params())
    ctx = make_ctx(tmp_path / "b", tiny_model())
    logged = []
    ctx.log_callback = lambda stage, step, values: logged.append((step, values))
    refit = SSD().apply(ctx, _params(refit_every=2))
    assert [s for s, v in logged if "refit_router_recall" in v] == [6, 8]  # sparse steps 4-8
    assert refit.metrics["ffn_overhead_flops"] > plain.metrics["ffn_overhead_flops"]
    assert refit.metrics["ffn_train_flops_saved"] == pytest.approx(plain.metrics["ffn_train_flops_saved"])
