"""The pruning template: a criterion writes its scores, ``ScorePruner`` does the rest.

A new pruning criterion is a ``ScorePruner`` subclass with a ``name`` and a
``scores`` method::

    class Snip(ScorePruner):
        name = "snip"
        calibration = "model"

        def scores(self, ctx, params, targets, layer=None):
            ...  # {target name: [out, in] tensor}, larger |score| = more worth keeping

Everything else is shared, so every criterion keeps the pruning contract
(``selection``'s docstring): the targets (``targets``/``exclude`` regexes,
``lm_head`` only when asked), the per-layer profile (uniform, a list, OWL),
the selection (``score_masks``: per matrix, per output row, global, n:m),
exact counts with the weights pruned by earlier stages pruned first and
counted (``prior_pruned``, ``check_prior``, ``row_quotas``), the masks in the
run's ``MaskSet`` and the stage metrics (``summary``). Validation checks
targets, n:m widths and a per-layer profile on the model's skeleton, and the
calibration split when the criterion reads it.

``calibration`` says what ``scores`` sees:

- ``"none"``: the weights alone (``prune/magnitude``); called once with every
  target, ``layer`` is ``None``.
- ``"model"``: anything it computes on the whole model, such as gradients of
  the loss on ``ctx.split(params.calibration_split)``; called once with every
  target, ``layer`` is ``None``.
- ``"layerwise"``: called for each transformer layer in order, with that
  layer's targets and its ``CalibrationLayer`` (``layer.observe`` sees the
  inputs of its Linear modules, the earlier layers already pruned:
  ``prune/wanda``). Targets must lie inside the transformer layers.

``group`` is what the scores are compared within for an unstructured
pattern: ``"matrix"`` (the lowest ``round(s * numel)`` of each matrix) or
``"row"`` (each output row prunes its share, rows differing by at most one
weight; Wanda's choice). A params class with ``scope: global``
(``ScopedPruneParams``) compares all targets together instead. Structures the
template does not cover (``prune/nmg``'s grouped n:m) override ``masks``.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar, Literal, Sequence

import torch
from pydantic import Field, model_validator

from sparsify_core import Method, StageResult
from sparsify_core.calibration import CalibrationLayer, calibrate
from sparsify_core.errors import SparsifyError

from .masks import global_magnitude_masks, magnitude_mask, nm_mask, row_mask
from .selection import (PruneParams, Target, assign_sparsities, by_layer, check_targets, prior_pruned, record_mask,
                        select_targets, summary)


class ScopedPruneParams(PruneParams):
    """``PruneParams`` plus ``scope``: prune each matrix to its sparsity, or all targets against one threshold."""

    scope: Literal["per_layer", "global"] = Field(
        "per_layer", description="per_layer: each weight matrix reaches its sparsity; "
                                 "global: one threshold across all targeted matrices")

    @model_validator(mode="after")
    def _global(self):
        if self.scope == "global" and (self.nm is not None or self.profile != "uniform"):
            raise ValueError("scope global takes an unstructured pattern and the uniform profile")
        return self


def score_masks(scores: Sequence[torch.Tensor], sparsities: Sequence[float],
                prior: Sequence[torch.Tensor | None], *, nm: tuple[int, int] | None = None,
                group: Literal["matrix", "row"] = "matrix", global_sparsity: float | None = None
                ) -> list[torch.Tensor]:
    """Keep-masks (``[out, in]`` bool) pruning the lowest ``|score|`` of each target, exactly.

    ``scores[i]`` is ``[out, in]`` (any dtype, any sign: ``|score|`` ranks; a
    weight itself ranks by magnitude, without a copy), ``sparsities[i]`` its
    sparsity, ``prior[i]`` its weights pruned by earlier stages (``[out, in]``
    bool or ``None``), pruned first and counted. ``nm=(n, m)``: the n largest of
    every m consecutive inputs (``sparsities`` unused); else ``global_sparsity``
    set: ``round(global_sparsity * n)`` over all targets together (one
    threshold); else per ``group``: each matrix prunes ``round(s * numel)``
    (``"matrix"``), spread over its rows as evenly as earlier masks allow
    (``"row"``). Raises ``ValueError`` on mismatched lengths or widths.
    """
    if not len(scores) == len(sparsities) == len(prior):
        raise ValueError(f"{len(scores)} scores, {len(sparsities)} sparsities, {len(prior)} prior masks")
    if nm is not None:
        return [nm_mask(s.detach().abs(), *nm, p) for s, p in zip(scores, prior)]
    if global_sparsity is not None:
        return global_magnitude_masks(list(scores), global_sparsity, list(prior))
    if group == "row":
        return [row_mask(s.detach().abs(), sp, p) for s, sp, p in zip(scores, sparsities, prior)]
    return [magnitude_mask(s, sp, p) for s, sp, p in zip(scores, sparsities, prior)]


class ScorePruner(Method):
    """Template of a pruning method that ranks weights by a score: subclasses implement ``scores`` only.

    ``apply`` selects the targets (``targets``), gives each its sparsity from
    the profile (``assign``, which also refuses an n:m pattern that earlier
    masks break), asks ``scores`` (once, or layer by layer: ``calibration``),
    turns the scores into masks (``masks``), records them (pruned weights zero
    now and through every later stage) and returns ``summary``'s metrics:
    ``sparsity`` (the measured fraction of the targeted weights that is
    masked), ``weights_pruned``, ``modules_pruned`` and, layer by layer,
    ``calibration_tokens``; ``info["module_sparsity"]`` (and
    ``layer_sparsity`` under a non-uniform profile). Errors are
    ``SparsifyError`` with a one-line message.
    """

    kind = "prune"
    Params = PruneParams
    calibration: ClassVar[Literal["none", "model", "layerwise"]] = "none"
    group: ClassVar[Literal["matrix", "row"]] = "matrix"

    @abstractmethod
    def scores(self, ctx, params, targets: list[Target],
               layer: CalibrationLayer | None = None) -> dict[str, torch.Tensor]:
        """``{target.name: scores}`` for every target given: ``[out, in]`` (``Target.weight``'s orientation;
        ``Target.out_in`` turns a gradient around), larger ``|score|`` kept. See the module docstring for
        when it is called and what ``layer`` is."""

    # -- the shared steps (a structure the template does not know overrides some of them) -------------

    @property
    def layerwise(self) -> bool:
        return self.calibration == "layerwise"

    def data_splits(self, params):
        """The calibration split when the criterion reads it, or the owl profile does."""
        return super().data_splits(params) if self.calibration != "none" or params.profile == "owl" else []

    def check(self, model, params) -> None:
        """Targets, n:m input widths and a per-layer profile, on the model's skeleton."""
        check_targets(model, params, inside_layers=self.layerwise)

    def targets(self, model, params) -> list[Target]:
        """The matrices to prune (``select_targets``)."""
        return select_targets(model, params, inside_layers=self.layerwise)

    def assign(self, ctx, params, targets: list[Target]) -> list[float | None] | None:
        """Set each target's sparsity; returns the per-layer profile to report (``None``: uniform)."""
        per_layer = assign_sparsities(ctx, params, targets)
        return per_layer if params.profile != "uniform" else None

    def masks(self, ctx, params, targets: list[Target], scores: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Keep-masks ``[out, in]`` of ``targets`` from their scores (``score_masks``)."""
        missing = [t.name for t in targets if t.name not in scores]
        if missing:
            raise SparsifyError(f"prune/{self.name}: no scores for {', '.join(missing[:3])}")
        scope = getattr(params, "scope", "per_layer")
        return score_masks([scores[t.name] for t in targets], [t.sparsity for t in targets],
                           [prior_pruned(ctx, t) for t in targets], nm=params.nm, group=self.group,
                           global_sparsity=params.sparsity if scope == "global" else None)

    def summarize(self, ctx, params, targets: list[Target], per_layer, **metrics: float) -> StageResult:
        """The stage result (``summary``)."""
        return summary(ctx, targets, per_layer, **metrics)

    def label(self, params) -> str:
        """How the progress bar names the stage."""
        scope = getattr(params, "scope", None)
        what = params.pattern if params.nm else f"{params.target_sparsity or 'profile'}"
        return f"{self.name} {what}" + (f" {scope}" if scope and not params.nm else "")

    def apply(self, ctx, params) -> StageResult:
        if self.layerwise and getattr(params, "scope", "per_layer") == "global":
            raise SparsifyError(f"prune/{self.name} prunes layer by layer: scope global cannot apply")
        targets = self.targets(ctx.model, params)
        per_layer = self.assign(ctx, params, targets)

        def prune(mine: list[Target], layer: CalibrationLayer | None = None) -> None:
            keeps = self.masks(ctx, params, mine, self.scores(ctx, params, mine, layer))
            for t, keep in zip(mine, keeps):
                record_mask(ctx, t, keep)

        if self.layerwise:
            groups = by_layer(targets)
            tokens = calibrate(ctx, lambda layer: prune(groups[layer.index], layer) if layer.index in groups
                               else None, split=params.calibration_split, batch_size=params.batch_size,
                               description=self.label(params))
            return self.summarize(ctx, params, targets, per_layer, calibration_tokens=float(tokens))
        with ctx.progress(self.label(params), total=len(targets)) as task:
            prune(targets)
            task.advance(len(targets))
        return self.summarize(ctx, params, targets, per_layer)
