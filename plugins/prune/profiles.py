"""Per-layer sparsity profiles, as pure functions: uniform, explicit, and OWL's outlier-weighted one.

OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): layers holding
more outliers of the Wanda score ``|W_ij| * ||X_j||_2`` are pruned less. A
layer's outlier ratio is the fraction of its scores (all its targeted
matrices together) above ``M`` times their mean. Ratios are min-max
normalised to ``r`` in [0, 1] and, as in the reference code, the layer keeps
``(1 - S) + 2 lambda (r_l - mean(r))`` of its weights, i.e.

    sparsity_l = S - 2 lambda (r_l - mean(r))

so the mean sparsity stays ``S`` and the sparsities span at most ``2 lambda``
(``S +- lambda`` around the middle layer). Paper defaults: ``M = 5``,
``lambda = 0.08``.
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


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """OWL's per-layer sparsities from the layers' outlier ratios (see the module docstring).

    Equal ratios give the uniform profile. Values are clipped to [0, 1), which
    only matters when ``S +- 2 lambda`` leaves that range.
    """
    r = torch.tensor(list(ratios), dtype=torch.float64)
    spread = r.max() - r.min() if r.numel() else torch.tensor(0.0)
    if r.numel() == 0 or spread <= 0:
        return [float(sparsity)] * r.numel()
    r = (r - r.min()) / spread
    s = sparsity - 2 * lam * (r - r.mean())
    return [min(max(float(v), 0.0), 1.0 - 1e-9) for v in s]


def layer_sparsities(profile: str | Sequence[float], sparsity: float | None, n_layers: int,
                     ratios: Sequence[float] | None = None, lam: float = 0.08) -> list[float]:
    """The sparsity of each of ``n_layers`` layers under ``profile``.

    ``uniform``: ``sparsity`` everywhere; a list: itself (its length must be
    ``n_layers``); ``owl``: ``owl_sparsities(ratios, sparsity, lam)``.
    """
    if isinstance(profile, str):
        if profile == "uniform":
            return [float(sparsity)] * n_layers
        if profile == "owl":
            if ratios is None or len(ratios) != n_layers:
                raise ValueError(f"the owl profile needs one outlier ratio per layer ({n_layers})")
            return owl_sparsities(ratios, float(sparsity), lam)
        raise ValueError(f"unknown profile {profile!r}")
    if len(profile) != n_layers:
        raise ValueError(f"the sparsity profile lists {len(profile)} values but there are {n_layers} layers")
    return [float(v) for v in profile]
