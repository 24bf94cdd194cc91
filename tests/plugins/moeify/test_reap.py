"""moeify/reap: REAP expert pruning (saliency math, native transformers MoE, moeify's routed FFNs, save/load)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import make_ctx, make_output, tiny_model, tiny_recipe, write
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from sparsify_core import load_output
from sparsify_core.errors import RecipeError, SparsifyError
from sparsify_core.recipe import check_model, load_recipe
from sparsify_plugins.moeify import RoutedFFN
from sparsify_plugins.moeify.reap import (ExpertStats, Reap, ReapParams, experts_to_keep, native_moe_blocks,
                                          reap_saliency, selection_frequency)
from sparsify_plugins.sources.models import Tiny

pytestmark = pytest.mark.usefixtures("one_thread")

MIXTRAL = {"arch": "mixtral", "hidden_size": 32, "intermediate_size": 32, "layers": 2, "heads": 4, "experts": 6}


# -- saliency: pure functions on hand-computed tensors ------------------------------------------

# 4 tokens, 3 experts, top-2. Expert 0 is picked by every token with a small gate; expert 1 once, with a large
# gate and output; expert 2 twice. Unrouted entries hold junk that must not count.
ROUTED = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 0, 1], [1, 0, 0]], dtype=torch.bool)
GATES = torch.tensor([[0.1, 0.9, 99.0], [0.1, 99.0, 0.5], [0.1, 99.0, 0.3], [0.1, 99.0, 99.0]])
NORMS = torch.tensor([[1.0, 2.0, 99.0], [1.0, 99.0, 1.0], [1.0, 99.0, 3.0], [1.0, 99.0, 99.0]])


def test_reap_saliency_is_the_mean_gated_norm_over_routed_tokens():
    # expert 0: 4 x 0.1*1 / 4; expert 1: 0.9*2 / 1; expert 2: (0.5*1 + 0.3*3) / 2
    assert reap_saliency(GATES, NORMS, ROUTED).tolist() == pytest.approx([0.1, 1.8, 0.7])
    assert selection_frequency(ROUTED).tolist() == pytest.approx([1.0, 0.25, 0.5])


def test_frequency_and_reap_disagree_on_which_experts_to_keep():
    assert experts_to_keep(reap_saliency(GATES, NORMS, ROUTED), 2).tolist() == [1, 2]  # drops the busy expert 0
    assert experts_to_keep(selection_frequency(ROUTED), 2).tolist() == [0, 2]  # drops the rare expert 1


def test_stats_add_up_over_batches_and_an_unrouted_expert_scores_zero():
    whole = ExpertStats(4)
    whole.add(F.pad(GATES, (0, 1)), F.pad(NORMS, (0, 1)), F.pad(ROUTED, (0, 1)))
    parts = ExpertStats(4)
    for s in (slice(0, 1), slice(1, 4)):
        parts.add(F.pad(GATES[s], (0, 1)), F.pad(NORMS[s], (0, 1)), F.pad(ROUTED[s], (0, 1)))
    for criterion in ("reap", "frequency"):
        torch.testing.assert_close(parts.scores(criterion), whole.scores(criterion))
    assert whole.scores("reap")[3] == 0 and whole.scores("frequency")[3] == 0
    with pytest.raises(ValueError, match="unknown criterion"):
        whole.scores("ean")


def test_experts_to_keep_breaks_ties_towards_the_lower_index_and_checks_the_count():
    assert experts_to_keep(torch.tensor([1.0, 2.0, 1.0, 2.0]), 3).tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="cannot keep 0 of 4"):
        experts_to_keep(torch.ones(4), 0)


def test_params_need_exactly_one_amount_and_keep_top_k_experts():
    with pytest.raises(ValidationError, match="exactly one of experts_keep"):
        ReapParams()
    with pytest.raises(ValidationError, match="exactly one of experts_keep"):
        ReapParams(experts_keep=0.5, prune_experts=1)
    assert ReapParams(experts_keep=0.75).kept(8, 2) == 6 and ReapParams(prune_experts=3).kept(8, 2) == 5
    with pytest.raises(SparsifyError, match="leaves 1 of 8 experts, but the layer routes each token to 2") as e:
        ReapParams(prune_experts=7).kept(8, 2)
    assert e.value.field == "prune_experts"


# -- native MoE (transformers): the defining property ---------------------------------------------


def _mixtral(**kw):
    p = Tiny.Params(**{**MIXTRAL, **kw})
    return Tiny().load(p, device=torch.device("cpu"), dtype=torch.float32).model


def _qwen2_moe():
    """A tiny Qwen2-MoE: a shared expert beside the routed ones, top-k weights not renormalised."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(vocab_size=260, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
                            max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _expected_saliency(model, ctx, criterion):
    """Saliencies computed independently: per block, each expert's output from its packed weights, one by one."""
    stats, handles = {}, []
    for b in native_moe_blocks(model):
        stats[b.name] = ExpertStats(b.num_experts)

        def pre(module, args, name=b.name):
            x = args[0].reshape(-1, args[0].shape[-1])
            probs = (x @ module.gate.weight.t()).softmax(-1)
            top, idx = probs.topk(module.gate.top_k, dim=-1)
            if getattr(module.gate, "norm_topk_prob", True):  # the weight the block applies (Mixtral: always)
                top = top / top.sum(-1, keepdim=True)
            gates = torch.zeros_like(probs).scatter_(-1, idx, top)
            routed = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, idx, True)
            norms = torch.zeros_like(probs)
            ex = module.experts
            for j in range(probs.shape[-1]):
                gate, up = (x @ ex.gate_up_proj[j].t()).chunk(2, dim=-1)
                norms[:, j] = ((ex.act_fn(gate) * up) @ ex.down_proj[j].t()).norm(dim=-1)
            stats[name].add(gates, norms, routed)
        handles.append(b.module.register_forward_pre_hook(pre))
    with torch.no_grad():
        for batch in ctx.split("calibration").batches(8):
            model(input_ids=batch)
    for h in handles:
        h.remove()
    return {name: s.scores(criterion) for name, s in stats.items()}


def _masked(model, dropped: dict[str, torch.Tensor]):
    """``model`` with each block's ``dropped`` experts' router logits at -inf (the pruned model's definition)."""
    for name, drop in dropped.items():
        router = model.get_submodule(name).gate

        def forward(hidden, router=router, drop=drop):  # the routers' own rule (softmax, top-k), on masked logits
            logits = hidden.reshape(-1, router.weight.shape[1]) @ router.weight.t()
            logits[:, drop] = float("-inf")
            top, idx = logits.float().softmax(-1).topk(router.top_k, dim=-1)
            if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises
                top = top / top.sum(-1, keepdim=True)
            return logits, top.to(logits.dtype), idx
        router.forward = forward
    return model


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("criterion", ["reap", "frequency"])
def test_pruning_removes_the_lowest_experts_and_equals_masking_their_router_logits(tmp_path, arch, criterion):
    model = _mixtral() if arch == "mixtral" else _qwen2_moe()
    reference = copy.deepcopy(model)
    ctx = make_ctx(tmp_path, model, samples=8, seq_len=16)
    want = _expected_saliency(reference, ctx, criterion)
    res = Reap().apply(ctx, ReapParams(criterion=criterion, prune_experts=2))

    dropped = {}
    for name, scores in want.items():
        keep = res.state[f"experts.{name}"]
        assert keep.tolist() == experts_to_keep(scores, 4).tolist()  # exactly the 2 lowest go
        dropped[name] = torch.tensor(sorted(set(range(6)) - set(keep.tolist())))
        block = model.get_submodule(name)
        assert block.gate.weight.shape[0] == 4 and block.experts.gate_up_proj.shape[0] == 4
        assert block.gate.top_k == 2
    assert getattr(model.config, "num_local_experts" if arch == "mixtral" else "num_experts") == 4
    assert res.metrics["experts_pruned_fraction"] == pytest.approx(1 / 3)

    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, masked = model(ids).logits, _masked(reference, dropped)(ids).logits
    torch.testing.assert_close(got, masked, rtol=0, atol=1e-5)


def test_native_output_is_a_plain_transformers_folder_with_the_same_logits(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    model, masks = make_output(tmp_path / "out", "mixtral", [("moeify", "reap", {"experts_keep": 0.75})])
    manifest = json.loads((tmp_path / "out" / "sparsify.json").read_text())
    assert manifest["stages"][0]["rebuild"] is False and manifest["storage"]["form"] == "dense"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert plain.config.num_local_experts == 6  # 8 * 0.75
    ours = load_output(tmp_path / "out").model
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(plain(ids).logits, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(ids).logits, want, rtol=0, atol=1e-6)


def test_rebuild_shrinks_a_model_loaded_from_its_source_as_a_checkpoint_resume_does(tmp_path):
    model = _mixtral()
    ctx = make_ctx(tmp_path, model, samples=8, seq_len=16)
    params = ReapParams(prune_experts=3)
    res = Reap().apply(ctx, params)
    fresh = _mixtral(init_seed=5)
    Reap().rebuild(make_ctx(tmp_path, fresh), params, res)
    assert fresh.config.num_local_experts == 3
    fresh.load_state_dict(model.state_dict(), strict=True)
    Reap().rebuild(make_ctx(tmp_path, fresh), params, res)  # already the kept count (an output's config): as is
    ids = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


# -- FFNs split into experts by moeify ---------------------------------------------------------------

MOEIFY = {"lte": {"expert_size": 8, "router": "lte", "fit": {"epochs": 2}},
          "mlp": {"expert_size": 8, "router": "mlp", "top_k": 3, "fit": {"epochs": 2}}}


def _drop_router_scores(model, dropped: dict[str, torch.Tensor]):
    """``model`` with the dropped experts' router logits at -inf (scores 0: never selected)."""
    for name, drop in dropped.items():
        router = model.get_submodule(name).router
        original = router.logits

        def logits(x, original=original, drop=drop):
            z = original(x).clone()
            z[..., drop] = float("-inf")
            return z
        router.logits = logits
    return model


@pytest.mark.parametrize("router", sorted(MOEIFY))
def test_moeified_llama_loses_whole_experts_and_saves_and_loads_in_sparsify_format(tmp_path, router):
    stages = [("prune", "magnitude", {"sparsity": 0.5}), ("moeify", "param_cluster", MOEIFY[router])]
    _, _ = make_output(tmp_path / "moe", "llama", stages)  # the unpruned experts, as the reference
    reference = load_output(tmp_path / "moe", fast=False).model
    model, masks = make_output(tmp_path / "out", "llama", [*stages, ("moeify", "reap", {"prune_experts": 2})])
    routed = [m for m in model.modules() if isinstance(m, RoutedFFN)]
    assert [m.num_experts for m in routed] == [6, 6]  # 64 neurons / 8 = 8 experts, 2 removed
    assert all(m.part("up").weight.shape[0] == 48 and m.part("down").weight.shape[1] == 48 for m in routed)
    assert all(k.shape == p.shape for n, k in masks.items() for pn, p in model.named_parameters() if pn == n)

    state = load_output(tmp_path / "out", fast=False)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    kept = load_file(tmp_path / "out" / "sparsify" / "stage-2.safetensors")
    dropped = {k[len("experts."):]: torch.tensor(sorted(set(range(8)) - set(v.tolist())))
               for k, v in kept.items() if k.startswith("experts.")}
    with torch.no_grad():
        want = model.eval()(ids).logits
        torch.testing.assert_close(state.model(ids).logits, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(load_output(tmp_path / "out").model(ids).logits, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(_drop_router_scores(reference, dropped)(ids).logits, want, rtol=0, atol=1e-5)
    assert len(state.masks) and all(state.masks.get(n).shape == k.shape for n, k in masks.items())


# -- validation before load -------------------------------------------------------------------------


def _reap_recipe(params: str, model: dict) -> str:
    return tiny_recipe(f"  - kind: moeify\n    method: reap\n    params: {params}\n", model=model)


def test_a_dense_model_is_refused_from_its_config_naming_the_stage():
    with pytest.raises(RecipeError, match=r"stage 'reap' \(moeify/reap\): moeify/reap prunes experts: it needs a "
                                          r"native MoE model .* LlamaForCausalLM has neither") as e:
        check_model(load_recipe("dense.yaml", text=_reap_recipe("{experts_keep: 0.75}", None)))
    assert e.value.field == "stages.0.params" and "\n" not in str(e.value)


def test_too_few_experts_left_for_top_k_is_refused_naming_the_field_and_line(tmp_path):
    text = _reap_recipe("{prune_experts: 5}", MIXTRAL)
    with pytest.raises(RecipeError, match="leaves 1 of 6 experts, but the layer routes each token to 2") as e:
        check_model(load_recipe(write(tmp_path / "r.yaml", text)))
    assert e.value.field == "stages.0.params.prune_experts"
    assert e.value.line == next(i for i, ln in enumerate(text.splitlines(), 1) if "prune_experts" in ln)
    check_model(load_recipe("ok.yaml", text=_reap_recipe("{prune_experts: 4}", MIXTRAL)))


def test_the_run_refuses_too_few_experts_left_and_a_model_without_experts_before_changing_anything(tmp_path):
    model = _mixtral(experts=4)
    ctx = make_ctx(tmp_path, model, samples=4, seq_len=8)
    with pytest.raises(SparsifyError, match="leaves 1 of 4 experts"):
        Reap().apply(ctx, ReapParams(experts_keep=0.25))
    assert model.config.num_local_experts == 4  # refused before anything changed
    with pytest.raises(SparsifyError, match="needs a native MoE model"):
        Reap().apply(make_ctx(tmp_path, tiny_model()), ReapParams(experts_keep=0.5))


def test_unsupported_moe_layouts_are_refused_by_name():
    class Block(nn.Module):
        def __init__(self, experts, gate):
            super().__init__()
            self.experts, self.gate = experts, gate

    class SigmoidRouter(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 8))

    with pytest.raises(SparsifyError, match="ModuleList"):
        native_moe_blocks(Block(nn.ModuleList([nn.Linear(8, 8)]), SigmoidRouter()))
    with pytest.raises(SparsifyError, match="router SigmoidRouter is not a plain softmax top-k router"):
        native_moe_blocks(Block(nn.Linear(8, 8), SigmoidRouter()))


# -- recipes through the engine ---------------------------------------------------------------------


def _run(workdir, text: str):
    from sparsify_core.registry import Registry
    from sparsify_core.runner import Runner

    registry = Registry(f"sqlite:///{workdir}/registry.db")
    run_id = Runner(load_recipe(write(workdir / "r.yaml", text)), registry, runs_dir=workdir / "runs").run()
    run = registry.get_run(run_id)
    assert run.status == "finished"
    return {(m.stage, m.name): m.value for m in run.metrics if m.layer is None}


def test_recipe_on_a_tiny_moeified_llama_evaluates_the_moe_metrics(workdir):
    stages = ("  - {kind: moeify, method: param_cluster, params: {expert_size: 8, router: mlp, top_k: 2, "
              "fit: {epochs: 2}}}\n  - {kind: moeify, method: reap, params: {experts_keep: 0.75}}\n")
    metrics = ["perplexity", "expert_sparsity", "router_recall", "ffn_flops_per_token", "parameters"]
    got = _run(workdir, tiny_recipe(stages, evaluate={"metrics": metrics, "after": "all"}))
    assert got[("reap", "experts_pruned")] == 4 and got[("reap", "experts_per_layer")] == 6
    assert got[("reap", "expert_sparsity")] == pytest.approx(1 - 2 / 6)
    assert got[("param_cluster", "expert_sparsity")] == pytest.approx(1 - 2 / 8)
    # 2 experts x 8 neurons x 3 projections x 32 wide gone per layer; the MLP router loses 2 rows of its second layer
    assert got[("param_cluster", "parameters")] - got[("reap", "parameters")] == 2 * (2 * 8 * 3 * 32 + 2 * 8)
    assert all(v == v for v in got.values())  # no metric failed (NaN)


def test_recipe_on_a_tiny_mixtral_saves_a_model_the_hf_source_takes_again(workdir):
    text = tiny_recipe("  - {kind: moeify, method: reap, params: {prune_experts: 2, criterion: frequency}}\n",
                       model=MIXTRAL, evaluate={"metrics": ["perplexity", "kl_divergence", "parameters"],
                                                "after": "all"}, output={"dir": str(workdir / "out")})
    got = _run(workdir, text)
    assert got[("reap", "experts_pruned_fraction")] == pytest.approx(1 / 3)
    assert got[("reap", "parameters")] < got[("dense", "parameters")] and got[("reap", "kl_divergence")] > 0
    again = text.replace("  source: tiny\n", "  source: hf\n").replace(
        text.split("\n")[text.split("\n").index("  source: tiny") + 1], f"  params: {{path: '{workdir / 'out'}'}}")
    check_model(load_recipe("again.yaml", text=again.replace("prune_experts: 2", "prune_experts: 1")))
    with pytest.raises(RecipeError, match="leaves 1 of 4 experts"):  # the saved config's count, 6 - 2
        check_model(load_recipe("again.yaml", text=again.replace("prune_experts: 2", "prune_experts: 3")))
