"""``regularize/lte``: Learn-To-be-Efficient training of routed FFNs (``docs/methods.md#lte``).

Run it after ``moeify`` with ``router: lte``. One stage, one pass of the
shared training loop, two phases switched at ``stage1_steps``:

- Stage 1 (steps ``[0, stage1_steps)``): soft routing, every expert computed
  and weighted by its score, ``y = sum_e G(x)_e E_e(x)``; model and routers
  train jointly on ``task + eta * L_eff + lambda * L_sep`` with

  - ``L_eff = mean over layers, tokens and experts of G(x)_e^2`` (efficiency:
    pushes scores down so fewer experts pass the threshold),
  - ``L_sep = mean over layers, tokens and experts of 1 / (G(x)_e - tau)^2``
    (separability: pushes scores away from ``tau``, so the hard threshold of
    stage 2 changes little). The squared distance is floored at ``sep_eps``
    so a score exactly at ``tau`` cannot make the loss infinite.

  The paper (``docs/methods.md#lte``) writes both as a mean over layers and tokens of a *sum* over
  experts; by default (``expert_reduction: mean``) they are averaged over the
  experts too, so ``eta`` in about [0, 2] and ``lambda = 0.5`` keep one
  meaning whatever the number of experts. ``expert_reduction: sum`` is the
  literal form (the same as ``mean`` with ``eta`` and ``lambda`` times E).

  By default the two penalties train the routers only: their gradients do
  not flow into the model through the router's input (``penalty_to_model:
  false``). The model still learns from the task loss, including through the
  soft routing weights. With the gradients flowing (``true``, joint training
  taken literally) L_sep, whose gradient ``2 / (G - tau)^3`` is in the
  thousands for scores near ``tau``, swamps the task loss: on SmolLM2-135M
  the distillation loss rose from 1.25 to 5.5 within 45 steps.
- Stage 2 (the remaining steps): routers frozen, hard threshold selection
  (expert e iff ``G(x)_e > tau``, experts combined unweighted), task loss only.
  Training computes it on the masked path (the same function and gradients;
  plain-torch gathering is about 2x slower than dense matmuls for training
  on a CPU); afterwards the modules are back on the gather path.

The task loss is the loop's: LM, KD from the dense model, or both
(``train.lm_weight``/``train.kd_weight``). The phase is a function of the
step, so ``--resume`` inside either phase continues where it stopped. After
the stage every routed FFN selects by threshold ``tau``.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, Field, model_validator

from sparsify_core import Method, MetricInfo, Params, StageResult
from sparsify_core.errors import SparsifyError
from sparsify_core.training import TrainCallback, TrainConfig, final_metrics, train

from ..moeify.modules import RoutedFFN, routed_modules


def _reduce(per_expert: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_expert.mean() if reduction == "mean" else per_expert.sum(-1).mean()


def efficiency_loss(scores: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """LTE's L_eff of one layer: ``G^2`` averaged over tokens and averaged (or summed) over experts."""
    return _reduce(scores.float().pow(2), reduction)


def separability_loss(scores: torch.Tensor, tau: float, eps: float = 1e-4, reduction: str = "mean") -> torch.Tensor:
    """LTE's L_sep of one layer: ``1 / (G - tau)^2`` (squared distance floored at ``eps``) averaged over tokens
    and averaged (or summed) over experts."""
    return _reduce((scores.float() - tau).pow(2).clamp_min(eps).reciprocal(), reduction)


class LTECallback(TrainCallback):
    """Switches the routing per phase and adds ``eta * L_eff + lambda * L_sep`` in stage 1."""

    def __init__(self, modules: list[RoutedFFN], *, eta: float, lam: float, tau: float, stage1_steps: int,
                 sep_eps: float, expert_reduction: str = "mean", penalty_to_model: bool = False):
        self.modules, self.eta, self.lam, self.tau = modules, eta, lam, tau
        self.stage1_steps, self.sep_eps = stage1_steps, sep_eps
        self.reduction, self.penalty_to_model = expert_reduction, penalty_to_model
        self.scores: list[torch.Tensor] = []
        self.unselected = 0.0
        self.count = 0
        self.phase = 1
        self._handles = []

    def _record(self, module, x, scores, selected):
        if torch.is_grad_enabled() and scores is not None:
            if self.phase == 1:  # the penalties' scores; stage 2 only counts the selection
                self.scores.append(scores if self.penalty_to_model else module.scores(x.detach()))
            below = (scores.detach() <= self.tau) if self.phase == 1 else ~selected.detach()
            self.unselected += float(below.sum())
            self.count += below.numel()

    def start(self, loop):
        self._handles = [m.register_selection_hook(self._record) for m in self.modules]

    def before_step(self, step):
        self.phase = 1 if step < self.stage1_steps else 2
        for m in self.modules:
            if self.phase == 1:
                m.set_routing("soft", tau=self.tau)
            else:
                m.set_routing("threshold", tau=self.tau)
                # Same function and gradients as the gather path, which is ~2x slower to train on a CPU.
                m.path = "masked"
            for p in m.router.parameters():
                p.requires_grad_(self.phase == 1)

    def penalty(self, step):
        scores, self.scores = self.scores, []
        info = {"phase": float(self.phase), "sparsity": self.unselected / max(self.count, 1)}
        self.unselected, self.count = 0.0, 0
        if self.phase == 2 or not scores:
            return None, info
        l_eff = torch.stack([efficiency_loss(s, self.reduction) for s in scores]).mean()
        l_sep = torch.stack([separability_loss(s, self.tau, self.sep_eps, self.reduction) for s in scores]).mean()
        pen = self.eta * l_eff + self.lam * l_sep
        info.update(l_eff=float(l_eff.detach()), l_sep=float(l_sep.detach()), penalty=float(pen.detach()))
        return pen, info

    def stop(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self.modules:
            m.set_routing("threshold", tau=self.tau)
            m.path = "gather"
            for p in m.router.parameters():
                p.requires_grad_(True)


# The callback's number the stage reports as final_sparsity (final_metrics): tokens' unselected experts.
LTE_METRICS = {"sparsity": MetricInfo(higher_is_better=True, fraction=True)}


class LTEParams(Params):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)  # saved params use "lam"

    eta: float = Field(0.5, ge=0, description="weight of the efficiency loss L_eff (sets the sparsity; ~[0, 2])")
    lam: float = Field(0.5, alias="lambda", ge=0, description="weight of the separability loss L_sep")
    tau: float = Field(0.5, gt=0, lt=1, description="router threshold: expert e iff G(x)_e > tau")
    stage1_steps: int = Field(gt=0, description=(
        "steps of stage 1 (soft routing, joint training); the rest of train.steps is stage 2"))
    sep_eps: float = Field(1e-4, gt=0, description="floor of (G - tau)^2 in L_sep")
    expert_reduction: Literal["mean", "sum"] = Field("mean", description=(
        "average L_eff and L_sep over the experts (eta keeps its meaning for any E) or sum them (the paper's "
        "literal form: the same as mean with eta and lambda times E)"))
    penalty_to_model: bool = Field(False, description=(
        "let the L_eff/L_sep gradients reach the model through the router input (joint training taken "
        "literally); off: the penalties train the routers only, the model learns from the task loss"))
    train: TrainConfig

    @model_validator(mode="after")
    def _phases(self):
        if self.stage1_steps > self.train.steps:
            raise ValueError(f"stage1_steps ({self.stage1_steps}) exceeds train.steps ({self.train.steps})")
        return self


class LTE(Method):
    """LTE: stage 1 soft routing with efficiency and separability losses, stage 2 frozen routers, hard threshold.

    Needs FFNs split into experts with ``lte`` routers (``moeify`` with
    ``router: lte``). Trains with the shared loop (LM and/or KD loss).
    """

    kind = "regularize"
    name = "lte"
    Params = LTEParams

    def apply(self, ctx, params) -> StageResult:
        modules = routed_modules(ctx.model)
        if not modules:
            raise SparsifyError("regularize/lte needs FFNs split into experts: run a moeify stage with router: lte "
                                "before it")
        wrong = sorted({m.router.kind for m in modules} - {"lte"})
        if wrong:
            raise SparsifyError(f"regularize/lte trains lte routers; this model's routers are {', '.join(wrong)} "
                                "(set router: lte in the moeify stage)")
        for m in modules:  # the optimizer is built over trainable parameters: include the routers
            for p in m.router.parameters():
                p.requires_grad_(True)
        cb = LTECallback(modules, eta=params.eta, lam=params.lam, tau=params.tau,
                         stage1_steps=params.stage1_steps, sep_eps=params.sep_eps,
                         expert_reduction=params.expert_reduction, penalty_to_model=params.penalty_to_model)
        metrics, declared = final_metrics(train(ctx, params.train, [cb]), LTE_METRICS)
        return StageResult(metrics=metrics, metric_info=declared)

    def plain_form(self, params) -> str | None:
        return "experts and a router"

    def rebuild(self, ctx, params, result) -> None:
        for m in routed_modules(ctx.model):
            m.set_routing("threshold", tau=params.tau)
