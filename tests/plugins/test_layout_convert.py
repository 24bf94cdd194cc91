"""layout_convert: modules match the unconverted model, save and load back, fall back loudly."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from helpers import sparsify, write
from sparsify_core import load_output
from sparsify_core.errors import SparsifyError
from sparsify_kernels import ffn as ffn_kernels
from sparsify_plugins.layouts import modules as M
from sparsify_plugins.layouts.weight import CSR, NM

RECIPE = """\
name: lc
seed: 0
model:
  source: tiny
  params: {{arch: {arch}, hidden_size: 32, intermediate_size: 64, layers: 2, heads: 4}}
data:
  source: pydoc
  seq_len: 16
  splits:
    eval: {{samples: 2}}
stages:
  - kind: substitute_activation
    method: relu
{extra}evaluate:
  metrics: [perplexity, activation_sparsity]
  after: last
output:
  dir: out-{{name}}
"""

CONVERT = """\
  - kind: prune
    method: nmg
    params: {n: 2, m: 4, g: 2}
  - kind: layout_convert
    method: activation_sparse_ffn
  - kind: layout_convert
    method: nm
    params: {n: 2, m: 4, targets: ["self_attn|attn|attention"]}
"""

def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits if hasattr(model(ids), "logits") else model(ids).last_hidden_state


def _tiny(arch):
    from sparsify_plugins.activation import ReLU
    from sparsify_plugins.sources.models import Tiny
    p = Tiny.Params(arch=arch, hidden_size=32, intermediate_size=64, layers=2, heads=4)
    model = Tiny().load(p, device=torch.device("cpu"), dtype=torch.float32).model.eval()
    ReLU()._substitute(model, ReLU.Params())
    return model


def _ctx(model, tmp_path):
    from sparsify_core import RunContext
    return RunContext(run_id="t", model=model, tokenizer=None, task="causal_lm", data={},
                      device=torch.device("cpu"), dtype=torch.float32, seed=0, workdir=tmp_path)


def test_run_convert_save_load_matches_unconverted(workdir):
    """`sparsify run` with layout_convert stages; the loaded output matches the same model unconverted."""
    from sparsify_plugins.layouts import NMGPrune
    write(workdir / "conv.yaml", RECIPE.format(arch="llama", extra=CONVERT).replace("out-{name}", "out-conv"))
    proc = sparsify("run", "conv.yaml", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    conv = load_output(workdir / "out-conv")
    kinds = {type(m).__name__ for m in conv.model.modules()}
    assert {"SparseLinear", "ActivationSparseFFN", "TransposedLinear"} <= kinds
    plain = _tiny("llama")  # the same seed and stages, without the conversions
    NMGPrune().apply(_ctx(plain, workdir), NMGPrune.Params(n=2, m=4, g=2))
    ids = torch.randint(0, 200, (1, 12))
    torch.testing.assert_close(_logits(conv.model, ids), _logits(plain, ids), atol=1e-4, rtol=1e-4)
    for t in range(3):  # decode: one token at a time through the fast kernels
        one = ids[:, t:t + 1]
        torch.testing.assert_close(_logits(conv.model, one), _logits(plain, one), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_convert_in_process_and_rebuild(tmp_path, arch):
    """Every conversion on plain (Conv1D and Linear) and gated FFNs, then rebuild + load_state_dict."""
    from sparsify_plugins.layouts import ActivationSparseFFNConvert, NMGPrune
    from sparsify_plugins.layouts.convert import weight_methods

    model = _tiny(arch)
    ctx = _ctx(model, tmp_path)
    NMGPrune().apply(ctx, NMGPrune.Params(n=2, m=4, g=2))
    ids = torch.randint(0, 200, (1, 7))
    ref = _logits(model, ids), _logits(model, ids[:, :1])
    methods = {m.name: m for m in weight_methods()}
    stages = [(ActivationSparseFFNConvert(), ActivationSparseFFNConvert.Params()),
              (methods["nmg"](), methods["nmg"].Params(n=2, m=4, g=2, targets=["q_proj|c_attn"])),
              (methods["csr"](), methods["csr"].Params(targets=["k_proj|attn.c_proj"])),
              (methods["bsr"](), methods["bsr"].Params(block=(8, 8), targets=["v_proj|o_proj|out_proj|c_fc"]))]
    results = []
    for method, params in stages:
        results.append(method.apply(ctx, params))
        ctx.masks.apply(model)  # as the runner does after every stage: masks must still fit
    out = _logits(model, ids), _logits(model, ids[:, :1])
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    rebuilt = _tiny(arch)
    ctx2 = _ctx(rebuilt, tmp_path)
    for (method, params), res in zip(stages, results):
        method.rebuild(ctx2, params, res)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(_logits(rebuilt.eval(), ids), ref[0], atol=1e-4, rtol=1e-4)


def _gated_ffn(d=16, dff=40, act=None):
    torch.manual_seed(0)
    gate, up, down = nn.Linear(d, dff, bias=False), nn.Linear(d, dff, bias=False), nn.Linear(dff, d, bias=False)
    act = act or nn.ReLU()
    dense = lambda x: down(act(gate(x)) * up(x))  # noqa: E731
    return M.ActivationSparseFFN(gate, up, M.TransposedLinear.from_linear(down), act), dense


@pytest.mark.skipif(not ffn_kernels.cpu_kernel_available(), reason="no native kernels")
def test_activation_sparse_ffn_module_matches_dense_and_respects_hooks():
    ffn, dense = _gated_ffn()
    for shape in [(1, 1, 16), (2, 3, 16), (1, 40, 16)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(ffn(x), dense(x), atol=1e-5, rtol=1e-5)
    seen = []
    h = ffn.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        ffn(torch.randn(1, 1, 16))
    h.remove()
    assert len(seen) == 1  # hooked: the dense path ran, so activation metrics see x1


def test_activation_spec_recognises_thresholds():
    from sparsify_plugins.activation.threshold import FATReLUModule, MagnitudeThreshold
    assert M.activation_spec(nn.ReLU()) == ("relu", 0.0, 0.0)
    assert M.activation_spec(FATReLUModule(0.01)) == ("relu", 0.01, 0.0)
    assert M.activation_spec(MagnitudeThreshold(nn.SiLU(), 0.2)) == ("silu", 0.0, 0.2)
    assert not M.is_sparse_activation(M.activation_spec(nn.SiLU()))


def test_dense_fallback_warns_once_and_strict_raises(monkeypatch):
    w = torch.randn(8, 12) * (torch.rand(8, 12) > 0.5)
    lin = M.SparseLinear(CSR.from_dense(w), torch.randn(8))
    x = torch.randn(3, 12, dtype=torch.float64)
    M._warned.clear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y1 = lin(x)
        lin(x)
    assert sum("no fast kernel" in str(r.message) for r in rec) == 1
    torch.testing.assert_close(y1, x @ w.double().T + lin.bias.double())
    strict = M.SparseLinear(CSR.from_dense(w), None, strict=True)
    with pytest.raises(SparsifyError, match="strict"):
        strict(x)
    monkeypatch.setenv("SPARSIFY_STRICT", "1")
    with pytest.raises(SparsifyError, match="strict"):
        lin(x)


def test_nm_convert_refuses_unpruned_weights(tmp_path):
    from sparsify_plugins.layouts.convert import weight_methods
    nm = next(m for m in weight_methods() if m.name == "nm")
    with pytest.raises(SparsifyError, match="q_proj: not 2:4 sparse"):
        nm().apply(_ctx(_tiny("llama"), tmp_path), nm.Params())


@pytest.mark.parametrize("T", [1, 5, 130])
def test_sparse_linear_kernel_matches_layout_reference(T):
    torch.manual_seed(T)
    from sparsify_plugins.layouts import formats as F
    w = torch.randn(70, 300)
    w = w * F.nm_mask(w, 2, 4)
    lin = M.SparseLinear(NM.from_dense(w), torch.randn(70))
    x = torch.randn(T, 300)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), lin.layout().matmul(x) + lin.bias, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not ffn_kernels.cpu_kernel_available(), reason="no native kernels")
@pytest.mark.parametrize("top_k", [None, 2])
def test_moe_ffn_module_matches_masked_dense(top_k):
    torch.manual_seed(0)
    d, size, E = 16, 8, 5
    gate, up, down = nn.Linear(d, E * size, bias=False), nn.Linear(d, E * size, bias=False), nn.Linear(E * size, d)
    router = nn.Linear(d, E)
    moe = M.MoEFFN(gate, up, M.TransposedLinear.from_linear(down), nn.SiLU(), router, size, tau=0.0, top_k=top_k)
    for shape in [(1, 1, d), (2, 3, d), (1, 20, d)]:
        x = torch.randn(shape)
        sel = moe.selection(x).repeat_interleave(size, -1).float()
        with torch.no_grad():
            ref = down(torch.nn.functional.silu(gate(x)) * up(x) * sel)
            torch.testing.assert_close(moe(x), ref, atol=1e-5, rtol=1e-5)


def _warnings_of(fn, times=2):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        outs = [fn() for _ in range(times)]
    return outs[0], [str(r.message) for r in rec if "no fast kernel" in str(r.message)]


@pytest.mark.parametrize("why", ["float64", "no native kernels"])
def test_every_module_falls_back_once_or_fails_in_strict_mode(monkeypatch, why):
    """ActivationSparseFFN (with and without predictor), MoEFFN and TransposedLinear: dense, warned once; strict raises."""
    torch.manual_seed(0)
    d, size, E = 16, 8, 5
    dtype = torch.float64 if why == "float64" else torch.float32
    if why == "no native kernels":
        monkeypatch.setenv("SPARSIFY_NO_NATIVE", "1")
    gate, up, down = (nn.Linear(d, E * size, bias=False), nn.Linear(d, E * size, bias=False),
                      nn.Linear(E * size, d, bias=False))
    gate, up, down = gate.to(dtype), up.to(dtype), down.to(dtype)
    pred = M.ActivationPredictor(torch.randn(3, d, dtype=dtype), torch.randn(E * size, 3, dtype=dtype),
                                 torch.zeros(E * size, dtype=dtype), 0.0)
    dense = lambda x, mask=1.0: down(torch.relu(gate(x)) * up(x) * mask)  # noqa: E731
    x = torch.randn(1, 2, d, dtype=dtype)
    x1 = torch.relu(torch.randn(1, 2, E * size, dtype=dtype))
    modules = {
        "activation-sparse FFN": (lambda s: M.ActivationSparseFFN(gate, up, M.TransposedLinear.from_linear(down, s),
                                                                   nn.ReLU(), s), lambda: dense(x)),
        "predicted FFN": (lambda s: M.ActivationSparseFFN(gate, up, M.TransposedLinear.from_linear(down, s),
                                                           nn.ReLU(), s, predictor=pred),
                          lambda: dense(x, pred(x).to(dtype))),
        "MoE FFN": (lambda s: M.MoEFFN(gate, up, M.TransposedLinear.from_linear(down, s), nn.ReLU(),
                                       nn.Linear(d, E).to(dtype), size, tau=0.0, strict=s), None),
        "sparse-input Linear": (lambda s: M.TransposedLinear.from_linear(down, s), lambda: down(x1)),
    }
    for what, (make, ref) in modules.items():
        M._warned.clear()
        mod = make(False)
        inp = x1 if what == "sparse-input Linear" else x
        with torch.no_grad():
            out, msgs = _warnings_of(lambda: mod(inp))
            if ref is not None:
                torch.testing.assert_close(out, ref())
        assert len(msgs) >= 1 and all(m.count("computing densely") == 1 for m in msgs), (what, msgs)
        assert len(msgs) == len(set(msgs)), (what, msgs)  # each reason once, not per call
        with torch.no_grad(), pytest.raises(SparsifyError, match="strict"):
            make(True)(inp)
