"""prune/width: Minitron's importance math, exact shrinking (GQA included), plain-transformers loading, the recipe."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import make_ctx, tiny_recipe, write

from sparsify_core.errors import RecipeError
from sparsify_core.output import save_output
from sparsify_core.plugin_manager import catalog
from sparsify_core.recipe import check_model, load_recipe
from sparsify_plugins.prune.width import (Importance, Width, WidthParams, head_counts, head_output_norms, head_rows,
                                          select_heads, token_means, top_units)
from sparsify_plugins.sources.models import Tiny


# -- the math, by hand ---------------------------------------------------------------------------------

def test_token_means_and_the_batch_aggregations_by_hand():
    # 2 sequences x 2 tokens x 3 neurons; |x| is averaged over tokens per sequence
    x = torch.tensor([[[1., -2., 0.], [3., 2., 0.]],
                      [[-1., 0., 4.], [1., 0., 0.]]])
    m = token_means(x.abs(), 2)
    assert torch.equal(m, torch.tensor([[2., 2., 0.], [1., 0., 2.]]))
    assert torch.equal(token_means(x.abs().reshape(4, 3), 2), m)  # OPT's flattened [batch*seq, d]
    imp = Importance()
    imp.add(m[:1])
    imp.add(m[1:])  # two batches make the same as one
    assert torch.allclose(imp.value("l2"), torch.tensor([math.sqrt(5), 2., 2.], dtype=torch.float64))
    assert torch.allclose(imp.value("mean"), torch.tensor([1.5, 1., 1.], dtype=torch.float64))
    with pytest.raises(ValueError):
        Importance().value("l2")


def test_head_output_norms_by_hand():
    o = torch.tensor([[3., 4., 1., 0., 0., 2.]])  # 3 heads of head_dim 2
    assert torch.allclose(head_output_norms(o, 2), torch.tensor([[5., 1., 2.]]))
    with pytest.raises(ValueError):
        head_output_norms(o, 4)


def test_selection_of_units_and_heads():
    assert top_units(torch.tensor([0.1, 3., 2., 3.]), 2).tolist() == [1, 3]
    assert top_units(torch.tensor([1., 1., 1.]), 2).tolist() == [0, 1]  # ties: lower index
    assert head_counts(9, 3, "kv_group") == [3, 6, 9] and head_counts(9, 3, "query") == [3, 6, 9]
    assert head_counts(4, 4, "kv_group") == [1, 2, 3, 4] and head_counts(4, 4, "query") == [4]
    assert head_counts(8, 2, "query") == [2, 4, 6, 8] and head_counts(8, 2, "kv_group") == [4, 8]
    scores = torch.tensor([5., 0., 1., 2., 2., 2.])  # 6 heads, 2 KV groups of 3: sums 6 and 6 -> group 0 (tie)
    q, kv = select_heads(scores, 3, 2, "kv_group")
    assert q.tolist() == [0, 1, 2] and kv.tolist() == [0]
    q, kv = select_heads(scores, 4, 2, "query")  # 2 of each group
    assert q.tolist() == [0, 2, 3, 4] and kv.tolist() == [0, 1]
    with pytest.raises(ValueError):
        select_heads(scores, 4, 2, "kv_group")
    assert head_rows(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


# -- the defining property: the kept units compute exactly what they did --------------------------------

def _tiny(arch="llama", heads=4, kv_heads=None, hidden=32, ffn=48):
    p = Tiny.Params(arch=arch, hidden_size=hidden, intermediate_size=ffn, layers=2, heads=heads, kv_heads=kv_heads)
    return Tiny().load(p, device=torch.device("cpu"), dtype=torch.float32)


def _zeroed(model, state):
    """The original model with the removed neurons and heads zeroed: their down / o_proj input columns."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, keep in state.items():
            axis, path = key.split(".", 1)
            if axis != "cols":  # the inputs of down_proj / o_proj / fc2 / c_proj: what a removed unit feeds
                continue
            m = modules[path]
            w = m.weight.t() if type(m).__name__ == "Conv1D" else m.weight
            gone = torch.ones(w.shape[1], dtype=torch.bool)
            gone[keep] = False
            w[:, gone] = 0
    return model


SHAPES = [("mha", 4, None, "kv_group", 0.5), ("gqa-groups", 6, 2, "kv_group", 0.5),
          ("gqa-query", 6, 2, "query", 2 / 3), ("gqa-mqa", 4, 1, "query", 0.5)]


@pytest.mark.parametrize("label, heads, kv, unit, keep", SHAPES, ids=[s[0] for s in SHAPES])
def test_the_shrunk_llama_equals_the_original_with_removed_units_zeroed(tmp_path, label, heads, kv, unit, keep):
    loaded = _tiny(heads=heads, kv_heads=kv, hidden=48)
    original = copy.deepcopy(loaded.model)
    ctx = make_ctx(tmp_path, loaded.model, samples=6, seq_len=8)
    result = Width().apply(ctx, WidthParams(ffn_keep=0.5, heads_keep=keep, head_unit=unit))
    cfg, kv_full = ctx.model.config, kv or heads
    want_heads = round(keep * heads)
    want_kv = kv_full if unit == "query" else want_heads // (heads // kv_full)
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        24, want_heads, want_kv, 48 // heads)
    attn = ctx.model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (want_heads * cfg.head_dim, 48)
    assert attn.k_proj.weight.shape == (want_kv * cfg.head_dim, 48) and attn.o_proj.in_features == want_heads * cfg.head_dim
    assert ctx.model.model.layers[1].mlp.down_proj.weight.shape == (48, 24)
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ctx.model(input_ids=ids).logits
        want = _zeroed(original, result.state)(input_ids=ids).logits
        dense = original(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, dense, atol=1e-3)  # something was removed
    assert result.metrics["projection_weights_kept"] < 1


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_ffn_only_on_conv1d_and_opt_is_exact_and_heads_are_refused(tmp_path, arch):
    loaded = _tiny(arch=arch)
    original = copy.deepcopy(loaded.model)
    ctx = make_ctx(tmp_path, loaded.model, samples=4, seq_len=8)
    result = Width().apply(ctx, WidthParams(intermediate_size=20))
    field = {"gpt2": "n_inner", "opt": "ffn_dim"}[arch]
    assert getattr(ctx.model.config, field) == 20
    ids = torch.randint(0, 250, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(ctx.model(input_ids=ids).logits, _zeroed(original, result.state)(input_ids=ids).logits,
                              atol=1e-5)
    from sparsify_core.errors import ParamsError
    with pytest.raises(ParamsError, match=f"{arch} has no llama-style attention") as info:
        Width().check(_tiny(arch=arch).model, WidthParams(heads_keep=0.5))
    assert info.value.field == "heads_keep"


def test_saved_output_loads_in_plain_transformers_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from sparsify_core import load_output

    loaded = _tiny(heads=6, kv_heads=2, hidden=48)
    ctx = make_ctx(tmp_path, loaded.model, samples=4, seq_len=8)
    params = WidthParams(ffn_keep=0.5, heads_keep=2 / 3, head_unit="query")
    result = Width().apply(ctx, params)
    manifest = {"run_id": "t", "task": "causal_lm", "stages": [
        {"index": 0, "name": "width", "kind": "prune", "method": "width", "params": params.model_dump(mode="json"),
         "rebuild": Width().needs_rebuild(None, None)}]}
    out = save_output(tmp_path / "out", ctx.model, loaded.tokenizer, ctx.masks, manifest, "name: t\n", {0: result})
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.config.num_attention_heads == 4 and plain.config.intermediate_size == 24
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ctx.model.eval()(input_ids=ids).logits
        assert torch.allclose(plain(input_ids=ids).logits, want, atol=1e-5)
        assert torch.allclose(load_output(out).model(input_ids=ids).logits, want, atol=1e-5)
    # resuming from a checkpoint: rebuild cuts a freshly loaded model to the same shapes, and the weights fit
    fresh = _tiny(heads=6, kv_heads=2, hidden=48).model
    Width().rebuild(make_ctx(tmp_path, fresh), params, result)
    fresh.load_state_dict(ctx.model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(input_ids=ids).logits, want, atol=1e-5)


def test_masks_of_an_earlier_pruning_are_cut_with_their_weights(tmp_path):
    loaded = _tiny(heads=4, kv_heads=2)
    ctx = make_ctx(tmp_path, loaded.model, samples=4, seq_len=8)
    magnitude = catalog().methods[("prune", "magnitude")]
    magnitude().apply(ctx, magnitude.Params(sparsity=0.5))
    ctx.masks.apply(ctx.model)
    Width().apply(ctx, WidthParams(ffn_keep=0.5, heads_keep=0.5))
    ctx.masks.check(ctx.model)  # every mask has its (smaller) weight's shape
    params = dict(ctx.model.named_parameters())
    for name, keep in ctx.masks.items():
        assert int((params[name].detach()[~keep] != 0).sum()) == 0 and not bool(keep.all()), name


# -- validation before load ----------------------------------------------------------------------------

def _stage(params: str) -> str:
    return f"  - kind: prune\n    method: width\n    params: {params}\n"


@pytest.mark.parametrize("params, model, field, says", [
    ("{heads_keep: 0.67}", {"heads": 6, "kv_heads": 2, "hidden_size": 48}, "heads_keep",
     r"4 heads cannot be kept by head_unit kv_group with 6 heads on 2 KV heads: keep one of 3 \(0.5\), 6 \(1\)"),
    ("{heads_keep: 0.5, head_unit: query}", {"heads": 4}, "heads_keep", "use head_unit kv_group"),
    ("{ffn_keep: 0.001}", {}, "ffn_keep", "keeps 0 of 64 neurons"),
    ("{intermediate_size: 100}", {}, "intermediate_size", "larger than the model's 64"),
    ("{num_attention_heads: 2}", {"arch": "gpt2"}, "num_attention_heads", "gpt2 has no llama-style attention"),
])
def test_widths_the_model_cannot_take_are_refused_before_load(params, model, field, says):
    text = tiny_recipe(_stage(params), model=model)
    with pytest.raises(RecipeError, match=says) as info:
        check_model(load_recipe("w.yaml", text=text))
    assert info.value.field == f"stages.0.params.{field}" and info.value.line == text.splitlines().index(
        f"    params: {params}") + 1


def test_params_and_offload_are_refused_at_load():
    with pytest.raises(RecipeError, match="give ffn_keep or intermediate_size, not both"):
        load_recipe("w.yaml", text=tiny_recipe(_stage("{ffn_keep: 0.5, intermediate_size: 8}")))
    with pytest.raises(RecipeError, match="nothing to prune"):
        load_recipe("w.yaml", text=tiny_recipe(_stage("{head_unit: query}")))
    text = tiny_recipe(_stage("{ffn_keep: 0.5}")).replace("data:\n", "  offload: cpu\ndata:\n", 1)
    with pytest.raises(RecipeError, match="replaces them with smaller ones") as info:
        load_recipe("w.yaml", text=text)
    assert info.value.field == "model.offload"


# -- a recipe, in process --------------------------------------------------------------------------------

def test_width_then_kd_finetune_recipe_on_the_tiny_model(workdir, one_thread):
    from transformers import AutoModelForCausalLM

    from sparsify_core.registry import Registry, stage_values
    from sparsify_core.runner import Runner

    text = tiny_recipe(
        _stage("{ffn_keep: 0.5, heads_keep: 0.5, head_unit: query}")
        + "  - kind: train\n    method: finetune\n    params: {train: {steps: 2, batch_size: 2, lm_weight: 0.0, "
          "kd_weight: 1.0, checkpoint_every: 0}}\n",
        name="width", model={"heads": 4, "kv_heads": 2}, seq_len=16,
        splits={"calibration": {"samples": 4}, "train": {"samples": 4, "offset": 4}, "eval": {"samples": 2}},
        evaluate={"metrics": ["parameters", "kl_divergence", "perplexity"], "after": "all"},
        output={"dir": "out"})
    registry = Registry(f"sqlite:///{workdir}/registry.db")
    run_id = Runner(load_recipe(write(workdir / "width.yaml", text)), registry, runs_dir=workdir / "runs").run()
    run = registry.get_run(run_id)
    params = {m.stage: m.value for m in run.metrics if m.name == "parameters" and m.layer is None}
    assert params["width"] < params["dense"] and params["finetune"] == params["width"]
    assert stage_values(run)[0]["intermediate_size"] == 32
    kl = {m.stage: m.value for m in run.metrics if m.name == "kl_divergence" and m.layer is None}
    assert kl["width"] > 0 and math.isfinite(kl["finetune"])
    model = AutoModelForCausalLM.from_pretrained(workdir / "out")  # stored dense: plain transformers loads it
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 2)
    assert sum(p.numel() for p in model.parameters()) == params["finetune"]
