"""Evaluation metrics (plugins) and the values they produce."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .params import Params

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .context import RunContext


@dataclass(frozen=True)
class MetricInfo:
    """What a metric's numbers are, so that reports never guess it from the name.

    ``higher_is_better``: the direction of better (``None``: neither, e.g. a
    count that only describes the model); ``unit``: a short unit shown next to
    values (``""`` for none, ``"nats"``, ``"s"``, ``"MiB"``, ``"params"``...);
    ``fraction``: values lie in [0, 1] and are shown as percents.
    """

    higher_is_better: bool | None = None
    unit: str = ""
    fraction: bool = False


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

    Every metric declares what its numbers are: ``higher_is_better``
    (``True``/``False``, or ``None`` for neither), ``unit`` and ``fraction``
    (see ``MetricInfo``). They are recorded with the run, and ``show``,
    ``compare`` and the plots format and rank values by them. A metric that
    records values under more names than its own (``<name>_dense``...)
    declares each in ``value_info``.

    A metric may take parameters: ``Params`` (a pydantic model, unknown keys
    refused) validated from ``evaluate.metrics: [{name: {params}}]`` in a
    recipe; ``check(params)`` refuses, before anything loads, what cannot
    work here (a missing optional package). A metric with ``in_all = False``
    (one too costly to run unasked) is left out of ``metrics: all``. A metric
    whose value names depend on its parameters or results declares what they
    are in ``info_of`` instead of ``value_info``.

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
    higher_is_better: ClassVar[bool | None] = None
    unit: ClassVar[str] = ""
    fraction: ClassVar[bool] = False
    Params: ClassVar[type[Params]] = Params
    in_all: ClassVar[bool] = True

    def __init__(self, params: Params | None = None):
        self.params = params if params is not None else self.Params()

    @classmethod
    def check(cls, params: Params) -> None:
        """Raise ``ValueError`` (one line) when the metric cannot run with ``params`` here (default: nothing)."""

    def info_of(self, value_name: str) -> MetricInfo:
        """What the values recorded under ``value_name`` are (default: ``value_info``, else an undeclared one)."""
        return self.value_info().get(value_name, MetricInfo())

    @classmethod
    def info(cls) -> MetricInfo:
        """What the values recorded under ``name`` are (from the class attributes)."""
        return MetricInfo(higher_is_better=cls.higher_is_better, unit=cls.unit, fraction=cls.fraction)

    @classmethod
    def value_info(cls) -> dict[str, MetricInfo]:
        """Every name this metric records values under, with what those values are (default: its ``name``)."""
        return {cls.name: cls.info()}

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
