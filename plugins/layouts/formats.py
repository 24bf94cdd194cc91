"""Sparse weight formats as pure functions on tensors: dense -> storage -> dense.

Every weight is ``[out, in]`` (``y = x @ W.T``); the sparse dimension of n:m
and n:m:g is ``in`` (the reduction dimension), as for 2:4 on GPUs. Shapes that
are not multiples of a block are padded with zeros inside the storage and
cropped on the way back, so every conversion is exact.

- CSR: ``crow [out+1]`` (int64), ``col [nnz]`` (int32), ``val [nnz]``.
- BSR: blocks of ``br x bc``; ``crow [out/br+1]``, ``col [nnzb]`` (block
  columns), ``val [nnzb, br, bc]``; a block is stored iff it has a non-zero.
- n:m: ``val [out, in/m*n]`` and ``idx [out, in/m*n]`` (uint8, position
  0..m-1 inside its block of m). A block with fewer than n non-zeros stores
  explicit zeros at unused positions.
- n:m:g (STen): rows are grouped in chunks of ``C(m, n) * g``; in each chunk
  and each block of m inputs, every one of the C(m, n) n-of-m patterns is
  used by exactly g rows. ``val [chunks, in/m, C, g, n]`` and
  ``row [chunks, in/m, C, g]`` (int16: the row inside its chunk).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch


def _pad_to(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if w.shape == (rows, cols):
        return w
    out = w.new_zeros(rows, cols)
    out[: w.shape[0], : w.shape[1]] = w
    return out


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# -- CSR -------------------------------------------------------------------------------

def csr_from_dense(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(crow, col, val)`` of the non-zeros of ``w``, row by row, columns ascending."""
    nz = w != 0
    counts = nz.sum(1)
    crow = torch.zeros(w.shape[0] + 1, dtype=torch.int64)
    crow[1:] = counts.cumsum(0)
    rows, cols = nz.nonzero(as_tuple=True)
    return crow, cols.to(torch.int32), w[rows, cols].contiguous()


def csr_to_dense(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense ``[out, in]`` matrix of a CSR triple."""
    out = val.new_zeros(shape)
    rows = torch.repeat_interleave(torch.arange(shape[0]), crow[1:] - crow[:-1])
    out[rows, col.long()] = val
    return out


def csr_matmul(crow, col, val, shape, x: torch.Tensor) -> torch.Tensor:
    """Reference ``x @ W.T`` from CSR: gather inputs, scale, sum per row."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, shape[1])
    rows = torch.repeat_interleave(torch.arange(shape[0], device=x.device), (crow[1:] - crow[:-1]).to(x.device))
    prod = x2[:, col.long()] * val.to(x.dtype)
    y = x2.new_zeros(x2.shape[0], shape[0]).index_add_(1, rows, prod)
    return y.reshape(*lead, shape[0])


# -- BSR -------------------------------------------------------------------------------

def bsr_from_dense(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(crow, col, val)`` over ``block``-sized tiles; a tile is stored iff it has a non-zero."""
    br, bc = block
    R, C = _ceil(w.shape[0], br), _ceil(w.shape[1], bc)
    tiles = _pad_to(w, R * br, C * bc).reshape(R, br, C, bc).permute(0, 2, 1, 3)  # [R, C, br, bc]
    keep = (tiles != 0).flatten(2).any(-1)
    crow = torch.zeros(R + 1, dtype=torch.int64)
    crow[1:] = keep.sum(1).cumsum(0)
    r, c = keep.nonzero(as_tuple=True)
    return crow, c.to(torch.int32), tiles[r, c].contiguous()


def bsr_to_dense(crow, col, val, shape: tuple[int, int]) -> torch.Tensor:
    """The dense ``[out, in]`` matrix of a BSR triple (``val [nnzb, br, bc]``)."""
    br, bc = val.shape[1:]
    R, C = _ceil(shape[0], br), _ceil(shape[1], bc)
    tiles = val.new_zeros(R, C, br, bc)
    rows = torch.repeat_interleave(torch.arange(R), crow[1:] - crow[:-1])
    tiles[rows, col.long()] = val
    return tiles.permute(0, 2, 1, 3).reshape(R * br, C * bc)[: shape[0], : shape[1]].contiguous()


def bsr_matmul(crow, col, val, shape, x: torch.Tensor) -> torch.Tensor:
    """Reference ``x @ W.T`` from BSR: per stored tile, a small dense product added to its block row."""
    br, bc = val.shape[1:]
    R, C = _ceil(shape[0], br), _ceil(shape[1], bc)
    lead = x.shape[:-1]
    x2 = _pad_to(x.reshape(-1, shape[1]), x.reshape(-1, shape[1]).shape[0], C * bc).reshape(-1, C, bc)
    rows = torch.repeat_interleave(torch.arange(R, device=x.device), (crow[1:] - crow[:-1]).to(x.device))
    part = torch.einsum("tkc,krc->tkr", x2[:, col.long()], val.to(x.dtype))  # [T, nnzb, br]
    y = x2.new_zeros(x2.shape[0], R, br).index_add_(1, rows, part)
    return y.reshape(x2.shape[0], R * br)[:, : shape[0]].reshape(*lead, shape[0])


# -- n:m -------------------------------------------------------------------------------

def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask of the n largest ``|w|`` in every block of m consecutive inputs (ties: first ones).

    The selection is the pruning plugin's (``sparsify_plugins.prune.masks.nm_mask``); this
    wrapper takes a weight instead of scores and allows a last partial block.
    """
    from sparsify_plugins.prune.masks import nm_mask as select

    rows, cols = w.shape
    padded = _pad_to(w.detach().abs().float(), rows, _ceil(cols, m) * m)
    return select(padded, n, m)[:, :cols]


def nm_from_dense(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(val, idx)`` of a weight with at most n non-zeros in every block of m inputs.

    Raises ``ValueError`` naming the first offending block otherwise (the
    conversion never drops a non-zero: prune first, e.g. with ``nm_mask``).
    """
    rows, cols = w.shape
    blocks = _pad_to(w, rows, _ceil(cols, m) * m).reshape(rows, -1, m)
    nz = blocks != 0
    over = nz.sum(-1) > n
    if over.any():
        r, b = over.nonzero()[0].tolist()
        raise ValueError(f"not {n}:{m} sparse: row {r}, inputs {b * m}..{b * m + m - 1} hold "
                         f"{int(nz[r, b].sum())} non-zeros")
    # Non-zeros first (stable), so the n kept positions include every non-zero, in ascending order.
    order = torch.sort((~nz).to(torch.int8), dim=-1, stable=True).indices[..., :n]
    idx = order.sort(-1).values
    val = blocks.gather(-1, idx)
    return val.reshape(rows, -1).contiguous(), idx.reshape(rows, -1).to(torch.uint8).contiguous()


def nm_to_dense(val, idx, n: int, m: int, shape: tuple[int, int]) -> torch.Tensor:
    """The dense ``[out, in]`` matrix of an n:m pair."""
    rows = shape[0]
    blocks = val.new_zeros(rows, _ceil(shape[1], m), m)
    blocks.scatter_(-1, idx.reshape(rows, -1, n).long(), val.reshape(rows, -1, n))
    return blocks.reshape(rows, -1)[:, : shape[1]].contiguous()


def nm_matmul(val, idx, n: int, m: int, shape, x: torch.Tensor) -> torch.Tensor:
    """Reference ``x @ W.T`` from n:m: input columns gathered by absolute index."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, shape[1])
    nb = _ceil(shape[1], m)
    x2 = _pad_to(x2, x2.shape[0], nb * m)
    cols = (idx.reshape(shape[0], nb, n).long() + torch.arange(nb).view(1, -1, 1) * m).reshape(shape[0], -1)
    y = torch.einsum("tok,ok->to", x2[:, cols.to(x.device)], val.to(x.dtype))
    return y.reshape(*lead, shape[0])


# -- n:m:g -----------------------------------------------------------------------------

@lru_cache(maxsize=None)
def nmg_patterns(n: int, m: int) -> tuple[tuple[int, ...], ...]:
    """All C(m, n) n-of-m index sets, ordered so neighbours differ in exactly one index.

    The revolving-door order: patterns without ``m-1`` first, then those with
    it in reverse, recursively (consecutive sets swap one element).
    """
    if n == 0:
        return ((),)
    if n == m:
        return (tuple(range(m)),)
    without = nmg_patterns(n, m - 1)
    with_last = tuple(p + (m - 1,) for p in reversed(nmg_patterns(n - 1, m - 1)))
    return without + with_last


def _pattern_masks(n: int, m: int) -> torch.Tensor:
    pats = nmg_patterns(n, m)
    masks = torch.zeros(len(pats), m, dtype=torch.bool)
    for i, p in enumerate(pats):
        masks[i, list(p)] = True
    return masks


def _match_lossless(cover: list[list[int]], C: int, g: int) -> list[int] | None:
    """Give each vector a pattern among those in ``cover[v]``, each pattern exactly g times.

    Kuhn's bipartite matching of vectors to the ``C * g`` pattern slots;
    ``None`` if no such assignment exists.
    """
    slot_owner = [-1] * (C * g)

    def augment(v: int, seen: list[bool]) -> bool:
        for p in cover[v]:
            for s in range(p * g, p * g + g):
                if seen[s]:
                    continue
                seen[s] = True
                if slot_owner[s] < 0 or augment(slot_owner[s], seen):
                    slot_owner[s] = v
                    return True
        return False

    for v in range(len(cover)):
        if not augment(v, [False] * (C * g)):
            return None
    owner = [-1] * len(cover)
    for s, v in enumerate(slot_owner):
        owner[v] = s // g
    return owner


def nmg_assign(w: torch.Tensor, n: int, m: int, g: int) -> torch.Tensor:
    """Pattern index of every vector (``[chunks, in/m, C*g]``, vector = one row's block of m).

    Greedy (``docs/methods.md#nmg``): score every (vector, pattern) by the ``|w|`` it keeps,
    and repeatedly take the best pair whose vector is unassigned and whose
    pattern still has fewer than g vectors. Vectors losing no non-zero are
    preferred, so a weight that already is n:m:g keeps all its non-zeros; the
    rare group where greedy order would still drop one is solved exactly by
    augmenting paths.
    """
    masks = _pattern_masks(n, m)
    C = masks.shape[0]
    V = C * g
    rows, cols = w.shape
    nb = _ceil(cols, m)
    chunks = _ceil(rows, V)
    a = _pad_to(w.detach().abs().float(), chunks * V, nb * m).reshape(chunks, V, nb, m).permute(0, 2, 1, 3)
    kept = torch.einsum("kbvm,pm->kbvp", a, masks.float())  # [chunks, nb, V, C]
    lost = torch.einsum("kbvm,pm->kbvp", (a != 0).float(), (~masks).float())
    # Lossless pairs outrank every lossy one; then the |w| kept decides.
    score = kept - lost * (a.sum(-1, keepdim=True) + 1)
    groups = score.reshape(-1, V, C).clone()
    G = groups.shape[0]
    assign = torch.full((G, V), -1, dtype=torch.int64)
    used = torch.zeros(G, C, dtype=torch.int64)
    ar = torch.arange(G)
    neg = torch.finfo(groups.dtype).min
    for _ in range(V):
        best = groups.reshape(G, -1).argmax(-1)
        v, p = best // C, best % C
        assign[ar, v] = p
        used[ar, p] += 1
        groups[ar, v, :] = neg  # vector taken
        full = used == g
        groups.masked_fill_(full[:, None, :], neg)
    # Exact repair where greedy lost a non-zero that a perfect assignment keeps.
    lossy = lost.reshape(G, V, C).gather(-1, assign[..., None]).squeeze(-1).sum(-1) > 0
    covers = lost.reshape(G, V, C) == 0
    fixable = lossy & covers.any(-1).all(-1)  # every vector has some lossless pattern
    for gi in fixable.nonzero().flatten().tolist():
        cover = [covers[gi, v].nonzero().flatten().tolist() for v in range(V)]
        owner = _match_lossless(cover, C, g)
        if owner is not None:
            assign[gi] = torch.tensor(owner)
    return assign.reshape(chunks, nb, V)


def nmg_from_dense(w: torch.Tensor, n: int, m: int, g: int, *, exact: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(val [chunks, in/m, C, g, n], row [chunks, in/m, C, g])`` by the greedy assignment.

    With ``exact`` (the layout conversion), raises ``ValueError`` if any
    non-zero would be dropped; ``exact=False`` is the n:m:g sparsifier.
    """
    masks = _pattern_masks(n, m)
    C = masks.shape[0]
    V = C * g
    rows, cols = w.shape
    nb = _ceil(cols, m)
    chunks = _ceil(rows, V)
    assign = nmg_assign(w, n, m, g)  # [chunks, nb, V]
    blocks = _pad_to(w, chunks * V, nb * m).reshape(chunks, V, nb, m).permute(0, 2, 1, 3)  # [k, b, V, m]
    # Vectors sorted by pattern: each pattern's g vectors are contiguous.
    order = torch.sort(assign, dim=-1, stable=True).indices  # [k, b, V]
    row = order.reshape(chunks, nb, C, g)
    pat_idx = torch.tensor(nmg_patterns(n, m), dtype=torch.int64)  # [C, n]
    vec = blocks.gather(2, order[..., None].expand(-1, -1, -1, m)).reshape(chunks, nb, C, g, m)
    val = vec.gather(-1, pat_idx.view(1, 1, C, 1, n).expand(chunks, nb, C, g, n))
    if exact:
        kept = val.ne(0).sum()
        total = w.ne(0).sum()
        if int(kept) != int(total):
            raise ValueError(f"not {n}:{m}:{g} sparse: the grouped format would drop {int(total - kept)} of "
                             f"{int(total)} non-zeros (prune with the nmg method first)")
    return val.contiguous(), row.to(torch.int16).contiguous()


def nmg_to_dense(val, row, n: int, m: int, g: int, shape: tuple[int, int]) -> torch.Tensor:
    """The dense ``[out, in]`` matrix of an n:m:g pair."""
    chunks, nb, C = val.shape[:3]
    V = C * g
    pat_idx = torch.tensor(nmg_patterns(n, m), dtype=torch.int64)
    vec = val.new_zeros(chunks, nb, C, g, m)
    vec.scatter_(-1, pat_idx.view(1, 1, C, 1, n).expand(chunks, nb, C, g, n), val)
    blocks = val.new_zeros(chunks, nb, V, m)
    blocks.scatter_(2, row.reshape(chunks, nb, V, 1).long().expand(-1, -1, -1, m), vec.reshape(chunks, nb, V, m))
    dense = blocks.permute(0, 2, 1, 3).reshape(chunks * V, nb * m)
    return dense[: shape[0], : shape[1]].contiguous()


def nmg_matmul(val, row, n: int, m: int, g: int, shape, x: torch.Tensor) -> torch.Tensor:
    """Reference ``x @ W.T`` from n:m:g: per (chunk, block, pattern), a dense ``[T, n] x [n, g]`` product."""
    chunks, nb, C = val.shape[:3]
    V = C * g
    lead = x.shape[:-1]
    x2 = x.reshape(-1, shape[1])
    x2 = _pad_to(x2, x2.shape[0], nb * m).reshape(-1, nb, m)
    pat_idx = torch.tensor(nmg_patterns(n, m), dtype=torch.int64, device=x.device)  # [C, n]
    xp = x2[:, :, pat_idx]  # [T, nb, C, n]
    part = torch.einsum("tbcn,kbcgn->tkbcg", xp, val.to(x.dtype))  # [T, chunks, nb, C, g]
    out_rows = (row.long().to(x.device) + torch.arange(chunks, device=x.device).view(-1, 1, 1, 1) * V)
    y = x2.new_zeros(x2.shape[0], chunks * V)
    y.index_add_(1, out_rows.flatten(), part.reshape(x2.shape[0], -1))
    return y[:, : shape[0]].reshape(*lead, shape[0])


def combinations(m: int, n: int) -> int:
    """C(m, n): the number of n:m patterns."""
    return math.comb(m, n)
