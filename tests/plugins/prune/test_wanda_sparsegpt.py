"""Wanda and SparseGPT: OBS math on small tensors, the methods on tiny models, and recipes end to end."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_ctx, tiny_model, tiny_recipe, write

from sparsify_core import load_output
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import prunable_modules, weight_out_in
from sparsify_plugins.prune import (Magnitude, SparseGPT, Wanda, hessian_factor, magnitude_mask, nm_mask,
                                    reconstruction_error, row_mask, sparsegpt_prune, wanda_scores)


def layer_problem(seed=0, rows=24, cols=64, tokens=512):
    """A random weight and correlated, unevenly scaled inputs, with their Hessian X^T X."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g) @ mix * torch.rand(cols, generator=g) * 3
    return torch.randn(rows, cols, generator=g), x, x.T @ x


def sequential_obs(w, h, prune, dampening=0.01):
    """Textbook OBS with a fixed mask: eliminate columns left to right, downdating the inverse Hessian."""
    w, h = w.double().clone(), h.double().clone()
    h += dampening * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    for i in range(w.shape[1]):
        err = torch.where(prune[:, i], w[:, i], 0.0) / hinv[i, i]
        w -= err[:, None] * hinv[i][None, :]
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    w[prune] = 0
    return w


# -- pure functions ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(sparsity=0.5, block_size=16), dict(sparsity=0.37, block_size=40),
                                dict(nm=(2, 4), block_size=16), dict(nm=(1, 8), block_size=64)])
def test_sparsegpt_is_sequential_obs(kw):
    w, _, h = layer_problem()
    new, keep = sparsegpt_prune(w, h, **kw)
    torch.testing.assert_close(new.double(), sequential_obs(w, h, ~keep), rtol=0, atol=1e-5)


def test_sparsegpt_exact_structure():
    w, _, h = layer_problem(1)
    new, keep = sparsegpt_prune(w, h, sparsity=0.43, block_size=24)
    assert int((~keep).sum()) == int(0.43 * w.numel() + 0.5) and torch.all(new[~keep] == 0)
    new, keep = sparsegpt_prune(w, h, nm=(2, 4))
    assert (keep.view(24, 16, 4).sum(-1) == 2).all() and torch.all(new[~keep] == 0)
    # n:m results do not depend on the block size (the lazy updates are exact)
    other, keep2 = sparsegpt_prune(w, h, nm=(2, 4), block_size=8)
    assert torch.equal(keep, keep2) and torch.allclose(new, other, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude(seed):
    w, x, h = layer_problem(seed)
    sq = x.square().sum(0)
    err = lambda new: reconstruction_error(w, new, h)  # noqa: E731
    sgpt, _ = sparsegpt_prune(w, h, sparsity=0.5)
    assert err(sgpt) < err(w * row_mask(wanda_scores(w, sq), 0.5)) < err(w * magnitude_mask(w, 0.5))
    sgpt, _ = sparsegpt_prune(w, h, nm=(2, 4))
    assert err(sgpt) < err(w * nm_mask(wanda_scores(w, sq), 2, 4)) < err(w * nm_mask(w.abs(), 2, 4))


@pytest.mark.parametrize("sparsity,block_size", [(0.5, 16), (0.3, 24), (0.8, 64)])
def test_sparsegpt_counts_earlier_pruning_in_its_budget(sparsity, block_size):
    """Weights pruned before stay pruned and count: the total is exact even when they crowd one block."""
    w, _, h = layer_problem(3)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    pruned[:, :12] = torch.rand(24, 12, generator=torch.Generator().manual_seed(0)) < 0.9  # dense in block 0
    w[pruned] = 0
    new, keep = sparsegpt_prune(w, h, sparsity=sparsity, block_size=block_size, pruned=pruned)
    assert not keep[pruned].any() and torch.all(new[~keep] == 0)
    assert int((~keep).sum()) == int(sparsity * w.numel() + 0.5)
    torch.testing.assert_close(new.double(), sequential_obs(w, h, ~keep), rtol=0, atol=1e-5)
    new, keep = sparsegpt_prune(w, h, nm=(2, 4), block_size=16, pruned=pruned & (torch.arange(64) % 4 == 0))
    assert (keep.view(24, 16, 4).sum(-1) == 2).all()


def test_dead_inputs_pruned_first_but_only_within_the_budget():
    _, x, h = layer_problem(4, cols=16)
    x[:, :6] = 0  # 6 dead inputs x 4 rows = 24 weights, more than the 16 asked for
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    new, keep = sparsegpt_prune(w, x.T @ x, sparsity=0.25)
    assert int((~keep).sum()) == int((~keep[:, :6]).sum()) == 16  # all 16 from the dead inputs
    assert keep[:, 6:].all() and torch.equal(new[:, :6][keep[:, :6]], w[:, :6][keep[:, :6]])  # kept ones unchanged


def test_hessian_factor_and_dead_inputs():
    _, x, h = layer_problem(2, cols=16)
    u, dead = hessian_factor(h, 0.01)
    damped = h.double() + 0.01 * h.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    assert torch.equal(u, u.triu()) and (u.diagonal() > 0).all() and not dead.any()
    torch.testing.assert_close(u.double().T @ u.double(), torch.linalg.inv(damped), rtol=1e-4, atol=1e-8)
    x[:, 5] = 0  # an input that is never non-zero carries no signal: its weights go
    w = torch.randn(4, 16)
    new, _ = sparsegpt_prune(w, x.T @ x, sparsity=0.25)
    assert torch.all(new[:, 5] == 0)


# -- methods on tiny models -------------------------------------------------------------------

def logits_error(model, reference, ids):
    with torch.no_grad():
        return float((model(input_ids=ids).logits - reference(input_ids=ids).logits).square().mean())


@pytest.mark.parametrize("arch,method,params", [
    ("llama", Wanda, {"sparsity": 0.5}), ("gpt2", Wanda, {"pattern": "2:4"}),
    ("llama", SparseGPT, {"sparsity": 0.5, "block_size": 16}), ("gpt2", SparseGPT, {"sparsity": 0.5}),
    ("llama", SparseGPT, {"pattern": "4:8", "block_size": 16})])
def test_methods_prune_every_target_exactly(tmp_path, arch, method, params):
    model = tiny_model(arch)
    ctx = make_ctx(tmp_path, model, samples=8, seq_len=16)
    lm_head = model.lm_head.weight.detach().clone()
    result = method().apply(ctx, method.Params(**params))
    modules = prunable_modules(model)
    assert len(ctx.masks) == len(modules) == result.metrics["modules_pruned"]
    assert result.metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert result.metrics["calibration_tokens"] == 8 * 16
    for name, module in modules:
        keep = ctx.masks.get(f"{name}.weight")
        assert keep.shape == module.weight.shape
        assert torch.all(module.weight[~keep] == 0)
        w = weight_out_in(module)
        keep_oi = keep.t() if keep.shape != w.shape or arch == "gpt2" else keep
        if "pattern" in params:
            n, m = map(int, params["pattern"].split(":"))
            assert (keep_oi.reshape(w.shape[0], -1, m).sum(-1) == n).all()
        elif method is Wanda:
            assert ((~keep_oi).sum(1) == w.shape[1] // 2).all()  # per output row
    assert torch.equal(model.lm_head.weight, lm_head)


def test_sparsegpt_and_wanda_beat_magnitude_on_the_model_output(tmp_path):
    dense = tiny_model("llama")
    ids = make_ctx(tmp_path, dense, samples=8, seq_len=16).split("eval").input_ids
    errors = {}
    for method, params in [(Magnitude, {"sparsity": 0.6}), (Wanda, {"sparsity": 0.6}),
                           (SparseGPT, {"sparsity": 0.6, "block_size": 16})]:
        model = copy.deepcopy(dense)
        method().apply(make_ctx(tmp_path, model, samples=32, seq_len=16), method.Params(**params))
        errors[method.name] = logits_error(model, dense, ids)
    assert errors["sparsegpt"] < errors["magnitude"] and errors["wanda"] < errors["magnitude"]


def q_proj_input_sq_norms(model, ids):
    norms = []
    q = model.model.layers[1].self_attn.q_proj
    handle = q.register_forward_pre_hook(lambda _m, args: norms.append(args[0].reshape(-1, 32).square().sum(0)))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return norms[0]


def test_wanda_is_sequential(tmp_path):
    """Layer 1 is scored with the input norms it gets from the already pruned layer 0."""
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    ctx = make_ctx(tmp_path, model, samples=8, seq_len=16)
    Wanda().apply(ctx, Wanda.Params(sparsity=0.5))
    ids = ctx.split("calibration").input_ids
    w = dense.model.layers[1].self_attn.q_proj.weight
    # q_proj's input depends on layer 0 only: the pruned model's forward gives the norms Wanda used
    sequential = row_mask(wanda_scores(w, q_proj_input_sq_norms(model, ids)), 0.5)
    one_shot = row_mask(wanda_scores(w, q_proj_input_sq_norms(dense, ids)), 0.5)
    got = ctx.masks.get("model.layers.1.self_attn.q_proj.weight")
    assert torch.equal(got, sequential) and not torch.equal(got, one_shot)


def test_profiles_explicit_and_owl(tmp_path):
    model = tiny_model("llama")
    ctx = make_ctx(tmp_path, model, samples=8, seq_len=16)
    result = Wanda().apply(ctx, Wanda.Params(profile=[0.25, 0.75]))
    per = result.info["module_sparsity"]
    assert all(v == pytest.approx(0.25) for k, v in per.items() if ".layers.0." in k)
    assert all(v == pytest.approx(0.75) for k, v in per.items() if ".layers.1." in k)

    model = tiny_model("llama")
    ctx = make_ctx(tmp_path, model, samples=8, seq_len=16)
    result = Magnitude().apply(ctx, Magnitude.Params(sparsity=0.5, profile="owl", owl_lambda=0.1))
    s = result.info["layer_sparsity"]
    assert sum(s) / 2 == pytest.approx(0.5) and max(s) - min(s) == pytest.approx(0.2)
    assert result.metrics["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_errors(tmp_path):
    ctx = make_ctx(tmp_path, tiny_model("llama"), samples=4, seq_len=8)
    with pytest.raises(SparsifyError, match="outside the transformer layers"):
        Wanda().apply(ctx, Wanda.Params(sparsity=0.5, targets=["lm_head"], exclude=[]))
    with pytest.raises(SparsifyError, match="not a multiple of 5"):
        Wanda().apply(ctx, Wanda.Params(pattern="2:5"))
    with pytest.raises(SparsifyError, match="2 values but there are 2|but there are 2 layers"):
        Wanda().apply(ctx, Wanda.Params(profile=[0.5, 0.5, 0.5]))
    with pytest.raises(SparsifyError, match="needs the data split 'calibration'"):
        SparseGPT().apply(make_ctx(tmp_path, tiny_model("llama"), splits=("eval",)), SparseGPT.Params(sparsity=0.5))


# -- end to end -------------------------------------------------------------------------------

E2E_TRAIN = """\
  - kind: regularize
    method: progressive_l1
    params:
      schedule: [{lambda: 0.0, steps: 3}]
      train: {steps: 3, lr: 0.01, batch_size: 4, checkpoint_every: 0}
"""


def _e2e_recipe(method: str, params: str) -> str:
    """prune/``method`` with ``params``, then a short training stage that must keep the masks."""
    prune = f"  - kind: prune\n    method: {method}\n    params: {params}\n"
    return tiny_recipe(prune + E2E_TRAIN, name="prune-e2e", seed=None,
                       splits={"calibration": {"samples": 8}, "train": {"samples": 8, "offset": 8},
                               "eval": {"samples": 4}},
                       evaluate={"metrics": ["perplexity", "weight_sparsity"], "after": "all"})


@pytest.mark.parametrize("method,params", [("wanda", '{pattern: "2:4"}'),
                                           ("sparsegpt", "{sparsity: 0.5, block_size: 16}")])
def test_recipe_end_to_end_masks_survive_training_and_save(workdir, method, params):
    from sparsify_core.recipe import load_recipe
    from sparsify_core.registry import Registry
    from sparsify_core.runner import Runner

    path = write(workdir / "r.yaml", _e2e_recipe(method, params))
    registry = Registry(f"sqlite:///{workdir}/registry.db")
    run_id = Runner(load_recipe(path), registry, runs_dir=workdir / "runs").run()
    run = registry.get_run(run_id)
    value = {(m.stage, m.name): m.value for m in run.metrics if m.layer is None and m.step is None}
    assert value[(method, "weight_sparsity")] == pytest.approx(0.5, abs=1e-3)
    # the training stage changed the kept weights but not the pruned ones
    assert value[("progressive_l1", "weight_sparsity")] == pytest.approx(0.5, abs=1e-3)
    out = load_output(next(a.path for a in run.artifacts if a.kind == "output"))
    params_by_name = dict(out.model.named_parameters())
    assert len(out.masks) == 14
    for name, keep in out.masks.items():
        assert torch.all(params_by_name[name][~keep] == 0)
        assert params_by_name[name][keep].ne(0).float().mean() > 0.99
