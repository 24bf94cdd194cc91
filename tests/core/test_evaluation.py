"""evaluate(): one shared forward pass per evaluation point, hooks and modes restored."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsify_core import Metric, MetricValue, RunContext, TokenSplit
from sparsify_core.evaluation import evaluate
from sparsify_plugins.metrics import (ActivationSparsity, EmbeddingSimilarity, FFNFlops, KLDivergence, Parameters,
                                      Perplexity)


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=100)).eval()


def make_ctx(tmp_path, model, *, samples=5, reference=None):
    ids = torch.randint(0, 100, (samples, 12), generator=torch.Generator().manual_seed(0))
    dense = reference if reference is not None else copy.deepcopy(model)
    loads = []

    def loader():
        loads.append(1)
        return dense

    ctx = RunContext(run_id="t", model=model, tokenizer=None, task="causal_lm", data={"eval": TokenSplit("eval", ids)},
                     device=torch.device("cpu"), dtype=torch.float32, seed=0, workdir=tmp_path,
                     reference_loader=loader)
    return ctx, dense, loads


def count_forwards(model):
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls


def all_metrics():
    return [Perplexity(), KLDivergence(), ActivationSparsity(), FFNFlops(), Parameters(), EmbeddingSimilarity()]


def test_one_forward_per_batch_baseline(tmp_path):
    model = tiny_llama()
    ctx, dense, loads = make_ctx(tmp_path, model)
    model_calls, ref_calls = count_forwards(model), count_forwards(dense)
    values = evaluate(ctx, all_metrics(), ctx.split("eval"), batch_size=2, is_reference=True)
    assert len(model_calls) == 3 and not ref_calls and not loads  # 5 samples / 2 = 3 batches
    summary = {v.name: v.value for v in values if v.layer is None}
    assert summary["kl_divergence"] == 0.0
    assert "embedding_similarity" not in summary  # encoder-only metric skipped silently
    assert {"perplexity", "activation_sparsity", "ffn_flops_per_token", "ffn_flops_per_token_dense",
            "parameters"} <= set(summary)


def test_one_forward_per_batch_each_for_model_and_reference(tmp_path):
    model = tiny_llama()
    ctx, dense, loads = make_ctx(tmp_path, model)
    model_calls, ref_calls = count_forwards(model), count_forwards(dense)
    evaluate(ctx, all_metrics(), ctx.split("eval"), batch_size=2)
    assert len(model_calls) == 3 and len(ref_calls) == 3 and len(loads) == 1
    # no metric needs the reference: it is not even loaded
    ctx2, dense2, loads2 = make_ctx(tmp_path, tiny_llama())
    evaluate(ctx2, [Perplexity()], ctx2.split("eval"), batch_size=2)
    assert not loads2


def test_static_metrics_need_no_forward(tmp_path):
    model = tiny_llama()
    ctx, _, _ = make_ctx(tmp_path, model)
    calls = count_forwards(model)
    values = evaluate(ctx, [Parameters()], ctx.split("eval"), batch_size=2)
    assert not calls and values == [MetricValue("parameters", float(sum(p.numel() for p in model.parameters())))]


def test_modes_restored_and_hooks_removed(tmp_path):
    model = tiny_llama().train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    ctx, _, _ = make_ctx(tmp_path, model)
    seen_training = []
    model.register_forward_pre_hook(lambda m, a: seen_training.append(m.training))
    evaluate(ctx, [Perplexity(), ActivationSparsity()], ctx.split("eval"), batch_size=4)
    assert seen_training == [False, False]
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert all(not m._forward_pre_hooks for m in model.modules() if m is not model)


class _Boom(Metric):
    name = "boom"
    uses_forward = True
    closed = False

    def update(self, batch, logits, reference_logits):
        raise RuntimeError("boom")

    def finish(self, ctx):
        return []

    def close(self):
        type(self).closed = True


def test_a_failing_metric_fails_alone_and_is_closed(tmp_path):
    model = tiny_llama()
    ctx, _, _ = make_ctx(tmp_path, model)
    values = evaluate(ctx, [ActivationSparsity(), _Boom()], ctx.split("eval"), batch_size=2)
    (boom,) = [v for v in values if v.name == "boom"]
    assert math.isnan(boom.value) and boom.error == "RuntimeError: boom"
    sparsity = [v for v in values if v.name == "activation_sparsity"]
    assert sparsity and all(v.error is None and 0 <= v.value <= 1 for v in sparsity)
    assert _Boom.closed
    assert all(not m._forward_pre_hooks for m in model.modules() if m is not model)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_other_architectures(tmp_path, arch):
    import transformers as T

    torch.manual_seed(0)
    if arch == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                               bos_token_id=0, eos_token_id=0))
    else:  # OPT's FFN sees [batch*seq, d]: x1 is 2-D there
        model = T.OPTForCausalLM(T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                             vocab_size=100, word_embed_proj_dim=32, max_position_embeddings=64))
    ctx, _, _ = make_ctx(tmp_path, model.eval())
    values = {v.name: v.value for v in evaluate(ctx, all_metrics(), ctx.split("eval"), batch_size=2)
              if v.layer is None}
    assert values["kl_divergence"] == pytest.approx(0.0, abs=1e-7) and values["perplexity"] > 1
    assert (values["activation_sparsity"] > 0.2) == (arch == "opt")  # OPT uses ReLU already
    assert values["ffn_flops_per_token"] <= values["ffn_flops_per_token_dense"]
