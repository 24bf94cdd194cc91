"""ISA variants of the native kernels: choice, forcing, errors; every runnable variant against torch, odd shapes."""
from __future__ import annotations

import pytest
import torch

from sparsify_core.errors import SparsifyError, one_line
from sparsify_kernels import ffn as K
from sparsify_kernels import native, spmm


def test_default_is_the_widest_variant_the_cpu_runs(monkeypatch):
    monkeypatch.delenv(native.ENV, raising=False)
    assert native.isa() == native.supported_isas()[0]
    assert native.supported_isas()[-1] == "portable"


def test_supported_isas_follow_the_flags():
    if not native._X86:
        pytest.skip("the AVX variants are x86-64 only")
    avx512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"})
    assert native.supported_isas(avx512) == ["avx512", "avx2", "portable"]
    assert native.supported_isas(frozenset({"avx2", "fma", "f16c"})) == ["avx2", "portable"]
    assert native.supported_isas(frozenset({"avx2"})) == ["portable"]  # AVX2 without FMA: portable only
    assert native.supported_isas(frozenset()) == ["portable"]


def test_forcing_a_variant_loads_that_variant(isa):
    assert native.isa() == isa
    assert native.loaded_isa() == isa
    assert native.library() is native.library(isa)


def test_forcing_an_isa_the_cpu_lacks_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.setattr(native, "_X86", True)
    monkeypatch.setenv(native.ENV, "avx512")
    with pytest.raises(native.ISAError) as exc:
        native.isa()
    msg = one_line(exc.value)
    assert isinstance(exc.value, SparsifyError) and "\n" not in msg
    assert "SPARSIFY_ISA=avx512" in msg and "avx512f" in msg and "avx2, portable" in msg
    with pytest.raises(native.ISAError):
        native.library()  # the kernels refuse too, never silently run another ISA
    monkeypatch.setenv(native.ENV, "AVX2")  # case-insensitive
    assert native.isa() == "avx2"


def test_unknown_isa_name_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(native.ENV, "sse9")
    with pytest.raises(native.ISAError, match=r"SPARSIFY_ISA='sse9': choose one of avx512, avx2, portable"):
        native.isa()


def test_a_variant_the_cpu_lacks_is_refused_by_library():
    lacking = [n for n in native.ISAS if n not in native.supported_isas()]
    if not lacking:
        pytest.skip("this CPU runs every variant")
    with pytest.raises(native.ISAError, match="this CPU runs only"):
        native.library(lacking[0])


# -- every runnable variant against the torch reference, odd shapes ------------------------------------------

def _weight(out, n_in, pattern, g):
    w = torch.randn(out, n_in, generator=g)
    if pattern == "zero":
        return torch.zeros(out, n_in)
    if pattern == "dense":
        return w
    w = w * (torch.rand(out, n_in, generator=g) < 0.3)
    w[::3] = 0  # empty rows
    w[:, 1::4] = 0  # empty columns
    return w


SHAPES = [(1, 1), (5, 13), (37, 131), (19, 258), (24, 9)]
PATTERNS = ["sparse", "zero", "dense"]


@pytest.mark.parametrize("out,n_in", SHAPES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_panel_csr_odd_shapes(isa, out, n_in, pattern):
    g = torch.Generator().manual_seed(out * 7 + n_in)
    w = _weight(out, n_in, pattern, g)
    packed = spmm.pack(w)
    b = torch.randn(out, generator=g)
    for T in (1, 3, 17):
        x = torch.randn(T, n_in, generator=g)
        torch.testing.assert_close(spmm.matmul(packed, x, b), spmm.reference(w, x, b), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(spmm.matmul(packed, x), spmm.reference(w, x), atol=1e-4, rtol=1e-4)


def _tiles(layout, order):
    """The layout's tiles in ``order``: ``rows`` as stored, ``columns`` re-laid column-major (a copy)."""
    if order == "rows":
        return layout.val
    val = layout.val.clone()
    spmm.tiles_by_columns(val)
    return val


def _declines(isa, val, T, br):
    """Whether ``bsr_matmul`` leaves this call to panel CSR: the portable build always; row-major tiles
    whose height is not a multiple of 4 from 16 tokens on (no tiles, or tiles of one row or column, stay
    row-major); the column kernels (AVX-512 and AVX2) take any height."""
    cols = spmm.is_by_columns(val) and isa != "portable"
    return isa == "portable" or (T >= 16 and br % 4 != 0 and not cols)


# (300, 40): more block rows than one write back takes (16 of 16 rows, 32 of 8), the last group short and its
# last block row partial
@pytest.mark.parametrize("out,n_in", SHAPES + [(300, 40)])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("block", [(16, 16), (8, 8), (3, 5), (20, 7)])
@pytest.mark.parametrize("order", ["rows", "columns"])
def test_bsr_odd_shapes(isa, out, n_in, pattern, block, order):
    from sparsify_plugins.layouts import BSR
    from sparsify_plugins.layouts.weight import BSRParams
    g = torch.Generator().manual_seed(out * 11 + n_in + block[0])
    w = _weight(out, n_in, pattern, g)
    layout = BSR.from_dense(w, BSRParams(block=block))
    b = torch.randn(out, generator=g)
    # 17 and 70: too few token tiles for whole ones per thread (each tile's block rows in parts, 70: a full
    # tile and a partial one); 128 and 520: whole tiles per thread (the last one partial at 520)
    val = _tiles(layout, order)
    for T in (1, 3, 8, 17, 70, 128, 520):
        x = torch.randn(T, n_in, generator=g)
        y = spmm.bsr_matmul(layout.crow, layout.col, val, layout.shape, x, b)
        if _declines(isa, val, T, block[0]):
            assert y is None  # declined: the layout's kernel uses panel CSR instead
            continue
        torch.testing.assert_close(y, spmm.reference(w, x, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("T", [17, 70, 128])
@pytest.mark.parametrize("order", ["rows", "columns"])
def test_bsr_calls_never_reuse_another_calls_packed_tile(isa, T, order):
    """A thread keeps the token tile it packed for its next item of the same call: the next call (other
    activations, same shapes and addresses reused) packs again."""
    if isa == "portable":
        pytest.skip("the many-token BSR kernel needs AVX2 or AVX-512")
    from sparsify_plugins.layouts import BSR
    from sparsify_plugins.layouts.weight import BSRParams
    g = torch.Generator().manual_seed(T)
    w = _weight(64, 96, "sparse", g)
    layout = BSR.from_dense(w, BSRParams(block=(16, 16)))
    x, val = torch.randn(T, 96, generator=g), _tiles(layout, order)
    for step in range(3):
        x.copy_(torch.randn(T, 96, generator=g))  # the same buffer, new values
        y = spmm.bsr_matmul(layout.crow, layout.col, val, layout.shape, x)
        torch.testing.assert_close(y, spmm.reference(w, x), atol=1e-4, rtol=1e-4)


def _bsr_with(setter, value, layout, x, b, val=None):
    """``bsr_matmul`` with a kernel setting (``sp_bsr_set_tile_group``, ``sp_set_input_chunk``,
    ``sp_bsr_set_output_prefetch``) at ``value``."""
    lib = native.library()
    prev = getattr(lib, setter)(value)
    try:
        return spmm.bsr_matmul(layout.crow, layout.col, layout.val if val is None else val, layout.shape, x, b)
    finally:
        getattr(lib, setter)(prev)


@pytest.mark.parametrize("block", [(16, 16), (8, 8), (4, 12)])
@pytest.mark.parametrize("T", [64, 70, 200])
@pytest.mark.parametrize("order", ["rows", "columns"])
def test_bsr_tile_groups_give_the_same_bits(isa, block, T, order):
    """Each register block runs over several tiles of a block row at once (as many as the L1 holds; column-major
    tiles: a chunk of tiles per pass, the sums carried in Y between chunks): every group size, the automatic one
    included, the short last group and a partial token tile, gives the same floats."""
    if isa == "portable":
        pytest.skip("the many-token BSR kernel needs AVX2 or AVX-512")
    from sparsify_plugins.layouts import BSR
    from sparsify_plugins.layouts.weight import BSRParams
    g = torch.Generator().manual_seed(T + block[1])
    w = _weight(40, 300, "sparse", g)  # up to 25-75 tiles per block row
    layout = BSR.from_dense(w, BSRParams(block=block))
    x, b = torch.randn(T, 300, generator=g), torch.randn(40, generator=g)
    val = _tiles(layout, order)
    ys = [_bsr_with("sp_bsr_set_tile_group", group, layout, x, b, val) for group in (1, 2, 3, 7, 0)]
    torch.testing.assert_close(ys[0], spmm.reference(w, x, b), atol=1e-4, rtol=1e-4)
    for y in ys[1:]:
        assert torch.equal(y, ys[0])


@pytest.mark.parametrize("T", [17, 70, 128, 520])
@pytest.mark.parametrize("out", [40, 300, 1100])
def test_bsr_output_prefetch_changes_no_result(isa, T, out):
    """The column-tile kernel prefetches the output lines it stores where the output outgrows the L2 cache
    (1100 x 520 floats is 2.3 MB): forced on, off and automatic give the same bits, the torch reference's sums,
    partial last block rows and token tiles included."""
    if isa == "portable":
        pytest.skip("the many-token BSR kernel needs AVX2 or AVX-512")
    from sparsify_plugins.layouts import BSR
    from sparsify_plugins.layouts.weight import BSRParams
    g = torch.Generator().manual_seed(T + out)
    w = _weight(out, 200, "sparse", g)
    layout = BSR.from_dense(w, BSRParams(block=(16, 16)))
    x, b = torch.randn(T, 200, generator=g), torch.randn(out, generator=g)
    val = _tiles(layout, "columns")
    ys = [_bsr_with("sp_bsr_set_output_prefetch", mode, layout, x, b, val) for mode in (0, 1, -1)]
    torch.testing.assert_close(ys[0], spmm.reference(w, x, b), atol=1e-4, rtol=1e-4)
    for y in ys[1:]:
        assert torch.equal(y, ys[0])


@pytest.mark.parametrize("block", [(16, 16), (8, 8), (4, 12)])
@pytest.mark.parametrize("T", [70, 128, 520])
@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("order", ["rows", "columns"])
def test_bsr_input_chunks(isa, block, T, shuffled, order):
    """Wide inputs go in chunks of block columns (half the L2's worth of a token tile): chunks of 16 and 32
    block columns (two to five chunks here, the last short, block rows with no tile in a chunk) against the
    torch reference, at token counts on both work-sharing paths; a block row's columns out of order (a
    hand-built layout) fall back to one chunk, still right."""
    if isa == "portable":
        pytest.skip("the many-token BSR kernel needs AVX2 or AVX-512")
    from sparsify_plugins.layouts import BSR
    from sparsify_plugins.layouts.weight import BSRParams
    g = torch.Generator().manual_seed(T + block[1] + shuffled)
    w = _weight(40, 600, "sparse", g)
    w[:, 200:400] = 0  # a run of empty block columns: block rows with no tile in a chunk
    layout = BSR.from_dense(w, BSRParams(block=block))
    if shuffled:  # reverse each block row's tiles: the same weight, columns descending
        val, col = layout.val.clone(), layout.col.clone()
        for rb in range(len(layout.crow) - 1):
            lo, hi = int(layout.crow[rb]), int(layout.crow[rb + 1])
            val[lo:hi], col[lo:hi] = layout.val[lo:hi].flip(0), layout.col[lo:hi].flip(0)
        layout = BSR(layout.shape, layout.params, crow=layout.crow, col=col, val=val)
    x, b = torch.randn(T, 600, generator=g), torch.randn(40, generator=g)
    ref = spmm.reference(w, x, b)
    val = _tiles(layout, order)
    for chunk in (16, 32, 0):
        torch.testing.assert_close(_bsr_with("sp_set_input_chunk", chunk, layout, x, b, val), ref, atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("T", [17, 70, 128, 520])
def test_panel_csr_input_chunks_and_parts(isa, T):
    """Panel CSR with many tokens: inputs in chunks of 1 and 2 panels (and the default, one chunk here), token
    tiles whole per thread or cut into parts of row blocks, several calls on one buffer: the torch reference."""
    g = torch.Generator().manual_seed(T)
    w = _weight(300, 600, "sparse", g)  # 5 panels, 3 blocks of 128 rows (the last short)
    w[:, 256:384] = 0  # a panel with no non-zeros
    packed = spmm.pack(w)
    b = torch.randn(300, generator=g)
    x = torch.empty(T, 600)
    lib = native.library()
    for chunk in (1, 2, 0):
        prev = lib.sp_set_input_chunk(chunk) if isa != "portable" else 0
        try:
            x.copy_(torch.randn(T, 600, generator=g))
            torch.testing.assert_close(spmm.matmul(packed, x, b), spmm.reference(w, x, b), atol=1e-4, rtol=1e-4)
        finally:
            if isa != "portable":
                lib.sp_set_input_chunk(prev)


@pytest.mark.parametrize("d,dff", [(1, 1), (13, 37), (67, 130)])
@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("live", [0.0, 0.3, 1.0])
def test_ffn_odd_shapes(isa, d, dff, T, live):
    g = torch.Generator().manual_seed(d + dff + T)
    w_in, w_up, w_down_t = (torch.randn(dff, d, generator=g) / d ** 0.5 for _ in range(3))
    x = torch.randn(T, d, generator=g)
    # FATReLU threshold leaving about `live` of the (token, neuron) gates active (0: none, 1: all), halfway
    # between two gate values so float rounding cannot flip a neuron
    pre = (x @ w_in.T).flatten().sort().values
    k = max(1, min(pre.numel() - 1, int((1 - live) * pre.numel())))
    live = 1.0 if pre.numel() == 1 and live else live
    t = float(pre[0]) - 1 if live == 1.0 else float(pre[-1]) + 1 if live == 0.0 else float(pre[k - 1] + pre[k]) / 2
    args = dict(w_in=w_in, b_in=None, w_up=w_up, b_up=None, w_down_t=w_down_t, b_down=torch.randn(d, generator=g))
    ref = K.ffn_reference(x, act="relu", threshold=t, **args)
    torch.testing.assert_close(K.ffn_sparse(x, act="relu", threshold=t, **args), ref, atol=1e-4, rtol=1e-4)


def test_library_follows_the_environment_at_every_call(monkeypatch):
    """library() caches by SPARSIFY_NO_NATIVE and SPARSIFY_ISA, read (fast) at every call, set either way."""
    import os
    monkeypatch.delenv("SPARSIFY_NO_NATIVE", raising=False)
    monkeypatch.delenv(native.ENV, raising=False)
    first = native.library()
    assert first is not None
    monkeypatch.setenv("SPARSIFY_NO_NATIVE", "1")
    assert native.library() is None
    monkeypatch.setenv("SPARSIFY_NO_NATIVE", "0")
    assert native.library() is first
    monkeypatch.delenv("SPARSIFY_NO_NATIVE")
    for variant in native.supported_isas():
        os.environ[native.ENV] = variant  # plain assignment, as a user's script would
        try:
            assert native.loaded_isa() == variant and native.library() is native.library(variant)
        finally:
            del os.environ[native.ENV]
    assert native.library() is first
    monkeypatch.setattr(native, "_ENV_DATA", None)  # no os.environ dict to read: os.environ.get
    monkeypatch.setenv("SPARSIFY_NO_NATIVE", "1")
    assert native.library() is None
