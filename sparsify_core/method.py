"""Stage methods: the unit a recipe's stages refer to."""
from __future__ import annotations

import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .metric import MetricInfo
# the params types live in their own leaf module; re-exported here, where methods have always imported them
from .params import (LayerIndices, Params, check_layers, check_regexes, is_layer_indices,  # noqa: F401
                     param_fields)

if TYPE_CHECKING:  # pragma: no cover
    from .context import RunContext


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
    A stage that removes neurons reports the ones left the same way
    (``[d_ff after]`` long, a selection rather than a permutation).

    ``metric_info`` says what a metric in ``metrics`` is (direction, unit,
    fraction: ``MetricInfo``). Every built-in method declares every name it
    reports; a name left out (a third-party method that does not declare) is
    recorded without a declaration, and reports show it as ``MetricInfo()``:
    no direction, no unit, not a fraction. The engine adds ``stage_seconds``
    and ``peak_memory_mb`` (and, for stages that calibrate layer by layer, ``device_memory_mb``:
    ``STAGE_METRICS``) itself.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    metric_info: dict[str, MetricInfo] = field(default_factory=dict)

    def recorded_info(self) -> dict[str, MetricInfo]:
        """The declarations the engine records: ``metric_info`` of the names in ``metrics`` (others: none)."""
        return {name: self.metric_info[name] for name in self.metrics if name in self.metric_info}

    def undeclared(self) -> list[str]:
        """Names in ``metrics`` that ``metric_info`` does not declare, in order."""
        return [name for name in self.metrics if name not in self.metric_info]


# Numbers the engine records for every stage (runner), besides the method's own.
STAGE_METRICS: dict[str, MetricInfo] = {
    "stage_seconds": MetricInfo(higher_is_better=False, unit="s"),  # wall time of the stage's apply
    "peak_memory_mb": MetricInfo(higher_is_better=False, unit="MiB"),  # peak device (or process) memory
    # stages that calibrate layer by layer: the most the device held (model tensors + calibration buffers)
    "device_memory_mb": MetricInfo(higher_is_better=False, unit="MiB"),
}


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

    def needs_rebuild(self, params: Params, result: StageResult) -> bool:
        """Whether loading a saved output must call ``rebuild`` for this stage (default: it has one).

        Recorded per stage in the output's manifest. A method whose change is
        wholly recorded in the saved ``config.json`` for this result (fewer
        experts in a native MoE model, a smaller width from ``prune/width``)
        says False: the output then stays a plain transformers folder, stored
        ``dense`` unless it has masks. Resuming from a checkpoint, which reloads
        the model from its source, still calls ``rebuild``.
        """
        return type(self).rebuild is not Method.rebuild

    def plain_form(self, params: Params) -> str | None:
        """Why the model this stage leaves has no plain transformers form; ``None`` when it has one.

        ``output.storage: dense`` writes every module as plain transformers
        holds it (``sparsify_core.plain``), so a stage whose result computes
        something transformers cannot (experts and a router, a thresholded
        activation, an activation predictor) makes that impossible. Validation
        asks every stage and refuses such a recipe, naming the stage and the
        reason (one phrase, e.g. ``"experts and a router"``), before any weight
        loads, instead of failing at save after the stages ran. The answer
        must agree with the plain-form protocol of the modules the stage
        leaves (``plain_module``): the mask-invariant sweep checks every
        installed method against a real dense export. Default ``None``: the
        stage changes weight values, or holds them in modules that convert
        back exactly (layouts).
        """
        return None

    @classmethod
    def trains(cls) -> bool:
        """True when the method trains with the shared loop: its params embed a ``TrainConfig``."""
        from .training import TrainConfig

        for f in cls.Params.model_fields.values():
            args = (f.annotation, *typing.get_args(f.annotation))
            if any(isinstance(a, type) and issubclass(a, TrainConfig) for a in args):
                return True
        return False

    def data_splits(self, params: Params) -> list[tuple[tuple, str]]:
        """The data splits this stage reads, as ``(params field path, split name)``; checked at validation.

        Default: every string field named ``split`` or ``*_split`` in
        ``params``, nested models (``train: TrainConfig``) included, so a
        method that keeps its split names in such fields needs nothing more.
        Override when the need is conditional (a split read only under some
        option) or a split is read under a fixed name; the path then points at
        the field that causes the read (``()`` for the stage's params).
        """
        return [(path, value) for path, value, _ in param_fields(params)
                if isinstance(value, str) and (path[-1] == "split" or str(path[-1]).endswith("_split"))]

    def check(self, model: torch.nn.Module, params: Params) -> None:
        """Refuse params that cannot work on this model, from its structure alone (default: accept).

        ``model`` is a *skeleton*: the model's modules built from its config on
        the meta device (shapes, names, no weights: reading values is an
        error). ``sparsify validate`` and ``sparsify run`` (before loading
        weights) call it for each stage in order, up to and including the
        first stage that moves Linear layers (``keeps_layers`` false: moeify,
        layout conversions): later stages would see modules the skeleton does
        not have. Raise
        ``ValueError`` or ``SparsifyError`` with a one-line message, or
        ``ParamsError`` to point at the params field at fault. A check must not
        change ``model``. (Every ``LayerIndices`` field is range-checked by the
        engine for every stage; no hook needed.)
        """

    @classmethod
    def keeps_layers(cls) -> bool:
        """True when the stage leaves every Linear/Conv1D module (path and shape) where it found them.

        The engine checks later stages (``check``) on the model's skeleton only
        while this holds. Default: true unless the method implements
        ``rebuild`` (it swaps modules); a structural change that only swaps
        activations says True.
        """
        return cls.rebuild is Method.rebuild

    @classmethod
    def supports_offload(cls) -> bool:
        """False when the stage cannot run with ``model.offload`` cpu/disk (default: True).

        Offload keeps each layer's parameters as host tensors it tracks; a
        stage that replaces them with tensors of another shape says False, and
        validation refuses the recipe before anything loads.
        """
        return True

    @classmethod
    def uses_optimizer(cls) -> bool:
        """True when the stage updates weights with a gradient optimizer (default: ``trains()``).

        Such a stage cannot run on float16 weights (AdamW's eps and squared
        gradients underflow), so validation refuses ``model.dtype: float16``
        with it. Methods that run their own optimizer say so by overriding.
        """
        return cls.trains()

    @classmethod
    def describe(cls) -> str:
        """First line of the class docstring."""
        return ((cls.__doc__ or "").strip().splitlines() or [""])[0]
