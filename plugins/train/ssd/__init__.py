"""SSD: Switchable Sparse-Dense training, ``train/ssd`` (``docs/methods.md#ssd``).

Dense training with an activation-pattern stability monitor (``monitor``), a
switch to sparse MoE training when the pattern is stable and back to dense at
the end (``schedule``), and the FFN FLOPs training spent against dense
training (``flops``). Experts and routers come from ``plugins/moeify``.
"""
from __future__ import annotations

from .method import SSD, SSDCallback, SSDParams, StabilityMonitor

__all__ = ["SSD", "SSDCallback", "SSDParams", "StabilityMonitor"]
