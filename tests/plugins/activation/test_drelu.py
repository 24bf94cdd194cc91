"""dReLU (Turbo Sparse): relu(gate) * relu(up), the method, the recipe, save/load and the fast modules."""
from __future__ import annotations

import pytest
import torch
from helpers import make_ctx, make_output, tiny_model
from torch import nn

from sparsify_core import load_output
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import capture_intermediates, find_ffn_blocks
from sparsify_plugins.activation import DReLU, ReLU
from sparsify_plugins.activation.substitute import RectifiedLinear
from sparsify_plugins.layouts.fast import fast_modules
from sparsify_plugins.layouts.modules import ActivationSparseFFN

pytestmark = pytest.mark.usefixtures("one_thread")


def test_drelu_ffn_is_the_hand_written_formula(tmp_path):
    model = tiny_model("llama").eval()
    mlp = model.model.layers[0].mlp
    w_gate, w_up, w_down = (mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone(),
                            mlp.down_proj.weight.detach().clone())
    res = DReLU().apply(make_ctx(tmp_path, model), DReLU.Params())
    assert res.info["config_fields_updated"] == []  # transformers has no dReLU: the config must not claim relu
    assert isinstance(mlp.up_proj, RectifiedLinear) and isinstance(mlp.act_fn, nn.ReLU)
    x = torch.randn(3, 5, 32)
    hand = (torch.relu(x @ w_gate.T) * torch.relu(x @ w_up.T)) @ w_down.T
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), hand)
        torch.testing.assert_close(find_ffn_blocks(model)[0].forward(x), hand)


def test_drelu_is_sparser_than_relu_and_active_means_both_positive(tmp_path):
    ids = torch.randint(0, 100, (2, 16))

    def zeros(model):
        z = []
        record = lambda b, x1: z.append((x1 == 0).float().mean())  # noqa: E731
        with torch.no_grad(), capture_intermediates(find_ffn_blocks(model), record):
            model(input_ids=ids)
        return float(sum(z) / len(z))
    relu, drelu = tiny_model("llama").eval(), tiny_model("llama").eval()
    ReLU().apply(make_ctx(tmp_path, relu), ReLU.Params())
    DReLU().apply(make_ctx(tmp_path, drelu), DReLU.Params())
    assert zeros(drelu) == pytest.approx(0.75, abs=0.1) and zeros(drelu) > zeros(relu) + 0.15  # random init: ~3/4


def test_drelu_refuses_plain_ffns(tmp_path):
    with pytest.raises(SparsifyError, match="dReLU needs a gated FFN"):
        DReLU().apply(make_ctx(tmp_path, tiny_model("gpt2")), DReLU.Params())


@pytest.mark.parametrize("tokens", [1, 3])
def test_drelu_output_loads_back_and_the_fast_ffn_equals_the_reference(tmp_path, tokens):
    model, _ = make_output(tmp_path / "out", "llama", [("substitute_activation", "drelu", {})])
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        plain = load_output(tmp_path / "out", fast=False).model
        assert isinstance(plain.model.layers[1].mlp.up_proj, RectifiedLinear)
        torch.testing.assert_close(plain(input_ids=ids).logits, ref)
        fast = load_output(tmp_path / "out", fast=True)
        assert isinstance(fast.model.model.layers[0].mlp, ActivationSparseFFN)
        torch.testing.assert_close(fast.model(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
        step = ids[:, :tokens]  # decoding sizes go through the CPU kernel with its up ReLU
        torch.testing.assert_close(fast.model(input_ids=step).logits, model(input_ids=step).logits,
                                   atol=1e-5, rtol=1e-5)


def test_drelu_split_into_experts_keeps_the_up_relu(tmp_path):
    """A dReLU model split into experts, every expert selected: the routed gather (long inputs) and the MoE
    kernel (decoding) both compute the dReLU FFN."""
    from sparsify_core.plugin_manager import catalog
    model = tiny_model("llama").eval()
    ctx = make_ctx(tmp_path, model, samples=4)
    DReLU().apply(ctx, DReLU.Params())
    long, short = torch.randint(0, 100, (1, 40)), torch.randint(0, 100, (1, 3))
    with torch.no_grad():
        ref_long, ref_short = model(input_ids=long).logits, model(input_ids=short).logits
    moeify = catalog().methods[("moeify", "param_cluster")]
    moeify().apply(ctx, moeify.Params.model_validate(
        {"expert_size": 16, "selection": "top_k", "top_k": 4, "fit": {"epochs": 1}}))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=long).logits, ref_long, atol=1e-5, rtol=1e-5)
        assert any("MoE FFN" in d for d in fast_modules(model))
        torch.testing.assert_close(model(input_ids=short).logits, ref_short, atol=1e-5, rtol=1e-5)
