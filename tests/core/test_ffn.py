"""FFN block discovery and intermediate-activation hooks on tiny random HF models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import (capture_intermediates, find_ffn_blocks, is_conv1d, linear_shape, prunable_modules,
                               transformer_layers, weight_out_in)


def tiny(arch: str) -> nn.Module:
    """A 2-layer random model, d_model 32, d_ff 64 (GPT-2: 4*32 = 128)."""
    import transformers as T

    torch.manual_seed(0)
    if arch == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=100))
    elif arch == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    elif arch == "opt":
        m = T.OPTForCausalLM(T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                         vocab_size=100, word_embed_proj_dim=32, max_position_embeddings=64))
    elif arch == "bert":
        m = T.BertModel(T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=100, max_position_embeddings=64))
    elif arch == "neox":
        m = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, vocab_size=100))
    elif arch == "phi":
        m = T.PhiForCausalLM(T.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=100))
    else:
        raise ValueError(arch)
    return m.eval()


EXPECTED = {  # arch: (kind, d_ff, first block path, up path)
    "llama": ("gated", 64, "model.layers.0.mlp", "model.layers.0.mlp.up_proj"),
    "gpt2": ("plain", 128, "transformer.h.0.mlp", "transformer.h.0.mlp.c_fc"),
    "opt": ("plain", 64, "model.decoder.layers.0", "model.decoder.layers.0.fc1"),
    "bert": ("plain", 64, "encoder.layer.0", "encoder.layer.0.intermediate.dense"),
    "neox": ("plain", 64, "gpt_neox.layers.0.mlp", "gpt_neox.layers.0.mlp.dense_h_to_4h"),
    "phi": ("plain", 64, "model.layers.0.mlp", "model.layers.0.mlp.fc1"),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_find_ffn_blocks(arch):
    model = tiny(arch)
    kind, d_ff, first, up = EXPECTED[arch]
    blocks = find_ffn_blocks(model)
    assert [b.index for b in blocks] == [0, 1]
    assert all(b.kind == kind and b.d_model == 32 and b.d_ff == d_ff for b in blocks)
    assert blocks[0].name == first and blocks[1].name == first.replace(".0", ".1")
    assert blocks[0].module_names["up"] == up
    modules = dict(model.named_modules())
    for b in blocks:
        for role, path in b.module_names.items():
            assert modules[path] is b.projections()[role]
        assert b.in_projections() == ([b.gate, b.up] if kind == "gated" else [b.up])
        assert b.weight("up").shape == (d_ff, 32) and b.weight("down").shape == (32, d_ff)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_captured_x1_reproduces_ffn_output(arch):
    model = tiny(arch)
    blocks = find_ffn_blocks(model)
    seen: dict[str, dict[str, torch.Tensor]] = {b.name: {} for b in blocks}
    handles = []
    for b in blocks:
        rec = seen[b.name]
        handles.append(b.up.register_forward_pre_hook(lambda m, a, rec=rec: rec.__setitem__("h", a[0])))
        handles.append(b.down.register_forward_hook(lambda m, a, o, rec=rec: rec.__setitem__("y", o)))
        handles.append(b.module.register_forward_hook(
            lambda m, a, o, rec=rec: rec.__setitem__("block", o if torch.is_tensor(o) else None)))
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture_intermediates(blocks, lambda b, x1: seen[b.name].__setitem__("x1", x1)):
        model(input_ids=ids)
    for h in handles:
        h.remove()
    for b in blocks:
        rec = seen[b.name]
        assert rec["x1"].shape[-1] == b.d_ff
        torch.testing.assert_close(rec["x1"], b.intermediate(rec["h"]))
        torch.testing.assert_close(b.down(rec["x1"]), rec["y"])
        torch.testing.assert_close(b.forward(rec["h"]), rec["y"])
        if b.name.endswith("mlp"):  # the block module is exactly the FFN: its output is down(x1)
            torch.testing.assert_close(rec["block"], rec["y"])


def test_gradients_flow_through_x1():
    model = tiny("llama").train()
    blocks = find_ffn_blocks(model)
    penalty = []
    with capture_intermediates(blocks, lambda b, x1: penalty.append(x1.abs().mean())):
        model(input_ids=torch.randint(0, 100, (2, 8)))
    torch.stack(penalty).sum().backward()
    assert all(b.gate.weight.grad is not None and b.gate.weight.grad.abs().sum() > 0 for b in blocks)


def test_hooks_removed_on_error():
    model = tiny("llama")
    blocks = find_ffn_blocks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_intermediates(blocks, lambda b, x1: None):
            raise RuntimeError("boom")
    assert all(not b.down._forward_pre_hooks for b in blocks)
    calls = []
    with capture_intermediates(blocks, lambda b, x1: calls.append(b.index)):
        model(input_ids=torch.randint(0, 100, (1, 4)))
    model(input_ids=torch.randint(0, 100, (1, 4)))
    assert calls == [0, 1]


def test_set_activation_and_conv1d_orientation():
    model = tiny("gpt2")
    b = find_ffn_blocks(model)[0]
    assert is_conv1d(b.up) and linear_shape(b.up) == (128, 32)
    assert b.up.weight.shape == (32, 128) and b.weight("up").shape == (128, 32)
    with torch.no_grad():
        b.weight("up")[5, 3] = 7.0  # a view: writes through to the Conv1D weight
    assert b.up.weight[3, 5] == 7.0 and weight_out_in(b.up) is not b.up.weight
    b.set_activation(nn.ReLU())
    assert isinstance(model.transformer.h[0].mlp.act, nn.ReLU) and isinstance(b.activation, nn.ReLU)
    bert = find_ffn_blocks(tiny("bert"))[0]
    bert.set_activation(nn.ReLU())
    assert isinstance(bert.module.intermediate.intermediate_act_fn, nn.ReLU)
    opt = find_ffn_blocks(tiny("opt"))[0]
    opt.set_activation(nn.Identity())
    assert isinstance(opt.module.activation_fn, nn.Identity)


def test_matches_structure_not_class_name():
    class Unseen(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleDict(dict(fc1=nn.Linear(8, 16), fc2=nn.Linear(16, 8)))
                                        for _ in range(3))
            for layer in self.layers:
                layer.activation_fn = nn.GELU()
            self.head = nn.Linear(8, 4)

    blocks = find_ffn_blocks(Unseen())
    assert [b.name for b in blocks] == ["layers.0", "layers.1", "layers.2"]
    assert blocks[0].d_model == 8 and blocks[0].d_ff == 16


def test_no_blocks_is_a_clear_error():
    with pytest.raises(SparsifyError, match="gate_proj/up_proj/down_proj/act_fn.*c_fc/c_proj.*fc1/fc2"):
        find_ffn_blocks(nn.Sequential(nn.Linear(4, 4)))


def test_prunable_modules():
    model = tiny("llama")
    assert [n for n, _ in transformer_layers(model)] == ["model.layers.0", "model.layers.1"]
    names = [n for n, _ in prunable_modules(model)]
    assert len(names) == 14 and "lm_head" not in names and all(n.startswith("model.layers.") for n in names)
    mlp = [n for n, _ in prunable_modules(model, targets=[r"mlp\."], exclude=[r"down_proj"])]
    assert mlp == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")]
    assert [n for n, _ in prunable_modules(model, targets=["lm_head"], exclude=[])] == ["lm_head"]
    gpt2 = [n for n, _ in prunable_modules(tiny("gpt2"))]
    assert gpt2[:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert not any("pooler" in n for n, _ in prunable_modules(tiny("bert")))
