"""Triton kernels against the plain-torch references, under ``TRITON_INTERPRET=1`` when there is no GPU.

Interpreted Triton is slow: shapes are small, but include sizes that are not
multiples of the blocks.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py sets it before triton's first import
pytest.importorskip("triton")

from sparsify_kernels import ffn as K  # noqa: E402
from sparsify_kernels import triton_kernels as TK  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not TK.available(), reason="no GPU and TRITON_INTERPRET is not 1")


def _w(d, dff, gated, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(DEV)  # noqa: E731
    b = (lambda n: (torch.randn(n, generator=g) * 0.1).to(DEV)) if bias else (lambda n: None)
    return dict(w_in=r(dff, d), b_in=b(dff), w_up=r(dff, d) if gated else None, b_up=b(dff) if gated else None,
                w_down_t=r(dff, d), b_down=b(d))


@pytest.mark.parametrize("d,dff,T,gated,bias,act,thr,cut", [
    (20, 70, 1, True, False, "relu", 0.0, 0.0),
    (33, 130, 2, True, True, "relu", 0.2, 0.0),
    (16, 64, 1, False, True, "gelu", 0.0, 0.1),
    (40, 65, 3, True, False, "silu", 0.0, 0.3),
])
def test_triton_activation_sparse_ffn(d, dff, T, gated, bias, act, thr, cut):
    w = _w(d, dff, gated, bias)
    x = torch.randn(T, d).to(DEV)
    out = TK.ffn_sparse(x, act=act, threshold=thr, cut=cut, block_n=32, block_d=16, **w)
    ref = K.ffn_reference(x, act=act, threshold=thr, cut=cut, **w)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_triton_moe_ffn(act):
    w = _w(24, 32 * 5, True, False)
    x = torch.randn(2, 24).to(DEV)
    ranges = torch.tensor([[0, 32], [64, 128], [150, 160]])
    out = TK.ffn_sparse(x, act=act, ranges=ranges, block_n=32, block_d=16, **w)
    torch.testing.assert_close(out, K.ffn_reference(x, act=act, ranges=ranges, **w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("d,dff,size,T,gated,bias,act", [
    (24, 160, 32, 1, True, False, "silu"),       # decode, gated
    (33, 130, 13, 5, False, True, "gelu_tanh"),  # plain FFN with biases; nothing a multiple of the blocks
    (40, 90, 9, 3, True, True, "relu"),
])
def test_triton_moe_ffn_experts_per_token(d, dff, size, T, gated, bias, act):
    """Each token its own experts (threshold routing: any number, none included), against the torch reference."""
    w = _w(d, dff, gated, bias)
    x = torch.randn(T, d).to(DEV)
    g = torch.Generator().manual_seed(T)
    experts = torch.rand(T, dff // size, generator=g) < 0.4
    experts[T // 2] = False
    experts[0, 0] = True
    out = TK.ffn_moe(x, act=act, experts=experts.to(DEV), expert_size=size, block_n=32, block_d=16, **w)
    ref = K.ffn_reference(x, act=act, select=K.expert_neurons(experts, size).to(DEV), **w)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n,m,out,n_in,T", [(2, 4, 40, 36, 3), (1, 4, 17, 64, 1), (2, 8, 33, 80, 20)])
def test_triton_nm_matmul(n, m, out, n_in, T):
    from sparsify_plugins.layouts import NM
    from sparsify_plugins.layouts import formats as F
    from sparsify_plugins.layouts.weight import NMParams
    w = torch.randn(out, n_in)
    w = w * F.nm_mask(w, n, m)
    layout = NM.from_dense(w, NMParams(n=n, m=m))
    x, b = torch.randn(T, n_in), torch.randn(out)
    y = TK.nm_matmul(x.to(DEV), layout.val.to(DEV), layout.idx.to(DEV), n, m, n_in, b.to(DEV),
                     block_t=16, block_o=16, block_b=4)
    torch.testing.assert_close(y.cpu(), x @ w.T + b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("d,dff,T,r,gated,bias,act,thr", [
    (20, 70, 1, 4, True, False, "relu", 0.0),
    (33, 130, 3, 8, True, True, "relu", 0.1),
    (16, 64, 2, 3, False, True, "silu", 0.0),
])
def test_triton_predicted_ffn(d, dff, T, r, gated, bias, act, thr):
    w = _w(d, dff, gated, bias)
    x = torch.randn(T, d)
    g = torch.Generator().manual_seed(1)
    p = dict(p_in=torch.randn(r, d, generator=g) / d ** 0.5, p_out=torch.randn(dff, r, generator=g),
             p_bias=torch.randn(dff, generator=g))
    logits = torch.nn.functional.linear(torch.nn.functional.linear(x, p["p_in"]), p["p_out"], p["p_bias"])
    srt = logits.flatten().sort().values
    i = srt.numel() // 3 + int((srt[srt.numel() // 3 + 1:] - srt[srt.numel() // 3:-1]).argmax())
    p["p_threshold"] = float(srt[i] + srt[i + 1]) / 2  # in a gap: no near-ties between torch and Triton
    sel = K.predict(x, **p)
    assert 0 < int(sel.sum()) < sel.numel()
    ref = K.ffn_reference(x.to(DEV), act=act, threshold=thr, select=sel.to(DEV), **w)
    out = TK.ffn_predicted(x.to(DEV), act=act, threshold=thr, block_n=32, block_d=16, **w,
                           **{k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in p.items()})
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
