"""Stage methods: the unit a recipe's stages refer to."""
from __future__ import annotations

import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    from .context import RunContext
    from .training import TrainCallback


def check_regexes(patterns: list[str] | None) -> list[str] | None:
    """A params validator body: every pattern compiles, else a ValueError naming it."""
    import re

    for p in patterns or []:
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"invalid regex {p!r}: {exc}") from None
    return patterns


def check_layers(layers: list[int] | None) -> list[int] | None:
    """A params validator body: FFN layer indices a stage applies to are omitted (all) or non-empty and 0-based."""
    if layers is not None and (not layers or any(i < 0 for i in layers)):
        raise ValueError("layers must be a non-empty list of 0-based layer indices (or omitted for all)")
    return layers


#: The type of a params ``layers`` field (which FFN layers a stage applies to; ``None``: all of them).
LayerIndices = Annotated[list[int] | None, AfterValidator(check_layers)]


class Params(BaseModel):
    """Base of every method's, source's and metric's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class StageResult:
    """What a stage hands back to the engine.

    ``metrics`` are recorded in the registry under the stage; ``state`` holds
    tensors the stage produced (saved with checkpoints and outputs and handed
    back to ``Method.rebuild``); ``info`` is JSON-serialisable and saved too.

    A stage that reorders the neurons of an FFN block reports it as
    ``state["perm.<block path>"]`` (``[d_ff]`` long: neuron ``j`` after the
    stage is neuron ``perm[j]`` before it), and moves the block's masks with
    ``MaskSet.replace``, so that pruned weights can be followed across it.
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

    def training_callback(self, ctx: "RunContext", params: Params, result: StageResult) -> "TrainCallback | None":
        """A schedule this stage hands to the next stage that trains with the shared loop (default: none).

        Methods that act *during* training (gradual pruning) implement it: their
        ``apply`` prepares (and returns in ``result``) what the schedule needs,
        and this builds the ``TrainCallback`` from ``params`` and ``result``
        alone. The engine calls it after ``apply``, and again on ``--resume``
        while the stage that trains is not completed; that stage's
        ``sparsify_core.training.train`` applies it. A recipe must have a
        training stage after such a method (checked when it is validated).
        """
        return None

    @classmethod
    def schedules_training(cls) -> bool:
        """True when the method hands a schedule to the next training stage (``training_callback``)."""
        return cls.training_callback is not Method.training_callback

    @classmethod
    def trains(cls) -> bool:
        """True when the method trains with the shared loop: its params embed a ``TrainConfig``."""
        from .training import TrainConfig

        for f in cls.Params.model_fields.values():
            args = (f.annotation, *typing.get_args(f.annotation))
            if any(isinstance(a, type) and issubclass(a, TrainConfig) for a in args):
                return True
        return False

    @classmethod
    def describe(cls) -> str:
        """First line of the class docstring."""
        return ((cls.__doc__ or "").strip().splitlines() or [""])[0]
