"""Activation predictors: the fitting math alone, then the layout_convert option end to end."""
from __future__ import annotations

import pytest
import torch

from helpers import make_ctx, run_here, tiny_model, tiny_recipe, write
from sparsify_core import load_output
from sparsify_kernels import ffn as K
from sparsify_plugins.layouts import ActivationPredictor, ActivationSparseFFN, ActivationSparseFFNConvert
from sparsify_plugins.layouts import predictor as P


def _lowdim(n, d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) @ torch.randn(k, d, generator=g)


def test_fit_is_exact_when_inputs_span_no_more_than_the_rank():
    x = _lowdim(300, 24, 3)
    w, b = torch.randn(40, 24), torch.randn(40)
    pre = x @ w.T + b
    for rank in (3, 5):  # rank >= the inputs' dimension: the pre-activations are reproduced
        pred = P.fit_lowrank(x, w, b, rank, offset=0.5)
        assert pred.p_in.shape == (rank, 24) and pred.p_out.shape == (40, rank)
        same = (pred.logits(x) >= 0) == (pre >= 0.5)
        assert same.float().mean() > 0.999
    low = P.fit_lowrank(x, w, b, 1, offset=0.5)  # rank 1 < 3: not exact
    assert ((low.logits(x) >= 0) != (pre >= 0.5)).any()


def test_fit_is_the_truncated_svd_in_units_of_its_error():
    x = torch.randn(500, 16) * torch.linspace(2, 0.1, 16)
    w, b = torch.randn(30, 16), torch.randn(30)
    pred = P.fit_lowrank(x, w, b, 4, offset=0.2)
    mu = x.mean(0)
    y = (x - mu) @ w.T
    v = torch.linalg.svd(y, full_matrices=False).Vh[:4].T  # the best rank-4 approximation (Eckart-Young)
    best = y @ v @ v.T
    expected = (best + mu @ w.T + b - 0.2) / (y - best).std(0)
    torch.testing.assert_close(pred.logits(x), expected, atol=1e-3, rtol=1e-3)


def test_threshold_for_recall_is_the_largest_meeting_it():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 60, generator=g)
    active = (logits + torch.randn(50, 60, generator=g)) > 1.0
    for recall in (0.5, 0.9, 0.99, 1.0):
        t = P.threshold_for_recall(logits, active, recall)
        assert P.coverage(logits >= t, active)["recall"] >= recall
        assert P.coverage(logits >= t + 1e-4, active)["recall"] < recall  # any higher one misses it
    assert P.threshold_for_recall(logits, torch.zeros_like(active), 0.9) > logits.max()


def test_coverage_counts_pairs_and_mass():
    selected = torch.tensor([[True, True, False, False]])
    active = torch.tensor([[True, False, True, False]])
    mass = torch.tensor([[3.0, 0.0, 1.0, 0.0]])
    c = P.coverage(selected, active, mass)
    assert c == {"recall": 0.5, "computed": 0.5, "active": 0.5, "mass_recall": 0.75}


def test_refine_lowers_the_cross_entropy():
    x = torch.randn(400, 12)
    w = torch.randn(20, 12)
    active = x @ w.T > 0.3
    start = P.Predictor(torch.randn(3, 12) * 0.01, torch.randn(20, 3) * 0.01, torch.zeros(20))
    _, before, after = P.refine(start, x, active, steps=100, lr=1e-2)
    assert after < before - 0.05


def _converted(tmp_path, predictor=None, samples=16):
    model = tiny_model("llama")
    from sparsify_plugins.activation import ReLU
    ReLU()._substitute(model, ReLU.Params())
    model.eval()
    ctx = make_ctx(tmp_path, model, samples=samples, seq_len=16)
    params = ActivationSparseFFNConvert.Params(predictor=predictor)
    res = ActivationSparseFFNConvert().apply(ctx, params)
    return model, ctx, params, res


def test_predictor_stage_fits_reports_recall_and_rebuilds(tmp_path):
    model, ctx, params, res = _converted(tmp_path, {"rank": 8, "recall": 0.9, "max_tokens": 256})
    ffns = [m for m in model.modules() if isinstance(m, ActivationSparseFFN)]
    assert len(ffns) == 2 and all(isinstance(f.predictor, ActivationPredictor) and f.predictor.rank == 8 for f in ffns)
    m = res.metrics
    assert 0.8 <= m["predictor_recall"] <= 1.0 and 0 < m["predictor_mass_recall"] <= 1.0
    assert m["predictor_active_fraction"] <= m["predictor_computed_fraction"] < 1.0
    assert set(res.info["predictors"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        full = model(ids).logits  # 9 tokens: the dense path, masked by the predictor
        steps = torch.cat([model(ids[:, :t + 1]).logits[:, -1:] for t in range(3)], 1)
    torch.testing.assert_close(steps, full[:, :3], atol=1e-4, rtol=1e-4)  # decode (fast path) = same function
    rebuilt = tiny_model("llama")
    from sparsify_plugins.activation import ReLU
    ReLU()._substitute(rebuilt, ReLU.Params())
    ActivationSparseFFNConvert().rebuild(make_ctx(tmp_path, rebuilt), params, res)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(ids).logits, full)


@pytest.mark.skipif(not K.cpu_kernel_available(), reason="no native kernels")
def test_predicted_block_matches_its_reference_on_one_token(tmp_path):
    model, *_ = _converted(tmp_path, {"rank": 4, "recall": 0.8, "max_tokens": 128})
    ffn = next(m for m in model.modules() if isinstance(m, ActivationSparseFFN))
    x = torch.randn(1, 1, 32)
    p = ffn.predictor
    sel = K.predict(x, p.p_in, p.p_out, p.p_bias, p.threshold_value())
    ref = K.ffn_reference(x, ffn.gate_proj.weight, None, ffn.up_proj.weight, None, ffn.down_proj.weight, None,
                          select=sel)
    exact = K.ffn_reference(x, ffn.gate_proj.weight, None, ffn.up_proj.weight, None, ffn.down_proj.weight, None)
    with torch.no_grad():
        out = ffn(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not sel.all()  # the predictor did skip neurons
    assert (exact - ref).abs().max() > 0 or bool((sel | (x @ ffn.gate_proj.weight.T <= 0)).all())


def test_predictor_needs_gated_blocks(tmp_path):
    from sparsify_core.errors import SparsifyError
    model = tiny_model("gpt2")
    from sparsify_plugins.activation import ReLU
    ReLU()._substitute(model, ReLU.Params())
    ctx = make_ctx(tmp_path, model)
    with pytest.raises(SparsifyError, match="only gated FFN blocks"):
        ActivationSparseFFNConvert().apply(ctx, ActivationSparseFFNConvert.Params(predictor={"rank": 4}))


RECIPE = tiny_recipe("""\
  - kind: substitute_activation
    method: relu
  - kind: layout_convert
    method: activation_sparse_ffn
    params: {predictor: {rank: 8, recall: 0.95}}
""", name="pred", seq_len=16, splits={"calibration": {"samples": 8}, "eval": {"samples": 2, "offset": 8}},
    evaluate={"metrics": ["perplexity"], "after": "last"}, output={"dir": "out"})


def test_run_saves_and_loads_the_predictors(workdir):
    write(workdir / "p.yaml", RECIPE)
    run_here(workdir / "p.yaml")
    out = load_output(workdir / "out")
    ffns = [m for m in out.model.modules() if isinstance(m, ActivationSparseFFN)]
    assert len(ffns) == 2 and all(f.predictor is not None and f.predictor.rank == 8 for f in ffns)
    assert all(float(f.predictor.p_out.abs().sum()) > 0 for f in ffns)  # fitted values, not the empty shells
    from sparsify_core.registry import Registry
    with Registry() as reg:
        (run,) = reg.find_runs()
    recorded = {m.name for m in run.metrics}
    assert {"predictor_recall", "predictor_mass_recall", "predictor_computed_fraction"} <= recorded
