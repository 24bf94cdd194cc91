"""The compiled activation-sparse / MoE FFN kernels against the plain-torch reference."""
from __future__ import annotations

import pytest
import torch

from sparsify_kernels import ffn as K

pytestmark = [pytest.mark.skipif(not K.cpu_kernel_available(), reason="no C++ compiler: native kernels unavailable"),
              pytest.mark.usefixtures("isa")]  # every test once per ISA variant the CPU runs (conftest.py)


def weights(d, dff, gated=True, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) / s[-1] ** 0.5  # noqa: E731
    w_in, w_up, w_down_t = r(dff, d), (r(dff, d) if gated else None), r(dff, d)
    b = (lambda n: torch.randn(n, generator=g) * 0.1) if bias else (lambda n: None)
    return dict(w_in=w_in, b_in=b(dff), w_up=w_up, b_up=b(dff) if gated else None, w_down_t=w_down_t, b_down=b(d))


# one token: d covering each vector loop and its tail (the four-row up / down path), and a dff of many chunks
@pytest.mark.parametrize("d,dff,T", [(1, 1, 1), (17, 45, 1), (48, 70, 1), (100, 300, 1), (64, 256, 3), (100, 37, 16)])
@pytest.mark.parametrize("gated,bias", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("act,threshold,cut", [("relu", 0.0, 0.0), ("relu", 0.3, 0.0), ("silu", 0.0, 0.0),
                                               ("silu", 0.0, 0.2), ("gelu", 0.0, 0.0), ("gelu_tanh", 0.0, 0.0)])
def test_ffn_kernel_matches_reference(d, dff, T, gated, bias, act, threshold, cut):
    w = weights(d, dff, gated, bias)
    x = torch.randn(T, d)
    ref = K.ffn_reference(x, act=act, threshold=threshold, cut=cut, **w)
    out = K.ffn_sparse(x, act=act, threshold=threshold, cut=cut, **w)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_ffn_kernel_skips_inactive_neurons_exactly():
    # NaN rows for neurons that are never active: reading them would poison the output
    w = weights(32, 64)
    x = torch.randn(2, 32)
    dead = torch.arange(64) % 3 == 0
    w["w_in"][dead] = -(x.abs().sum(0) + 1).sign().expand(int(dead.sum()), 32) * 0  # zero gate rows
    w["w_up"][dead] = float("nan")
    w["w_down_t"][dead] = float("nan")
    out = K.ffn_sparse(x, **w)
    assert torch.isfinite(out).all()
    keep = ~dead
    ref = K.ffn_reference(x, w["w_in"][keep], None, w["w_up"][keep], None, w["w_down_t"][keep], None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 4])
def test_moe_ranges_compute_only_listed_experts(T):
    d, dff = 48, 32 * 6
    w = weights(d, dff)
    x = torch.randn(T, d)
    ranges = torch.tensor([[0, 32], [96, 160], [190, 192]])
    out = K.ffn_sparse(x, act="silu", ranges=ranges, **w)
    ref = K.ffn_reference(x, act="silu", ranges=ranges, **w)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    empty = K.ffn_sparse(x, act="silu", ranges=torch.zeros(0, 2, dtype=torch.long), **w)
    assert torch.equal(empty, torch.zeros(T, d))


def _experts(T, E, p, seed=0):
    """Boolean ``[T, E]``: a random, different number of experts per token (one token with none)."""
    g = torch.Generator().manual_seed(seed)
    ex = torch.rand(T, E, generator=g) < p
    ex[T // 2] = False
    return ex


@pytest.mark.parametrize("d,dff,size,T", [(17, 45, 9, 1), (100, 390, 13, 1), (64, 256, 32, 3), (100, 39, 13, 16),
                                           (33, 130, 10, 7)])
@pytest.mark.parametrize("gated,bias", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "relu"])
def test_moe_kernel_matches_reference_with_experts_per_token(d, dff, size, T, gated, bias, act):
    w = weights(d, dff, gated, bias)
    x = torch.randn(T, d)
    experts = _experts(T, dff // size, 0.4)
    counts = []
    out = K.ffn_moe(x, act=act, experts=experts, expert_size=size, counts=counts, **w)
    ref = K.ffn_reference(x, act=act, select=K.expert_neurons(experts, size), **w)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert counts == [int(experts.any(0).sum())]


def test_moe_kernel_never_reads_unselected_experts():
    d, size, E, T = 24, 8, 6, 3
    w = weights(d, size * E, bias=True)
    experts = torch.zeros(T, E, dtype=torch.bool)
    experts[0, 1] = experts[1, 1] = experts[1, 4] = experts[2, 4] = True
    for e in (0, 2, 3, 5):  # no token chose these: any read of their rows would poison the output
        rows = slice(e * size, (e + 1) * size)
        for k in ("w_in", "w_up", "w_down_t", "b_in", "b_up"):
            w[k][rows] = float("nan")
    x = torch.randn(T, d)
    out = K.ffn_moe(x, act="silu", experts=experts, expert_size=size, **w)
    assert torch.isfinite(out).all()
    clean = {k: (torch.nan_to_num(v) if v is not None else None) for k, v in w.items()}
    torch.testing.assert_close(out, K.ffn_reference(x, act="silu", select=K.expert_neurons(experts, size), **clean),
                               atol=1e-5, rtol=1e-5)


def test_moe_kernel_declines_what_it_cannot_do():
    w = weights(16, 32)
    ex = torch.ones(1, 4, dtype=torch.bool)
    assert K.ffn_moe(torch.randn(1, 16, dtype=torch.float64), experts=ex, expert_size=8, **w) is None
    many = torch.randn(K.MAX_TOKENS + 1, 16)
    assert K.ffn_moe(many, experts=torch.ones(len(many), 4, dtype=torch.bool), expert_size=8, **w) is None
    with pytest.raises(ValueError, match="do not cover"):
        K.ffn_moe(torch.randn(1, 16), experts=ex, expert_size=4, **w)


def test_ffn_kernel_declines_what_it_cannot_do():
    w = weights(8, 16)
    assert K.ffn_sparse(torch.randn(K.MAX_TOKENS + 1, 8), **w) is None
    assert K.ffn_sparse(torch.randn(2, 8, dtype=torch.float64), **w) is None


@pytest.mark.parametrize("T,n_in,n_out", [(1, 50, 7), (5, 300, 33)])
def test_sparse_input_linear(T, n_in, n_out):
    x1 = torch.relu(torch.randn(T, n_in))
    w_t, b = torch.randn(n_in, n_out), torch.randn(n_out)
    torch.testing.assert_close(K.sparse_input_linear(x1, w_t, b), K.sparse_input_linear_reference(x1, w_t, b),
                               atol=1e-4, rtol=1e-4)


def predictor(d, dff, r, x, seed=1, bias=True):
    """Random predictor weights and a threshold in a wide gap of the logits (no near-ties between kernels)."""
    g = torch.Generator().manual_seed(seed)
    p_in, p_out = torch.randn(r, d, generator=g) / d ** 0.5, torch.randn(dff, r, generator=g)
    p_bias = torch.randn(dff, generator=g) if bias else None
    logits = torch.nn.functional.linear(torch.nn.functional.linear(x, p_in), p_out, p_bias).flatten().sort().values
    n = logits.numel()
    lo, hi = n // 3, max(n // 3 + 1, 2 * n // 3)
    i = lo + int((logits[lo + 1:hi + 1] - logits[lo:hi]).argmax()) if n > 1 else 0
    thr = float((logits[i] + logits[i + 1]) / 2) if n > 1 else float(logits[0]) - 1
    return dict(p_in=p_in, p_out=p_out, p_bias=p_bias, p_threshold=thr)


@pytest.mark.parametrize("d,dff,T,r", [(17, 45, 1, 3), (64, 256, 3, 8), (100, 37, 16, 5), (40, 130, 2, 64)])
@pytest.mark.parametrize("gated,bias", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("act,threshold,cut", [("relu", 0.0, 0.0), ("relu", 0.2, 0.0), ("silu", 0.0, 0.1)])
def test_predicted_ffn_kernel_matches_reference(d, dff, T, r, gated, bias, act, threshold, cut):
    w = weights(d, dff, gated, bias)
    x = torch.randn(T, d)
    p = predictor(d, dff, r, x, bias=bias)  # the predictor's bias is optional too
    sel = K.predict(x, **p)
    ref = K.ffn_reference(x, act=act, threshold=threshold, cut=cut, select=sel, **w)
    counts = []
    out = K.ffn_predicted(x, act=act, threshold=threshold, cut=cut, counts=counts, **p, **w)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert counts == [int(sel.any(0).sum())]
    assert 0 < int(sel.sum()) < sel.numel()  # the threshold splits the logits: some chosen, some not


def test_predicted_ffn_never_reads_unpredicted_neurons():
    d, dff = 32, 96
    w = weights(d, dff)
    x = torch.randn(2, d)
    p = predictor(d, dff, 4, x)
    chosen = K.predict(x, **p).any(0)
    for k in ("w_in", "w_up", "w_down_t"):
        w[k][~chosen] = float("nan")  # reading any of these rows would poison the output
    out = K.ffn_predicted(x, **p, **w)
    assert torch.isfinite(out).all()
    keep = chosen
    ref = K.ffn_reference(x, w["w_in"][keep], None, w["w_up"][keep], None, w["w_down_t"][keep], None,
                          select=K.predict(x, **p)[:, keep])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    nothing = K.ffn_predicted(x, **dict(p, p_threshold=1e9), **w)
    assert torch.equal(nothing, torch.zeros(2, d))


def test_predicted_ffn_declines_what_it_cannot_do():
    w = weights(8, 16)
    p = predictor(8, 16, 2, torch.randn(1, 8))
    assert K.ffn_predicted(torch.randn(K.MAX_TOKENS + 1, 8), **p, **w) is None
    assert K.ffn_predicted(torch.randn(1, 8), **dict(p, p_in=p["p_in"].double()), **w) is None


@pytest.mark.parametrize("d,dff,T", [(17, 45, 1), (64, 256, 3), (100, 37, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_drelu_kernels_match_reference(d, dff, T, bias):
    """dReLU (``up_relu``): relu(gate) * relu(up), through the exact, predicted and MoE kernels."""
    w = weights(d, dff, True, bias)
    x = torch.randn(T, d)
    ref = K.ffn_reference(x, up_relu=True, **w)
    gate = torch.relu(x @ w["w_in"].T + (w["b_in"] if bias else 0))
    up = torch.relu(x @ w["w_up"].T + (w["b_up"] if bias else 0))
    hand = gate * up @ w["w_down_t"] + (w["b_down"] if bias else 0)
    torch.testing.assert_close(ref, hand, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref, K.ffn_reference(x, **w))  # the up ReLU matters
    torch.testing.assert_close(K.ffn_sparse(x, up_relu=True, **w), ref, atol=1e-4, rtol=1e-4)
    p_in, p_out = torch.randn(8, d), torch.randn(dff, 8)
    select = K.predict(x, p_in, p_out, None, 0.0)
    torch.testing.assert_close(K.ffn_predicted(x, up_relu=True, p_in=p_in, p_out=p_out, **w),
                               K.ffn_reference(x, up_relu=True, select=select, **w), atol=1e-4, rtol=1e-4)
    if dff % 5 == 0:
        experts = torch.rand(T, 5) < 0.5
        torch.testing.assert_close(
            K.ffn_moe(x, up_relu=True, experts=experts, expert_size=dff // 5, **w),
            K.ffn_reference(x, up_relu=True, select=K.expert_neurons(experts, dff // 5), **w), atol=1e-4, rtol=1e-4)


def _same_bits_at_any_thread_count(call):
    """``call()`` gives bit-identical outputs in 1 thread, and in 2 threads over repeats (fixed summation order)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call()
        torch.set_num_threads(2)
        outs = [call() for _ in range(30)]
    finally:
        torch.set_num_threads(before)
    for out in outs:
        assert torch.equal(out, one)


@pytest.mark.parametrize("T", [1, 3])
def test_kernels_are_deterministic_at_any_thread_count(T):
    # Greedy decoding compares tokens between runs and paths: a sum whose order depends on
    # which thread took which chunk flips near-tied tokens (seen with 2 threads).
    d, dff = 96, 2000  # 125 chunks of 16 neurons: many more than groups and threads
    w = weights(d, dff, gated=True, bias=True)
    x = torch.randn(T, d)
    _same_bits_at_any_thread_count(lambda: K.ffn_sparse(x, act="relu", **w))
    experts = _experts(T, 20, 0.5)
    _same_bits_at_any_thread_count(lambda: K.ffn_moe(x, act="relu", experts=experts, expert_size=100, **w))
    x1 = torch.relu(torch.randn(T, dff))
    w_t, b = torch.randn(dff, 70), torch.randn(70)
    _same_bits_at_any_thread_count(lambda: K.sparse_input_linear(x1, w_t, b))


# -- the screened gate (one token, ReLU/FATReLU) ------------------------------------------------------------------

@pytest.mark.parametrize("d,dff", [(1, 1), (17, 45), (48, 70), (100, 300), (300, 37)])
@pytest.mark.parametrize("gated,bias,up_relu", [(True, False, False), (False, True, False), (True, True, False),
                                                (True, False, True), (True, True, True)])  # dReLU needs W_up
@pytest.mark.parametrize("threshold,cut", [(0.0, 0.0), (0.3, 0.0), (-0.2, 0.0), (0.0, 0.2)])
def test_screened_ffn_matches_unscreened(d, dff, gated, bias, threshold, cut, up_relu):
    w = weights(d, dff, gated, bias, seed=d + dff)
    x = torch.randn(1, d)
    screen = K.truncation_screen(w["w_in"])
    counts = []
    out = K.ffn_screened(x, threshold=threshold, cut=cut, screen=screen, counts=counts, up_relu=up_relu, **w)
    same = K.ffn_sparse(x, act="relu", threshold=threshold, cut=cut, up_relu=up_relu, **w)
    torch.testing.assert_close(out, same, atol=1e-5, rtol=1e-5)  # the same neurons; only the final sums' order
    g = torch.nn.functional.linear(x, w["w_in"], w["b_in"])
    assert int((g >= threshold).sum()) <= counts[0] <= dff  # every active neuron is a candidate


def test_screened_ffn_never_reads_ruled_out_gate_rows():
    # The fp32 gate rows of neurons the screen rules out (by a wide margin), and their up/down rows, are NaN
    w = weights(256, 512, seed=3)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(3))
    screen = K.truncation_screen(w["w_in"])
    g = torch.nn.functional.linear(x, w["w_in"]).flatten()
    out_ref = K.ffn_screened(x, threshold=0.5, screen=screen, **w)
    ruled_out = g < 0.5 - 10 * x.norm() * screen[1]
    assert 0.3 < float(ruled_out.float().mean()) < 1
    for name in ("w_in", "w_up", "w_down_t"):
        w[name][ruled_out] = float("nan")
    counts = []
    out = K.ffn_screened(x, threshold=0.5, screen=screen, counts=counts, **w)
    assert torch.isfinite(out).all() and counts[0] <= int((~ruled_out).sum())
    torch.testing.assert_close(out, out_ref, atol=0, rtol=0)


# -- the gate in 16-bit planes (one token, ReLU/FATReLU) ------------------------------------------------------------

@pytest.mark.parametrize("d,dff", [(1, 1), (17, 45), (48, 70), (100, 300), (300, 37), (40, 1000)])
@pytest.mark.parametrize("gated,bias,up_relu", [(True, False, False), (False, True, False), (True, True, False),
                                                (True, False, True), (True, True, True)])  # dReLU needs W_up
@pytest.mark.parametrize("threshold,cut", [(0.0, 0.0), (0.3, 0.0), (-0.2, 0.0), (0.0, 0.2), (9.0, 0.0)])
def test_planes_ffn_is_the_unscreened_kernel_bit_for_bit(d, dff, gated, bias, threshold, cut, up_relu):
    # d covers dot4_planes' 32- and 16-wide steps and every tail (AVX-512 masked, AVX2 scalar); dff chunks of 16
    # with short last chunks and candidate groups of 1-3; thresholds from every neuron a candidate to none.
    w = weights(d, dff, gated, bias, seed=d + dff)
    x = torch.randn(1, d)
    planes = K.gate_planes(w["w_in"])
    hi, lo, err = planes
    assert torch.equal(torch.stack([lo, hi], -1).view(torch.float32).reshape(dff, d), w["w_in"])
    counts = []
    args = {k: v for k, v in w.items() if k != "w_in"}
    out = K.ffn_planes(x, threshold=threshold, cut=cut, planes=planes, counts=counts, up_relu=up_relu, **args)
    same = K.ffn_sparse(x, act="relu", threshold=threshold, cut=cut, up_relu=up_relu, **w)
    assert torch.equal(out, same)  # the same gates, neurons, chunks and sums
    torch.testing.assert_close(out, K.ffn_reference(x, act="relu", threshold=threshold, cut=cut, up_relu=up_relu,
                                                    **w), atol=1e-4, rtol=1e-4)
    g = torch.nn.functional.linear(x, w["w_in"], w["b_in"])
    assert int((g >= threshold).sum()) <= counts[0] <= dff  # every active neuron is a candidate


def test_planes_ffn_never_reads_what_the_screen_rules_out():
    # Lower halves and up/down rows of neurons the screen rules out (by a wide margin) are NaN; a gate weight
    # that is not finite makes its neuron a candidate (err = inf) and the kernel computes it as ffn_sparse does.
    w = weights(256, 512, seed=3)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(3))
    w["w_in"][7, 5] = float("inf")
    hi, lo, err = K.gate_planes(w["w_in"])
    assert torch.isinf(err[7])
    g = torch.nn.functional.linear(x, w["w_in"]).flatten()
    ruled_out = g < 0.5 - 10 * x.norm() * err
    assert 0.3 < float(ruled_out.float().mean()) < 1 and not ruled_out[7]
    args = {k: v for k, v in w.items() if k != "w_in"}
    ref = K.ffn_planes(x, threshold=0.5, planes=(hi, lo, err), **args)
    assert torch.equal(ref, K.ffn_sparse(x, act="relu", threshold=0.5, **w))
    lo = lo.clone()
    lo[ruled_out] = -1  # 0xffff: with any upper half, a NaN or a different weight
    for name in ("w_up", "w_down_t"):
        args[name] = args[name].clone()
        args[name][ruled_out] = float("nan")
    counts = []
    out = K.ffn_planes(x, threshold=0.5, planes=(hi, lo, err), counts=counts, **args)
    assert torch.equal(out, ref) and counts[0] <= int((~ruled_out).sum())


def test_planes_ffn_same_bits_at_any_thread_count():
    w = weights(96, 2000, gated=True, bias=True)
    x = torch.randn(1, 96)
    planes = K.gate_planes(w["w_in"])
    args = {k: v for k, v in w.items() if k != "w_in"}
    _same_bits_at_any_thread_count(lambda: K.ffn_planes(x, planes=planes, **args))


def test_planes_ffn_declines_what_it_cannot_do():
    w = weights(16, 32, bias=True)
    planes = K.gate_planes(w["w_in"])
    args = {k: v for k, v in w.items() if k != "w_in"}
    x = torch.randn(1, 16)
    assert K.ffn_planes(x, planes=planes, **args).shape == (1, 16)
    assert K.ffn_planes(torch.randn(2, 16), planes=planes, **args) is None  # one token only
    assert K.ffn_planes(x, planes=None, **args) is None
    assert K.ffn_planes(x.double(), planes=planes, **args) is None
    assert K.ffn_planes(x, planes=K.gate_planes(torch.randn(32, 8)), **args) is None  # another weight's shape
    assert K.ffn_planes(x, planes=(planes[0], planes[1][:16], planes[2]), **args) is None
    assert K.ffn_planes(x, planes=planes, **{**args, "b_in": args["b_in"][:5]}) is None
    assert K.ffn_planes(x, planes=planes, **{**args, "b_down": torch.zeros(17)}) is None


def test_screened_ffn_declines_what_it_cannot_do():
    w = weights(16, 32)
    screen = K.truncation_screen(w["w_in"])
    assert K.ffn_screened(torch.randn(2, 16), screen=screen, **w) is None  # one token only
    assert K.ffn_screened(torch.randn(1, 16), screen=None, **w) is None
    assert K.ffn_screened(torch.randn(1, 16, dtype=torch.float64), screen=screen, **w) is None
    other = K.truncation_screen(torch.randn(32, 8))
    assert K.ffn_screened(torch.randn(1, 16), screen=other, **w) is None  # a screen of another weight's shape
    assert K.ffn_screened(torch.randn(1, 16), screen=screen, **w).shape == (1, 16)


# -- arguments the C kernels would index out of bounds -------------------------------------------------------------

def _ffn_calls(w, x):
    """Every FFN kernel wrapper on the weights ``w`` (one token ``x``), as name -> call."""
    d, dff = w["w_in"].shape[1], w["w_in"].shape[0]
    rest = {k: v for k, v in w.items() if k != "w_in"}
    g = torch.Generator().manual_seed(5)
    p_in, p_out = torch.randn(4, d, generator=g), torch.randn(dff, 4, generator=g)
    try:
        screen, planes = K.truncation_screen(w["w_in"]), K.gate_planes(w["w_in"])
    except RuntimeError:  # a mis-shaped w_in (not [dff, d] rows of the others' width) has no sensible screen
        screen = planes = None
    return {
        "sparse": lambda: K.ffn_sparse(x, **w),
        "predicted": lambda: K.ffn_predicted(x, **w, p_in=p_in, p_out=p_out, p_threshold=-1e9),
        "screened": lambda: K.ffn_screened(x, **w, screen=screen),
        "planes": lambda: K.ffn_planes(x, **rest, planes=planes),
        "moe": lambda: K.ffn_moe(x, **w, experts=torch.ones(1, dff // 8, dtype=torch.bool), expert_size=8),
        "moe_threshold": lambda: K.ffn_moe_threshold(x, torch.ones(1, dff // 8), 0.5, **w, expert_size=8),
    }


@pytest.mark.parametrize("name", ["b_in", "w_up", "b_up", "w_down_t", "b_down"])
@pytest.mark.parametrize("kernel", ["sparse", "predicted", "screened", "planes", "moe", "moe_threshold"])
def test_ffn_kernels_decline_mis_shaped_weights(kernel, name):
    d, dff = 24, 64
    w = weights(d, dff, bias=True)
    x = torch.randn(1, d)
    assert _ffn_calls(w, x)[kernel]() is not None  # well-shaped: the kernel runs
    t = w[name]
    w[name] = t[: t.shape[0] // 2].contiguous()  # too few rows (or a bias too short): read past its end
    assert _ffn_calls(w, x)[kernel]() is None
    if t.dim() == 2:
        w[name] = torch.randn(dff, d + 8)  # rows of another width
        assert _ffn_calls(w, x)[kernel]() is None


def test_predictor_and_input_linear_decline_mis_shaped_tensors():
    d, dff = 24, 64
    w = weights(d, dff, bias=True)
    x = torch.randn(1, d)
    p_in, p_out = torch.randn(4, d), torch.randn(dff, 4)
    assert K.ffn_predicted(x, **w, p_in=p_in, p_out=p_out) is not None
    for bad in (dict(p_in=torch.randn(4, d + 1), p_out=p_out), dict(p_in=p_in, p_out=torch.randn(dff - 1, 4)),
                dict(p_in=p_in, p_out=torch.randn(dff, 5)), dict(p_in=p_in, p_out=p_out, p_bias=torch.zeros(3))):
        assert K.ffn_predicted(x, **w, **bad) is None
    x1, w_t = torch.relu(torch.randn(2, 30)), torch.randn(30, 10)
    assert K.sparse_input_linear(x1, w_t, torch.zeros(10)) is not None
    assert K.sparse_input_linear(x1, w_t, torch.zeros(9)) is None


@pytest.mark.parametrize("ranges", [[[0, 65]], [[-1, 4]], [[10, 5]], [[0, 8], [60, 70]]])
def test_ffn_sparse_rejects_ranges_outside_the_neurons(ranges):
    w = weights(24, 64)
    with pytest.raises(ValueError, match="ranges"):
        K.ffn_sparse(torch.randn(1, 24), **w, ranges=torch.tensor(ranges))
    assert K.ffn_sparse(torch.randn(1, 24), **w, ranges=torch.tensor([[0, 64]])) is not None
