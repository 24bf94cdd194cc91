"""Fast modules of the plugin's own: a Linear whose weight is entirely zero computes only its bias.

A stage that prunes a whole matrix (``prune/random`` at sparsity near 1, or a
removed expert) leaves a Linear that still multiplies by zeros; ``ZeroLinear``
skips the product, exactly.
"""
from __future__ import annotations

import torch
from torch import nn


class ZeroLinear(nn.Module):
    """``y = b`` (or zeros) for an all-zero ``[out, in]`` weight: ``x [..., in] -> y [..., out]``."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        y = x.new_zeros(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def zero_linears(model: nn.Module, masks) -> list[str]:
    """Swap every ``nn.Linear`` whose weight is all zero for a ``ZeroLinear``; returns one line per swap.

    Its mask (if any) goes with the weight: nothing of it is left to keep at zero."""
    done = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and not torch.any(module.weight):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    ZeroLinear(module.in_features, module.out_features, module.bias))
            if f"{name}.weight" in masks:
                masks.drop(f"{name}.weight")
            done.append(f"{name}: all-zero weight, bias only (ZeroLinear)")
    return done
