"""The activation-pattern stability monitor of SSD, as pure functions on small tensors.

SSD switches to sparse training once *which neurons fire for which tokens*
stops changing. The paper does not publish its metric; sparsify's is:

- a token's **active set** in one FFN layer is the set of neurons whose
  ``|x1|`` is among the token's ``active_fraction`` largest (SiLU/GELU models,
  whose ``x1`` has no exact zeros), or, with ``active_fraction=None``, the
  neurons with ``x1 != 0`` (ReLU-family models);
- the **pattern similarity** between two monitor points is the Jaccard
  similarity ``|A ∩ B| / |A ∪ B|`` of each probe token's active sets at the
  two points, averaged over the tokens of a fixed probe batch and then over
  the FFN layers (two empty sets count as identical, 1).

It is 1 when no token changed its active neurons and about
``f / (2 - f)`` for unrelated sets of a fraction ``f`` of the neurons (0.05
for ``f = 0.1``).
"""
from __future__ import annotations

import base64

import numpy as np
import torch


def active_neurons(x1: torch.Tensor, active_fraction: float | None = None) -> torch.Tensor:
    """Boolean ``[tokens, d_ff]``: each token's active neurons (see the module docs).

    ``x1`` is ``[..., d_ff]`` with tokens on the leading dimensions.
    """
    a = x1.detach().reshape(-1, x1.shape[-1])
    if active_fraction is None:
        return a != 0
    k = max(1, round(active_fraction * a.shape[-1]))
    top = a.abs().topk(k, dim=-1).indices
    return torch.zeros(a.shape, dtype=torch.bool, device=a.device).scatter_(-1, top, True)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Jaccard similarity of two boolean ``[tokens, d_ff]`` sets (1 where both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"active sets of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
    inter = (a & b).sum(-1).double()
    union = (a | b).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def pattern_similarity(previous: list[torch.Tensor], current: list[torch.Tensor]) -> float:
    """Mean over FFN layers of the mean over tokens of ``jaccard`` (the monitor's curve value)."""
    if len(previous) != len(current) or not current:
        raise ValueError(f"patterns of {len(previous)} and {len(current)} layers")
    return float(torch.stack([jaccard(p, c).mean() for p, c in zip(previous, current)]).mean())


def pack_pattern(layers: list[torch.Tensor]) -> dict:
    """A JSON-serialisable form of an activation pattern (bit-packed, base64), for mid-stage checkpoints."""
    return {"shapes": [list(t.shape) for t in layers],
            "bits": [base64.b64encode(np.packbits(t.cpu().numpy().reshape(-1)).tobytes()).decode("ascii")
                     for t in layers]}


def unpack_pattern(packed: dict) -> list[torch.Tensor]:
    """Inverse of ``pack_pattern``."""
    out = []
    for shape, bits in zip(packed["shapes"], packed["bits"]):
        n = int(np.prod(shape))
        flat = np.unpackbits(np.frombuffer(base64.b64decode(bits), dtype=np.uint8))[:n]
        out.append(torch.from_numpy(flat.astype(bool)).reshape(shape))
    return out
