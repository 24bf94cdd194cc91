"""TEAL: threshold math, greedy allocation, the method on tiny models, save/load and the fast modules."""
from __future__ import annotations

import pytest
import torch
from helpers import make_ctx, make_output, tiny_model, tiny_recipe, write
from torch import nn

from sparsify_core import load_output
from sparsify_core.errors import SparsifyError
from sparsify_plugins.activation import TEAL
from sparsify_plugins.activation.teal import (ThresholdedLinear, effective_sparsity, equal_flops_sparsity,
                                              greedy_allocation, level_threshold, set_input_threshold)
from sparsify_plugins.activation.threshold import quantile_threshold
from sparsify_plugins.layouts.fast import fast_modules
from sparsify_plugins.layouts.modules import InputSparseLinear

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only wait on each other

FAST = dict(step=0.5, error_samples=4, batch_size=4)  # a few greedy steps: tests stay under a second or two


@pytest.mark.parametrize("level", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("n", [1, 10, 1000])
def test_level_threshold_hits_the_level_on_the_distribution(level, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    v = torch.sort(x.abs()).values
    t = level_threshold(v, level)
    zero = (x.abs() < t).float().mean().item()
    assert zero == pytest.approx(round(level * n) / n)
    if 0 < level < 1:  # the same rule as CATS' quantile_threshold
        assert t == pytest.approx(quantile_threshold(x.abs(), level))


def test_level_threshold_with_ties_keeps_the_tied_values():
    v = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0])
    assert level_threshold(v, 0.4) == 0.5  # between the 2nd and 3rd value
    assert level_threshold(v, 0.6) == 1.0  # lands inside a tie: the tie stays (fewer zeros, never more)


def test_greedy_allocation_takes_the_cheapest_step_each_time():
    # error = 4a^2 + b^2, equal weights, step 0.1. By hand, the cheaper candidate at each step:
    # (0,0): a .04 | b .01 -> b;  (0,.1): a .05 | b .04 -> b;  (0,.2): a .08 | b .09 -> a;
    # (.1,.2): a .20 | b .13 -> b;  (.1,.3): a .25 | b .20 -> b;  (.1,.4): a .32 | b .29 -> b -> (.1,.5): 30%
    trace = greedy_allocation(lambda s: 4 * s["a"] ** 2 + s["b"] ** 2, {"a": 1.0, "b": 1.0}, 0.3, 0.1)
    assert [p for p, _, _ in trace] == ["b", "b", "a", "b", "b", "b"]
    assert trace[-1][1] == pytest.approx({"a": 0.1, "b": 0.5})
    assert trace[-1][2] == pytest.approx(4 * 0.01 + 0.25)


def test_greedy_allocation_steps_remove_equal_work_and_stop_at_one():
    # b is 3x a: a rises by 0.1 * 2 / 1 = 0.2 a step, b by 0.1 * 2 / 3; error only from b, so a goes first,
    # to 1 (capped), then b; the weighted mean reaches the target exactly at (1, 1/3)
    trace = greedy_allocation(lambda s: s["b"], {"a": 1.0, "b": 3.0}, 0.5, 0.1)
    assert [p for p, _, _ in trace] == ["a"] * 5 + ["b"] * 5
    final = trace[-1][1]
    assert final["a"] == 1.0 and final["b"] == pytest.approx(1 / 3)
    assert effective_sparsity(final, {"a": 1.0, "b": 3.0}) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        greedy_allocation(lambda s: 0.0, {"a": 1.0}, 1.0, 0.1)


def test_equal_flops_sparsity_smollm2_shapes():
    # SmolLM2-135M layer: d 576, d_ff 1536, 9 heads, 3 KV heads of 64
    d, dff, kv = 576, 1536, 192
    w = {"q_proj": d * d, "k_proj": d * kv, "v_proj": d * kv, "o_proj": d * d,
         "gate_proj": d * dff, "up_proj": d * dff, "down_proj": d * dff}
    # CATS at 80% skips 80% of up and down: 0.8 * 2 * 884736 of 3538944 multiply-adds = 40%
    assert equal_flops_sparsity(w, 0.8) == pytest.approx(0.4)


def test_thresholded_linear_is_the_same_linear_of_the_cut_input():
    lin = nn.Linear(6, 3)
    weight = lin.weight
    x = torch.tensor([[0.1, -0.5, 2.0, -3.0, 0.2, 0.0]])
    ref = lin(x * (x.abs() >= 0.3))
    set_input_threshold(lin, 0.3, "lin")
    assert isinstance(lin, ThresholdedLinear) and lin.weight is weight  # same parameters, same module
    torch.testing.assert_close(lin(x), ref)
    set_input_threshold(lin, 0.0, "lin")
    torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias)
    with pytest.raises(SparsifyError, match="seq: TEAL thresholds"):
        set_input_threshold(nn.Sequential(), 0.1, "seq")


def _dense_inputs(model, ids, paths) -> dict[str, torch.Tensor]:
    """|input| of each module in ``paths`` in a forward of the dense ``model``."""
    out, modules = {}, dict(model.named_modules())
    def hook(_module, args, p):
        out[p] = args[0].abs()  # returns None: a pre-hook's return value would replace the input

    handles = [modules[p].register_forward_pre_hook(lambda m, a, p=p: hook(m, a, p)) for p in paths]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("greedy", [True, False])
def test_teal_reaches_its_target_on_calibration_and_rebuilds(tmp_path, arch, greedy):
    model = tiny_model(arch).eval()
    ctx = make_ctx(tmp_path, model, samples=8)
    ids = ctx.split("eval").input_ids
    before = model(input_ids=ids).logits
    res = TEAL().apply(ctx, TEAL.Params(sparsity=0.3, greedy=greedy, **FAST))
    paths = res.info["modules"]
    assert len(paths) == len(set(paths)) == (14 if arch == "llama" else 8)  # every projection of every layer
    assert res.metrics["allocated_sparsity"] == pytest.approx(0.3, abs=0.08 if greedy else 1e-9)
    # Each module's threshold zeroes its level of its input on the calibration split, in the dense model
    # (TEAL calibrates every layer on the dense model's hidden states; nothing is subsampled at this size).
    inputs = _dense_inputs(tiny_model(arch).eval(), ctx.split("calibration").input_ids, paths)
    for p, level, t in zip(paths, res.state["levels"].tolist(), res.state["thresholds"].tolist()):
        assert (inputs[p] < t).float().mean().item() == pytest.approx(level, abs=0.01), p
    after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)
    fresh = tiny_model(arch).eval()
    TEAL().rebuild(make_ctx(tmp_path, fresh), TEAL.Params(sparsity=0.3), res)
    torch.testing.assert_close(fresh(input_ids=ids).logits, after)


def test_teal_layers_param_and_its_errors(tmp_path):
    model = tiny_model("llama").eval()
    res = TEAL().apply(make_ctx(tmp_path, model, samples=8), TEAL.Params(sparsity=0.3, layers=[1], **FAST))
    assert all(p.startswith("model.layers.1.") for p in res.info["modules"])
    assert not isinstance(model.model.layers[0].mlp.up_proj, ThresholdedLinear)
    with pytest.raises(SparsifyError, match="out of range"):
        TEAL().apply(make_ctx(tmp_path, tiny_model("llama")), TEAL.Params(sparsity=0.3, layers=[5]))


def test_teal_output_loads_back_with_input_sparse_linears(tmp_path):
    model, _ = make_output(tmp_path / "out", "llama", [("substitute_activation", "teal", dict(sparsity=0.4, **FAST))])
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        plain = load_output(tmp_path / "out", fast=False).model
        assert isinstance(plain.model.layers[0].self_attn.q_proj, ThresholdedLinear)
        torch.testing.assert_close(plain(input_ids=ids).logits, ref)
        fast = load_output(tmp_path / "out", fast=True)
        assert "input-sparse Linear in 14 modules" in fast.manifest["fast_modules"]
        q = fast.model.model.layers[0].self_attn.q_proj
        assert isinstance(q, InputSparseLinear) and q.input_threshold > 0
        torch.testing.assert_close(fast.model(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
        for t in range(3):  # decoding, one token at a time: the input-sparse GEMV
            one = ids[:, t:t + 1]
            torch.testing.assert_close(fast.model(input_ids=one).logits, model(input_ids=one).logits,
                                       atol=1e-5, rtol=1e-5)


def test_teal_output_decodes_on_the_native_lean_step_with_the_torch_steps_tokens(tmp_path, one_thread):
    """Every projection input-sparse: the native decode step covers it (no fallback) and decodes the tokens
    of the lean torch step (its InputSparseLinears) and of HF generate on the thresholded model."""
    from sparsify_core import lean
    from sparsify_core.generation import greedy_generate, timed_generate
    from sparsify_kernels import decode as K

    if not K.available():
        pytest.skip("native kernels unavailable")
    make_output(tmp_path / "out", "llama", [("substitute_activation", "teal", dict(sparsity=0.4, **FAST))])
    fast = load_output(tmp_path / "out", fast=True)
    step, why = lean.native_step(fast.model)
    assert why is None and step is not None
    ids = torch.tensor([[3, 14, 15, 92, 6]])
    native = timed_generate(fast.model, ids, 10, fast.tokenizer, path="lean", min_new_tokens=10)
    assert native.path.startswith("lean native")
    torch_step = timed_generate(fast.model, ids, 10, fast.tokenizer, path="lean-torch", min_new_tokens=10)
    assert torch_step.path.startswith("lean torch")
    assert torch.equal(native.ids, torch_step.ids)
    plain = load_output(tmp_path / "out", fast=False).model  # ThresholdedLinears, HF generate
    assert torch.equal(greedy_generate(plain, ids, 10, fast.tokenizer, min_new_tokens=10), native.ids)


@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_input_sparse_linear_equals_the_thresholded_linear(tokens, bias):
    lin = nn.Linear(24, 10, bias=bias)
    set_input_threshold(lin, 0.8, "lin")
    fast = InputSparseLinear.from_thresholded(lin)
    x = torch.randn(tokens, 24)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), lin(x), atol=1e-5, rtol=1e-5)


def test_fast_modules_leave_activation_sparse_ffns_to_teal_thresholds(tmp_path):
    """A ReLU FFN whose projections TEAL thresholds gets input-sparse Linears, never the FFN kernel (it
    would skip the thresholds)."""
    from sparsify_plugins.activation import ReLU
    from sparsify_plugins.layouts.convert import ActivationSparseFFNConvert
    model = tiny_model("llama").eval()
    ReLU()._substitute(model, ReLU.Params())
    TEAL().apply(make_ctx(tmp_path, model, samples=8), TEAL.Params(sparsity=0.4, layers=[0], **FAST))
    with pytest.raises(SparsifyError, match="threshold their inputs"):
        ActivationSparseFFNConvert()._convert(model, ActivationSparseFFNConvert.Params(layers=[0]))
    ids = torch.randint(0, 100, (1, 2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        done = fast_modules(model)
        assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
        assert type(model.model.layers[1].mlp).__name__ == "ActivationSparseFFN"
        assert any("input-sparse Linear in 7" in d for d in done)
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_teal_recipe_runs_on_the_tiny_model(workdir):
    from sparsify_core.recipe import load_recipe
    from sparsify_core.registry import Registry
    from sparsify_core.runner import Runner
    text = tiny_recipe("""\
  - kind: substitute_activation
    method: teal
    params: {sparsity: 0.3, step: 0.5, error_samples: 2, batch_size: 2}
""", name="teal", seq_len=16, splits={"calibration": {"samples": 4}, "eval": {"samples": 2}},
        evaluate={"metrics": ["perplexity"], "after": "all"})
    registry = Registry(f"sqlite:///{workdir}/registry.db")
    run_id = Runner(load_recipe(write(workdir / "teal.yaml", text)), registry, runs_dir=workdir / "runs").run()
    record = registry.get_run(run_id)
    assert record.status == "finished", record.reason
    values = {(m.stage_idx, m.name): m.value for m in record.metrics if m.layer is None and m.step is None}
    assert values[(0, "allocated_sparsity")] == pytest.approx(0.3, abs=0.08)
    assert values[(0, "perplexity")] > 0 and values[(0, "block_error")] > 0


def _stage(name, params):
    from sparsify_core.plugin_manager import catalog
    kind, method = name.split("/")
    cls = catalog().methods[(kind, method)]
    return cls(), cls.Params.model_validate(params)


@pytest.mark.parametrize("first,then,message", [
    ("substitute_activation/teal", "moeify/param_cluster", "moeify and teal do not combine"),
    ("moeify/param_cluster", "substitute_activation/teal", "moeify and teal do not combine"),
    ("substitute_activation/teal", "layout_convert/csr", "weight layouts and teal do not combine"),
    ("layout_convert/csr", "substitute_activation/teal", "run teal before layout conversions"),
])
def test_teal_refuses_what_would_skip_its_thresholds(tmp_path, first, then, message):
    """Every stage that would compute a thresholded projection from its weight alone refuses, either order."""
    params = {"substitute_activation/teal": dict(sparsity=0.3, **FAST),
              "moeify/param_cluster": {"expert_size": 16, "selection": "top_k", "top_k": 2, "fit": {"epochs": 1}},
              "layout_convert/csr": {}}
    model = tiny_model("llama").eval()
    ctx = make_ctx(tmp_path, model, samples=4)
    method, p = _stage(first, params[first])
    method.apply(ctx, p)
    method, p = _stage(then, params[then])
    with pytest.raises(SparsifyError, match=message):
        method.check(model, p)
        method.apply(ctx, p)
