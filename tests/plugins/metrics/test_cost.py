"""bytes_per_token on small constructed models, against numbers computed by hand for each family.

The model: a 4-token vocabulary embedded one-hot (d = 4), one gated ReLU FFN (d_ff = 6) whose gate
row j is +1/-1 per token, so neuron j is non-zero for a known share f_j of the eval tokens
(f = 1, 3/4, 1/2, 1/4, 0, 0 over the tokens 0, 1, 2, 3), and an LM head [10, 4]; float32, no biases.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparsify_core import RunContext, TokenSplit
from sparsify_core.evaluation import evaluate
from sparsify_core.ffn import find_ffn_blocks
from sparsify_plugins.metrics.cost import BytesPerToken, weight_read_bytes

SIGNS = torch.tensor([[1, 1, 1, 1], [1, 1, 1, -1], [1, 1, -1, -1], [1, -1, -1, -1], [-1, -1, -1, -1],
                      [-1, -1, -1, -1]], dtype=torch.float32)
F = torch.tensor([1, 0.75, 0.5, 0.25, 0, 0])


class FFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(4, 6, bias=False)
        self.up_proj = nn.Linear(4, 6, bias=False)
        self.down_proj = nn.Linear(6, 4, bias=False)
        self.act_fn = nn.ReLU()
        with torch.no_grad():
            self.gate_proj.weight.copy_(SIGNS)
            self.up_proj.weight.fill_(1.0)
            self.down_proj.weight.fill_(1.0)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(4, 4)
        self.mlp = FFN()
        self.lm_head = nn.Linear(4, 10, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(4))

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        return SimpleNamespace(logits=self.lm_head(h + self.mlp(h)))


def _measure(tmp_path, model, masks=None) -> dict:
    data = {"eval": TokenSplit("eval", torch.tensor([[0, 1, 2, 3]]))}
    ctx = RunContext(run_id="t", model=model, tokenizer=None, task="causal_lm", data=data,
                     device=torch.device("cpu"), dtype=torch.float32, seed=0, workdir=tmp_path)
    for name, keep in (masks or {}).items():
        ctx.masks.set(name, keep)
    ctx.masks.apply(model)
    values = evaluate(ctx, [BytesPerToken()], ctx.split("eval"), batch_size=1)
    assert not [v.error for v in values if v.error]
    return {(v.name, v.layer): v.value for v in values}


EMBED_ROW, GATE, LM_HEAD = 4 * 4, 6 * 4 * 4, 10 * 4 * 4
DENSE = EMBED_ROW + GATE + 2 * 6 * 4 * 4 + LM_HEAD  # 464: every weight, every neuron


def test_dense_model_reads_every_weight(tmp_path):
    model = Model()
    with torch.no_grad():
        model.mlp.gate_proj.weight.abs_()  # every neuron positive for every token
    v = _measure(tmp_path, model)
    assert v[("bytes_per_token", None)] == DENSE == v[("bytes_per_token_dense", None)] == 464
    # FLOPs: 2 x (gate 24 + up 24 + down 24 + LM head 40) multiply-adds
    assert v[("flops_per_token", None)] == 2 * (24 + 24 + 24 + 40)


def test_activation_sparse_neurons_skip_up_rows_and_down_columns(tmp_path):
    v = _measure(tmp_path, Model())
    # gate in full; up row j and down column j (16 bytes each) for a share f_j of tokens: sum f = 2.5
    assert v[("bytes_per_token", None)] == EMBED_ROW + GATE + 2.5 * 16 + 2.5 * 16 + LM_HEAD == 352
    assert v[("bytes_per_token", "mlp")] == GATE + 80
    assert v[("bytes_per_token_dense", None)] == DENSE
    assert v[("flops_per_token", None)] == 2 * (24 + 2.5 * 4 + 2.5 * 4 + 40)


def test_masked_weights_read_as_their_compressed_storage(tmp_path):
    """Bitmask storage: 4 bytes per kept weight plus 1 bit per weight, row or column by row or column."""
    down_keep = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]],
                             dtype=torch.bool)  # every column keeps 2 of its 4 weights
    head_keep = torch.tensor([[1, 0, 1, 0]] * 10, dtype=torch.bool)  # every row keeps 2 of 4
    v = _measure(tmp_path, Model(), {"mlp.down_proj.weight": down_keep, "lm_head.weight": head_keep})
    down = 2.5 * (2 * 4 + 4 / 8)   # sum f_j x (2 kept x 4 bytes + 4 bits)
    head = 10 * (2 * 4 + 4 / 8)    # 85
    assert v[("bytes_per_token", None)] == EMBED_ROW + GATE + 2.5 * 16 + down + head == 258.25
    assert v[("flops_per_token", None)] == 2 * (24 + 2.5 * 4 + 2.5 * 2 + 20)


def test_moe_reads_the_selected_experts_and_its_router(tmp_path):
    """Two experts of 3 neurons; the router sends tokens 0, 1 to expert 0 and tokens 2, 3 to expert 1."""
    from sparsify_plugins.layouts.convert import _set_module
    from sparsify_plugins.moeify.modules import LTERouter, RoutedFFN

    model = Model()
    block = find_ffn_blocks(model)[0]
    router = LTERouter(4, 2)
    with torch.no_grad():
        router.proj.weight.copy_(torch.tensor([[8.0, 8, 0, 0], [0, 0, 8, 8]]))
    routed = RoutedFFN.from_block(block, torch.tensor([0, 0, 0, 1, 1, 1]), router, 3)
    routed.set_routing("top_k", top_k=1)
    _set_module(model, block.name, routed.eval())
    v = _measure(tmp_path, model)
    # every gate row for half the tokens (c = 1/2); neurons 0-2 are non-zero for the tokens of expert 0
    # (f = 1/2 each), neuron 3 only for token 0, which expert 1 does not get: f = 1/2, 1/2, 1/2, 0, 0, 0
    gate, up, down, router_bytes = 6 * 0.5 * 16, 1.5 * 16, 1.5 * 16, 2 * 4 * 4
    assert v[("bytes_per_token", None)] == EMBED_ROW + gate + up + down + router_bytes + LM_HEAD == 304
    assert v[("bytes_per_token_dense", None)] == DENSE + router_bytes


def test_weight_read_bytes_per_row_column_and_layout():
    w = torch.tensor([[1.0, 0, 2, 0], [0, 0, 0, 3]])
    assert weight_read_bytes(w, 2) == 16
    assert weight_read_bytes(w, 2, dim=0).tolist() == [8, 8]
    keep = w != 0
    assert weight_read_bytes(w, 2, keep=keep) == 3 * 2 + 8 / 8
    assert weight_read_bytes(w, 2, keep=keep, dim=1).tolist() == [2.25, 0.25, 2.25, 2.25]
    # a layout's bytes apportioned by non-zeros: 2 of 3 in row 0
    assert weight_read_bytes(w, 0, stored_bytes=30, dim=0).tolist() == pytest.approx([20, 10])
    assert weight_read_bytes(w, 0, stored_bytes=30) == 30


def test_layout_storage_counts_its_bytes(tmp_path):
    """A weight moved into CSR reads the layout's values and indices (Layout.nbytes)."""
    from sparsify_core.layout import find_layout
    from sparsify_plugins.layouts.modules import SparseLinear

    model = Model()
    head = find_layout("csr").from_dense(model.lm_head.weight.detach() * torch.tensor([1.0, 0, 1, 0]))
    model.lm_head = SparseLinear(head)
    v = _measure(tmp_path, model)
    assert v[("bytes_per_token", None)] == EMBED_ROW + GATE + 2.5 * 16 + 2.5 * 16 + head.nbytes()


def test_teal_thresholded_inputs_read_only_their_surviving_columns(tmp_path):
    """TEAL (input_threshold on a projection): each weight column is read for the tokens whose input entry
    survives the threshold, in an FFN block (gate, up, down) and outside one (the LM head); both FLOP metrics
    count the same columns."""
    from sparsify_plugins.activation.teal import set_input_threshold
    from sparsify_plugins.metrics.sparsity import FFNFlops

    model = Model()
    # the FFN and head inputs are one-hot (the down projection's input never reaches 2.0, so the FFN adds 0):
    # one column of 4 survives per token, column j for token j: a share 1/4 each
    for path, t in (("mlp.gate_proj", 0.5), ("mlp.up_proj", 0.5), ("mlp.down_proj", 2.0), ("lm_head", 0.5)):
        set_input_threshold(model.get_submodule(path), t, path)
    v = _measure(tmp_path, model)
    gate = up = 4 * 0.25 * (6 * 4)  # 4 columns of 6 float32 weights, each read by a quarter of the tokens
    head = 4 * 0.25 * (10 * 4)
    assert v[("bytes_per_token", "mlp")] == gate + up == 48
    assert v[("bytes_per_token", None)] == EMBED_ROW + gate + up + 0 + head == 104
    assert v[("bytes_per_token_dense", None)] == DENSE
    assert v[("flops_per_token", None)] == 2 * (6 + 6 + 0 + 10)
    data = {"eval": TokenSplit("eval", torch.tensor([[0, 1, 2, 3]]))}
    ctx = RunContext(run_id="t", model=model, tokenizer=None, task="causal_lm", data=data,
                     device=torch.device("cpu"), dtype=torch.float32, seed=0, workdir=tmp_path)
    ffn = {(x.name, x.layer): x.value for x in evaluate(ctx, [FFNFlops()], ctx.split("eval"), batch_size=1)}
    assert ffn[("ffn_flops_per_token", None)] == 2 * (6 + 6 + 0)
    # on down alone, a threshold every non-zero input passes: its columns are read as without one (f_j)
    model = Model()
    set_input_threshold(model.mlp.down_proj, 0.5, "down")
    v = _measure(tmp_path, model)
    assert v[("bytes_per_token", None)] == EMBED_ROW + GATE + 2.5 * 16 + 2.5 * 16 + LM_HEAD == 352
