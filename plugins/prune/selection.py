"""What every pruning method shares: which weights (targets), how many per layer (profile), which structure.

``PruneParams`` holds the parameters common to the pruning methods; ``select_targets`` turns them into the matrices to prune,
each with its transformer layer and its sparsity; ``record_mask`` writes a
mask to the run's ``MaskSet`` and zeroes the weights; ``summary`` makes the
stage metrics. OWL's outlier ratios need the Wanda scores of the dense model,
so ``owl_ratios`` runs a layer-wise calibration pass for them.

The contract every method keeps (and a third-party one gets by using these
helpers): the fraction of the targeted weights that is pruned after the
stage equals the request (to rounding: half a weight per matrix), and the
stage's ``sparsity`` metric is that measured fraction. The request is the
target sparsity over the targeted weights, not a mean over layers: profiles
weigh layers by their targeted weights (``assign_sparsities``). Weights
pruned by an earlier stage stay pruned (``MaskSet`` intersects masks) and
count towards the request: ``prior_pruned`` hands them to the mask
functions, which prune them first, so a matrix asked for ``s`` ends at ``s``
whenever ``s`` is at least its earlier sparsity (and otherwise keeps its
earlier mask, nothing more pruned).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from sparsify_core.method import check_regexes
from sparsify_core import MetricInfo, Params, StageResult
from sparsify_core.calibration import CalibrationLayer, calibrate
from sparsify_core.errors import ParamsError, SparsifyError
from sparsify_core.ffn import is_conv1d, linear_shape, prunable_modules, transformer_layers, weight_out_in

from .masks import nm_overflow, parse_pattern, wanda_scores
from .profiles import layer_sparsities, outlier_ratio


class PruneParams(Params):
    """Parameters shared by the pruning methods: how much, in which structure, where."""

    sparsity: float | None = Field(
        None, gt=0, lt=1, description="fraction of the targeted weights to zero, weights pruned by earlier "
                                      "stages included (unstructured; with the owl profile, over all targeted "
                                      "weights; with a per-layer list, for targets outside the transformer "
                                      "layers only); implied by an n:m pattern")
    pattern: str = Field("unstructured", description="'unstructured', or 'n:m' to keep n of every m consecutive "
                                                     "weights along the input dimension (2:4, 4:8, 1:4...)")
    profile: Literal["uniform", "owl"] | list[float] = Field(
        "uniform", description="per-layer sparsity: uniform, owl (outlier-weighted, from calibration; the "
                               "targeted weights as a whole reach sparsity), or one sparsity per transformer "
                               "layer (entries of layers without targets are unused)")
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

    def out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor stored like the weight parameter (its ``.grad``, say) as ``[out, in]`` (a view)."""
        return tensor.t() if is_conv1d(self.module) else tensor


def select_targets(model: nn.Module, params: PruneParams, *, inside_layers: bool = False) -> list[Target]:
    """The matrices ``params`` target, each with its transformer layer (``sparsity`` left at 0).

    ``inside_layers=True`` (methods that calibrate layer by layer) refuses
    targets outside the transformer layers, such as ``lm_head``. An n:m
    pattern needs every target's input size to be a multiple of m. Raises
    ``SparsifyError``.
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
    """Number of transformer layers of ``model``."""
    return len(transformer_layers(model))


def assign_sparsities(ctx, params: PruneParams, targets: list[Target]) -> list[float | None]:
    """Set each target's sparsity from the profile; returns the per-layer sparsities (``None``: no targets).

    Targets outside the transformer layers get ``params.sparsity`` (or the
    n:m sparsity); with a per-layer list and no ``sparsity`` there is nothing
    to give them: ``SparsifyError``. The owl profile runs one calibration
    pass over the dense model first (``owl_ratios``) and weighs each layer by
    its targeted weights, so that all targets together reach the sparsity
    asked for (``profiles.owl_sparsities``). Also refuses, with a
    ``SparsifyError``, an n:m pattern that masks from earlier stages already
    break (``check_prior``), and says (a status line) when a target's weight
    is tied to another parameter, which is then pruned with it.
    """
    count = n_layers(ctx.model)
    check_prior(ctx, params, targets)
    for param, others in tied_elsewhere(ctx.model, targets).items():  # asked for, but easy to miss
        ctx.info(f"{param} is tied to {', '.join(others)}: pruning it prunes {'them' if len(others) > 1 else 'it'} "
                 "too (the same tensor)")
    sizes = [0] * count
    for t in targets:
        if t.layer is not None:
            sizes[t.layer] += t.module.weight.numel()
    if params.profile == "owl" and not any(sizes):
        raise SparsifyError("the owl profile spreads the sparsity over transformer layers, but no target lies "
                            "inside one: use profile: uniform")
    ratios = owl_ratios(ctx, params, targets) if params.profile == "owl" else None
    try:
        per_layer = layer_sparsities(params.profile, params.target_sparsity, count, ratios, params.owl_lambda,
                                     sizes)
    except ValueError as exc:
        raise SparsifyError(str(exc)) from None
    outside = [t.name for t in targets if t.layer is None]
    if outside and params.target_sparsity is None:
        raise SparsifyError(f"{', '.join(outside[:3])} lie outside the transformer layers, which the per-layer "
                            "profile does not cover: give their sparsity too (sparsity: ...), or exclude them")
    for t in targets:
        t.sparsity = per_layer[t.layer] if t.layer is not None else float(params.target_sparsity)
    return [s if n else None for s, n in zip(per_layer, sizes)]


def tied_elsewhere(model: nn.Module, targets: list[Target]) -> dict[str, list[str]]:
    """Targets' weights that are also other parameters of ``model`` (GPT-2's ``lm_head`` is ``wte``):
    ``{target param: [the other names]}``. Pruning such a target prunes those too (the same tensor)."""
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    out = {}
    for t in targets:
        others = [n for n in names_of.get(id(t.module.weight), []) if n != t.param]
        if others:
            out[t.param] = others
    return out


def prior_pruned(ctx, target: Target) -> torch.Tensor | None:
    """The target's weights pruned by earlier stages, ``[out, in]`` bool on the CPU, where masks are kept
    (``None`` if it has no mask yet); the mask functions move it next to the scores."""
    keep = ctx.masks.get(target.param)
    if keep is None:
        return None
    return ~(keep.t() if is_conv1d(target.module) else keep)


def check_prior(ctx, params: PruneParams, targets: list[Target]) -> None:
    """Refuse an n:m pattern that earlier masks already break, and say when a target is sparser than asked.

    A group of m inputs with more than ``m - n`` weights pruned before cannot
    keep n: the result would be neither n:m nor the sparsity asked for. An
    unstructured request below a target's earlier sparsity prunes nothing
    more there (a status line says so). Raises ``SparsifyError``.
    """
    nm = params.nm
    above = []
    for t in targets:
        pruned = prior_pruned(ctx, t)
        if pruned is None:
            continue
        if nm is not None:
            bad = nm_overflow(pruned, *nm)
            if bad:
                raise SparsifyError(f"{t.name}: {bad} groups of {nm[1]} inputs already have more than "
                                    f"{nm[1] - nm[0]} weights pruned by an earlier stage, so pattern "
                                    f"{params.pattern} cannot hold; prune with {params.pattern} first, or use "
                                    "an unstructured pattern")
        elif params.target_sparsity is not None and float(pruned.float().mean()) > params.target_sparsity:
            above.append(t.name)
    if above:
        ctx.info(f"{len(above)} targets ({', '.join(above[:3])}{' ...' if len(above) > 3 else ''}) are already "
                 f"sparser than {params.target_sparsity:g} from earlier stages: they keep their masks")


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

    Layers without targets get ratio 0 (``owl_sparsities`` leaves them out:
    they hold no targeted weights). Costs one layer-wise calibration pass
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


# What pruning stages report (``summary``; gmp reports the first three too).
PRUNE_METRICS: dict[str, MetricInfo] = {
    "sparsity": MetricInfo(fraction=True),  # measured, of the targeted weights; the recipe sets the goal
    "weights_pruned": MetricInfo(unit="params"),
    "modules_pruned": MetricInfo(unit="modules"),
    "calibration_tokens": MetricInfo(unit="tokens"),  # methods that calibrate: tokens the model was run on
}


def summary(ctx, targets: list[Target], per_layer: list[float | None] | None = None, *,
            metric_info: Mapping[str, MetricInfo] | None = None, **metrics: float) -> StageResult:
    """The stage result of a pruning method: overall and per-module sparsity of the targets' masks.

    ``sparsity`` is the measured fraction of all targeted weights that are
    masked (earlier stages' masks included), ``weights_pruned`` their
    number; ``info`` holds ``module_sparsity`` and, when given,
    ``layer_sparsity`` (the profile; ``None`` for layers without targets).
    ``metrics`` are the method's own numbers, declared by ``metric_info``
    (``calibration_tokens`` is declared here, in ``PRUNE_METRICS``).
    """
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
                                "modules_pruned": float(len(targets)), **metrics}, info=info,
                       metric_info={**PRUNE_METRICS, **(metric_info or {})})
