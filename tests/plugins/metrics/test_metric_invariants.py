"""What a metric reports is what the model computes, on every module type sparsify creates.

An exact conversion (a weight layout, the activation-sparse FFN, the MoE
layout) changes how weights are stored and computed, never the function or
the weights themselves: every metric must read the same before and after.
And a metric that fails costs the run nothing but that metric.
"""
from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from rich.console import Console

from helpers import tiny_recipe, write
from sparsify_core import Metric, RunContext, TokenSplit, hookimpl
from sparsify_core.evaluation import evaluate
from sparsify_core.ffn import find_ffn_blocks, prunable_modules
from sparsify_core.plugin_manager import catalog, register, unregister
from sparsify_core.registry import Registry
from sparsify_core.report import format_compare, show_run

# Counts and weight fractions are exact; values measured through a forward pass may differ by float rounding.
EXACT = ("weight_sparsity", "parameters", "nonzero_parameters")
ROUTED_ONLY = ("expert_sparsity", "router_recall")
# Bytes read per token count the storage itself: a conversion changes them by design (tests/plugins/metrics/test_cost.py).
STORAGE = ("bytes_per_token", "bytes_per_token_dense")  # a predictor adds its own weights
# Names recorded besides each metric's own.
EXTRA = {"ffn_flops_per_token_dense", "bytes_per_token_dense", "flops_per_token"}


# -- in-process helpers ------------------------------------------------------------------------

def _tiny(arch: str):
    """The tiny model of ``arch`` (its FFN activation replaced by ReLU: activations with exact zeros)."""
    from sparsify_plugins.activation import ReLU
    from sparsify_plugins.sources.models import Tiny
    torch.manual_seed(0)
    p = Tiny.Params(arch=arch, hidden_size=32, intermediate_size=64, layers=2, heads=4)
    loaded = Tiny().load(p, device=torch.device("cpu"), dtype=torch.float32)
    model = loaded.model.eval()
    ReLU()._substitute(model, ReLU.Params())
    return model, loaded.task


def _ctx(tmp_path, model, task) -> RunContext:
    """A run context over random tokens; its reference is the model as it is now (the dense model)."""
    gen = torch.Generator().manual_seed(0)
    data = {n: TokenSplit(n, torch.randint(0, 200, (4, 16), generator=gen)) for n in ("calibration", "eval")}
    dense = copy.deepcopy(model)
    return RunContext(run_id="t", model=model, tokenizer=None, task=task, data=data, device=torch.device("cpu"),
                      dtype=torch.float32, seed=0, workdir=tmp_path, reference_loader=lambda: dense)


def _apply(ctx, method, **params) -> None:
    """Run one stage method as the runner does: apply, then re-apply the masks."""
    method.apply(ctx, method.Params(**params))
    ctx.masks.apply(ctx.model)


def _method(name: str):
    kind, _, method = name.partition("/")
    return catalog().methods[(kind, method)]()


def _measure(ctx) -> dict[tuple[str, str | None], float]:
    """Every applying metric of the catalog, by (name, layer); none may fail."""
    values = evaluate(ctx, [cls() for cls in catalog().metrics.values()], ctx.split("eval"), batch_size=2)
    failed = [f"{v.name}: {v.error}" for v in values if v.error is not None]
    assert not failed, failed
    # every name a metric records values under is one it declares (what show/compare format it by)
    declared = {name for cls in catalog().metrics.values() for name in cls.value_info()}
    assert {v.name for v in values} <= declared, sorted({v.name for v in values} - declared)
    return {(v.name, v.layer): v.value for v in values}


def _assert_same(before: dict, after: dict, keys=None) -> None:
    keys = set(before) if keys is None else set(keys)
    assert keys <= set(after), sorted(keys - set(after))
    for key in sorted(keys, key=str):
        if key[0] in STORAGE:
            continue
        if key[0] in EXACT:
            assert after[key] == before[key], key
        else:
            assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-6), key


def _names(values: dict) -> set[str]:
    return {name for name, layer in values if layer is None}


def _expected_names(task: str, routed: bool) -> set[str]:
    """The catalog's metrics that apply to a model of ``task``, with or without routed FFNs."""
    # lm_eval needs a tokenizer, which these contexts do not have (tests/plugins/metrics/test_lm_eval.py)
    names = {n for n, cls in catalog().metrics.items() if task in cls.tasks and n != "lm_eval"}
    return names if routed else names - set(ROUTED_ONLY)


# -- every exact conversion, every metric ----------------------------------------------------------

WEIGHT_LAYOUTS = [("csr", {}), ("bsr", {"block": (8, 8)}), ("nm", {"n": 2, "m": 4}), ("nmg", {"n": 2, "m": 4, "g": 2})]


@pytest.mark.parametrize("arch,layout,params", [
    *[(arch, layout, params) for arch in ("llama", "gpt2") for layout, params in WEIGHT_LAYOUTS],
    ("opt", "csr", {}), ("opt", "nm", {"n": 2, "m": 4}), ("bert", "csr", {}), ("bert", "nm", {"n": 2, "m": 4}),
])
def test_weight_layouts_change_no_metric(tmp_path, one_thread, arch, layout, params):
    """Masked dense Linear/Conv1D -> SparseLinear in each layout: every metric, every layer, the same."""
    model, task = _tiny(arch)
    ctx = _ctx(tmp_path, model, task)
    _apply(ctx, _method("prune/nmg"), n=2, m=4, g=2)  # fits every layout exactly
    before = _measure(ctx)
    _apply(ctx, _method(f"layout_convert/{layout}"), **params)
    assert {type(m).__name__ for _, m in prunable_modules(model, stored=True)} == {"SparseLinear"}
    assert not prunable_modules(model)  # nothing left to prune or convert
    after = _measure(ctx)
    _assert_same(before, after)
    assert set(after) == set(before) and _names(after) == _expected_names(task, routed=False) | EXTRA
    assert after[("weight_sparsity", None)] == pytest.approx(0.5)  # the zeros moved into the layout


@pytest.mark.parametrize("arch,predictor", [("llama", False), ("llama", True), ("gpt2", False), ("opt", False)])
def test_activation_sparse_ffn_changes_no_metric(tmp_path, one_thread, arch, predictor):
    """ActivationSparseFFN (gated, with or without a predictor) and TransposedLinear down projections (plain)."""
    model, task = _tiny(arch)
    ctx = _ctx(tmp_path, model, task)
    _apply(ctx, _method("prune/nmg"), n=2, m=4, g=2)
    before = _measure(ctx)
    assert 0 < before[("activation_sparsity", None)] < 1
    # A threshold far below every logit predicts every neuron: the predicted block is then exact too.
    extra = {"predictor": {"rank": 4, "threshold": -1e9, "max_tokens": 64}} if predictor else {}
    _apply(ctx, _method("layout_convert/activation_sparse_ffn"), **extra)
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("ActivationSparseFFN" in kinds) == (arch == "llama") and "TransposedLinear" in kinds
    assert all((b.module.predictor is not None) == predictor for b in find_ffn_blocks(model) if arch == "llama")
    after = _measure(ctx)
    _assert_same(before, after)
    assert set(after) == set(before) and _names(after) == _expected_names(task, routed=False) | EXTRA


def _split_into_experts(model, routing: str) -> int:
    """Every FFN of ``model`` as a RoutedFFN of random experts (8 neurons); returns the routers' parameter count."""
    from sparsify_plugins.layouts.convert import _set_module
    from sparsify_plugins.moeify.modules import LTERouter, RoutedFFN
    gen = torch.Generator().manual_seed(0)
    added = 0
    for b in find_ffn_blocks(model):
        experts = b.d_ff // 8
        router = LTERouter(b.d_model, experts)
        router.proj.weight.data.mul_(8)  # confident scores: top_k and threshold select different experts
        routed = RoutedFFN.from_block(b, torch.randperm(b.d_ff, generator=gen) % experts, router, 8)
        routed.set_routing(routing, top_k=3, tau=0.5)
        _set_module(model, b.name, routed.eval())
        added += sum(p.numel() for p in router.parameters())
    return added


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_routed_ffn_and_moe_ffn_change_no_metric(tmp_path, one_thread, arch):
    """Dense -> RoutedFFN (dense routing: the same function) -> top_k -> MoEFFN (exact) on gated and plain FFNs."""
    model, task = _tiny(arch)
    ctx = _ctx(tmp_path, model, task)
    _apply(ctx, _method("prune/nmg"), n=2, m=4, g=2)
    dense = _measure(ctx)
    ctx.masks.load_state_dict({})  # the split permutes neurons; the weights keep their zeros (moeify's job)
    routers = _split_into_experts(model, "dense")
    routed = _measure(ctx)
    assert _names(routed) == _expected_names(task, routed=True) | EXTRA
    # Routing every expert computes what the dense FFN did; only the routers are new parameters and weights.
    grown = {("parameters", None), ("nonzero_parameters", None), ("weight_sparsity", None),
             ("flops_per_token", None)}
    _assert_same(dense, routed, [k for k in dense if k not in grown])
    assert routed[("parameters", None)] == dense[("parameters", None)] + routers
    assert routed[("nonzero_parameters", None)] == dense[("nonzero_parameters", None)] + routers  # no zeros
    assert routed[("expert_sparsity", None)] == 0 and routed[("router_recall", None)] == pytest.approx(1.0)

    for b in find_ffn_blocks(model):
        b.module.set_routing("top_k", top_k=3)
    before = _measure(ctx)
    assert before[("expert_sparsity", None)] == pytest.approx(5 / 8)
    assert before[("ffn_flops_per_token", None)] < routed[("ffn_flops_per_token", None)]
    _apply(ctx, _method("layout_convert/moe_ffn"))
    assert {type(b.module).__name__ for b in find_ffn_blocks(model)} == {"MoEFFN"}
    after = _measure(ctx)
    _assert_same(before, after)
    assert set(after) == set(before)


# -- the field cases ------------------------------------------------------------------------

def _points(registry_path, run_id) -> dict[str, dict[str, float]]:
    with Registry(f"sqlite:///{registry_path}") as reg:
        run = reg.get_run(run_id)
    points: dict[str, dict[str, float]] = {}
    for m in run.metrics:
        if m.layer is None and m.step is None:
            points.setdefault(m.stage, {})[m.name] = m.value
    return points


def _run(workdir, text: str) -> str:
    from sparsify_core.recipe import load_recipe
    from sparsify_core.runner import Runner
    path = write(workdir / "recipe.yaml", text)
    with Registry(f"sqlite:///{workdir}/registry.db") as reg:
        return Runner(load_recipe(path), reg, runs_dir=workdir / "runs").run()


def test_csr_on_pruned_ffns_changes_no_metric(workdir, one_thread):
    """Field case 05b: 70% magnitude on the FFNs, then CSR on the FFNs: every metric as after magnitude."""
    text = tiny_recipe("""\
  - kind: prune
    method: magnitude
    params: {sparsity: 0.7, targets: ['mlp\\.']}
  - kind: layout_convert
    method: csr
    params: {targets: ['mlp\\.']}
""", model={"hidden_size": 64, "intermediate_size": 128}, splits={"calibration": {"samples": 4},
                                                                  "eval": {"samples": 4}},
        evaluate={"metrics": ["weight_sparsity", "parameters", "nonzero_parameters", "ffn_flops_per_token",
                              "perplexity"], "after": "all"}, output={"save": False})
    points = _points(workdir / "registry.db", _run(workdir, text))
    dense, pruned, csr = points["dense"], points["magnitude"], points["csr"]
    for name in ("weight_sparsity", "parameters", "nonzero_parameters", "ffn_flops_per_token",
                 "ffn_flops_per_token_dense", "perplexity"):
        assert csr[name] == pytest.approx(pruned[name], rel=1e-6), name
    # 70% of the FFN weights (3 x 64 x 128 a layer) among all projections (plus 4 x 64 x 64 of attention)
    ffn, attention = 3 * 64 * 128, 4 * 64 * 64
    assert csr["weight_sparsity"] == pytest.approx(0.7 * ffn / (ffn + attention), abs=1e-4)
    assert csr["parameters"] == dense["parameters"]
    assert csr["nonzero_parameters"] == dense["nonzero_parameters"] - 6 * round(0.7 * 128 * 64)  # per matrix
    assert csr["ffn_flops_per_token"] < 0.5 * dense["ffn_flops_per_token"]


@pytest.mark.parametrize("arch", ["gpt2", "opt", "bert"])
def test_nm_layout_run_finishes_saves_and_measures_the_same(workdir, one_thread, arch):
    """Field case 05a: SparseGPT 2:4 then nm on every projection; the run saves and measures as before nm."""
    text = tiny_recipe("""\
  - kind: prune
    method: sparsegpt
    params: {pattern: '2:4'}
  - kind: layout_convert
    method: nm
    params: {n: 2, m: 4}
""", model={"arch": arch}, splits={"calibration": {"samples": 8}, "eval": {"samples": 4}},
        evaluate={"metrics": ["weight_sparsity", "perplexity"], "after": "all"}, output={"dir": "out-nm"})
    run_id = _run(workdir, text)
    points = _points(workdir / "registry.db", run_id)
    assert points["nm"]["weight_sparsity"] == pytest.approx(0.5) == points["sparsegpt"]["weight_sparsity"]
    if arch != "bert":  # an encoder has no perplexity
        assert points["nm"]["perplexity"] == pytest.approx(points["sparsegpt"]["perplexity"], rel=1e-5)
    with Registry(f"sqlite:///{workdir}/registry.db") as reg:
        run = reg.get_run(run_id)
    assert run.status == "finished" and [a.kind for a in run.artifacts] == ["output"]
    assert any((workdir / "out-nm").glob("*.safetensors"))


# -- a failing metric ------------------------------------------------------------------------

class _BreaksTheForward(Metric):
    """A metric whose hook raises inside the model's forward: the shared pass fails, the others must not."""

    name = "breaks_forward"
    uses_forward = True

    def start(self, ctx):
        def hook(module, args):
            raise ValueError("hook failed\nwith a second line")
        self._handle = ctx.model.get_submodule("model.layers.0.mlp.down_proj").register_forward_pre_hook(hook)

    def finish(self, ctx):
        return []

    def close(self):
        self._handle.remove()


def test_a_metric_breaking_the_shared_forward_fails_alone(tmp_path, one_thread):
    from sparsify_plugins.metrics import ActivationSparsity, Perplexity
    model, task = _tiny("llama")
    ctx = _ctx(tmp_path, model, task)
    metrics = [Perplexity(), _BreaksTheForward(), ActivationSparsity()]
    values = evaluate(ctx, metrics, ctx.split("eval"), batch_size=2)
    failed = {v.name: v.error for v in values if v.error is not None}
    assert failed == {"breaks_forward": "ValueError: hook failed"}
    alone = {v.name: v.value for v in evaluate(ctx, [Perplexity(), ActivationSparsity()], ctx.split("eval"),
                                                 batch_size=2) if v.layer is None}
    got = {v.name: v.value for v in values if v.layer is None and v.error is None}
    assert got == pytest.approx(alone)
    assert all(not m._forward_pre_hooks for m in model.modules())


class _Broken(Metric):
    """Raises in every eval batch; its message has a second line, which the record must leave out."""

    name = "broken"
    uses_forward = True

    def update(self, batch, logits, reference_logits):
        raise RuntimeError("deliberately broken\nsecond line")

    def finish(self, ctx):
        return []


class _BrokenPlugin:
    @hookimpl
    def sparsify_metrics(self):
        return [_Broken]


@pytest.fixture
def broken_metric():
    """The ``broken`` metric, registered as a plugin for this test only."""
    plugin = _BrokenPlugin()
    register(plugin, name="test-broken-metric")
    yield
    unregister(plugin)


def test_a_failing_metric_costs_the_run_nothing(workdir, one_thread, broken_metric, capfd):
    """A metric that raises after the last stage: one warning line, recorded as failed, the output saved."""
    text = tiny_recipe("""\
  - kind: prune
    method: magnitude
    params: {sparsity: 0.5}
""", splits={"eval": {"samples": 2}}, evaluate={"metrics": ["weight_sparsity", "broken"], "after": "last"},
        output={"dir": "out"})
    run_id = _run(workdir, text)
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "broken" in line and "warning" in line]
    assert len(warnings) == 2, err  # once after the dense baseline, once after the stage
    assert "RuntimeError: deliberately broken" in warnings[-1] and "second line" not in err
    with Registry(f"sqlite:///{workdir}/registry.db") as reg:
        run = reg.get_run(run_id)
    assert run.status == "finished" and any(a.kind == "output" for a in run.artifacts)
    assert any((workdir / "out").iterdir())
    final = {m.name: m for m in run.metrics if m.stage_idx == 0 and m.layer is None and m.step is None}
    assert math.isnan(final["broken"].value) and final["broken"].error == "RuntimeError: deliberately broken"
    assert final["weight_sparsity"].error is None and final["weight_sparsity"].value == pytest.approx(0.5)
    console = Console(file=io.StringIO(), width=200)
    show_run(run, console)
    shown = console.file.getvalue()
    assert "failed metrics" in shown and "RuntimeError: deliberately broken" in shown
    (dense, final_row) = json.loads(format_compare([run], "json"))
    assert dense["broken"] is None and final_row["failed"] == "broken: RuntimeError: deliberately broken"
    assert final_row["weight_sparsity"] == pytest.approx(0.5)
    table = format_compare([run], "table").splitlines()
    header = next(line for line in table if "broken" in line)
    rows = [line for line in table if run_id in line or line.strip().startswith("magnitude")]
    column = header.index("broken")
    assert len(rows) == 2 and all("failed" in line[column - 2:column + 10] for line in rows), table


def test_an_interruption_is_not_a_metric_failure(tmp_path, one_thread):
    """Ctrl-C or SIGTERM while measuring stops the run; it is never recorded as a failed metric."""
    from sparsify_core.errors import RunInterrupted
    from sparsify_plugins.metrics import ActivationSparsity

    class Interrupted(_Broken):
        def update(self, batch, logits, reference_logits):
            raise RunInterrupted("stopped by SIGTERM")

    model, task = _tiny("llama")
    ctx = _ctx(tmp_path, model, task)
    with pytest.raises(RunInterrupted):
        evaluate(ctx, [ActivationSparsity(), Interrupted()], ctx.split("eval"), batch_size=2)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_an_existing_registry_learns_failed_metrics(tmp_path):
    """A v4 database (no metrics.error) migrates: old metrics read back without an error, failed ones with it."""
    from sqlalchemy import text as sql

    from sparsify_core import MetricValue
    from sparsify_core.registry import SCHEMA_VERSION, make_engine, migrate, schema_version
    url = f"sqlite:///{tmp_path}/old.db"
    engine = make_engine(url)
    assert migrate(engine, target=4) == 4
    with engine.begin() as conn:
        conn.execute(sql("INSERT INTO runs (id, recipe_name, status, started_at, pid, host, overrides, versions) "
                         "VALUES ('20250101-0000-aaaaaa', 'old', 'finished', '2025-01-01T00:00:00+00:00', 1, 'h', "
                         "'[]', '{}')"))
        conn.execute(sql("INSERT INTO metrics (run_id, stage, stage_idx, name, value, created_at) VALUES "
                         "('20250101-0000-aaaaaa', 'dense', -1, 'perplexity', 12.5, '2025-01-01T00:00:00+00:00')"))
    engine.dispose()
    with Registry(url) as reg:
        with reg.engine.connect() as conn:
            assert schema_version(conn) == SCHEMA_VERSION
        reg.log_metrics("20250101-0000-aaaaaa", "s", 0, [MetricValue("perplexity", math.nan, error="E: why")])
        old, new = reg.get_run("20250101").metrics
    assert (old.value, old.error) == (12.5, None)
    assert math.isnan(new.value) and new.error == "E: why"
