"""Gradual magnitude pruning (``prune/gmp``): train with the shared loop while a cubic schedule prunes.

The stage checks the targets, fixes each matrix's final sparsity (uniform, a
per-layer list, or OWL's profile measured on the model as it is when the
stage starts) and trains with the shared loop (``sparsify_core.training``,
its ``train:`` block), passing it a ``GMPSchedule``. The loop calls the
schedule after every optimizer step; every ``every`` steps between ``start``
and ``end`` (fractions of the stage's steps) it prunes the smallest |w| up to
the cubic schedule's sparsity (``schedule.py``), weights pruned before (by
earlier stages or earlier steps) counting towards it, so the end of the
window leaves exactly the final sparsity of the targeted weights. Masks go
into the run's ``MaskSet``: pruned weights stay zero for the rest of
training, in checkpoints (mid-stage ones too), later stages and the saved
model. Mask selection is the pruning template's (``pruner.score_masks``): per
matrix, global, or n:m.

Everything the schedule needs is rebuilt from the stage's params and the
model the stage starts from, so ``--resume`` inside the stage (the loop's
mid-stage checkpoint: weights, masks, optimizer, the schedule's last pruning
step) continues exactly where an uninterrupted run would be.
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

from sparsify_core import Method, MetricInfo, StageResult
from sparsify_core.training import TrainCallback, TrainConfig, final_metrics, train

from .pruner import ScopedPruneParams, score_masks
from .schedule import cubic_sparsity, is_pruning_step, nm_keep, pruning_progress, pruning_window
from .selection import (PRUNE_METRICS, Target, assign_sparsities, check_targets, prior_pruned, record_mask,
                        select_targets)


OLD_RECIPE = ("prune/gmp trains itself now and needs a train: block in its params (e.g. params: {sparsity: 0.5, "
              "train: {steps: 100}}); from an older recipe, move the train: block of the training stage after gmp "
              "here and drop that stage")


class GMPParams(ScopedPruneParams):
    sparsity: float | None = Field(
        None, ge=0, lt=1, description="final fraction of the targeted weights to zero (0: a dense control run); "
                                      "implied by an n:m pattern")
    start: float = Field(0.25, ge=0, lt=1, description="pruning starts at this fraction of the stage's steps")
    end: float = Field(0.75, gt=0, le=1, description="the final sparsity is reached at this fraction")
    every: int = Field(10, gt=0, description="recompute the masks every this many optimizer steps")
    train: TrainConfig = Field(description="the shared training loop the schedule prunes during")

    @model_validator(mode="before")
    @classmethod
    def _trains(cls, data):
        # the old recipes handed the schedule to a later training stage: say how to write them now
        if isinstance(data, dict) and "train" not in data:
            raise ValueError(OLD_RECIPE)
        return data

    @model_validator(mode="after")
    def _window(self):
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must come before end ({self.end})")
        return self


class GMPSchedule(TrainCallback):
    """Prunes ``targets`` to the cubic schedule during the gmp stage's training (see the module docstring).

    ``targets`` carry their final sparsity (``Target.sparsity``);
    ``layer_sparsity`` is the per-layer profile they came from (``None``:
    uniform), for the stage's info. Reports
    ``weight_sparsity`` (the measured fraction of the targeted weights that
    are masked) after every step; ``sparsity`` holds it between steps. Its
    state (the last step it pruned at) travels in mid-stage checkpoints; the
    masks themselves are the run's and are checkpointed with the weights.
    """

    def __init__(self, params: GMPParams, targets: list[Target], layer_sparsity: list[float | None] | None = None):
        self.params, self.targets, self.layer_sparsity = params, list(targets), layer_sparsity
        self.pruned_at, self.sparsity = 0, 0.0
        self.ctx = self.loop = None  # the run context and the loop, from the loop at start

    def start(self, loop) -> None:
        self.ctx, self.loop = loop.ctx, loop
        self.first, self.last = pruning_window(loop.cfg.steps, self.params.start, self.params.end)
        self.sparsity = self._measured()

    def after_step(self, step: int) -> dict[str, float]:
        t = step + 1
        if t > self.pruned_at and is_pruning_step(t, self.first, self.last, self.params.every):
            self._prune(pruning_progress(t, self.first, self.last))
            self.pruned_at = t
        return {"weight_sparsity": self.sparsity}

    @torch.no_grad()
    def _prune(self, progress: float) -> None:
        p, nm = self.params, self.params.nm
        # masks so far (earlier stages', this schedule's earlier steps) count towards each step's target
        prior = [prior_pruned(self.ctx, t) for t in self.targets]
        # whole weights even when the loop shards them (fsdp); the loop applies the recorded masks to the shards
        with self.loop.full_parameters():
            weights = [t.weight() for t in self.targets]
            if nm is not None:
                keep_n = nm_keep(nm[0], nm[1], progress)
                if keep_n == nm[1]:  # no zero per group yet
                    return
                masks = score_masks(weights, [0.0] * len(weights), prior, nm=(keep_n, nm[1]))
            else:
                masks = score_masks(weights, [cubic_sparsity(t.sparsity, progress) for t in self.targets], prior,
                                    global_sparsity=(cubic_sparsity(float(p.sparsity or 0.0), progress)
                                                     if p.scope == "global" else None))
            for t, keep in zip(self.targets, masks):
                if not (bool(keep.all()) and t.param not in self.ctx.masks):
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
    """Gradual magnitude pruning while training with the shared loop: cubic schedule, unstructured or n:m.

    Between ``start`` and ``end`` (fractions of the ``train:`` block's steps)
    the sparsity of the targeted matrices rises as ``S (1 - (1 - p)^3)``,
    masks recomputed every ``every`` steps from |w| (per matrix, global, or
    keeping the largest of every m, the kept count ramping from m to n).
    Metrics: ``sparsity`` (the measured fraction of the targeted weights that
    is masked at the end), ``target_sparsity``, ``weights_pruned``,
    ``modules_pruned`` and the loop's ``final_loss`` (``final_lm_loss``,
    ``final_kd_loss``); ``weight_sparsity`` after every step is a curve.
    """

    kind = "prune"
    name = "gmp"
    Params = GMPParams

    def data_splits(self, params):
        """The train split, and the calibration split when the owl profile reads it."""
        return [(path, split) for path, split in super().data_splits(params)
                if path != ("calibration_split",) or params.profile == "owl"]

    def check(self, model, params) -> None:
        """Targets, n:m input widths and a per-layer profile, on the model's skeleton."""
        check_targets(model, params)

    def schedule(self, ctx, params: GMPParams) -> GMPSchedule:
        """The schedule of this stage, from ``params`` and the model as the stage starts (owl measures it).

        Refuses (``SparsifyError``) what ``assign_sparsities`` refuses, such as
        an n:m pattern that earlier masks already break.
        """
        targets = select_targets(ctx.model, params)
        per_layer = assign_sparsities(ctx, params, targets)
        return GMPSchedule(params, targets, per_layer if params.profile != "uniform" else None)

    def apply(self, ctx, params: GMPParams) -> StageResult:
        schedule = self.schedule(ctx, params)
        targets = schedule.targets
        sizes = [t.module.weight.numel() for t in targets]
        mean = sum(t.sparsity * n for t, n in zip(targets, sizes)) / max(sum(sizes), 1)
        label = params.pattern if params.nm else f"{mean:.3g} ({params.scope})"
        ctx.info(f"{len(targets)} matrices to prune to {label} between {params.start:.0%} and {params.end:.0%} "
                 f"of {params.train.steps} training steps, every {params.every} steps")
        final, declared = final_metrics(train(ctx, params.train, callbacks=[schedule]))
        per_module, pruned = {}, 0
        for t, n in zip(targets, sizes):
            keep = ctx.masks.get(t.param)
            zeros = 0 if keep is None else int((~keep).sum())
            per_module[t.name], pruned = zeros / n, pruned + zeros
        metrics = {"sparsity": pruned / max(sum(sizes), 1), "target_sparsity": mean, "weights_pruned": float(pruned),
                   "modules_pruned": float(len(targets))}
        info = {"module_sparsity": per_module}
        if schedule.layer_sparsity is not None:
            info["layer_sparsity"] = schedule.layer_sparsity
        return StageResult(metrics={**metrics, **final}, info=info,
                           metric_info={**PRUNE_METRICS, "target_sparsity": MetricInfo(fraction=True), **declared})
