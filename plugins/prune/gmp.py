"""Gradual magnitude pruning (``prune/gmp``): a cubic sparsity schedule the next training stage applies.

The stage itself trains nothing: it checks the targets, fixes each matrix's
final sparsity (uniform, a per-layer list, or OWL's profile measured on the
model as it is when the stage runs) and hands a ``GMPSchedule`` to the next
stage that trains with the shared loop (``train/finetune``,
``regularize/progressive_l1``...). That loop calls the schedule after every
optimizer step; every ``every`` steps between ``start`` and ``end`` (fractions
of that stage's steps) it prunes the smallest |w| up to the cubic schedule's
sparsity (``schedule.py``), weights pruned before (by earlier stages or
earlier steps) counting towards it, so the end of the window leaves exactly
the final sparsity of the targeted weights. Masks go into the run's ``MaskSet``: pruned
weights stay zero for the rest of training, in checkpoints (mid-stage ones
too), later stages and the saved model. Mask selection is the prune plugin's
(``masks.py``): per matrix, global, or n:m.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from sparsify_core import Method, StageResult
from sparsify_core.errors import SparsifyError
from sparsify_core.training import TrainCallback

from .masks import global_magnitude_masks, magnitude_mask, nm_mask
from .schedule import cubic_sparsity, is_pruning_step, nm_keep, pruning_progress, pruning_window
from .selection import (PruneParams, Target, assign_sparsities, check_targets, prior_pruned, record_mask,
                        select_targets)


class GMPParams(PruneParams):
    sparsity: float | None = Field(
        None, ge=0, lt=1, description="final fraction of the targeted weights to zero (0: a dense control run); "
                                      "implied by an n:m pattern")
    scope: Literal["per_layer", "global"] = Field(
        "per_layer", description="per_layer: each matrix follows the schedule to its sparsity; global: one "
                                 "magnitude threshold across all targeted matrices")
    start: float = Field(0.25, ge=0, lt=1, description="pruning starts at this fraction of the training stage")
    end: float = Field(0.75, gt=0, le=1, description="the final sparsity is reached at this fraction")
    every: int = Field(10, gt=0, description="recompute the masks every this many optimizer steps")

    @model_validator(mode="after")
    def _window(self):
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must come before end ({self.end})")
        if self.scope == "global" and (self.nm is not None or self.profile != "uniform"):
            raise ValueError("scope global takes an unstructured pattern and the uniform profile")
        return self


class GMPSchedule(TrainCallback):
    """Prunes ``targets`` to the cubic schedule during a training stage (see the module docstring).

    Reports ``weight_sparsity`` (the measured fraction of the targeted
    weights that are masked) after every step and, once the end of the
    window is reached, that fraction as the training stage's
    ``gmp_sparsity`` metric (not ``sparsity``: training stages such as
    progressive_l1 log activation sparsity under that name).

    ``final`` maps each targeted module path to its final sparsity. Its state
    (the last step it pruned at) travels in mid-stage checkpoints; the masks
    themselves are the run's and are checkpointed with the weights.
    """

    def __init__(self, params: GMPParams, final: dict[str, float]):
        self.params, self.final = params, dict(final)
        self.pruned_at, self.sparsity = 0, 0.0
        self.targets: list[Target] = []
        self.ctx = None  # the run context, from the loop at start

    def start(self, loop) -> None:
        self.ctx = loop.ctx
        found = {t.name: t for t in select_targets(loop.model, self.params)}
        missing = sorted(set(self.final) - set(found))
        if missing:
            raise SparsifyError(f"prune/gmp: {', '.join(missing[:3])} no longer exist in the model being trained")
        self.targets = [found[name] for name in self.final]
        for t in self.targets:
            t.sparsity = self.final[t.name]
        self.first, self.last = pruning_window(loop.cfg.steps, self.params.start, self.params.end)
        self.sparsity = self._measured()

    def after_step(self, step: int) -> dict[str, float]:
        t = step + 1
        if t > self.pruned_at and is_pruning_step(t, self.first, self.last, self.params.every):
            self._prune(pruning_progress(t, self.first, self.last))
            self.pruned_at = t
            if t == self.last:  # the final sparsity, reached: a stage metric of the training stage
                self.ctx.log({"gmp_sparsity": self.sparsity})
        return {"weight_sparsity": self.sparsity}

    @torch.no_grad()
    def _prune(self, progress: float) -> None:
        p, nm = self.params, self.params.nm
        # masks so far (earlier stages', this schedule's earlier steps) count towards each step's target
        prior = [prior_pruned(self.ctx, t) for t in self.targets]
        if nm is not None:
            keep_n = nm_keep(nm[0], nm[1], progress)
            masks = [nm_mask(t.weight().abs(), keep_n, nm[1], q) if keep_n < nm[1] else None
                     for t, q in zip(self.targets, prior)]
        elif p.scope == "global":
            masks = global_magnitude_masks([t.weight() for t in self.targets],
                                           cubic_sparsity(float(p.sparsity or 0.0), progress), prior)
        else:
            masks = [magnitude_mask(t.weight(), cubic_sparsity(t.sparsity, progress), q)
                     for t, q in zip(self.targets, prior)]
        for t, keep in zip(self.targets, masks):
            if keep is not None and not (bool(keep.all()) and t.param not in self.ctx.masks):
                record_mask(self.ctx, t, keep)
        self.sparsity = self._measured()

    def _measured(self) -> float:
        """Fraction of the targeted weights that are masked now."""
        pruned = total = 0
        for t in self.targets:
            keep = self.ctx.masks.get(t.param)
            total += t.module.weight.numel()
            pruned += 0 if keep is None else int((~keep).sum())
        return pruned / max(total, 1)

    def state_dict(self) -> dict:
        return {"pruned_at": self.pruned_at, "sparsity": self.sparsity}

    def load_state_dict(self, state: dict) -> None:
        self.pruned_at, self.sparsity = int(state["pruned_at"]), float(state["sparsity"])


class GMP(Method):
    """Gradual magnitude pruning during the next training stage: cubic schedule, unstructured or n:m.

    Between ``start`` and ``end`` (fractions of the next training stage's
    steps) the sparsity of the targeted matrices rises as
    ``S (1 - (1 - p)^3)``, masks recomputed every ``every`` steps from |w|
    (per matrix, global, or keeping the largest of every m, the kept count
    ramping from m to n). Needs a later stage that trains with the shared
    loop, such as ``train/finetune``.
    """

    kind = "prune"
    name = "gmp"
    Params = GMPParams

    def data_splits(self, params):
        """The calibration split, read by the owl profile only."""
        return super().data_splits(params) if params.profile == "owl" else []

    def check(self, model, params) -> None:
        """Targets, n:m input widths and a per-layer profile, on the model's skeleton."""
        check_targets(model, params)

    def apply(self, ctx, params: GMPParams) -> StageResult:
        targets = select_targets(ctx.model, params)
        per_layer = assign_sparsities(ctx, params, targets)  # owl: measured on the model as it is now
        total = sum(t.module.weight.numel() for t in targets)
        mean = sum(t.sparsity * t.module.weight.numel() for t in targets) / max(total, 1)
        label = params.pattern if params.nm else f"{mean:.3g} ({params.scope})"
        ctx.info(f"{len(targets)} matrices to prune to {label} between {params.start:.0%} and {params.end:.0%} "
                 f"of the next training stage, every {params.every} steps")
        info = {"module_sparsity": {t.name: t.sparsity for t in targets}}
        if params.profile != "uniform":
            info["layer_sparsity"] = per_layer
        return StageResult(metrics={"target_sparsity": mean, "modules_scheduled": float(len(targets))}, info=info)

    def training_callback(self, ctx, params: GMPParams, result: StageResult) -> GMPSchedule:
        return GMPSchedule(params, result.info["module_sparsity"])
