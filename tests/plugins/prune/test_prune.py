"""Magnitude pruning: exact mask math on small tensors, then the method on tiny models."""
from __future__ import annotations

import pytest
import torch
import transformers as T
from pydantic import ValidationError

from sparsify_core import RunContext
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import prunable_modules
from sparsify_plugins.prune import Magnitude, global_magnitude_masks, global_threshold, magnitude_mask
from sparsify_plugins.prune.masks import kth_smallest_abs, prune_count


def test_magnitude_mask_breaks_ties_exactly():
    w = torch.tensor([[1.0, -1.0, 3.0], [1.0, -2.0, 1.0]])
    keep = magnitude_mask(w, 0.5)  # 3 of the four |w| == 1 go, first ones first
    assert keep.tolist() == [[False, False, True], [False, True, True]]
    assert magnitude_mask(torch.zeros(10), 0.3).sum() == 7


@pytest.mark.parametrize("shape,s", [((7, 13), 0.5), ((64, 32), 0.9), ((5,), 0.01), ((3, 33), 0.37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_mask_exact_count(shape, s, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    keep = magnitude_mask(w, s)
    assert keep.shape == w.shape and int((~keep).sum()) == prune_count(w.numel(), s)
    if (~keep).any() and keep.any():
        assert w[~keep].abs().max() <= w[keep].abs().min()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_earlier_pruned_go_first_even_among_exact_zeros(dtype):
    """Zeros that were never masked must not take the places of masked ones: the mask would then prune both."""
    w = torch.tensor([[0.0, 0.0, 0.5, 2.0], [0.0, 3.0, 0.0, 1.0]]).to(dtype)
    pruned = torch.tensor([[False, False, True, False], [False, False, True, True]])
    for keep in (magnitude_mask(w, 0.5, pruned), global_magnitude_masks([w[:1], w[1:]], 0.5, pruned.split(1))):
        keep = keep if isinstance(keep, torch.Tensor) else torch.cat(keep)
        assert not keep[pruned].any() and int((~keep).sum()) == 4  # 3 masked + the first unmasked zero
        assert (~keep).tolist() == [[True, False, True, False], [False, False, True, True]]
    assert magnitude_mask(w, 0.25, pruned).logical_not().sum() == 2  # asked below the 3 masked: 2 of them


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kth_smallest_abs_bisection_matches_sort(dtype):
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(s, generator=g).to(dtype) for s in [(4, 5), (17,), (3, 3, 3)]]
    ts[1][:5] = 0.0  # zeros and ties
    ts[0][0, :3] = ts[2].flatten()[0]
    flat = torch.cat([t.abs().float().flatten() for t in ts]).sort().values
    for k in [1, 2, 7, 20, 33, 50, len(flat)]:
        assert kth_smallest_abs(ts, k) == flat[k - 1].item()


def test_global_masks_exact_and_consistent():
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(10, 10, generator=g) * scale for scale in (0.1, 1.0, 10.0)]
    masks = global_magnitude_masks(ws, 0.6)
    assert sum(int((~m).sum()) for m in masks) == 180
    pruned = torch.cat([w[~m].abs() for w, m in zip(ws, masks)])
    kept = torch.cat([w[m].abs() for w, m in zip(ws, masks)])
    assert pruned.max() <= kept.min()
    assert (~masks[0]).sum() > (~masks[2]).sum()  # small-scale matrix loses more
    threshold, k = global_threshold(ws, 0.6)
    assert k == 180 and threshold == pytest.approx(pruned.max().item())
    single = [torch.tensor([1.0, 1.0, 1.0, 2.0])]
    assert global_magnitude_masks(single, 0.5)[0].tolist() == [False, False, True, True]


def tiny(arch="llama"):
    torch.manual_seed(0)
    if arch == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                              bos_token_id=0, eos_token_id=0))
    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=100))


def ctx_for(model, tmp_path):
    return RunContext(run_id="t", model=model, tokenizer=None, task="causal_lm", data={}, device=torch.device("cpu"),
                      dtype=torch.float32, seed=0, workdir=tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_layer_exact(tmp_path, arch):
    model = tiny(arch)
    ctx = ctx_for(model, tmp_path)
    lm_head = model.lm_head.weight.detach().clone()
    result = Magnitude().apply(ctx, Magnitude.Params(sparsity=0.3))
    modules = prunable_modules(model)
    assert len(ctx.masks) == len(modules) == result.metrics["modules_pruned"]
    for name, m in modules:
        keep = ctx.masks.get(f"{name}.weight")
        assert keep.shape == m.weight.shape  # Conv1D masks follow the parameter's [in, out]
        assert int((m.weight == 0).sum()) == int((~keep).sum()) == prune_count(m.weight.numel(), 0.3)
    assert torch.equal(model.lm_head.weight, lm_head)
    assert result.metrics["sparsity"] == pytest.approx(0.3, abs=1e-3)


def test_global_exact_and_targets(tmp_path):
    model = tiny()
    ctx = ctx_for(model, tmp_path)
    result = Magnitude().apply(ctx, Magnitude.Params(sparsity=0.5, scope="global", targets=[r"mlp\."]))
    modules = prunable_modules(model, [r"mlp\."])
    n = sum(m.weight.numel() for _, m in modules)
    assert sum(int((m.weight == 0).sum()) for _, m in modules) == n // 2 == result.metrics["weights_pruned"]
    assert not any("self_attn" in name for name, _ in ctx.masks.items())
    # pruning again at a lower target keeps every weight pruned before
    Magnitude().apply(ctx, Magnitude.Params(sparsity=0.2, scope="global", targets=[r"mlp\."]))
    assert sum(int((m.weight == 0).sum()) for _, m in modules) == n // 2


def test_params_and_errors(tmp_path):
    for bad in [dict(sparsity=0), dict(sparsity=1.0), dict(sparsity=0.5, targets=["("]),
                dict(sparsity=0.5, scope="row"), dict(sparsity=0.5, spars=1)]:
        with pytest.raises(ValidationError):
            Magnitude.Params(**bad)
    with pytest.raises(SparsifyError, match="no Linear/Conv1D module matches"):
        Magnitude().apply(ctx_for(tiny(), tmp_path), Magnitude.Params(sparsity=0.5, targets=["nothing_here"]))
