"""Layouts: exact round trips and reference products, on small tensors."""
from __future__ import annotations

import pytest
import torch

from sparsify_plugins.layouts import BSR, CSR, NM, NMG
from sparsify_plugins.layouts import formats as F
from sparsify_plugins.layouts.weight import BSRParams, NMGParams, NMParams

SHAPES = [(1, 1), (7, 13), (48, 64), (50, 30)]


def sparse(shape, density=0.4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    return w * (torch.rand(shape, generator=g) < density)


def check(layout, w, atol=1e-5):
    assert torch.equal(layout.to_dense(), w)
    x = torch.randn(2, 3, w.shape[1], dtype=w.dtype)
    torch.testing.assert_close(layout.matmul(x), x @ w.T, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_csr_and_bsr_round_trip(shape):
    w = sparse(shape)
    check(CSR.from_dense(w), w)
    check(BSR.from_dense(w), w)
    check(BSR.from_dense(w, BSRParams(block=(4, 8))), w)


def test_bsr_stores_only_non_empty_tiles():
    w = torch.zeros(8, 8)
    w[0, 0], w[5, 7] = 1.0, 2.0
    layout = BSR.from_dense(w, BSRParams(block=(4, 4)))
    assert layout.val.shape == (2, 4, 4) and layout.col.tolist() == [0, 1] and layout.crow.tolist() == [0, 1, 2]


def test_empty_and_full_weights():
    for w in (torch.zeros(5, 9), torch.randn(5, 9)):
        check(CSR.from_dense(w), w)
        check(BSR.from_dense(w, BSRParams(block=(2, 4))), w)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_round_trip(shape, n, m):
    w = sparse(shape, 0.9)
    w = w * F.nm_mask(w, n, m)
    layout = NM.from_dense(w, NMParams(n=n, m=m))
    assert layout.idx.dtype == torch.uint8 and layout.val.shape[1] == -(-shape[1] // m) * n
    check(layout, w)


def test_nm_mask_keeps_n_largest():
    w = torch.tensor([[1.0, -4.0, 3.0, 0.5, 0.0, 0.0, 2.0, 1.0]])
    assert F.nm_mask(w, 2, 4).tolist() == [[False, True, True, False, False, False, True, True]]


def test_nm_refuses_lossy_conversion():
    with pytest.raises(ValueError, match="not 2:4 sparse: row 0, inputs 0..3"):
        NM.from_dense(torch.ones(2, 8))


def test_nmg_patterns_revolving_door():
    for n, m in [(1, 4), (2, 4), (3, 6), (4, 8)]:
        pats = F.nmg_patterns(n, m)
        assert len(pats) == len(set(pats)) == F.combinations(m, n)
        assert all(len(set(a) ^ set(b)) == 2 for a, b in zip(pats, pats[1:]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n,m,g", [(2, 4, 1), (2, 4, 3), (1, 4, 2), (3, 6, 1)])
def test_nmg_sparsifier_and_round_trip(shape, n, m, g):
    w = torch.randn(shape)
    val, row = F.nmg_from_dense(w, n, m, g, exact=False)
    C = F.combinations(m, n)
    assert val.shape[2:] == (C, g, n) and row.dtype == torch.int16
    # every chunk and block uses every pattern exactly g times: each row appears once
    assert torch.equal(row.long().flatten(2).sort(-1).values,
                       torch.arange(C * g).expand(*row.shape[:2], C * g))
    wg = F.nmg_to_dense(val, row, n, m, g, shape)
    assert ((wg != 0).sum(1) <= n * -(-shape[1] // m)).all()
    assert ((wg == 0) | (wg == w)).all()  # only prunes, never changes a value
    check(NMG.from_dense(wg, NMGParams(n=n, m=m, g=g)), wg)


def test_nmg_greedy_keeps_the_most_magnitude():
    # one chunk (C*g = 6 rows) of one block: each row prefers a different pattern
    pats = F.nmg_patterns(2, 4)
    w = torch.full((6, 4), 0.1)
    for r, p in enumerate(pats):
        w[r, list(p)] = 5.0
    val, row = F.nmg_from_dense(w, 2, 4, 1, exact=False)
    assert torch.equal(F.nmg_to_dense(val, row, 2, 4, 1, w.shape), w * (w == 5.0))


def test_nmg_exact_conversion_repairs_greedy_order():
    # rows with one non-zero fit several patterns; an exact assignment exists and must be found
    n, m, g = 2, 4, 1
    pats = F.nmg_patterns(n, m)
    w = torch.zeros(6, 4)
    for r, p in enumerate(pats[:4]):
        w[r, list(p)] = 1.0 + r
    w[4, 1] = 9.0  # fits (0,1), (1,2) or (1,3): only (1,3) is free
    w[5, 0] = 9.0  # fits (0,1), (0,2), (0,3): only (0,3) is free
    layout = NMG.from_dense(w, NMGParams(n=n, m=m, g=g))
    assert torch.equal(layout.to_dense(), w)


def test_nmg_refuses_lossy_conversion():
    with pytest.raises(ValueError, match="would drop"):
        NMG.from_dense(torch.ones(6, 4), NMGParams(n=2, m=4, g=1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_layouts_keep_dtype(dtype):
    w = sparse((12, 16), 0.3, dtype=dtype)
    w = w * F.nm_mask(w, 2, 4)
    for layout in (CSR.from_dense(w), BSR.from_dense(w, BSRParams(block=(4, 4))), NM.from_dense(w)):
        assert torch.equal(layout.to_dense(), w)
        x = torch.randn(3, 16, dtype=dtype)
        torch.testing.assert_close(layout.matmul(x), x @ w.T, atol=5e-2 if dtype == torch.bfloat16 else 1e-9,
                                   rtol=5e-2 if dtype == torch.bfloat16 else 1e-9)


def test_layouts_are_registered_plugins():
    from sparsify_core.plugin_manager import catalog
    assert {"csr", "bsr", "nm", "nmg"} <= set(catalog().layouts)


def _structured(name, w):
    """``w`` with the structure layout ``name`` needs, and the layout's params."""
    if name == "csr":
        return w, None
    if name == "bsr":
        return w, BSRParams(block=(4, 8))
    if name == "nm":
        return w * F.nm_mask(w, 2, 4), NMParams(n=2, m=4)
    val, row = F.nmg_from_dense(w, 2, 4, 2, exact=False)
    return F.nmg_to_dense(val, row, 2, 4, 2, w.shape), NMGParams(n=2, m=4, g=2)


@pytest.mark.parametrize("name", ["csr", "bsr", "nm", "nmg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,T", [((8, 16), 1), ((33, 72), 5), ((70, 300), 20), ((24, 40), 130)])
def test_builtin_kernels_match_the_layout_reference(name, dtype, shape, T):
    """Every built-in layout's ``kernel`` (CPU C++) against its plain-torch ``matmul``, with and without bias.

    The CPU kernels are float32: other dtypes get no kernel (the module falls back)."""
    from sparsify_core.plugin_manager import catalog
    from sparsify_kernels import spmm

    cls = catalog().layouts[name]
    w, params = _structured(name, sparse(shape, 0.5, seed=T).to(dtype))
    layout = cls.from_dense(w, params)
    run = layout.kernel(torch.device("cpu"), dtype)
    if dtype != torch.float32 or not spmm.cpu_kernel_available():
        assert run is None
        return
    gen = torch.Generator().manual_seed(1)
    x, b = torch.randn(2, T, shape[1], generator=gen), torch.randn(shape[0], generator=gen)
    with torch.no_grad():
        ref = layout.matmul(x)
        torch.testing.assert_close(run(x, b), ref + b, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(run(x, None), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["nm", "nmg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_builtin_cuda_kernels_match_the_layout_reference(name, dtype):
    """The Triton n:m kernel that ``nm`` and ``nmg`` hand out on CUDA, against the reference."""
    from sparsify_core.plugin_manager import catalog
    from sparsify_kernels import triton_kernels

    if not triton_kernels.available():
        pytest.skip("no triton")
    w, params = _structured(name, sparse((96, 160), 0.5))
    layout = catalog().layouts[name].from_dense(w.to(dtype), params)
    run = layout.kernel(torch.device("cuda"), dtype)
    x, b = torch.randn(7, 160, dtype=dtype, device="cuda"), torch.randn(96, dtype=dtype, device="cuda")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(run(x, b).to(dtype), (layout.matmul(x.cpu()) + b.cpu()).cuda(), atol=tol, rtol=tol)


@pytest.mark.parametrize("block", [(16, 16), (3, 5)])
def test_bsr_kernel_packs_its_panel_fallback_only_when_a_call_needs_it(monkeypatch, isa, block):
    """The BSR tile kernels serve every token count for fp32 tiles with a multiple of 4 rows (row-major, or
    column-major on AVX-512): the panel-CSR copy (5 bytes per non-zero) is never packed; row-major tiles of
    other heights decline 16+ tokens and pack it once, then."""
    from sparsify_kernels import spmm

    probe = BSR.from_dense(torch.ones(16, 16))
    if not spmm.cpu_kernel_available() or spmm.bsr_matmul(probe.crow, probe.col, probe.val, probe.shape,
                                                          torch.randn(20, 16)) is None:
        pytest.skip("no native BSR kernels here (the portable build)")
    calls = []
    real = spmm.pack
    monkeypatch.setattr(spmm, "pack", lambda w: calls.append(w.shape) or real(w))
    w = sparse((40, 60), 0.3)
    run = BSR.from_dense(w, BSRParams(block=block)).kernel(torch.device("cpu"), torch.float32)
    assert calls == []
    packs = 0 if block[0] % 4 == 0 or spmm.bsr_tiles_by_columns(block[0]) else 1
    for T in (1, 3, 20, 70, 20):
        x = torch.randn(T, 60)
        torch.testing.assert_close(run(x, None), x @ w.T, atol=1e-4, rtol=1e-4)
    assert len(calls) == packs


def test_sparse_linear_computes_with_the_layout_kernel(monkeypatch):
    """``SparseLinear`` calls its layout's kernel once built (cached per device and dtype), and forgets it on load."""
    from sparsify_kernels import spmm
    from sparsify_plugins.layouts.modules import SparseLinear

    if not spmm.cpu_kernel_available():
        pytest.skip("no native kernels")
    built = []
    real = CSR.kernel
    monkeypatch.setattr(CSR, "kernel",
                        lambda self, device, dtype: built.append((device, dtype)) or real(self, device, dtype))
    w = sparse((12, 20), 0.3)
    lin = SparseLinear(CSR.from_dense(w), torch.randn(12), strict=True)
    x = torch.randn(4, 20)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(lin(x), x @ w.T + lin.bias, atol=1e-5, rtol=1e-5)
        assert built == [(torch.device("cpu"), torch.float32)]
        w2 = w * torch.randn(12, 20)  # same pattern (storage shapes), new values
        lin.load_state_dict(SparseLinear(CSR.from_dense(w2), lin.bias.detach()).state_dict())
        torch.testing.assert_close(lin(x), x @ w2.T + lin.bias, atol=1e-5, rtol=1e-5)
    assert len(built) == 2


@pytest.mark.parametrize("block", [(16, 16), (32, 8), (3, 5)])
def test_bsr_module_holds_its_tiles_by_columns_in_place(isa, tmp_path, block):
    """Where the kernels want column-major tiles (AVX-512, 16 x 16; 3 x 5 stays row-major), building the kernel
    re-lays the module's own ``val``
    buffer in place: one copy of the tiles (the kernel computes from the buffer's memory), the same values and
    shape for every reader, row-major safetensors files (``save_file`` and the stage checkpoint), which load
    back into a module whose kernel re-lays them again; the AVX2 and portable builds leave them row-major."""
    from safetensors.torch import load_file, save_file

    from sparsify_core.masks import MaskSet
    from sparsify_core.output import write_checkpoint
    from sparsify_kernels import spmm
    from sparsify_plugins.layouts.modules import SparseLinear

    w = sparse((40, 60), 0.3)
    lin = SparseLinear(BSR.from_dense(w, BSRParams(block=block)), torch.randn(40))
    rows_ptr = lin.val.data_ptr()
    x = torch.randn(70, 60)
    with torch.no_grad():
        for T in (1, 5, 70):
            torch.testing.assert_close(lin(x[:T]), x[:T] @ w.T + lin.bias, atol=1e-4, rtol=1e-4)
    by_cols = spmm.bsr_tiles_by_columns(block[0])
    assert spmm.is_by_columns(lin.val) == by_cols and (lin.val.data_ptr() != rows_ptr) == by_cols
    assert lin.val.shape == (len(lin.col), *block) and torch.equal(lin.dense_weight(), w)
    if by_cols:
        run = lin.kernel(x).first
        assert run.storage[2].data_ptr() == lin.val.data_ptr() and run.storage[3] == []  # no second copy
    save_file({k: v.contiguous() for k, v in lin.state_dict().items()}, tmp_path / "lin.safetensors")
    loaded = load_file(tmp_path / "lin.safetensors")
    assert loaded["val"].is_contiguous() and torch.equal(loaded["val"], lin.val)
    write_checkpoint(tmp_path, torch.nn.Sequential(lin), MaskSet(), 1, {})
    back = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert torch.equal(back["0.val"], lin.val)
    twin = SparseLinear.empty("bsr", lin.layout_params, (40, 60), lin.storage_spec(), True, torch.float32)
    twin.load_state_dict(loaded)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), x @ w.T + lin.bias, atol=1e-4, rtol=1e-4)
    assert spmm.is_by_columns(twin.val) == by_cols


def test_tiles_by_columns_keeps_values_and_declines_what_it_cannot_change():
    from sparsify_kernels import spmm

    val = torch.randn(5, 3, 4)
    ref = val.clone()
    assert not spmm.is_by_columns(val) and spmm.tiles_by_columns(val) and spmm.is_by_columns(val)
    assert torch.equal(val, ref) and val.stride() == (12, 1, 3)
    assert spmm.tiles_by_columns(val)  # already: unchanged
    for one in (torch.randn(5, 1, 4), torch.randn(5, 3, 1), torch.randn(0, 3, 4)):
        assert not spmm.tiles_by_columns(one) and one.is_contiguous()
    with torch.inference_mode():
        frozen = torch.randn(5, 3, 4)
    assert not spmm.tiles_by_columns(frozen) and frozen.is_contiguous()  # stays row-major, still right


def test_sparse_linear_copies_pack_their_own_kernels():
    """A deep copy must not compute with kernels packed from the original's storage."""
    import copy

    from sparsify_plugins.layouts.modules import SparseLinear

    w = sparse((12, 20), 0.3)
    lin = SparseLinear(CSR.from_dense(w), None)
    x = torch.randn(4, 20)
    with torch.no_grad():
        lin(x)  # builds and caches the kernel
        twin = copy.deepcopy(lin)
        twin.val.mul_(2)
        torch.testing.assert_close(twin(x), 2 * (x @ w.T), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lin(x), x @ w.T, atol=1e-5, rtol=1e-5)
        lin.double()  # cast storage: the float32 kernel is dropped, the float64 path computes from the new buffers
        torch.testing.assert_close(lin(x.double()), x.double() @ w.double().T)
