"""Regularisation schedules as pure functions."""
from __future__ import annotations

import math


def progressive_lambda(step: int, stages: list[tuple[float, int]]) -> float:
    """ProSparse Algorithm 1: the L1 factor at ``step``.

    ``stages`` is ``[(lambda_1, steps_1), (lambda_2, steps_2), ...]`` with each
    stage's *duration* in steps. Stage 1 (warm-up) holds ``lambda_1``; inside
    stage i >= 2, with ``p`` the progress through it, lambda rises from
    ``lambda_{i-1}`` to ``lambda_i`` along ``eta = (sin(-pi/2 + pi p) + 1) / 2``.
    After the last stage lambda stays at its last value.
    """
    if not stages:
        return 0.0
    start = 0
    prev = stages[0][0]
    for i, (lam, length) in enumerate(stages):
        if step < start + length:
            if i == 0:
                return lam
            p = (step - start) / length
            eta = (math.sin(-math.pi / 2 + math.pi * p) + 1) / 2
            return prev + eta * (lam - prev)
        prev, start = lam, start + length
    return stages[-1][0]
