"""LTE threshold routing decided in the MoE kernel (``ffn_moe_threshold``, ``MoEFFN._threshold_decode``).

The kernel takes the router's logits and selects experts itself; it must
select exactly what ``torch.sigmoid(logits) > tau`` selects, hand undecidable
logits back to torch, and the module must keep the general path wherever
something observes it (hooks) or the routing is another one.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sparsify_kernels import ffn as K

pytestmark = pytest.mark.skipif(not K.cpu_kernel_available(), reason="no native kernels")

TAUS = [1e-5, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999, 1 - 1e-5]


@pytest.mark.parametrize("tau", TAUS + [0.123456789, 0.87654321])
def test_logit_bracket_decides_as_torch_sigmoid(tau):
    lo, hi = K.logit_bracket(tau)
    assert lo < math.log(tau / (1 - tau)) < hi
    grid = torch.linspace(lo - 2.0, hi + 2.0, 400_001, dtype=torch.float32)
    ends = torch.tensor([lo, hi], dtype=torch.float32)
    near = torch.cat([ends, torch.nextafter(ends, ends + 1), torch.nextafter(ends, ends - 1)])
    far = torch.tensor([-200.0, -90.0, -30.0, 30.0, 90.0, 200.0, float("inf"), float("-inf")])
    z = torch.cat([grid, near, far])
    torch_sel = torch.sigmoid(z) > tau
    assert bool(torch_sel[z.double() >= hi].all())
    assert not bool(torch_sel[z.double() <= lo].any())


@pytest.mark.parametrize("tau", [0.0, 1.0, 1e-8, 1 - 1e-8, -0.5, 1.5])
def test_logit_bracket_leaves_saturating_taus_to_torch(tau):
    assert K.logit_bracket(tau) is None


def _weights(kind, d, dff, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_in = torch.randn(dff, d, generator=g) / d ** 0.5
    w_up = torch.randn(dff, d, generator=g) / d ** 0.5 if kind == "gated" else None
    w_down_t = torch.randn(dff, d, generator=g) / dff ** 0.5
    b = (lambda n: torch.randn(n, generator=g) * 0.1) if bias else (lambda n: None)
    return w_in, b(dff), w_up, b(dff) if kind == "gated" else None, w_down_t, b(d)


def _decided_logits(T, E, tau, seed):
    """Random logits [T, E] around logit(tau), none inside the kernel's bracket."""
    lo, hi = K.logit_bracket(tau)
    z = torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 3 + math.log(tau / (1 - tau))
    inside = (z.double() > lo) & (z.double() < hi)
    return torch.where(inside, torch.tensor(hi + 1e-3), z).float()


# every activation x FFN kind x bias; dReLU (ReLU on gate and up) only with ReLU
FFNS = [(act, kind, bias, False) for act in sorted(K.ACTIVATIONS)
        for kind, bias in (("gated", False), ("gated", True), ("plain", True))] + [("relu", "gated", False, True)]


@pytest.mark.parametrize("act,kind,bias,up_relu", FFNS)
@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("tau", [0.2, 0.5, 0.9])
def test_threshold_kernel_equals_ffn_moe_on_torch_selection(act, kind, bias, up_relu, T, tau):
    d, size, E = 40, 8, 7
    w_in, b_in, w_up, b_up, w_down_t, b_down = _weights(kind, d, size * E, bias, seed=T)
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(100 + T))
    logits = _decided_logits(T, E, tau, seed=T)
    args = dict(act=act, threshold=0.05 if act == "relu" else 0.0, expert_size=size, up_relu=up_relu)
    y = K.ffn_moe_threshold(x, logits, tau, w_in, b_in, w_up, b_up, w_down_t, b_down, **args)
    selected = torch.sigmoid(logits) > tau
    ref = K.ffn_moe(x, w_in, b_in, w_up, b_up, w_down_t, b_down, experts=selected, **args)
    assert y is not None and torch.equal(y, ref)  # same selection, same kernel: the same bits
    torch.testing.assert_close(y, K.ffn_reference(x, w_in, b_in, w_up, b_up, w_down_t, b_down, act=act,
                                                  threshold=args["threshold"], up_relu=up_relu,
                                                  select=K.expert_neurons(selected, size)), atol=1e-5, rtol=1e-5)


def test_threshold_kernel_hands_back_what_it_cannot_decide():
    d, size, E, tau = 16, 4, 5, 0.5
    w_in, b_in, w_up, b_up, w_down_t, b_down = _weights("gated", d, size * E, False)
    x = torch.randn(1, d)
    logits = _decided_logits(1, E, tau, seed=0)

    def run(x=x, logits=logits, tau=tau, w_in=w_in):
        return K.ffn_moe_threshold(x, logits, tau, w_in, b_in, w_up, b_up, w_down_t, b_down, act="silu",
                                   expert_size=size)

    assert run() is not None
    for bad in (0.0, 5e-5, -5e-5, float("nan")):  # inside the bracket around logit(0.5) = 0, or NaN
        z = logits.clone()
        z[0, 2] = bad
        assert run(logits=z) is None
    assert run(tau=1e-9) is None  # no bracket: torch decides
    assert run(x=torch.randn(17, d), logits=_decided_logits(17, E, tau, 1)) is None  # more than MAX_TOKENS
    assert run(x=torch.randn(d, 2).t()[:1]) is None  # not contiguous
    assert run(x=x.double()) is None
    with pytest.raises(ValueError, match="do not cover"):
        run(logits=logits[:, :3])  # E x size must cover d_ff
    with pytest.raises(ValueError, match="do not cover"):
        run(logits=_decided_logits(2, E, tau, 1))  # two tokens' logits for one token


def _moe(routing="threshold", router="lte", d=16, size=8, E=6, seed=0):
    from sparsify_plugins.layouts.modules import MoEFFN
    from sparsify_plugins.moeify.modules import LTERouter, MLPRouter, RoutedFFN
    torch.manual_seed(seed)
    dff = E * size
    parts = {"gate": nn.Linear(d, dff, bias=False), "up": nn.Linear(d, dff, bias=False),
             "down": nn.Linear(dff, d, bias=False)}
    names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj", "act": "act_fn"}
    r = (MLPRouter if router == "mlp" else LTERouter)(d, E)
    for w in r.parameters():
        w.data.mul_(4)  # scores spread away from tau
    routed = RoutedFFN("gated", parts, names, nn.SiLU(), r, size, routing, top_k=2 if routing == "top_k" else None)
    return MoEFFN.from_routed(copy.deepcopy(routed.eval())).eval()


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = K.ffn_moe_threshold
    monkeypatch.setattr(K, "ffn_moe_threshold", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _general(moe, x):
    from sparsify_plugins.moeify.modules import RoutedFFN
    return RoutedFFN.forward(moe, x)


@pytest.mark.parametrize("shape", [(1, 16), (1, 1, 16), (2, 3, 16), (1, 16, 16), (1, 40, 16)])
def test_moe_ffn_decodes_with_the_threshold_kernel_as_the_general_path(spy, shape):
    moe = _moe()
    x = torch.randn(shape)
    with torch.no_grad():
        y, ref = moe(x), _general(moe, x)
    assert len(spy) == 1  # 40 tokens: the kernel declines, torch selects and gathers
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    if shape[-2] <= K.MAX_TOKENS:
        assert torch.equal(y, ref)  # the same selection through the same kernel


def test_moe_ffn_undecided_logit_takes_torch_selection(spy):
    moe = _moe()
    x = torch.randn(1, 16)
    with torch.no_grad():
        w = moe.router.proj.weight
        w[2] -= (x @ w[2]) / x.square().sum() * x[0]  # expert 2's logit ~0 = logit(0.5): inside the bracket
        assert abs(float(x @ w[2])) < 1e-4
        y, ref = moe(x), _general(moe, x)
    assert len(spy) == 1 and torch.equal(y, ref)


def _observers():
    """Ways to observe the general path, each (install(moe) -> (calls list, remove()))."""
    def selection(moe):
        seen = []
        h = moe.register_selection_hook(lambda *a: seen.append(1))
        return seen, h.remove

    def router_hook(moe):
        seen = []
        h = moe.router.register_forward_hook(lambda *a: seen.append(1))
        return seen, h.remove

    def proj_pre_hook(moe):
        seen = []
        h = moe.router.proj.register_forward_pre_hook(lambda *a: seen.append(1))
        return seen, h.remove

    def part_hook(moe):
        seen = []
        h = moe.part("up").register_forward_hook(lambda *a: seen.append(1))
        return seen, h.remove

    def global_hook(moe):
        seen = []
        h = torch.nn.modules.module.register_module_forward_hook(
            lambda m, *a: seen.append(1) if m is moe.router else None)
        return seen, h.remove

    return {"selection": selection, "router_hook": router_hook, "proj_pre_hook": proj_pre_hook,
            "part_hook": part_hook, "global_hook": global_hook}


@pytest.mark.parametrize("observer", sorted(_observers()))
def test_moe_ffn_keeps_the_general_path_where_it_is_observed(spy, observer):
    moe = _moe()
    seen, remove = _observers()[observer](moe)
    x = torch.randn(1, 2, 16)
    try:
        with torch.no_grad():
            y = moe(x)
    finally:
        remove()
    assert not spy and seen  # the hook ran: the kernel fast path was not taken
    with torch.no_grad():
        torch.testing.assert_close(y, moe(x), atol=1e-5, rtol=1e-5)
    assert len(spy) == 1


@pytest.mark.parametrize("case", ["top_k", "mlp_router", "masked", "autograd"])
def test_moe_ffn_other_routings_and_training_take_the_general_path(spy, case):
    moe = _moe(routing="top_k" if case == "top_k" else "threshold", router="mlp" if case == "mlp_router" else "lte")
    if case == "masked":
        moe.path = "masked"
    x = torch.randn(1, 2, 16, requires_grad=case == "autograd")
    y = moe(x)
    assert not spy
    if case == "autograd":
        y.sum().backward()
        assert x.grad is not None
