"""layout_convert: modules match the unconverted model, save and load back, fall back loudly."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from helpers import run_here, tiny_recipe, write
from sparsify_core import load_output
from sparsify_core.errors import SparsifyError
from sparsify_kernels import ffn as ffn_kernels
from sparsify_plugins.layouts import modules as M
from sparsify_plugins.layouts.weight import CSR, NM

CONVERT_RECIPE = tiny_recipe("""\
  - kind: substitute_activation
    method: relu
  - kind: prune
    method: nmg
    params: {n: 2, m: 4, g: 2}
  - kind: layout_convert
    method: activation_sparse_ffn
  - kind: layout_convert
    method: nm
    params: {n: 2, m: 4, targets: ["self_attn|attn|attention"]}
""", name="lc", seq_len=16, splits={"eval": {"samples": 2}},
    evaluate={"metrics": ["perplexity", "activation_sparsity"], "after": "last"}, output={"dir": "out-conv"})


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
    from sparsify_plugins.prune import NMGPrune
    write(workdir / "conv.yaml", CONVERT_RECIPE)
    run_here(workdir / "conv.yaml")
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
    from sparsify_plugins.layouts import ActivationSparseFFNConvert
    from sparsify_plugins.prune import NMGPrune
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


def _routed_ffn(kind, routing, d=16, size=8, E=5, bias=False, dtype=torch.float32):
    """A RoutedFFN on random weights (LLaMA or GPT-2 attribute names) and its kernel-backed MoEFFN."""
    from sparsify_plugins.moeify.modules import LTERouter, MLPRouter, RoutedFFN
    torch.manual_seed(0)
    dff = E * size
    if kind == "gated":
        parts = {"gate": nn.Linear(d, dff, bias=bias), "up": nn.Linear(d, dff, bias=bias),
                 "down": nn.Linear(dff, d, bias=bias)}
        names, act = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj", "act": "act_fn"}, nn.SiLU()
    else:
        from transformers.pytorch_utils import Conv1D
        parts, act = {"up": Conv1D(dff, d), "down": Conv1D(d, dff)}, nn.GELU(approximate="tanh")
        names = {"up": "c_fc", "down": "c_proj", "act": "act"}
        for m in parts.values():
            nn.init.normal_(m.bias, std=0.1)
    router = (MLPRouter if routing == "top_k" else LTERouter)(d, E)
    for w in router.parameters():
        w.data.mul_(4)  # scores spread away from tau
    routed = RoutedFFN(kind, parts, names, act, router, size, routing, top_k=2 if routing == "top_k" else None)
    routed = routed.to(dtype).eval()
    return routed, M.MoEFFN.from_routed(copy.deepcopy(routed)).eval()


@pytest.mark.skipif(not ffn_kernels.cpu_kernel_available(), reason="no native kernels")
@pytest.mark.parametrize("kind,bias", [("gated", False), ("gated", True), ("plain", True)])
@pytest.mark.parametrize("routing", ["top_k", "threshold"])
def test_moe_ffn_module_matches_routed_ffn(monkeypatch, kind, bias, routing):
    """Kernels (few tokens) and torch gather (many) compute what the RoutedFFN computes, selection hooks included."""
    routed, moe = _routed_ffn(kind, routing, bias=bias)
    moe.strict = True  # a silent fallback would fail here
    calls = []
    kernel = ffn_kernels.ffn_moe
    monkeypatch.setattr(ffn_kernels, "ffn_moe", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    seen = []
    moe.register_selection_hook(lambda m, x, scores, sel: seen.append(sel.float().mean().item()))
    for shape in [(1, 1, 16), (2, 3, 16), (1, 16, 16), (1, 40, 16)]:
        x = torch.randn(shape)
        with torch.no_grad():
            ref = routed(x)
            torch.testing.assert_close(moe(x), ref, atol=1e-5, rtol=1e-5)
            routed.path = "masked"
            torch.testing.assert_close(routed(x), ref, atol=1e-5, rtol=1e-5)
            routed.path = "gather"
    assert len(calls) == 3 and len(seen) == 4  # the kernel for up to 16 tokens, torch gather for 40
    if routing == "threshold":
        assert 0 < min(seen) and max(seen) < 1
    x = torch.randn(2, 3, 16, requires_grad=True)  # training: autograd through the torch path
    moe(x).sum().backward()
    assert x.grad is not None and len(calls) == 3


def _moeify_tiny(arch, routing, size=8, seed=0):
    """The tiny model with every FFN split into random experts and routed (top_k 3 of 8, or tau 0.5)."""
    from sparsify_core.ffn import find_ffn_blocks
    from sparsify_plugins.layouts.convert import _set_module
    from sparsify_plugins.moeify.modules import LTERouter, MLPRouter, RoutedFFN
    from sparsify_plugins.sources.models import Tiny
    p = Tiny.Params(arch=arch, hidden_size=32, intermediate_size=64, layers=2, heads=4)
    model = Tiny().load(p, device=torch.device("cpu"), dtype=torch.float32).model.eval()
    g = torch.Generator().manual_seed(seed)
    for b in find_ffn_blocks(model):
        E = b.d_ff // size
        torch.manual_seed(seed + b.index)
        router = (MLPRouter if routing == "top_k" else LTERouter)(b.d_model, E)
        for w in router.parameters():
            w.data.mul_(4)
        m = RoutedFFN.from_block(b, torch.randperm(b.d_ff, generator=g) % E, router, size)
        m.set_routing(routing, top_k=3, tau=0.5)
        _set_module(model, b.name, m.eval())
    return model


@pytest.mark.skipif(not ffn_kernels.cpu_kernel_available(), reason="no native kernels")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("routing", ["top_k", "threshold"])
def test_moe_ffn_convert_matches_routed_model_and_rebuilds(monkeypatch, tmp_path, arch, routing):
    """layout_convert/moe_ffn on gated (llama) and plain Conv1D (gpt2) FFNs: same logits, decode included."""
    from sparsify_plugins.layouts import MoEFFNConvert
    from sparsify_plugins.moeify import RoutedFFN
    model = _moeify_tiny(arch, routing)
    routed = copy.deepcopy(model)
    ctx = _ctx(model, tmp_path)
    params = MoEFFNConvert.Params(strict=True)
    result = MoEFFNConvert().apply(ctx, params)
    ctx.masks.apply(model)
    assert result.metrics["blocks_converted"] == 2
    assert all(type(m).__name__ == "MoEFFN" and m.routing == routing for m in model.modules() if hasattr(m, "router"))
    calls = []
    for name in ("ffn_moe", "ffn_moe_threshold"):  # top_k: selection, then the kernel; threshold: one kernel call
        def counted(*a, kernel=getattr(ffn_kernels, name), name=name, **k):
            y = kernel(*a, **k)
            calls.extend([name] if y is not None else [])
            return y
        monkeypatch.setattr(ffn_kernels, name, counted)
    for ids in (torch.randint(0, 200, (1, 1)), torch.randint(0, 200, (2, 5)), torch.randint(0, 200, (1, 40))):
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, routed(ids).logits, atol=1e-4, rtol=1e-4)
    # 1 and 2x5 tokens through the kernel in both layers; 40 through torch gather
    assert calls == 2 * 2 * ["ffn_moe_threshold" if routing == "threshold" else "ffn_moe"]
    rebuilt = _moeify_tiny(arch, routing, seed=1)  # other experts, routing dense: the rebuild restores the recorded
    for m in rebuilt.modules():
        if isinstance(m, RoutedFFN):
            m.set_routing("dense")
    MoEFFNConvert().rebuild(_ctx(rebuilt, tmp_path), params, result)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    ids = torch.randint(0, 200, (1, 7))
    torch.testing.assert_close(_logits(rebuilt.eval(), ids), _logits(routed, ids), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_logits(rebuilt, ids[:, :1]), _logits(routed, ids[:, :1]), atol=1e-4, rtol=1e-4)


def test_moe_ffn_convert_refuses_unrouted_models(tmp_path):
    from sparsify_plugins.layouts import MoEFFNConvert
    with pytest.raises(SparsifyError, match="run a moeify stage"):
        MoEFFNConvert().apply(_ctx(_tiny("llama"), tmp_path), MoEFFNConvert.Params())
    model = _moeify_tiny("llama", "threshold")
    for m in model.modules():
        if hasattr(m, "set_routing"):
            m.set_routing("soft")
    with pytest.raises(SparsifyError, match="routes 'soft'"):
        MoEFFNConvert().apply(_ctx(model, tmp_path), MoEFFNConvert.Params())


MOE_RECIPE = tiny_recipe("""\
  - kind: moeify
    method: param_cluster
    params: {expert_size: 8, router: lte, fit: {epochs: 2}}
  - kind: layout_convert
    method: moe_ffn
    params: {strict: true}
""", name="moe-lc", seq_len=16, splits={"calibration": {"samples": 8}, "eval": {"samples": 2}},
    # batch_size 1: 16 tokens a forward, so the converted model evaluates through the kernel (strict: no fallback)
    evaluate={"metrics": ["perplexity", "expert_sparsity", "router_recall", "ffn_flops_per_token"], "after": "all",
              "batch_size": 1},
    output={"dir": "out-moe"})


@pytest.mark.skipif(not ffn_kernels.cpu_kernel_available(), reason="no native kernels")
def test_run_moeify_then_moe_ffn_layout_matches_and_loads_back(workdir):
    """`sparsify run`: moeify -> layout_convert/moe_ffn evaluates as before the conversion, and loads back."""
    from sparsify_core.registry import Registry
    write(workdir / "moe.yaml", MOE_RECIPE)
    run_here(workdir / "moe.yaml")
    (run,) = Registry(f"sqlite:///{workdir}/registry.db").find_runs()
    metrics = {}
    for m in run.metrics:
        if m.layer is None and m.step is None:
            metrics.setdefault(m.stage, {})[m.name] = m.value
    before, after = metrics["param_cluster"], metrics["moe_ffn"]
    for name in ("perplexity", "expert_sparsity", "router_recall", "ffn_flops_per_token"):
        assert after[name] == pytest.approx(before[name], rel=1e-5), name
    assert 0 < after["expert_sparsity"] < 1
    out = load_output(workdir / "out-moe")
    moe = [m for m in out.model.modules() if type(m).__name__ == "MoEFFN"]
    assert len(moe) == 2 and all(m.routing == "threshold" and m.strict for m in moe)
    ids = torch.randint(0, 200, (1, 9))
    fast = [_logits(out.model, ids)] + [_logits(out.model, ids[:, t:t + 1]) for t in range(2)]
    for m in moe:
        m.path = "masked"  # RoutedFFN's reference path: every neuron, unselected experts zeroed
    ref = [_logits(out.model, ids)] + [_logits(out.model, ids[:, t:t + 1]) for t in range(2)]
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


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
    moe_ref, _ = _routed_ffn("gated", "threshold", d, size, E, dtype=dtype)
    moe_ref.path = "masked"
    x = torch.randn(1, 2, d, dtype=dtype)
    x1 = torch.relu(torch.randn(1, 2, E * size, dtype=dtype))
    modules = {
        "activation-sparse FFN": (lambda s: M.ActivationSparseFFN(gate, up, M.TransposedLinear.from_linear(down, s),
                                                                   nn.ReLU(), s), lambda: dense(x)),
        "predicted FFN": (lambda s: M.ActivationSparseFFN(gate, up, M.TransposedLinear.from_linear(down, s),
                                                           nn.ReLU(), s, predictor=pred),
                          lambda: dense(x, pred(x).to(dtype))),
        "MoE FFN": (lambda s: M.MoEFFN.from_routed(moe_ref, s), lambda: moe_ref(x)),
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


@pytest.mark.skipif(not ffn_kernels.cpu_kernel_available(), reason="no native kernels")
def test_gate_screen_is_exact_follows_weight_changes_and_backs_off(monkeypatch):
    from sparsify_plugins.activation.threshold import FATReLUModule
    act = FATReLUModule(0.9)  # gates ~N(0, 0.58): ~6% active, few candidates
    ffn, dense = _gated_ffn(d=64, dff=200, act=act)
    ffn.gate_screen = True
    used = []
    for name in ("ffn_screened", "ffn_planes"):
        real = getattr(ffn_kernels, name)
        monkeypatch.setattr(ffn_kernels, name, lambda *a, _n=name, _r=real, **k: used.append(_n) or _r(*a, **k))
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(1, 1, 64)
            torch.testing.assert_close(ffn(x), dense(x), atol=1e-5, rtol=1e-5)
        # the first call in planes; it finds few candidates, so the next ones take the two-pass kernel
        assert used == ["ffn_planes", "ffn_screened", "ffn_screened"] and ffn._screen is not None
        assert ffn._screen_skip == 0 and ffn._screen_frac <= ffn.SCREEN_TWO_PASS
        ffn.gate_proj.weight.mul_(-1.0)  # in place: a stale screen would rule out the wrong neurons
        x = torch.randn(1, 1, 64)
        torch.testing.assert_close(ffn(x), dense(x), atol=1e-5, rtol=1e-5)
        assert len(used) == 4
        ffn(torch.randn(1, 2, 64))  # two tokens: never screened
        assert len(used) == 4
        act.threshold = 0.3  # ~30% active: candidates between SCREEN_TWO_PASS and SCREEN_MAX_CANDIDATES
        for _ in range(2):
            torch.testing.assert_close(ffn(x), dense(x), atol=1e-5, rtol=1e-5)
        assert used[-1] == "ffn_planes" and ffn.SCREEN_TWO_PASS < ffn._screen_frac <= ffn.SCREEN_MAX_CANDIDATES
        with monkeypatch.context() as mp:  # the planes are ffn_sparse bit for bit
            mp.setattr(ffn, "gate_screen", False)
            plain = ffn(x)
        assert torch.equal(ffn(x), plain) and used[-1] == "ffn_planes"
        act.threshold = -1.0  # nearly every neuron a candidate, more than SCREEN_MAX_CANDIDATES
        torch.testing.assert_close(ffn(x), dense(x), atol=1e-5, rtol=1e-5)
        n = len(used)
        assert ffn._screen_skip == ffn.SCREEN_BACKOFF  # so the next calls skip it
        torch.testing.assert_close(ffn(x), dense(x), atol=1e-5, rtol=1e-5)
        assert len(used) == n and ffn._screen_skip == ffn.SCREEN_BACKOFF - 1


def test_gate_screen_param_reaches_the_modules_and_their_rebuild(tmp_path):
    from sparsify_plugins.layouts import ActivationSparseFFNConvert
    model = _tiny("llama")
    params = ActivationSparseFFNConvert.Params(gate_screen=True)
    res = ActivationSparseFFNConvert().apply(_ctx(model, tmp_path), params)
    ffns = [m for m in model.modules() if isinstance(m, M.ActivationSparseFFN)]
    assert ffns and all(m.gate_screen for m in ffns)
    rebuilt = _tiny("llama")
    ActivationSparseFFNConvert().rebuild(_ctx(rebuilt, tmp_path), params, res)
    assert all(m.gate_screen for m in rebuilt.modules() if isinstance(m, M.ActivationSparseFFN))
    assert not ActivationSparseFFNConvert.Params().gate_screen
