"""The compiled activation-sparse / MoE FFN kernels against the plain-torch reference."""
from __future__ import annotations

import pytest
import torch

from sparsify_kernels import ffn as K

pytestmark = pytest.mark.skipif(not K.cpu_kernel_available(), reason="no C++ compiler: native kernels unavailable")


def weights(d, dff, gated=True, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) / s[-1] ** 0.5  # noqa: E731
    w_in, w_up, w_down_t = r(dff, d), (r(dff, d) if gated else None), r(dff, d)
    b = (lambda n: torch.randn(n, generator=g) * 0.1) if bias else (lambda n: None)
    return dict(w_in=w_in, b_in=b(dff), w_up=w_up, b_up=b(dff) if gated else None, w_down_t=w_down_t, b_down=b(d))


@pytest.mark.parametrize("d,dff,T", [(1, 1, 1), (17, 45, 1), (64, 256, 3), (100, 37, 16)])
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
