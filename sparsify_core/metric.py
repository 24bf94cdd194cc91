"""Evaluation metrics (plugins) and the values they produce."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .context import RunContext


@dataclass(frozen=True)
class MetricValue:
    """One recorded number: ``layer`` is set for per-layer/per-module breakdowns.

    A metric that failed is recorded as one value with ``value`` NaN and
    ``error`` its one-line reason (``ExceptionType: message``).
    """

    name: str
    value: float
    layer: str | None = None
    error: str | None = None


class Metric(ABC):
    """An evaluation metric.

    Lifecycle at each evaluation point: ``start(ctx)`` (register hooks, reset
    counters), then for every eval batch ``update(batch, logits,
    reference_logits)`` within one shared forward pass (only when
    ``uses_forward``; ``reference_logits`` is the frozen dense model's output
    when ``uses_reference``, else ``None``), then ``finish(ctx)`` returns the
    values, and ``close()`` always runs (remove hooks). ``tasks`` lists the
    model tasks (``causal_lm``, ``encoder``) the metric applies to.

    A metric that raises fails alone: evaluation records it as failed with
    its one-line reason and measures the others (``evaluation.evaluate``).
    Models may hold weights in sparse layouts: read weights through
    ``sparsify_core.ffn`` (``weight_out_in``, ``linear_shape``,
    ``prunable_modules(..., stored=True)``), never ``module.weight``.
    """

    name: ClassVar[str]
    tasks: ClassVar[frozenset[str]] = frozenset({"causal_lm", "encoder"})
    uses_forward: ClassVar[bool] = False
    uses_reference: ClassVar[bool] = False

    def applies_to(self, ctx: "RunContext") -> bool:
        return ctx.task in self.tasks

    def start(self, ctx: "RunContext") -> None:
        """Prepare for an evaluation pass (default: nothing)."""

    def update(self, batch: torch.Tensor, logits: torch.Tensor, reference_logits: torch.Tensor | None) -> None:
        """Consume one eval batch's outputs (default: nothing)."""

    @abstractmethod
    def finish(self, ctx: "RunContext") -> list[MetricValue]:
        """Return the metric's values for this evaluation point."""

    def close(self) -> None:
        """Release hooks and buffers (default: nothing)."""

    @classmethod
    def describe(cls) -> str:
        return ((cls.__doc__ or "").strip().splitlines() or [""])[0]
