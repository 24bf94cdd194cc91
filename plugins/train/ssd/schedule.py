"""When SSD trains sparsely: the switch rule and the phase of a step, as pure functions.

Three phases over a stage of ``steps`` optimizer steps:

1. ``dense`` until the switch step ``s``: ordinary dense training, with the
   stability monitor every ``every`` steps.
2. ``sparse`` for steps ``[s, final_start)``: every FFN is an MoE; each token
   computes (and updates) only its selected experts.
3. ``final_dense`` for steps ``[final_start, steps)``: the routed FFNs run
   densely again (routing ``dense``), so the final model works both ways.

The switch happens at a monitor point ``t`` (after ``t`` steps; step ``t`` is
the first sparse one) when the last ``patience`` pattern similarities are all
at least ``threshold`` and ``t >= earliest``; or, when ``latest`` is set and
the pattern never became stable, at the first monitor point ``t >= latest``
("forced"). A switch at or after ``final_start`` would leave no sparse
steps, so none happens there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Phase = Literal["dense", "sparse", "final_dense"]


@dataclass(frozen=True)
class SwitchRule:
    """The switch rule in steps (see the module docs)."""

    threshold: float
    patience: int
    earliest: int
    latest: int | None
    final_start: int

    @classmethod
    def from_fractions(cls, steps: int, *, threshold: float, patience: int, min_dense: float,
                       max_dense: float | None, final_dense: float) -> "SwitchRule":
        """Fractions of ``steps`` to step counts: earliest and latest switch, start of the final dense phase."""
        return cls(threshold=threshold, patience=patience, earliest=math.ceil(min_dense * steps),
                   latest=None if max_dense is None else math.ceil(max_dense * steps),
                   final_start=steps - math.ceil(final_dense * steps))


def switch_reason(t: int, similarities: list[float], rule: SwitchRule) -> str | None:
    """``"stable"``, ``"forced"`` or ``None``: whether to switch to sparse at the monitor point after ``t`` steps.

    ``similarities`` is the monitor curve so far, the last value measured at ``t``.
    """
    if t >= rule.final_start or t < rule.earliest:
        return None
    recent = similarities[-rule.patience:]
    if len(recent) == rule.patience and all(s >= rule.threshold for s in recent):
        return "stable"
    if rule.latest is not None and t >= rule.latest:
        return "forced"
    return None


def phase_at(step: int, switch_step: int | None, final_start: int) -> Phase:
    """The phase of optimizer step ``step`` given the switch step (``None``: not switched yet)."""
    if switch_step is None or step < switch_step:
        return "dense"
    return "sparse" if step < final_start else "final_dense"
