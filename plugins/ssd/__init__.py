"""SSD: Switchable Sparse-Dense training (``docs/methods.md#ssd``).

- ``train/ssd`` (``method``): dense training with an activation-pattern
  stability monitor (``monitor``), a switch to sparse MoE training when the
  pattern is stable and back to dense at the end (``schedule``), and the FFN
  FLOPs training spent against dense training (``flops``). Experts and
  routers come from ``plugins/moe``.
- ``moeify/routing`` (``routing``): run a model split into experts dense or as
  an MoE (top-k, threshold) without changing its weights.
"""
from __future__ import annotations

from sparsify_core import hookimpl

from .method import SSD, SSDCallback, SSDParams, StabilityMonitor
from .routing import Routing

__all__ = ["SSD", "Routing", "SSDCallback", "SSDParams", "StabilityMonitor"]


@hookimpl
def sparsify_methods():
    """``train/ssd`` and ``moeify/routing``."""
    return [SSD, Routing]
