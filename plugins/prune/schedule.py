"""Gradual pruning schedules, as pure functions of the training step.

Zhu & Gupta's cubic schedule, as Frantar et al. use it for the sparse scaling
law: between the steps ``first`` and ``last`` of training the target sparsity
rises as ``s_t = S (1 - (1 - p)^3)`` with ``p = (t - first) / (last - first)``,
quickly at first (while the weights are still plastic) and slowly at the end.
Masks are recomputed every ``every`` steps inside that window and always at
``last``, where ``S`` is reached exactly. An n:m pattern ramps the number of
zeros in every group of m the same way, up to ``m - n``.
"""
from __future__ import annotations

import math


def cubic_fraction(progress: float) -> float:
    """``1 - (1 - p)^3`` for ``p`` clipped to [0, 1]: the share of the final sparsity reached at ``p``."""
    p = min(max(float(progress), 0.0), 1.0)
    return 1.0 - (1.0 - p) ** 3


def cubic_sparsity(final: float, progress: float) -> float:
    """The cubic schedule ``S (1 - (1 - p)^3)``: target sparsity at ``progress`` p of the pruning window."""
    return final * cubic_fraction(progress)


def pruning_window(steps: int, start: float, end: float) -> tuple[int, int]:
    """``(first, last)``: the optimizer steps (counted as steps completed) where pruning starts and ends.

    ``start`` and ``end`` are fractions of ``steps`` (``0 <= start < end <= 1``);
    the window always holds at least one step, and ``last <= steps``.
    """
    if steps < 1 or not 0 <= start < end <= 1:
        raise ValueError(f"needs steps >= 1 and 0 <= start < end <= 1, got {steps}, {start}, {end}")
    first = min(math.floor(start * steps), steps - 1)
    last = min(steps, max(first + 1, round(end * steps)))
    return first, last


def pruning_progress(t: int, first: int, last: int) -> float:
    """Progress p in [0, 1] through the window after ``t`` completed steps."""
    return min(max((t - first) / (last - first), 0.0), 1.0)


def is_pruning_step(t: int, first: int, last: int, every: int) -> bool:
    """Whether masks are recomputed after ``t`` completed steps: every ``every`` steps in (first, last], and at last."""
    return first < t <= last and ((t - first) % every == 0 or t == last)


def nm_keep(n: int, m: int, progress: float) -> int:
    """Weights kept in every group of ``m`` at ``progress`` while ramping to n:m: ``m`` down to ``n``.

    The number of zeros follows the cubic schedule, rounded to the nearest
    integer (half up), so the pattern is exactly n:m at the end.
    """
    zeros = int((m - n) * cubic_fraction(progress) + 0.5)
    return m - min(zeros, m - n)


def schedule_table(steps: int, start: float, end: float, every: int, final: float) -> list[tuple[int, float]]:
    """Every ``(t, target sparsity)`` at which masks are recomputed in a stage of ``steps`` steps."""
    first, last = pruning_window(steps, start, end)
    return [(t, cubic_sparsity(final, pruning_progress(t, first, last)))
            for t in range(first + 1, last + 1) if is_pruning_step(t, first, last, every)]
