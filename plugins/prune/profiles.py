"""Per-layer sparsity profiles, as pure functions: uniform, explicit, and OWL's outlier-weighted one.

OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): layers holding
more outliers of the Wanda score ``|W_ij| * ||X_j||_2`` are pruned less. A
layer's outlier ratio is the fraction of its scores (all its targeted
matrices together) above ``M`` times their mean. Ratios are min-max
normalised to ``r`` in [0, 1] and, as in the reference code, the layer keeps
``(1 - S) + 2 lambda (r_l - mean(r))`` of its weights, i.e.

    sparsity_l = S - 2 lambda (r_l - mean(r))

so the sparsities span at most ``2 lambda``. Paper defaults: ``M = 5``,
``lambda = 0.08``.

What ``S`` means here: the fraction of the *targeted weights* that is pruned,
not the mean over layers. The reference code centres on the plain mean of
``r`` over layers, which delivers ``S`` only when every layer holds the same
number of targeted weights. Here the centre ``c`` replaces ``mean(r)`` and is
chosen so that ``sum_l n_l sparsity_l = S sum_l n_l`` (``n_l``: targeted
weights of layer ``l``), also after clipping to [0, 1): without clipping
``c`` is the ``n``-weighted mean of ``r``; with clipping the other layers
shift together until the total is met. Layers with ``n_l = 0`` (nothing
targeted) take no part: they neither set the min-max range nor the total.
"""
from __future__ import annotations

from typing import Sequence

import torch


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """Fraction of all entries of ``scores`` above ``threshold`` times their mean (OWL's layer outlier ratio)."""
    total = sum(s.numel() for s in scores)
    if total == 0:
        return 0.0
    mean = sum(float(s.double().sum()) for s in scores) / total
    return sum(int((s.double() > threshold * mean).sum()) for s in scores) / total


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float,
                   sizes: Sequence[int] | None = None) -> list[float]:
    """OWL's per-layer sparsities from the layers' outlier ratios (see the module docstring).

    ``sizes[l]`` is the number of targeted weights of layer ``l`` (default:
    all equal); the result prunes exactly ``sparsity`` of them in total
    (before each matrix rounds to whole weights). Layers of size 0 get
    ``sparsity`` (nothing of theirs is pruned). Values stay in [0, 1): when
    ``S +- 2 lambda`` leaves that range, the clipped layers are held at the
    bound and the others move together to keep the total. Equal ratios give
    the uniform profile. Raises ``ValueError`` for a negative size or no
    positive one.
    """
    r = torch.tensor(list(ratios), dtype=torch.float64)
    n = torch.ones_like(r) if sizes is None else torch.tensor(list(sizes), dtype=torch.float64)
    if n.shape != r.shape or (n < 0).any() or (r.numel() and not (n > 0).any()):
        raise ValueError(f"owl needs one non-negative size per layer, some positive; got {list(n.tolist())}")
    out = torch.full_like(r, float(sparsity))
    live = n > 0
    rl, nl = r[live], n[live]
    spread = rl.max() - rl.min() if rl.numel() else torch.tensor(0.0)
    if rl.numel() == 0 or spread <= 0:
        return out.tolist()
    rl = (rl - rl.min()) / spread
    top = 1.0 - 1e-9

    def layers(centre: float) -> torch.Tensor:
        return (sparsity - 2 * lam * (rl - centre)).clamp(0.0, top)

    def total(centre: float) -> float:
        return float((layers(centre) * nl).sum() / nl.sum())

    centre = float((rl * nl).sum() / nl.sum())  # the n-weighted mean: exact when nothing clips
    if abs(total(centre) - sparsity) > 1e-12:
        # total(c) rises with c from 0 to ~1: bisect (r and c live in [0, 1], sparsities move by 2 lambda per unit)
        lo, hi = -1.0 / max(2 * lam, 1e-12), 1.0 + 1.0 / max(2 * lam, 1e-12)
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if total(mid) < sparsity else (lo, mid)
        centre = (lo + hi) / 2
    out[live] = layers(centre)
    return out.tolist()


def layer_sparsities(profile: str | Sequence[float], sparsity: float | None, n_layers: int,
                     ratios: Sequence[float] | None = None, lam: float = 0.08,
                     sizes: Sequence[int] | None = None) -> list[float]:
    """The sparsity of each of ``n_layers`` layers under ``profile``.

    ``uniform``: ``sparsity`` everywhere; a list: itself (its length must be
    ``n_layers``); ``owl``: ``owl_sparsities(ratios, sparsity, lam, sizes)``,
    ``sizes`` being the targeted weights per layer. Raises ``ValueError`` on
    a length mismatch or an unknown profile.
    """
    if isinstance(profile, str):
        if profile == "uniform":
            return [float(sparsity)] * n_layers
        if profile == "owl":
            if ratios is None or len(ratios) != n_layers:
                raise ValueError(f"the owl profile needs one outlier ratio per layer ({n_layers})")
            return owl_sparsities(ratios, float(sparsity), lam, sizes)
        raise ValueError(f"unknown profile {profile!r}")
    if len(profile) != n_layers:
        raise ValueError(f"the sparsity profile lists {len(profile)} values but there are {n_layers} layers")
    return [float(v) for v in profile]
