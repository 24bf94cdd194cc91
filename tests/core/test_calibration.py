"""Layer-by-layer calibration: the inputs each layer sees, the observed Linear inputs, changes propagating."""
from __future__ import annotations

import pytest
import torch
import transformers as T
from helpers import tiny_model

from sparsify_core.calibration import calibrate_layerwise, capture_first_layer_inputs
from sparsify_core.ffn import transformer_layers


def model_of(arch: str):
    if arch == "opt":
        torch.manual_seed(0)
        return T.OPTForCausalLM(T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                            vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=32))
    return tiny_model(arch)


def layer_inputs_of_full_forward(model, ids):
    """Every layer's hidden-state input during one ordinary forward, by layer path."""
    seen = {}
    handles = [layer.register_forward_pre_hook(
        lambda _m, args, kwargs, name=name: seen.setdefault(name, []).append(
            (args[0] if args else kwargs["hidden_states"]).detach().clone()), with_kwargs=True)
        for name, layer in transformer_layers(model)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bert"])
def test_each_layer_sees_what_a_full_forward_feeds_it(arch):
    model = model_of(arch).eval()
    ids = torch.randint(0, 100, (5, 12), generator=torch.Generator().manual_seed(0))
    want = layer_inputs_of_full_forward(model, ids)
    got, observed = {}, {}

    def visit(layer):
        got[layer.name] = layer.inputs.hidden.clone()
        layer.observe(lambda names, x: observed.setdefault(names, []).append(x.shape))

    tokens = calibrate_layerwise(model, ids, visit, batch_size=2)  # 3 batches, the last one smaller
    assert tokens == 5 * 12
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    # every Linear of every layer was observed once per batch, as [tokens, in_features]
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or hasattr(m, "nf")}
    in_layers = {n for n in linears if any(n.startswith(lname + ".") for lname in want)}
    assert {n for names in observed for n in names} == in_layers
    for names, shapes in observed.items():
        assert [s[0] for s in shapes] == [24, 24, 12]


def test_modules_sharing_an_input_are_observed_together():
    model = tiny_model("llama").eval()
    groups = set()
    calibrate_layerwise(model, torch.randint(0, 100, (2, 8)), lambda layer: layer.observe(
        lambda names, x: groups.add(tuple(n.rsplit(".", 1)[1] for n in names))))
    assert groups == {("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)}


def test_observing_some_modules_stops_the_layer_early_and_changes_nothing():
    model = tiny_model("llama").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def visit(layer):
        down = layer.module.mlp.down_proj
        handle = down.register_forward_hook(lambda *a: calls.append(layer.index))
        layer.observe(lambda names, x: None, modules=[f"{layer.name}.self_attn.q_proj"])
        handle.remove()

    calibrate_layerwise(model, torch.randint(0, 100, (4, 8)), visit, batch_size=2)
    assert calls == []  # the forward stopped at q_proj: the FFN never ran while observing
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_changes_to_a_layer_reach_the_next_layer_inputs():
    model = tiny_model("llama").eval()
    ids = torch.randint(0, 100, (3, 8))
    got = {}

    def visit(layer):
        got[layer.index] = layer.inputs.hidden.clone()
        if layer.index == 0:
            with torch.no_grad():
                layer.module.mlp.down_proj.weight.zero_()  # "prune" layer 0's FFN away

    calibrate_layerwise(model, ids, visit)
    want = layer_inputs_of_full_forward(model, ids)  # the model now has the change
    torch.testing.assert_close(got[1], want["model.layers.1"], rtol=0, atol=1e-6)


def test_first_layer_arguments_are_shared_between_equal_batches():
    model = tiny_model("llama").eval()
    inputs = capture_first_layer_inputs(model, torch.randint(0, 100, (6, 8)), batch_size=2)
    assert inputs.hidden.shape == (6, 8, 32)
    assert len(inputs.extras) == 3 and len({id(e) for e in inputs.extras}) == 1


def test_training_mode_is_restored():
    model = tiny_model("llama").train()
    calibrate_layerwise(model, torch.randint(0, 100, (2, 8)), lambda layer: None)
    assert all(m.training for m in model.modules())
