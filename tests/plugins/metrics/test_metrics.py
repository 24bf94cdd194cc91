"""Built-in metrics against direct computations and hand-made cases."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from sparsify_core import RunContext, TokenSplit
from sparsify_core.evaluation import evaluate
from sparsify_core.ffn import find_ffn_blocks, prunable_modules
from sparsify_plugins.metrics import (ActivationSparsity, EmbeddingSimilarity, FFNFlops, KLDivergence,
                                      NonzeroParameters, Parameters, Perplexity, WeightSparsity)
from sparsify_plugins.metrics.sparsity import activation_sparsity


def tiny_llama(**kw):
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()


def make_ctx(tmp_path, model, *, reference=None, task="causal_lm"):
    ids = torch.randint(0, 100, (5, 12), generator=torch.Generator().manual_seed(0))
    dense = reference if reference is not None else copy.deepcopy(model)
    return RunContext(run_id="t", model=model, tokenizer=None, task=task, data={"eval": TokenSplit("eval", ids)},
                      device=torch.device("cpu"), dtype=torch.float32, seed=0, workdir=tmp_path,
                      reference_loader=lambda: dense)


def run(ctx, *metrics, is_reference=False):
    values = evaluate(ctx, list(metrics), ctx.split("eval"), batch_size=2, is_reference=is_reference)
    return {v.name: v.value for v in values if v.layer is None}, {(v.name, v.layer): v.value for v in values if v.layer}


def test_perplexity_matches_cross_entropy(tmp_path):
    model = tiny_llama()
    ctx = make_ctx(tmp_path, model)
    ids = ctx.split("eval").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expected = math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, 100), ids[:, 1:].reshape(-1)).item())
    assert run(ctx, Perplexity())[0]["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_kl_divergence(tmp_path):
    model = tiny_llama()
    ctx = make_ctx(tmp_path, model)
    assert run(ctx, KLDivergence(), is_reference=True)[0]["kl_divergence"] == 0.0
    assert run(ctx, KLDivergence())[0]["kl_divergence"] == pytest.approx(0.0, abs=1e-7)  # identical copy
    dense = copy.deepcopy(model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    ctx = make_ctx(tmp_path, model, reference=dense)
    kl = run(ctx, KLDivergence())[0]["kl_divergence"]
    ids = ctx.split("eval").input_ids
    with torch.no_grad():
        log_q = F.log_softmax(model(input_ids=ids).logits[:, :-1], -1).reshape(-1, 100)
        log_p = F.log_softmax(dense(input_ids=ids).logits[:, :-1], -1).reshape(-1, 100)
    expected = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean").item()
    assert kl > 0 and kl == pytest.approx(expected, rel=1e-4)


class _ZeroFirst(nn.Module):
    """An activation whose first ``n`` outputs are exactly zero (the rest are ~never zero)."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, x):
        x = x.clone()
        x[..., :self.n] = 0
        return x


def test_activation_sparsity_counts_exact_zeros(tmp_path):
    model = tiny_llama()
    b0, b1 = find_ffn_blocks(model)
    b0.set_activation(_ZeroFirst(16))   # 16 / 64 zero
    b1.set_activation(_ZeroFirst(48))   # 48 / 64 zero
    summary, per_layer = run(make_ctx(tmp_path, model), ActivationSparsity())
    assert per_layer == {("activation_sparsity", b0.name): 0.25, ("activation_sparsity", b1.name): 0.75}
    assert summary["activation_sparsity"] == 0.5
    assert activation_sparsity(torch.tensor([3, 0, 1]), tokens=4) == 1 - 4 / 12


def test_weight_sparsity(tmp_path):
    model = tiny_llama()
    modules = prunable_modules(model)
    with torch.no_grad():
        modules[0][1].weight[:4] = 0  # 4 rows of q_proj (32 x 32)
    summary, per_module = run(make_ctx(tmp_path, model), WeightSparsity())
    total = sum(m.weight.numel() for _, m in modules)
    assert summary["weight_sparsity"] == pytest.approx(4 * 32 / total)
    assert per_module[("weight_sparsity", modules[0][0])] == 4 / 32
    assert len(per_module) == len(modules) and ("weight_sparsity", "lm_head") not in per_module


def test_parameters_count_tied_weights_once(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = {id(p): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    summary, _ = run(make_ctx(tmp_path, model), Parameters(), NonzeroParameters())
    assert summary["parameters"] == sum(unique.values())
    assert summary["nonzero_parameters"] == summary["parameters"]
    with torch.no_grad():
        model.model.embed_tokens.weight[:10] = 0  # 10 x 32 zeros, in the tied matrix once
    assert run(make_ctx(tmp_path, model), NonzeroParameters())[0]["nonzero_parameters"] == summary["parameters"] - 320


def test_ffn_flops_metric(tmp_path):
    model = tiny_llama()
    summary, _ = run(make_ctx(tmp_path, model), FFNFlops())
    dense = 2 * 2 * 3 * 32 * 64  # 2 layers, 3 matrices of 32 x 64, 2 FLOPs per multiply-add
    assert summary["ffn_flops_per_token_dense"] == dense
    assert summary["ffn_flops_per_token"] == pytest.approx(dense)  # SiLU: no exact zeros
    b0, b1 = find_ffn_blocks(model)
    b0.set_activation(_ZeroFirst(16))  # neurons 0..15 always zero
    with torch.no_grad():
        b1.gate.weight[:, :16] = 0  # 16 of 32 inputs of every gate row
    summary, per_layer = run(make_ctx(tmp_path, model), FFNFlops())
    assert per_layer[("ffn_flops_per_token", b0.name)] == pytest.approx(2 * (32 * 64 + 48 / 64 * 2 * 32 * 64))
    assert per_layer[("ffn_flops_per_token", b1.name)] == pytest.approx(2 * (16 * 64 + 2 * 32 * 64))
    assert summary["ffn_flops_per_token"] == pytest.approx(sum(per_layer.values()))


def test_embedding_similarity(tmp_path):
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=100, max_position_embeddings=64)).eval()
    ctx = make_ctx(tmp_path, model, task="encoder")
    summary, _ = run(ctx, EmbeddingSimilarity(), Perplexity(), ActivationSparsity(), is_reference=True)
    assert summary["embedding_similarity"] == pytest.approx(1.0)
    assert "perplexity" not in summary and "activation_sparsity" in summary
    dense = copy.deepcopy(model)
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.normal_()
    sim = run(make_ctx(tmp_path, model, reference=dense, task="encoder"), EmbeddingSimilarity())[0]
    assert 0 < sim["embedding_similarity"] < 0.999
