"""Mask math, as pure functions on tensors (``True`` = keep): magnitude, per-row, n:m, and Wanda's scores.

Weights and scores are ``[out, in]``. Exactness: ``k = round(sparsity * n)``
entries are pruned, never more or fewer, whatever the ties: all entries
below the k-th smallest value ``t`` are pruned, then as many entries equal to
``t`` as still needed, first ones first (tensor order, then index order), so
results are deterministic. n:m masks keep exactly n of every m consecutive
inputs of a row.

Weights pruned by an earlier stage (``pruned``, ``True`` = already pruned)
stay pruned: the run's ``MaskSet`` intersects every new mask with the old
one. So that a stage still delivers what it is asked for, the mask functions
take them as pruned first and count them in the ``k`` of the request: the
result prunes exactly ``k`` weights, the earlier ones among them, whenever
``k`` is at least their number (otherwise no weight beyond them, so that
the intersection with the old mask is the old mask).
"""
from __future__ import annotations

from typing import Sequence

import torch


def prune_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a target ``sparsity`` prunes (rounded half up)."""
    return min(numel, max(0, int(sparsity * numel + 0.5)))


class _Ranked:
    """A weight read through ``magnitude_ranks`` (earlier-pruned entries first), computed only when read,
    so the global threshold's passes still hold one matrix's float32 copy at a time."""

    def __init__(self, weight: torch.Tensor, pruned: torch.Tensor):
        self.weight, self.pruned = weight, pruned

    def numel(self) -> int:
        return self.weight.numel()


def _abs32(t) -> torch.Tensor:
    if isinstance(t, _Ranked):
        return magnitude_ranks(t.weight, t.pruned)
    # float32 holds every bf16/fp16/fp32 value exactly, so comparisons stay exact
    return t.detach().abs().to(torch.float32)


def _bits_to_float(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def _count_at_most(tensors: Sequence[torch.Tensor], threshold: float) -> int:
    return sum(int((_abs32(t) <= threshold).sum()) for t in tensors)


def kth_smallest_abs(tensors: Sequence[torch.Tensor], k: int) -> float:
    """The k-th smallest ``|w|`` (1-based) over all ``tensors``, exactly.

    One tensor: ``torch.kthvalue``. Several: a bisection over the float32 bit
    patterns of ``|w|`` (monotonic for non-negative floats), at most 31
    passes that each count ``|w| <= t`` tensor by tensor, so the extra memory
    is one tensor's ``|w|`` in float32, never a concatenation of all weights.
    """
    n = sum(t.numel() for t in tensors)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside 1..{n}")
    if len(tensors) == 1:
        return float(_abs32(tensors[0]).flatten().kthvalue(k).values)
    top = max(float(_abs32(t).max()) for t in tensors if t.numel())
    lo, hi = 0, int(torch.tensor([top], dtype=torch.float32).view(torch.int32).item())
    while lo < hi:  # smallest bit pattern b with count(|w| <= float(b)) >= k
        mid = (lo + hi) // 2
        if _count_at_most(tensors, _bits_to_float(mid)) >= k:
            hi = mid
        else:
            lo = mid + 1
    return _bits_to_float(lo)


def threshold_masks(tensors: Sequence[torch.Tensor], threshold: float, k: int) -> list[torch.Tensor]:
    """Keep-masks pruning every ``|w| < threshold`` plus the first ties ``|w| == threshold``
    until ``k`` weights are pruned in total (``threshold`` from ``kth_smallest_abs``)."""
    masks, ties_left = [], k - sum(int((_abs32(t) < threshold).sum()) for t in tensors)
    for t in tensors:
        a = _abs32(t)
        prune = a < threshold
        if ties_left > 0:
            eq = (a == threshold).flatten()
            take = eq & (eq.cumsum(0) <= ties_left)
            ties_left -= int(take.sum())
            prune |= take.view_as(prune)
        masks.append(~prune)
    return masks


# the smallest positive float32 (a subnormal): ranks an unpruned exact zero just above pruned ones
_TINY = torch.finfo(torch.float32).smallest_normal * torch.finfo(torch.float32).eps


def magnitude_ranks(weight: torch.Tensor, pruned: torch.Tensor | None = None) -> torch.Tensor:
    """``|weight|`` in float32 with already ``pruned`` entries ranked first.

    Pruned entries become 0 and any other exact zero the smallest positive
    float32, below every non-zero bf16/fp16/fp32 magnitude, so the order of
    the rest is unchanged and a threshold at 0 takes exactly the pruned ones.
    """
    a = _abs32(weight)
    if pruned is None:
        return a
    pruned = pruned.to(a.device)
    return torch.where(pruned, torch.zeros_like(a), torch.where(a == 0, torch.full_like(a, _TINY), a))


def magnitude_mask(weight: torch.Tensor, sparsity: float, pruned: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask zeroing exactly ``round(sparsity * numel)`` smallest-magnitude entries of ``weight``
    (the ``pruned`` ones first, see the module docstring)."""
    return global_magnitude_masks([weight], sparsity, None if pruned is None else [pruned])[0]


def global_threshold(weights: Sequence[torch.Tensor], sparsity: float) -> tuple[float, int]:
    """``(threshold, k)``: the magnitude below which (with ties) ``k = round(sparsity * n)``
    weights of all ``weights`` together are pruned. ``threshold`` is ``-1`` when ``k == 0``."""
    k = prune_count(sum(w.numel() for w in weights), sparsity)
    return (kth_smallest_abs(weights, k) if k else -1.0), k


def global_magnitude_masks(weights: Sequence[torch.Tensor], sparsity: float,
                           pruned: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """Keep-masks pruning exactly ``round(sparsity * n)`` smallest ``|w|`` across all ``weights``
    (``pruned[i]``, same shape as ``weights[i]`` or ``None``: entries pruned before, taken first)."""
    if pruned is not None:
        if len(pruned) != len(weights):
            raise ValueError(f"{len(pruned)} pruned masks for {len(weights)} weights")
        weights = [w if p is None else _Ranked(w, p) for w, p in zip(weights, pruned)]
    threshold, k = global_threshold(weights, sparsity)
    return threshold_masks(weights, threshold, k)


# -- structures: per-row and n:m ----------------------------------------------------

def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> ``None``; ``"n:m"`` -> ``(n, m)``: keep n of every m consecutive weights.

    Raises ``ValueError`` unless ``0 < n < m``.
    """
    if pattern == "unstructured":
        return None
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"pattern {pattern!r} is neither 'unstructured' nor 'n:m' (e.g. '2:4')")
    n, m = (int(p) for p in parts)
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: needs 0 < n < m (keep n of every m weights)")
    return n, m


def nm_mask(scores: torch.Tensor, n: int, m: int, pruned: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask of a ``[out, in]`` score matrix keeping the ``n`` highest of every ``m`` consecutive inputs.

    Groups run along the input dimension (the last), as sparse tensor cores
    need; every group keeps exactly ``n`` entries (ties: lower index first).
    Entries already ``pruned`` (``[out, in]`` bool) are never kept; a group
    with more than ``m - n`` of them cannot hold the pattern: see
    ``nm_overflow``. Raises ``ValueError`` unless ``in`` is a multiple of ``m``.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} inputs are not a multiple of m={m}")
    s = scores.detach().float()
    if pruned is not None:
        s = s.masked_fill(pruned.to(s.device), -torch.inf)
    groups = s.reshape(rows, cols // m, m)
    # stable descending sort: among equal scores the lower index is kept, deterministically
    top = groups.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(rows, cols)


def nm_overflow(pruned: torch.Tensor, n: int, m: int) -> int:
    """How many groups of ``m`` consecutive inputs of a ``[out, in]`` mask already have more than ``m - n`` pruned."""
    rows, cols = pruned.shape
    return int((pruned.reshape(rows, cols // m, m).sum(-1) > m - n).sum())


def row_quotas(floors: torch.Tensor, cols: int, k: int) -> torch.Tensor:
    """How many of each row's ``cols`` entries to prune so that ``k`` are pruned in all (int64 ``[rows]``).

    Every row prunes at least ``floors[r]`` (its entries pruned before) and
    the rows are otherwise as even as possible: ``max(floors[r], L)`` or one
    more, for the largest level ``L`` that fits, the extra ones going to the
    first rows at the level. ``k`` below ``sum(floors)`` gives ``floors``.
    """
    f = floors.to(torch.int64)
    if k <= int(f.sum()):
        return f.clone()
    lo, hi = 0, cols  # largest L with sum(max(f, L)) <= k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if int(f.clamp(min=mid).sum()) <= k else (lo, mid - 1)
    counts = f.clamp(min=lo)
    extra = k - int(counts.sum())
    at_level = f <= lo
    counts += (at_level & (at_level.cumsum(0) <= extra)).to(torch.int64)
    return counts


def row_mask(scores: torch.Tensor, sparsity: float, pruned: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask of a ``[out, in]`` score matrix pruning the lowest scores of each row,
    ``round(sparsity * out * in)`` in all.

    Wanda's comparison group is the output row: each row prunes its own lowest
    scores, ``sparsity * in`` of them rounded down or up (``row_quotas``) so
    that the matrix total is exact rather than off by up to half a weight per
    row. Entries already ``pruned`` (``[out, in]`` bool) are pruned first and
    count in their row's share. Ties: lower index pruned first.
    """
    rows, cols = scores.shape
    floors = torch.zeros(rows, dtype=torch.int64) if pruned is None else pruned.sum(-1).cpu()
    counts = row_quotas(floors, cols, prune_count(rows * cols, sparsity)).to(scores.device)
    s = scores.detach().float()
    if pruned is not None:
        s = s.masked_fill(pruned.to(s.device), -torch.inf)
    order = s.sort(dim=-1, stable=True).indices  # stable: among equal scores the lower index goes first
    rank_pruned = torch.arange(cols, device=s.device)[None, :] < counts[:, None]
    return ~torch.zeros_like(rank_pruned).scatter_(-1, order, rank_pruned)


def structured_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                    pruned: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row unstructured (``nm`` None) or n:m keep-mask of ``[out, in]`` scores (``pruned``: taken first)."""
    return row_mask(scores, sparsity, pruned) if nm is None else nm_mask(scores, *nm, pruned)


# -- scores ---------------------------------------------------------------------------

def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's ``|W_ij| * ||X_j||_2`` for a ``[out, in]`` weight, from per-input squared norms ``[in]``.

    ``sq_norms[j]`` is ``sum_t x_tj^2`` over the calibration tokens (any
    positive rescaling, such as a mean, ranks weights the same).
    """
    return weight.detach().float().abs() * sq_norms.detach().float().sqrt().to(weight.device)
