"""The packed sparse-matmul CPU kernel against the plain-torch reference."""
from __future__ import annotations

import pytest
import torch

from sparsify_kernels import spmm

pytestmark = [pytest.mark.skipif(not spmm.cpu_kernel_available(), reason="no C++ compiler: native kernels unavailable"),
              pytest.mark.usefixtures("isa")]  # every test once per ISA variant the CPU runs (conftest.py)


@pytest.mark.parametrize("out,n_in", [(1, 1), (33, 129), (64, 256), (7, 300)])
@pytest.mark.parametrize("T", [1, 3, 7, 12, 16, 64, 65, 130])  # 7 and 12: each ISA's switch to 64-token tiles
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_spmm_matches_reference(out, n_in, T, density):
    g = torch.Generator().manual_seed(out * 1000 + n_in + T)
    w = torch.randn(out, n_in, generator=g) * (torch.rand(out, n_in, generator=g) < density)
    b = torch.randn(out, generator=g)
    x = torch.randn(T, n_in, generator=g)
    packed = spmm.pack(w)
    assert torch.equal(packed.to_dense(), w)
    torch.testing.assert_close(spmm.matmul(packed, x, b), spmm.reference(w, x, b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(spmm.matmul(packed, x.view(T, 1, n_in)), spmm.reference(w, x).view(T, 1, out),
                               atol=1e-4, rtol=1e-4)


def test_spmm_declines_other_dtypes():
    packed = spmm.pack(torch.eye(4))
    assert spmm.matmul(packed, torch.randn(2, 4, dtype=torch.float64)) is None


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 8), (2, 8), (8, 16)])
@pytest.mark.parametrize("out,n_in", [(5, 8), (33, 100), (16, 512)])
@pytest.mark.parametrize("T", [1, 3, 15])
def test_nm_few_token_kernel(n, m, out, n_in, T):
    from sparsify_plugins.layouts import NM
    from sparsify_plugins.layouts import formats as F
    from sparsify_plugins.layouts.weight import NMParams
    g = torch.Generator().manual_seed(n * 100 + m + out + T)
    w = torch.randn(out, n_in, generator=g)
    w = w * F.nm_mask(w, n, m)
    layout = NM.from_dense(w, NMParams(n=n, m=m))
    packed = spmm.pack_nm(layout.val, layout.idx, n, m, layout.shape)
    x, b = torch.randn(T, n_in, generator=g), torch.randn(out, generator=g)
    y = spmm.nm_matmul(packed, x, b)
    if spmm.native.isa() != "avx512":
        assert y is None
        return
    torch.testing.assert_close(y, spmm.reference(w, x, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block", [(4, 4), (16, 16), (8, 5), (32, 8)])
@pytest.mark.parametrize("out,n_in,T", [(16, 32, 16), (37, 50, 70), (64, 200, 130), (37, 50, 1), (70, 90, 5),
                                        (100, 64, 200), (600, 48, 70),  # the last: runs of several block rows
                                        # around spmm.BSR_MANY_TOKENS: per-token kernel below, a partial tile above
                                        (70, 90, 7), (70, 90, 8), (37, 300, 12), (64, 200, 15)])
def test_bsr_kernels(block, out, n_in, T):
    from sparsify_plugins.layouts import BSR
    from sparsify_plugins.layouts.weight import BSRParams
    g = torch.Generator().manual_seed(out + n_in + T + block[1])
    w = torch.randn(out, n_in, generator=g)
    tiles = torch.rand(-(-out // block[0]), -(-n_in // block[1]), generator=g) < 0.4
    w = w * tiles.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:out, :n_in]
    layout = BSR.from_dense(w, BSRParams(block=block))
    x, b = torch.randn(T, n_in, generator=g), torch.randn(out, generator=g)
    y = spmm.bsr_matmul(layout.crow, layout.col, layout.val, layout.shape, x, b)
    if spmm.native.isa() == "portable":
        assert y is None
        return
    torch.testing.assert_close(y, spmm.reference(w, x, b), atol=1e-4, rtol=1e-4)


def _bound_kernels():
    """Each kernel bound to a weight once (what SparseLinear calls per token), with its dense weight."""
    from sparsify_plugins.layouts import BSR, NM
    from sparsify_plugins.layouts import formats as F
    from sparsify_plugins.layouts.weight import BSRParams, NMParams
    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 64, generator=g)
    w_nm = w * F.nm_mask(w, 2, 4)
    w_bsr = w * (torch.rand(6, 8, generator=g) < 0.5).repeat_interleave(8, 0).repeat_interleave(8, 1)
    bsr = BSR.from_dense(w_bsr, BSRParams(block=(8, 8)))
    nm = NM.from_dense(w_nm, NMParams(n=2, m=4))
    out = {"panel": (spmm.panel_kernel(spmm.pack(w_nm)), w_nm, 130),
           "bsr": (spmm.bsr_kernel(bsr.crow, bsr.col, bsr.val, bsr.shape), w_bsr, 15)}
    if spmm.native.isa() == "avx512":
        out["nm"] = (spmm.nm_kernel(spmm.pack_nm(nm.val, nm.idx, 2, 4, nm.shape)), w_nm, 15)
    return out


@pytest.mark.parametrize("form", ["2d", "3d", "strided", "bias", "one token"])
def test_bound_kernels_take_every_input_form(form):
    g = torch.Generator().manual_seed(3)
    for name, (run, w, max_t) in _bound_kernels().items():
        if name == "bsr" and spmm.native.isa() == "portable":
            continue  # the tile kernels need AVX2 or AVX-512 (declining: the next test)
        T = 1 if form == "one token" else min(max_t, 5)
        x = torch.randn(T, 64, generator=g)
        b = torch.randn(48, generator=g) if form == "bias" else None
        if form == "3d":
            x = x.view(T, 1, 64)
        if form == "strided":
            x = torch.randn(64, T, generator=g).t()  # not contiguous
        for _ in range(2):  # the second call reuses the addresses bound at the first
            y = run(x, b)
            assert y is not None, name
            torch.testing.assert_close(y, spmm.reference(w, x, b), atol=1e-4, rtol=1e-4, msg=name)


def test_bound_kernels_decline_what_they_cannot_compute():
    x = torch.randn(3, 64)
    for name, (run, w, _) in _bound_kernels().items():
        if run(x) is None:  # the portable build declines BSR altogether
            assert spmm.native.isa() == "portable" and name == "bsr"
            continue
        assert run(x.double()) is None, name
        assert run(torch.randn(3, 63)) is None, name  # wrong width: the dense path raises torch's error
        assert run(x, torch.randn(48, dtype=torch.float64)) is None, name
        assert run(x, torch.randn(47)) is None, name
        assert run(x.requires_grad_()) is None, name
        x = x.detach()
        with torch.no_grad():
            assert run(x.requires_grad_()) is not None, name
        x = x.detach()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 10), (4, 8)])
@pytest.mark.parametrize("T", [1, 2, 5, 15, 16, 40])
def test_nm_layout_takes_the_permute_kernel_only_where_it_pays(monkeypatch, n, m, T):
    """n:m layouts: the permute kernel for 2-15 tokens and windows up to 64 inputs, panel CSR elsewhere."""
    from sparsify_plugins.layouts import NM
    from sparsify_plugins.layouts import formats as F
    from sparsify_plugins.layouts.modules import SparseLinear
    from sparsify_plugins.layouts.weight import NMParams
    calls = []
    real = spmm.nm_kernel

    def spy(packed):
        run = real(packed)
        return lambda x, bias=None: calls.append(x.numel()) or run(x, bias)
    monkeypatch.setattr(spmm, "nm_kernel", spy)
    g = torch.Generator().manual_seed(n * 10 + m + T)
    w = torch.randn(24, 80, generator=g)
    w = w * F.nm_mask(w, n, m)
    lin = SparseLinear(NM.from_dense(w, NMParams(n=n, m=m)), torch.randn(24, generator=g))
    x = torch.randn(T, 80, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), x @ w.T + lin.bias, atol=1e-4, rtol=1e-4)
    lo, hi = spmm.NM_KERNEL_TOKENS
    pays = lo <= T < hi and 16 * m // n <= spmm.NM_KERNEL_MAX_WINDOW
    assert bool(calls) == pays
