"""TEAL (docs/methods.md#teal): training-free magnitude sparsity on the input of every projection.

Every Linear inside the transformer layers (q/k/v from the attention input, o
from the attention output, gate/up from the FFN input, down from the FFN
intermediate) zeroes the entries of its input with ``|x| < t``, ``t`` chosen
per projection from the calibration distribution of ``|x|`` so that a level
``s`` of its inputs is zero. The levels come from TEAL's block-wise greedy
search (``greedy_allocation``): in each transformer layer, starting from 0,
raise the level of the one projection whose raise costs the least block-output
error, until the layer's size-weighted sparsity reaches the target; every
layer gets the same target, so the model-wide figure is the target too.

Pure math (``greedy_allocation``, ``effective_sparsity``, ``level_threshold``,
``equal_flops_sparsity``) is separate from the module surgery (``set_input_threshold``).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from pydantic import Field
from torch import nn

from sparsify_core import Method, MetricInfo, Params, StageResult
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import (find_ffn_blocks, is_linear, transformer_layers, weight_numel,
                               zero_small_inputs)
from sparsify_core.method import LayerIndices


# -- the math ---------------------------------------------------------------------

def effective_sparsity(levels: dict[str, float], weights: dict[str, float]) -> float:
    """Size-weighted mean of ``levels``: the fraction of the projections' multiply-adds whose input is zero."""
    total = sum(weights.values())
    return sum(levels[p] * weights[p] for p in weights) / total


def greedy_allocation(error: Callable[[dict[str, float]], float], weights: dict[str, float], target: float,
                      step: float) -> list[tuple[str, dict[str, float], float]]:
    """TEAL's greedy: raise, one projection at a time, the level whose raise costs the least ``error``.

    ``weights`` are the projections' sizes (multiply-adds per token; any common
    unit). Projection ``p`` rises by ``step * mean(weights) / weights[p]`` per
    step (capped at 1), so every step removes the same number of
    multiply-adds: a large projection rises in small steps. ``error(levels)``
    is the cost of a candidate (TEAL: the block-output L2 error). Ties go to
    the projection listed first. Stops once ``effective_sparsity`` reaches
    ``target`` (it may overshoot by one step). Returns the trace: after each
    step, ``(projection raised, levels, its error)``; the last levels are the
    allocation. ``ValueError`` if ``target`` is not in ``[0, 1)``.
    """
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity {target} is not in [0, 1)")
    mean = sum(weights.values()) / len(weights)
    steps = {p: step * mean / w for p, w in weights.items()}
    levels = {p: 0.0 for p in weights}
    trace: list[tuple[str, dict[str, float], float]] = []
    while effective_sparsity(levels, weights) < target - 1e-9:
        best: tuple[float, str] | None = None
        for p in weights:
            if levels[p] >= 1.0:
                continue
            candidate = dict(levels, **{p: min(1.0, levels[p] + steps[p])})
            e = float(error(candidate))
            if best is None or e < best[0]:
                best = (e, p)
        assert best is not None  # some level is below 1 while the weighted mean is below target < 1
        levels[best[1]] = min(1.0, levels[best[1]] + steps[best[1]])
        trace.append((best[1], dict(levels), best[0]))
    return trace


def level_threshold(sorted_values: torch.Tensor, level: float) -> float:
    """The threshold zeroing a ``level`` fraction of ``sorted_values`` (ascending |x|), as ``quantile_threshold``."""
    n = sorted_values.numel()
    k = int(round(level * n))
    if k <= 0:
        return 0.0
    if k >= n:
        return float(torch.nextafter(sorted_values[-1], torch.tensor(float("inf"))))
    lo, hi = float(sorted_values[k - 1]), float(sorted_values[k])
    return (lo + hi) / 2 if hi > lo else hi


def equal_flops_sparsity(weights: dict[str, float], ffn_cats_sparsity: float, gate: str = "gate_proj",
                         skipped: tuple[str, ...] = ("up_proj", "down_proj")) -> float:
    """The TEAL model-wide sparsity computing the same projection multiply-adds as CATS at ``ffn_cats_sparsity``.

    CATS computes every gate row and every attention projection, and skips
    the up and down work of its zero neurons; TEAL skips a level of every
    projection's input. Equal FLOPs: ``(1 - s_teal) W = W - s_cats (W_up + W_down)``,
    so ``s_teal = s_cats (W_up + W_down) / W`` with ``W`` all projections of
    a layer (``weights`` keyed by projection name, e.g. ``q_proj``).
    """
    total = sum(weights.values())
    return ffn_cats_sparsity * sum(weights[p] for p in skipped) / total


# -- the module surgery -----------------------------------------------------------

class _InputThreshold:
    """Mixin: zero the input entries with ``|x| < input_threshold`` before the layer's own forward."""

    input_threshold: float = 0.0

    def forward(self, x):
        return super().forward(zero_small_inputs(x, self.input_threshold))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input_threshold={self.input_threshold:.6g}"


class ThresholdedLinear(_InputThreshold, nn.Linear):
    """``nn.Linear`` of the magnitude-thresholded input (TEAL): ``y = s(x) W^T + b``, ``s(x) = x·[|x| >= t]``."""


def _conv1d_cls():
    from transformers.pytorch_utils import Conv1D
    return Conv1D


@functools.cache
def _thresholded_conv1d() -> type:
    """``ThresholdedConv1D``, made on first use: it subclasses transformers' ``Conv1D``, and importing transformers
    when the plugin loads would cost every ``sparsify`` command ~2 s (``plugins``, ``schema``, ``runs``...)."""
    cls = type("ThresholdedConv1D", (_InputThreshold, _conv1d_cls()),
               {"__doc__": "GPT-2 ``Conv1D`` of the magnitude-thresholded input (TEAL).", "__module__": __name__,
                "__qualname__": "ThresholdedConv1D"})
    globals()["ThresholdedConv1D"] = cls  # importable (and picklable) by name from now on
    return cls


def __getattr__(name: str):
    """``ThresholdedConv1D`` on first access (PEP 562); ``AttributeError`` for any other missing name."""
    if name == "ThresholdedConv1D":
        return _thresholded_conv1d()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def set_input_threshold(module: nn.Module, threshold: float, where: str) -> None:
    """Make ``module`` zero its inputs below ``threshold`` (0: none), in place.

    The module keeps its path, parameters and hooks (its class becomes the
    thresholded subclass), so masks, state-dict keys and later stages see the
    same Linear. ``SparsifyError`` for modules other than ``nn.Linear`` and
    transformers' ``Conv1D``.
    """
    if not isinstance(module, _InputThreshold):
        if type(module) is nn.Linear:
            module.__class__ = ThresholdedLinear
        elif type(module) is _conv1d_cls():
            module.__class__ = _thresholded_conv1d()
        else:
            raise SparsifyError(f"{where}: TEAL thresholds the inputs of nn.Linear and Conv1D modules, "
                                f"not {type(module).__name__}")
    module.input_threshold = float(threshold)


# -- the method -------------------------------------------------------------------

class TEALParams(Params):
    sparsity: float = Field(..., gt=0, lt=1, description="model-wide target: fraction of the projections' "
                                                        "multiply-adds whose input entry is zero (size-weighted)")
    greedy: bool = Field(True, description="TEAL's block-wise greedy allocation across a layer's projections; "
                                           "false: every projection at `sparsity` (TEAL's uniform baseline)")
    step: float = Field(0.05, gt=0, le=0.5, description="greedy step: the rise of an average-sized projection's "
                                                       "sparsity per step (larger ones rise less)")
    error_positions: float = Field(0.25, gt=0, le=1, description="the block-output error is measured on this "
                                                                "last fraction of each sequence's positions")
    split: str = Field("calibration", description="data split the distributions and errors are measured on")
    error_samples: int = Field(8, ge=1, description="calibration sequences (whole batches, from the first) the "
                                                   "greedy's block-output error is measured on: each greedy step "
                                                   "runs the layer once per projection over them")
    batch_size: int = Field(8, ge=1, description="calibration sequences per forward")
    max_values: int = Field(1 << 20, ge=1024, description="|x| samples kept per projection input (seeded subsample)")
    layers: LayerIndices = Field(None, description="transformer layers (0-based) to sparsify; default all")


class TEAL(Method):
    """TEAL: magnitude thresholds on the input of every projection, calibrated; greedy per-layer allocation.

    Training-free. Each Linear/Conv1D inside the chosen transformer layers
    zeroes its input entries below a per-projection threshold, the
    ``level``-quantile of its calibration ``|x|``; levels from the greedy
    search on the block-output error (``greedy``), or uniform. Thresholds
    are saved with the output (``rebuild``); the fast modules compute each
    projection with the input-sparse GEMV (``InputSparseLinear``).
    """

    kind = "substitute_activation"
    name = "teal"
    Params = TEALParams

    @classmethod
    def keeps_layers(cls) -> bool:
        """True: every Linear keeps its path and shape (only its forward thresholds the input)."""
        return True

    def _layers(self, model, params) -> list[tuple[str, nn.Module]]:
        layers = transformer_layers(model)
        wanted = params.layers if params.layers is not None else range(len(layers))
        bad = [i for i in wanted if not 0 <= i < len(layers)]
        if bad:
            raise SparsifyError(f"layers {bad} out of range: the model has {len(layers)} transformer layers")
        routed = [b.name for b in find_ffn_blocks(model) if callable(getattr(b.module, "set_routing", None))]
        if routed:
            raise SparsifyError(f"{routed[0]}: TEAL does not threshold FFNs split into experts (moeify); "
                                "moeify and teal do not combine")
        chosen = [layers[i] for i in wanted]
        for name, layer in chosen:  # refuse before anything changes, not halfway through a layer
            for sub, m in layer.named_modules():
                if is_linear(m) and not isinstance(m, _InputThreshold) and type(m) not in (nn.Linear, _conv1d_cls()):
                    raise SparsifyError(f"{name}.{sub}: TEAL thresholds the inputs of nn.Linear and Conv1D modules, "
                                        f"not {type(m).__name__}; run teal before layout conversions")
        return chosen

    def check(self, model, params) -> None:
        """Refuse layers out of range, FFNs split into experts and projections that are not Linear/Conv1D."""
        self._layers(model, params)

    def apply(self, ctx, params) -> StageResult:
        from sparsify_core.calibration import calibrate

        chosen = {name for name, _ in self._layers(ctx.model, params)}
        gen = torch.Generator().manual_seed(ctx.seed)
        batches = -(-len(ctx.split(params.split)) // params.batch_size)
        per_batch = max(1, params.max_values // batches)
        paths: list[str] = []
        thresholds: list[float] = []
        levels: list[float] = []
        errors: list[float] = []

        def visit(layer):
            if layer.name not in chosen:
                return
            samples: dict[str, list[torch.Tensor]] = {n: [] for n in layer.linears}

            def grab(names, x):
                v = x.detach().abs().flatten().float().cpu()
                if v.numel() > per_batch:
                    v = v[torch.randint(0, v.numel(), (per_batch,), generator=gen)]
                for n in names:
                    samples[n].append(v)
            layer.observe(grab)
            dist = {n: torch.sort(torch.cat(s)).values for n, s in samples.items() if s}
            for n, m in layer.linears.items():
                set_input_threshold(m, 0.0, n)
            weights = {n: float(weight_numel(layer.linears[n])) for n in dist}
            dense = _outputs(layer, params.error_samples)

            def error(lv: dict[str, float], relative: bool = False) -> float:
                for n, v in lv.items():
                    layer.linears[n].input_threshold = level_threshold(dist[n], v)
                return _block_error(dense, _outputs(layer, params.error_samples), params.error_positions, relative)

            if params.greedy:
                trace = greedy_allocation(error, weights, params.sparsity, params.step)
                final = trace[-1][1] if trace else {n: 0.0 for n in dist}
            else:
                final = {n: params.sparsity for n in dist}
            errors.append(error(final, relative=True))
            for n, v in final.items():
                paths.append(n)
                levels.append(v)
                thresholds.append(level_threshold(dist[n], v))
            for n in dist:  # the next layers calibrate on the dense model's hidden states, as TEAL does
                layer.linears[n].input_threshold = 0.0

        calibrate(ctx, visit, split=params.split, batch_size=params.batch_size, description="teal thresholds")
        modules = dict(ctx.model.named_modules())
        for path, t in zip(paths, thresholds):
            set_input_threshold(modules[path], t, path)
        weights = {p: float(weight_numel(modules[p])) for p in paths}
        allocated = effective_sparsity(dict(zip(paths, levels)), weights) if paths else 0.0
        by_role: dict[str, list[float]] = {}
        for p, v in zip(paths, levels):
            by_role.setdefault(p.rpartition(".")[2], []).append(v)
        by_role_mean = {role: sum(v) / len(v) for role, v in by_role.items()}
        ctx.info(f"teal: {allocated:.1%} of projection inputs zero on {params.split} ("
                 + ", ".join(f"{r} {s:.0%}" for r, s in by_role_mean.items()) + ")")
        return StageResult(
            metrics={"allocated_sparsity": allocated, "block_error": sum(errors) / max(1, len(errors))},
            metric_info={"allocated_sparsity": MetricInfo(fraction=True),
                         # mean over layers of the relative L2 error of the block output on calibration data
                         "block_error": MetricInfo(higher_is_better=False)},
            state={"thresholds": torch.tensor(thresholds, dtype=torch.float64),
                   "levels": torch.tensor(levels, dtype=torch.float64)},
            info={"modules": paths, "levels_by_role": by_role_mean})

    def plain_form(self, params) -> str | None:
        return "thresholds on the input of every projection (TEAL)"

    def rebuild(self, ctx, params, result: StageResult) -> None:
        modules = dict(ctx.model.named_modules())
        for path, t in zip(result.info["modules"], result.state["thresholds"].tolist()):
            if path not in modules:
                raise SparsifyError(f"teal: module {path} of the saved thresholds is not in the model")
            set_input_threshold(modules[path], t, path)


@torch.no_grad()
def _outputs(layer, samples: int) -> list[torch.Tensor]:
    """The layer's output for the calibration batches holding the first ``samples`` sequences (inputs unchanged)."""
    outs = []
    for rows, args, kwargs in layer.inputs.batches():
        if rows.start >= samples:
            break
        out = layer.module(layer.inputs.hidden[rows], *args, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def _block_error(dense: list[torch.Tensor], new: list[torch.Tensor], positions: float,
                 relative: bool = False) -> float:
    """Mean over tokens of ``||new - dense||_2`` on the last ``positions`` of each sequence (TEAL's error).

    With ``relative``, each token's error is divided by ``||dense||_2``: a
    unitless figure comparable across layers (reported as ``block_error``).
    """
    total, count = 0.0, 0
    for d, n in zip(dense, new):
        start = int(d.shape[-2] * (1 - positions))
        err = (n[..., start:, :] - d[..., start:, :]).float().norm(dim=-1)
        if relative:
            err = err / d[..., start:, :].float().norm(dim=-1).clamp_min(1e-12)
        total += float(err.sum())
        count += err.numel()
    return total / max(1, count)
