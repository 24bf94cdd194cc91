"""Stage methods: the unit a recipe's stages refer to."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    from .context import RunContext


class Params(BaseModel):
    """Base of every method's, source's and metric's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class StageResult:
    """What a stage hands back to the engine.

    ``metrics`` are recorded in the registry under the stage; ``state`` holds
    tensors the stage produced (saved with checkpoints and outputs and handed
    back to ``Method.rebuild``); ``info`` is JSON-serialisable and saved too.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """A stage method. Subclass, set ``kind``/``name``/``Params``, implement ``apply``.

    The engine calls ``apply`` once with the run context and validated params.
    A method that changes the model's *structure* (swaps modules, adds routers)
    must also implement ``rebuild``: given the same params and the state its
    ``apply`` returned, redo the structural change on a freshly loaded model
    without recomputing anything, so that checkpoints and saved outputs
    (which store weights only) can be loaded back. Methods that only change
    weight values keep the default no-op.
    """

    kind: ClassVar[str]
    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params

    @abstractmethod
    def apply(self, ctx: "RunContext", params: Params) -> StageResult | None:
        """Implemented by each subclass."""

    def rebuild(self, ctx: "RunContext", params: Params, result: StageResult) -> None:
        """Redo structural changes on a fresh model (default: none)."""

    @classmethod
    def describe(cls) -> str:
        """First line of the class docstring."""
        return ((cls.__doc__ or "").strip().splitlines() or [""])[0]
