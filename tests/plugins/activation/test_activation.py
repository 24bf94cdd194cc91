"""ReLU substitution: sparsity appears, config follows, rebuild and from_pretrained reproduce it."""
from __future__ import annotations

import pytest
import torch
import transformers as T
from pydantic import ValidationError
from torch import nn

from sparsify_core import RunContext
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import capture_intermediates, find_ffn_blocks
from sparsify_plugins.activation import ReLU


def tiny(arch):
    torch.manual_seed(0)
    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, vocab_size=100)).eval()
    if arch == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                              bos_token_id=0, eos_token_id=0)).eval()
    return T.BertModel(T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, vocab_size=100, max_position_embeddings=64)).eval()


def ctx_for(model, tmp_path):
    return RunContext(run_id="t", model=model, tokenizer=None, task="causal_lm", data={}, device=torch.device("cpu"),
                      dtype=torch.float32, seed=0, workdir=tmp_path)


def sparsity(model, ids):
    zeros = []
    with torch.no_grad(), capture_intermediates(find_ffn_blocks(model), lambda b, x1: zeros.append(
            (x1 == 0).float().mean().item())):
        model(input_ids=ids)
    return sum(zeros) / len(zeros)


IDS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch,field", [("llama", "hidden_act"), ("gpt2", "activation_function"),
                                        ("bert", "hidden_act")])
def test_relu_everywhere(tmp_path, arch, field):
    model = tiny(arch)
    assert sparsity(model, IDS) == 0.0
    result = ReLU().apply(ctx_for(model, tmp_path), ReLU.Params())
    assert result.metrics["layers_replaced"] == 2
    assert all(isinstance(b.activation, nn.ReLU) for b in find_ffn_blocks(model))
    assert 0.3 < sparsity(model, IDS) < 0.7  # random init: pre-activations ~ symmetric around 0
    assert getattr(model.config, field) == "relu" and result.info["config_fields_updated"] == [field]


def test_some_layers_leave_config(tmp_path):
    model = tiny("llama")
    result = ReLU().apply(ctx_for(model, tmp_path), ReLU.Params(layers=[1]))
    b0, b1 = find_ffn_blocks(model)
    assert not isinstance(b0.activation, nn.ReLU) and isinstance(b1.activation, nn.ReLU)
    assert model.config.hidden_act == "silu" and result.info["layers"] == [b1.name]
    with pytest.raises(SparsifyError, match="out of range.*2 FFN layers"):
        ReLU().apply(ctx_for(model, tmp_path), ReLU.Params(layers=[0, 2]))
    with pytest.raises(ValidationError):
        ReLU.Params(layers=[-1])
    with pytest.raises(ValidationError):
        ReLU.Params(lyers=[0])


def test_rebuild_and_from_pretrained_reproduce(tmp_path):
    model = tiny("llama")
    params = ReLU.Params()
    result = ReLU().apply(ctx_for(model, tmp_path), params)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits

    fresh = tiny("llama")  # the original SiLU architecture, as a source would load it
    ReLU().rebuild(ctx_for(fresh, tmp_path), params, result)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS).logits, expected, rtol=0, atol=0)

    model.save_pretrained(tmp_path / "out")
    loaded = T.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert all(isinstance(b.activation, nn.ReLU) for b in find_ffn_blocks(loaded))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected)
