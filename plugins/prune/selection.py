"""What every pruning method shares: which weights (targets), how many per layer (profile), which structure.

``PruneParams`` holds the parameters common to ``magnitude``, ``wanda`` and
``sparsegpt``; ``select_targets`` turns them into the matrices to prune,
each with its transformer layer and its sparsity; ``record_mask`` writes a
mask to the run's ``MaskSet`` and zeroes the weights; ``summary`` makes the
stage metrics. OWL's outlier ratios need the Wanda scores of the dense model,
so ``owl_ratios`` runs a layer-wise calibration pass for them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from sparsify_core.method import check_regexes
from sparsify_core import Params, StageResult
from sparsify_core.calibration import CalibrationLayer, calibrate
from sparsify_core.errors import ParamsError, SparsifyError
from sparsify_core.ffn import is_conv1d, linear_shape, prunable_modules, transformer_layers, weight_out_in

from .masks import parse_pattern, wanda_scores
from .profiles import layer_sparsities, outlier_ratio


class PruneParams(Params):
    """Parameters shared by the pruning methods: how much, in which structure, where."""

    sparsity: float | None = Field(
        None, gt=0, lt=1, description="fraction of the targeted weights to zero (unstructured; with the owl "
                                      "profile, the mean over layers); implied by an n:m pattern")
    pattern: str = Field("unstructured", description="'unstructured', or 'n:m' to keep n of every m consecutive "
                                                     "weights along the input dimension (2:4, 4:8, 1:4...)")
    profile: Literal["uniform", "owl"] | list[float] = Field(
        "uniform", description="per-layer sparsity: uniform, owl (outlier-weighted, from calibration), "
                               "or one sparsity per transformer layer")
    owl_threshold: float = Field(5.0, gt=0, description="OWL's M: a Wanda score is an outlier above M x its "
                                                        "layer's mean")
    owl_lambda: float = Field(0.08, ge=0, lt=0.5, description="OWL's lambda: layer sparsities span 2 lambda")
    targets: list[str] | None = Field(
        None, description="regexes (re.search) on module paths of Linear/Conv1D modules to prune; "
                          "default: every Linear/Conv1D inside the transformer layers")
    exclude: list[str] = Field(["lm_head"], description="regexes of module paths never pruned")
    calibration_split: str = Field("calibration", description="data split that calibration reads (wanda, "
                                                              "sparsegpt, the owl profile)")
    batch_size: int = Field(8, gt=0, description="calibration sequences per forward")

    @field_validator("targets", "exclude")
    @classmethod
    def _regexes(cls, v):
        return check_regexes(v)

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, v):
        if isinstance(v, int):  # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124
            raise ValueError(f"got the number {v}: quote n:m patterns in YAML (pattern: \"2:4\")")
        parse_pattern(v)
        return v

    @field_validator("profile")
    @classmethod
    def _profile(cls, v):
        if isinstance(v, list) and (not v or any(not 0 <= s < 1 for s in v)):
            raise ValueError("a per-layer profile is a non-empty list of sparsities in [0, 1)")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        nm = self.nm
        if nm is not None:
            if self.sparsity is not None and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
                raise ValueError(f"pattern {self.pattern} fixes the sparsity at {1 - nm[0] / nm[1]:g}; "
                                 "leave sparsity out")
            if self.profile != "uniform":
                raise ValueError("an n:m pattern prunes every layer alike: profile must be uniform")
        elif self.sparsity is None and not isinstance(self.profile, list):
            raise ValueError("sparsity is required (unless pattern is n:m or profile lists every layer's)")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(n, m)`` of an n:m pattern, ``None`` when unstructured."""
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float | None:
        """The overall sparsity asked for (``1 - n/m`` for n:m; ``None`` for an explicit profile)."""
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm is not None else self.sparsity


@dataclass(eq=False)
class Target:
    """One weight matrix to prune: module path, module, transformer layer index (None outside layers), sparsity."""

    name: str
    module: nn.Module
    layer: int | None
    sparsity: float = 0.0

    @property
    def param(self) -> str:
        """The parameter name masks are keyed by."""
        return f"{self.name}.weight"

    def weight(self) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view for Conv1D: writes go through)."""
        return weight_out_in(self.module)


def select_targets(model: nn.Module, params: PruneParams, *, inside_layers: bool = False) -> list[Target]:
    """The matrices ``params`` target, each with its transformer layer (``sparsity`` left at 0).

    ``inside_layers=True`` (methods that calibrate layer by layer) refuses
    targets outside the transformer layers, such as ``lm_head``. An n:m
    pattern needs every target's input size to be a multiple of m.
    """
    modules = prunable_modules(model, params.targets, params.exclude)
    if not modules:
        raise SparsifyError(f"no Linear/Conv1D module matches targets={params.targets} "
                            f"outside exclude={params.exclude}")
    layers = [name for name, _ in transformer_layers(model)]
    targets = []
    for name, module in modules:
        layer = next((i for i, lname in enumerate(layers) if name.startswith(lname + ".")), None)
        if layer is None and inside_layers:
            raise SparsifyError(f"{name} is outside the transformer layers, which this method calibrates layer "
                                "by layer; prune it with magnitude, or exclude it")
        targets.append(Target(name, module, layer))
    nm = params.nm
    if nm is not None:
        bad = [t.name for t in targets if linear_shape(t.module)[1] % nm[1]]
        if bad:
            raise SparsifyError(f"pattern {params.pattern}: the input size of {', '.join(bad[:3])}"
                                f"{' ...' if len(bad) > 3 else ''} is not a multiple of {nm[1]}")
    return targets


def check_targets(model: nn.Module, params: PruneParams, *, inside_layers: bool = False) -> None:
    """``Method.check`` of the pruning methods: ``select_targets`` (and a per-layer profile) on the model's skeleton.

    Points at ``targets`` when nothing (or, layer by layer, something outside
    the layers) is targeted, at ``pattern`` when an input size is not a
    multiple of m (with the ``exclude`` that leaves those modules dense), at
    ``profile`` when a per-layer list does not have one value per layer.
    """
    try:
        targets = select_targets(model, params.model_copy(update={"pattern": "unstructured"}),
                                 inside_layers=inside_layers)
    except SparsifyError as exc:
        raise ParamsError(str(exc), field="targets") from None
    try:
        select_targets(model, params, inside_layers=inside_layers)
    except SparsifyError as exc:
        # the paths of the odd modules inside their layer ("mlp.c_proj"): one regex per kind of module
        m = params.nm[1] if params.nm else 1
        odd = sorted({re.sub(r"^(.*\.)?\d+\.", "", t.name) for t in targets if linear_shape(t.module)[1] % m})
        hint = ", ".join(f"'{p}'" for p in [*params.exclude, *(re.escape(name) for name in odd)])
        raise ParamsError(f"{exc}; leave them dense with exclude: [{hint}]", field="pattern") from None
    if isinstance(params.profile, list):
        try:
            layer_sparsities(params.profile, params.target_sparsity, n_layers(model))
        except ValueError as exc:
            raise ParamsError(str(exc), field="profile") from None


def n_layers(model: nn.Module) -> int:
    return len(transformer_layers(model))


def assign_sparsities(ctx, params: PruneParams, targets: list[Target]) -> list[float]:
    """Set each target's sparsity from the profile; returns the per-layer sparsities.

    Targets outside the transformer layers get ``params.sparsity`` (or the
    n:m sparsity). The owl profile runs one calibration pass over the dense
    model first (``owl_ratios``).
    """
    count = n_layers(ctx.model)
    ratios = owl_ratios(ctx, params, targets) if params.profile == "owl" else None
    try:
        per_layer = layer_sparsities(params.profile, params.target_sparsity, count, ratios, params.owl_lambda)
    except ValueError as exc:
        raise SparsifyError(str(exc)) from None
    for t in targets:
        t.sparsity = per_layer[t.layer] if t.layer is not None else float(params.target_sparsity or 0.0)
    return per_layer


def by_layer(targets: list[Target]) -> dict[int, list[Target]]:
    """Targets grouped by transformer layer index."""
    out: dict[int, list[Target]] = {}
    for t in targets:
        if t.layer is not None:
            out.setdefault(t.layer, []).append(t)
    return out


def input_sq_norms(layer: CalibrationLayer, targets: list[Target]) -> dict[str, torch.Tensor]:
    """``||X_j||_2^2`` per input feature of each target, summed over the layer's calibration tokens (float32)."""
    names = {t.name for t in targets}
    sums: dict[str, torch.Tensor] = {}

    def observe(group, x):
        sq = x.float().pow(2).sum(0)
        for name in group:
            if name in names:
                sums[name] = sums[name] + sq if name in sums else sq
    layer.observe(observe, modules=[t.name for t in targets])
    missing = sorted(names - set(sums))
    if missing:
        raise SparsifyError(f"{', '.join(missing)} never ran during calibration: nothing to score them by")
    return sums


def owl_ratios(ctx, params: PruneParams, targets: list[Target]) -> list[float]:
    """OWL outlier ratio of each transformer layer, from the Wanda scores of its targets on the dense model.

    Layers without targets get ratio 0. Costs one layer-wise calibration pass
    (the model is not changed).
    """
    groups = by_layer(targets)
    ratios = [0.0] * n_layers(ctx.model)

    def visit(layer: CalibrationLayer) -> None:
        mine = groups.get(layer.index)
        if mine:
            norms = input_sq_norms(layer, mine)
            scores = [wanda_scores(t.weight(), norms[t.name]) for t in mine]
            ratios[layer.index] = outlier_ratio(scores, params.owl_threshold)

    calibrate(ctx, visit, split=params.calibration_split, batch_size=params.batch_size,
              description="owl outlier ratios")
    return ratios


@torch.no_grad()
def record_mask(ctx, target: Target, keep: torch.Tensor) -> None:
    """Record ``keep`` (``[out, in]``) for ``target`` in ``ctx.masks`` and zero its pruned weights now.

    The mask is stored in the parameter's own orientation (``[in, out]`` for
    Conv1D); a weight pruned by an earlier stage stays pruned.
    """
    ctx.masks.set(target.param, keep.t() if is_conv1d(target.module) else keep)
    w = target.module.weight
    w.masked_fill_(~ctx.masks.get(target.param).to(w.device), 0)


def summary(ctx, targets: list[Target], per_layer: list[float] | None = None, **metrics: float) -> StageResult:
    """The stage result of a pruning method: overall and per-module sparsity of the targets' masks."""
    per_module, pruned, total = {}, 0, 0
    for t in targets:
        keep = ctx.masks.get(t.param)
        n_pruned = int((~keep).sum())
        per_module[t.name] = n_pruned / keep.numel()
        pruned, total = pruned + n_pruned, total + keep.numel()
    info = {"module_sparsity": per_module}
    if per_layer is not None:
        info["layer_sparsity"] = per_layer
    return StageResult(metrics={"sparsity": pruned / total, "weights_pruned": float(pruned),
                                "modules_pruned": float(len(targets)), **metrics}, info=info)
