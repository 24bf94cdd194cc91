"""Mask math, as pure functions on tensors (``True`` = keep): magnitude, per-row, n:m, and Wanda's scores.

Weights and scores are ``[out, in]``. Exactness: ``k = round(sparsity * n)``
entries are pruned, never more or fewer, whatever the ties: all entries
below the k-th smallest value ``t`` are pruned, then as many entries equal to
``t`` as still needed, first ones first (tensor order, then index order), so
results are deterministic. n:m masks keep exactly n of every m consecutive
inputs of a row.
"""
from __future__ import annotations

from typing import Sequence

import torch


def prune_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a target ``sparsity`` prunes (rounded half up)."""
    return min(numel, max(0, int(sparsity * numel + 0.5)))


def _abs32(t: torch.Tensor) -> torch.Tensor:
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


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask zeroing exactly ``round(sparsity * numel)`` smallest-magnitude entries of ``weight``."""
    return global_magnitude_masks([weight], sparsity)[0]


def global_threshold(weights: Sequence[torch.Tensor], sparsity: float) -> tuple[float, int]:
    """``(threshold, k)``: the magnitude below which (with ties) ``k = round(sparsity * n)``
    weights of all ``weights`` together are pruned. ``threshold`` is ``-1`` when ``k == 0``."""
    k = prune_count(sum(w.numel() for w in weights), sparsity)
    return (kth_smallest_abs(weights, k) if k else -1.0), k


def global_magnitude_masks(weights: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep-masks pruning exactly ``round(sparsity * n)`` smallest ``|w|`` across all ``weights``."""
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


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask of a ``[out, in]`` score matrix keeping the ``n`` highest of every ``m`` consecutive inputs.

    Groups run along the input dimension (the last), as sparse tensor cores
    need; every group keeps exactly ``n`` entries (ties: lower index first).
    ``in`` must be a multiple of ``m``.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} inputs are not a multiple of m={m}")
    groups = scores.detach().float().reshape(rows, cols // m, m)
    # stable descending sort: among equal scores the lower index is kept, deterministically
    top = groups.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(rows, cols)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of a ``[out, in]`` score matrix pruning the ``round(sparsity * in)`` lowest scores of each row.

    Wanda's comparison group: every output row ends with exactly the same
    number of weights (ties at a row's threshold: lower index pruned first).
    """
    rows, cols = scores.shape
    k = prune_count(cols, sparsity)
    if k == 0:
        return torch.ones((rows, cols), dtype=torch.bool, device=scores.device)
    s = scores.detach().float()
    threshold = s.kthvalue(k, dim=-1, keepdim=True).values  # a row-wise selection, cheaper than sorting
    prune = s < threshold
    ties = s == threshold
    prune |= ties & (ties.cumsum(-1) <= k - prune.sum(-1, keepdim=True))
    return ~prune


def structured_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """Per-row unstructured (``nm`` None) or n:m keep-mask of ``[out, in]`` scores."""
    return row_mask(scores, sparsity) if nm is None else nm_mask(scores, *nm)


# -- scores ---------------------------------------------------------------------------

def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's ``|W_ij| * ||X_j||_2`` for a ``[out, in]`` weight, from per-input squared norms ``[in]``.

    ``sq_norms[j]`` is ``sum_t x_tj^2`` over the calibration tokens (any
    positive rescaling, such as a mean, ranks weights the same).
    """
    return weight.detach().float().abs() * sq_norms.detach().float().sqrt().to(weight.device)
