"""MoE-ify: clustering (pure), the routed FFN module, the moeify methods, metrics, and save/load."""
from __future__ import annotations

import pytest
import torch
from helpers import make_ctx, tiny_model
from pydantic import ValidationError

from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import find_ffn_blocks
from sparsify_plugins.moeify import Coactivation, ParamCluster, RoutedFFN
from sparsify_plugins.moeify.clustering import (balanced_assign, balanced_kmeans, balanced_partition, cluster_rows,
                                             expert_permutation, intra_weight)
from sparsify_plugins.moeify.methods import fit_router, router_recall
from sparsify_plugins.moeify.modules import LTERouter, MLPRouter


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


# -- clustering: pure functions -------------------------------------------------------


def _planted(k=4, size=8, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=gen) * 5
    truth = torch.arange(k).repeat_interleave(size)
    x = centres[truth] + 0.3 * torch.randn(k * size, d, generator=gen)
    perm = torch.randperm(k * size, generator=gen)
    return x[perm], truth[perm]


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])).all())


def test_balanced_assign_respects_capacity_and_prefers_cheap_clusters():
    cost = torch.tensor([[0.0, 1.0], [0.1, 1.0], [0.2, 1.0], [5.0, 0.0]])
    labels = balanced_assign(cost, 2)
    assert torch.bincount(labels, minlength=2).tolist() == [2, 2]
    assert labels[0] == 0 and labels[1] == 0 and labels[3] == 1  # the costliest for cluster 0 moves
    with pytest.raises(ValueError, match="do not fit"):
        balanced_assign(cost, 1)


def test_balanced_kmeans_recovers_planted_clusters_with_equal_sizes():
    x, truth = _planted()
    labels = balanced_kmeans(x, 4, seed=0)
    assert torch.bincount(labels).tolist() == [8, 8, 8, 8]
    assert _same_partition(labels, truth)


def test_balanced_kmeans_forces_equal_sizes_on_unequal_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(20, 4, generator=gen), torch.randn(4, 4, generator=gen) + 10])
    labels = balanced_kmeans(x, 3, seed=0)
    assert torch.bincount(labels).tolist() == [8, 8, 8]


def test_cluster_rows_is_deterministic_with_the_seed_and_scale_invariant():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 12, generator=gen)
    a, b = cluster_rows(w, 8, seed=3), cluster_rows(w, 8, seed=3)
    assert torch.equal(a, b)
    # rows are L2-normalised first: rescaling a neuron's row does not move it
    scaled = w * torch.rand(64, 1, generator=gen).add(0.5)
    assert torch.equal(cluster_rows(scaled, 8, seed=3), a)
    with pytest.raises(ValueError, match="multiple"):
        cluster_rows(w, 7)


def test_balanced_partition_recovers_planted_communities():
    k, size = 4, 8
    n = k * size
    gen = torch.Generator().manual_seed(0)
    truth = torch.randperm(n, generator=gen) % k
    same = (truth[:, None] == truth[None, :]).double()
    adj = same * 50 + torch.rand(n, n, generator=gen, dtype=torch.float64) * 10
    adj = (adj + adj.t()) / 2
    labels = balanced_partition(adj, k, seed=0)
    assert torch.bincount(labels).tolist() == [size] * k
    assert _same_partition(labels, truth)
    assert intra_weight(adj, labels) > intra_weight(adj, torch.arange(n) % k)


def test_partition_refinement_never_lowers_the_intra_weight():
    gen = torch.Generator().manual_seed(2)
    adj = torch.rand(48, 48, generator=gen, dtype=torch.float64)
    adj = adj + adj.t()
    no_refine = balanced_partition(adj, 6, rounds=0, seed=0)
    refined = balanced_partition(adj, 6, seed=0)
    assert intra_weight(adj, refined) >= intra_weight(adj, no_refine)
    assert torch.bincount(refined).tolist() == [8] * 6


def test_expert_permutation_makes_experts_contiguous():
    labels = torch.tensor([1, 0, 1, 0, 2, 2])
    perm = expert_permutation(labels)
    assert labels[perm].tolist() == [0, 0, 1, 1, 2, 2]


# -- the routed FFN module ---------------------------------------------------------------------


def _wrap(arch, expert_size=8, router_cls=LTERouter):
    model = tiny_model(arch)
    block = find_ffn_blocks(model)[0]
    labels = cluster_rows(block.weight("gate" if block.gate is not None else "up"), expert_size)
    router = router_cls(block.d_model, block.d_ff // expert_size)
    x = torch.randn(2, 5, block.d_model)
    with torch.no_grad():
        dense = block.module(x)
    module = RoutedFFN.from_block(block, labels, router, expert_size)
    return module, x, dense


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unrouted_moe_ffn_equals_dense_ffn(arch):
    module, x, dense = _wrap(arch)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), dense, atol=1e-5, rtol=1e-5)
    assert module.num_experts == module.d_ff // 8


def test_equality_check_scales_with_the_output_not_elementwise():
    from sparsify_plugins.moeify.modules import _same_output

    big = torch.tensor([300.0, -250.0, 1e-3])
    assert _same_output(big + torch.tensor([0.0, 0.0, 9e-4]), big)  # rounding of large sums near a zero entry
    assert not _same_output(big + torch.tensor([0.0, 0.0, 0.5]), big)  # a wrong neuron is O(1) off
    import transformers as T

    torch.manual_seed(0)  # a real-sized FFN (SmolLM2's 576 -> 1536) with large outputs, as in real models
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                                             num_attention_heads=4, vocab_size=10))
    block = find_ffn_blocks(model)[0]
    with torch.no_grad():
        for role in ("gate", "up", "down"):
            block.weight(role).normal_(0, 0.3)
    labels = torch.randperm(block.d_ff, generator=torch.Generator().manual_seed(1)) % (block.d_ff // 32)
    RoutedFFN.from_block(block, labels, LTERouter(block.d_model, block.d_ff // 32), 32)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("routing", ["top_k", "threshold"])
def test_gather_path_equals_masked_reference_with_gradients(arch, routing):
    module, x, _ = _wrap(arch)
    module.eval()
    module.set_routing(routing, top_k=3, tau=0.5)
    sel = module.select(module.scores(x))
    counts = sel.sum(-1)
    if routing == "top_k":
        assert bool((counts == 3).all())
    else:
        assert counts.unique().numel() > 1  # the number of experts varies per token
    outs, grads = [], []
    for path in ("gather", "masked"):
        module.path = path
        module.zero_grad()
        y = module(x)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append(module.part("up").weight.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
    # only the selected experts receive gradient
    up_grad = module.part("up").weight.grad
    rows = up_grad.t() if up_grad.shape[0] != module.d_ff else up_grad
    used = sel.reshape(-1, module.num_experts).any(0).repeat_interleave(module.expert_size)
    assert bool((rows[~used] == 0).all()) and bool((rows[used] != 0).any())


def test_soft_routing_weights_experts_by_score():
    module, x, dense = _wrap("llama")
    module.eval()
    module.set_routing("soft")
    with torch.no_grad():
        g = module.scores(x)
        x1 = module.expert_intermediate(x) * g.repeat_interleave(module.expert_size, -1)
        torch.testing.assert_close(module(x), module.part("down")(x1))
        module.router.proj.weight.fill_(0)  # G = 0.5 everywhere: half the dense output
        torch.testing.assert_close(module(x), dense * 0.5, atol=1e-5, rtol=1e-4)


def test_routing_errors_are_clear():
    module, _, _ = _wrap("llama")
    with pytest.raises(SparsifyError, match="top_k must be in 1..8"):
        module.set_routing("top_k", top_k=9)
    with pytest.raises(SparsifyError, match="unknown routing"):
        module.set_routing("sometimes")


def test_ffn_inlined_in_its_layer_is_refused():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                     vocab_size=50, word_embed_proj_dim=16, max_position_embeddings=32))
    block = find_ffn_blocks(model)[0]
    with pytest.raises(SparsifyError, match="own module"):
        RoutedFFN.from_block(block, torch.arange(32) // 8, LTERouter(16, 4), 8)


def test_bases_are_abstract_and_concrete_classes_instantiate():
    from sparsify_plugins.moeify.methods import _MoEify
    from sparsify_plugins.moeify.metrics import ExpertSparsity, RouterRecall, _RoutedMetric
    from sparsify_plugins.moeify.modules import Router

    with pytest.raises(TypeError, match="abstract methods flops_per_token, logits"):
        Router(16, 4)
    with pytest.raises(TypeError, match="abstract method labels"):
        _MoEify()
    with pytest.raises(TypeError, match="abstract methods _record"):
        _RoutedMetric()
    assert isinstance(LTERouter(16, 4), Router) and MLPRouter(16, 4).flops_per_token() == 2.0 * (16 * 4 + 4 * 4)
    assert ParamCluster() and Coactivation() and ExpertSparsity() and RouterRecall()


# -- router fitting ---------------------------------------------------------------------------


def test_router_recall_definition():
    mass = torch.tensor([[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    sel = torch.tensor([[True, False, False, False], [True, True, False, False]])
    assert router_recall(mass, sel) == pytest.approx((0.75 + 0.5) / 2)


@pytest.mark.parametrize("router_cls", [MLPRouter, LTERouter])
def test_fitted_router_beats_chance_on_learnable_routing(router_cls):
    from sparsify_plugins.moeify.methods import RouterFit

    gen = torch.Generator().manual_seed(0)
    d, E = 16, 8
    w = torch.randn(E, d, generator=gen)
    x = torch.randn(2048, d, generator=gen)
    mass = torch.relu(x @ w.t())  # expert mass is a function of the input
    torch.manual_seed(0)
    router = router_cls(d, E)
    top = lambda s: torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(2, -1).indices, True)  # noqa: E731
    res = fit_router(router, x, mass, top, RouterFit(epochs=10, lr=0.01, batch_size=256), seed=0)
    assert res["expert_sparsity"] == pytest.approx(0.75)
    held_out = mass[-204:]
    oracle = router_recall(held_out, top(held_out))  # the 2 experts with the most mass: about 0.76
    assert res["router_recall"] > 0.9 * oracle  # random experts would cover about 0.25


# -- methods on tiny models ---------------------------------------------------------------------


def test_params_validation():
    P = ParamCluster.Params
    assert P(expert_fraction=0.5).routing() == "top_k"
    assert P(router="lte").routing() == "threshold"
    with pytest.raises(ValidationError, match="exactly one of top_k and expert_fraction"):
        P()
    with pytest.raises(ValidationError, match="lte router selects by threshold"):
        P(router="lte", selection="top_k", top_k=2)
    with pytest.raises(ValidationError, match="apply to selection top_k only"):
        P(selection="threshold", top_k=2)
    with pytest.raises(ValidationError):
        P(expert_fraction=0.5, expert_sise=8)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_param_cluster_stage_with_mlp_router(tmp_path, arch):
    model = tiny_model(arch)
    ctx = make_ctx(tmp_path, model, samples=8)
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    fit = {"epochs": 3, "batch_size": 64}
    res = ParamCluster().apply(ctx, ParamCluster.Params(expert_size=8, expert_fraction=0.5, fit=fit))
    assert res.metrics["calibration_expert_sparsity"] == pytest.approx(0.5)
    blocks = find_ffn_blocks(model)
    assert all(isinstance(b.module, RoutedFFN) and b.module.routing == "top_k" for b in blocks)
    with torch.no_grad():
        routed = model(input_ids=ids).logits
        for b in blocks:
            b.module.set_routing("dense")
        torch.testing.assert_close(model(input_ids=ids).logits, dense, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(routed, dense, atol=1e-4)
    with pytest.raises(SparsifyError, match="already split"):
        ParamCluster().apply(ctx, ParamCluster.Params(expert_size=8, expert_fraction=0.5))


def test_coactivation_needs_zeros_or_an_active_fraction(tmp_path):
    model = tiny_model("llama")  # SiLU: no exact zeros
    ctx = make_ctx(tmp_path, model, samples=4)
    with pytest.raises(SparsifyError, match="active_fraction"):
        Coactivation().apply(ctx, Coactivation.Params(expert_size=8, top_k=2))
    res = Coactivation().apply(ctx, Coactivation.Params(expert_size=8, top_k=2, active_fraction=0.25,
                                                        fit={"epochs": 2}))
    assert res.metrics["blocks_converted"] == 2


def test_metrics_expert_sparsity_recall_and_flops(tmp_path):
    from sparsify_core.evaluation import evaluate
    from sparsify_plugins.metrics import FFNFlops
    from sparsify_plugins.moeify import ExpertSparsity, RouterRecall

    model = tiny_model("llama")
    ctx = make_ctx(tmp_path, model, samples=8)

    def run():
        vals = evaluate(ctx, [ExpertSparsity(), RouterRecall(), FFNFlops()], ctx.split("eval"), batch_size=4)
        return {v.name: v.value for v in vals if v.layer is None}

    assert set(run()) == {"ffn_flops_per_token", "ffn_flops_per_token_dense"}  # dense model: MoE metrics skip
    dense_flops = run()["ffn_flops_per_token"]
    ParamCluster().apply(ctx, ParamCluster.Params(expert_size=8, top_k=2, fit={"epochs": 2}))
    m = run()
    assert m["expert_sparsity"] == pytest.approx(0.75)
    assert 0.25 < m["router_recall"] < 1
    block = find_ffn_blocks(model)[0].module
    # a quarter of each neuron's gate/up/down work, plus the router, per layer (SiLU: no zeros)
    expected = 2 * (0.25 * dense_flops / 2 + block.router.flops_per_token())
    assert m["ffn_flops_per_token"] == pytest.approx(expected, rel=1e-6)
    for b in find_ffn_blocks(model):
        b.module.set_routing("dense")
    m = run()
    assert m["expert_sparsity"] == 0 and m["router_recall"] == pytest.approx(1.0)
    assert m["ffn_flops_per_token"] == pytest.approx(dense_flops)
