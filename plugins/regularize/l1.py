"""ProSparse progressive L1 regularisation of the FFN intermediate (``docs/methods.md#progressive-l1``)."""
from __future__ import annotations

from contextlib import ExitStack

import torch
from pydantic import Field, field_validator, model_validator

from sparsify_core import Method, MetricInfo, Params, StageResult
from sparsify_core.ffn import capture_intermediates
from sparsify_core.training import TrainCallback, TrainConfig, final_metrics, train

from .schedules import progressive_lambda


class ScheduleStage(Params):
    """One stage of Algorithm 1: reach ``lambda`` (sine ramp from the previous one) over ``steps``."""

    lam: float = Field(alias="lambda", ge=0)
    steps: int = Field(gt=0)


class L1Callback(TrainCallback):
    """Adds ``lambda(step) * sum over layers of mean |x1|`` to the loss and reports x1's sparsity.

    Normalisation (the paper leaves it open): per FFN layer, the mean of
    |x1| over tokens *and* neurons, summed over layers. It does not change with
    batch size, sequence length or FFN width, only with depth; a lambda tuned
    on one model width carries over to another of the same depth.
    """

    def __init__(self, blocks, stages: list[tuple[float, int]]):
        self.blocks, self.stages = blocks, stages
        self.terms: list[torch.Tensor] = []
        self.zeros = 0.0
        self.count = 0
        self.lam = 0.0
        self._stack: ExitStack | None = None

    def _record(self, block, x1):
        if torch.is_grad_enabled():
            self.terms.append(x1.abs().float().mean())
            self.zeros += float((x1 == 0).sum())
            self.count += x1.numel()

    def start(self, loop):
        self._stack = ExitStack()
        self._stack.enter_context(capture_intermediates(self.blocks, self._record))

    def before_step(self, step):
        self.lam = progressive_lambda(step, self.stages)

    def penalty(self, step):
        terms, self.terms = self.terms, []
        info = {"lambda": self.lam, "sparsity": self.zeros / max(self.count, 1)}
        self.zeros, self.count = 0.0, 0
        if not terms:
            return None, info
        l1 = torch.stack(terms).sum()
        info["l1"] = float(l1.detach())
        info["penalty"] = float(self.lam * l1.detach())
        return (self.lam * l1 if self.lam > 0 else None), info

    def stop(self):
        if self._stack is not None:
            self._stack.close()
            self._stack = None


# The callback's numbers the stage reports as final_<name> (final_metrics).
L1_METRICS = {
    "l1": MetricInfo(higher_is_better=False),  # sum over layers of mean |x1|: what the penalty pushes down
    "sparsity": MetricInfo(higher_is_better=True, fraction=True),  # zero entries of x1: the aim of the stage
}


class ProgressiveL1Params(Params):
    schedule: list[ScheduleStage] = Field(
        description="Algorithm 1 stages as [{lambda, steps}, ...]; the first is the constant warm-up")
    train: TrainConfig

    @field_validator("schedule")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("needs at least one stage")
        return v

    @model_validator(mode="after")
    def _steps_match(self):
        total = sum(s.steps for s in self.schedule)
        if total != self.train.steps:
            raise ValueError(f"train.steps ({self.train.steps}) must equal the schedule's total steps ({total})")
        return self


class ProgressiveL1(Method):
    """ProSparse progressive L1 on the FFN intermediate x1, with a sine-ramped lambda (Algorithm 1).

    Trains with the shared loop (LM and/or KD loss) plus ``lambda(t) * sum over
    layers of mean|x1|``. Run it after ReLU substitution; finish with FATReLU.
    """

    kind = "regularize"
    name = "progressive_l1"
    Params = ProgressiveL1Params

    def apply(self, ctx, params):
        stages = [(s.lam, s.steps) for s in params.schedule]
        cb = L1Callback(ctx.ffn_blocks(), stages)
        metrics, declared = final_metrics(train(ctx, params.train, [cb]), L1_METRICS)
        return StageResult(metrics=metrics, metric_info=declared)
