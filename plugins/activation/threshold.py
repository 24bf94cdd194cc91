"""Thresholded activations: FATReLU (ProSparse step 3) and CATS (training-free baseline).

Both keep an activation value only where it clears a per-layer threshold.
Thresholds are either given (``threshold``, absolute, as ProSparse's t = 0.01
for LLaMA-2) or calibrated per layer so that a ``target_sparsity`` fraction of
the FFN intermediate is zero on the calibration split: activation scales
differ between models and layers (SmolLM2's are not LLaMA-2's), so a
calibrated per-layer threshold transfers where an absolute one does not.
"""
from __future__ import annotations

from abc import abstractmethod

import torch
from pydantic import Field, model_validator
from torch import nn

from sparsify_core import Method, MetricInfo, Params, StageResult
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import FFNBlock, find_ffn_blocks
from sparsify_core.method import LayerIndices



class FATReLUModule(nn.Module):
    """``f(x) = x if x >= t else 0`` (ProSparse's FATReLU); t = 0 is ReLU."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x):
        return x * (x >= self.threshold).to(x.dtype)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.6g}"


class MagnitudeThreshold(nn.Module):
    """``y = act(x)``, kept only where ``|y| >= t`` (CATS: the up/down work of the rest is skipped)."""

    def __init__(self, act: nn.Module, threshold: float):
        super().__init__()
        self.act = act
        self.threshold = float(threshold)

    def forward(self, x):
        y = self.act(x)
        return y * (y.abs() >= self.threshold).to(y.dtype)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.6g}"


def quantile_threshold(values: torch.Tensor, sparsity: float) -> float:
    """Smallest t such that a ``sparsity`` fraction of ``values`` lies below t (exact, via kthvalue)."""
    flat = values.flatten().float()
    k = int(round(sparsity * flat.numel()))
    if k <= 0:
        return 0.0
    if k >= flat.numel():
        return float(flat.max()) + 1e-12
    lo = torch.kthvalue(flat, k).values
    hi = torch.kthvalue(flat, k + 1).values
    return float((lo + hi) / 2) if hi > lo else float(hi)


@torch.no_grad()
def calibrate_activation_scores(ctx, blocks: list[FFNBlock], score, *, max_values: int = 1 << 21) -> list[torch.Tensor]:
    """Per block, a sample of ``score(activation, act_input)`` over the calibration split.

    ``score`` maps the activation module and its *input* (the gate
    pre-activation) to the quantity thresholded (``|act(x)|`` for CATS, ``x``
    for FATReLU). Scoring the input, not the output, matters when the current
    activation is already thresholded: its output is zero below the old
    threshold, so any quantile under that sparsity would come out as 0 and a
    recalibration would silently undo the old threshold. Per layer at most ``max_values`` values are
    kept (a seeded uniform sample per batch), so memory is bounded whatever
    the model and calibration size.
    """
    split = ctx.split("calibration")
    batch = 4
    batches = (len(split) + batch - 1) // batch
    per_batch = max(1, max_values // batches)
    gen = torch.Generator().manual_seed(ctx.seed)
    samples: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = []
    for i, block in enumerate(blocks):
        act = block.activation
        if not isinstance(act, nn.Module):
            raise SparsifyError(f"{block.name}: the activation is not a module; cannot calibrate it")

        def hook(module, inp, _out, i=i):
            v = score(module, inp[0].detach()).flatten().float().cpu()
            if v.numel() > per_batch:
                v = v[torch.randint(0, v.numel(), (per_batch,), generator=gen)]
            samples[i].append(v)
        handles.append(act.register_forward_hook(hook))
    was = ctx.model.training
    ctx.model.eval()
    try:
        with ctx.progress("calibrate thresholds", total=batches) as bar:
            for ids in split.batches(batch):
                ctx.model(input_ids=ids.to(ctx.device))
                bar.advance(1)
    finally:
        for h in handles:
            h.remove()
        ctx.model.train(was)
    return [torch.cat(s) for s in samples]


class ThresholdParams(Params):
    threshold: float | None = Field(None, ge=0, description="absolute threshold for every layer")
    target_sparsity: float | None = Field(
        None, gt=0, lt=1, description="calibrate a per-layer threshold reaching this fraction of zeros")
    layers: LayerIndices = Field(None, description="FFN layers (0-based) to change; default all")

    @model_validator(mode="after")
    def _one(self):
        if (self.threshold is None) == (self.target_sparsity is None):
            raise ValueError("give exactly one of threshold or target_sparsity")
        return self


class _Thresholded(Method):
    """Shared: pick thresholds (given or calibrated), swap modules, rebuild from saved thresholds."""

    kind = "substitute_activation"
    Params = ThresholdParams

    def score(self, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The quantity compared with the threshold, from the activation module and its input."""
        base = act.act if isinstance(act, MagnitudeThreshold) else act
        return base.forward(x).abs()  # .forward: this runs inside a hook on ``act`` itself

    @abstractmethod
    def make(self, block: FFNBlock, threshold: float) -> nn.Module:
        """The thresholded activation module for one block."""

    def data_splits(self, params):
        """The calibration split, read (under that name) only to calibrate a ``target_sparsity``."""
        return [(("target_sparsity",), "calibration")] if params.target_sparsity is not None else []

    def _blocks(self, model, params) -> list[FFNBlock]:
        blocks = find_ffn_blocks(model)
        wanted = params.layers if params.layers is not None else range(len(blocks))
        bad = [i for i in wanted if not 0 <= i < len(blocks)]
        if bad:
            raise SparsifyError(f"layers {bad} out of range: the model has {len(blocks)} FFN layers")
        return [blocks[i] for i in wanted]

    def apply(self, ctx, params) -> StageResult:
        blocks = self._blocks(ctx.model, params)
        if params.threshold is not None:
            thresholds = [params.threshold] * len(blocks)
        else:
            scores = calibrate_activation_scores(ctx, blocks, self.score)
            thresholds = [quantile_threshold(s, params.target_sparsity) for s in scores]
        self._swap(blocks, thresholds)
        t = torch.tensor(thresholds, dtype=torch.float64)
        ctx.info(f"{self.name}: thresholds {float(t.min()):.3g}..{float(t.max()):.3g} over {len(blocks)} layers")
        return StageResult(metrics={"threshold_mean": float(t.mean()), "threshold_max": float(t.max())},
                           state={"thresholds": t}, info={"layers": [b.name for b in blocks]},
                           # a threshold is in the score's own scale, and neither higher nor lower is better
                           metric_info={"threshold_mean": MetricInfo(), "threshold_max": MetricInfo()})

    def _swap(self, blocks, thresholds):
        for block, t in zip(blocks, thresholds):
            block.set_activation(self.make(block, t))

    @classmethod
    def keeps_layers(cls) -> bool:
        """True: only activation modules are swapped; every Linear layer stays as it was."""
        return True

    def plain_form(self, params) -> str | None:
        return f"a thresholded activation ({self.name})"

    def rebuild(self, ctx, params, result: StageResult) -> None:
        self._swap(self._blocks(ctx.model, params), result.state["thresholds"].tolist())


class FATReLU(_Thresholded):
    """FATReLU: x if x >= t else 0 on the gate (ProSparse's activation threshold shifting).

    Use after ReLU substitution and training. ``threshold`` is absolute
    (ProSparse: 0.01 for LLaMA-2-7B); ``target_sparsity`` calibrates a
    threshold per layer on the calibration split so that this fraction of the
    activation outputs is zero (thresholds are at least 0: FATReLU never
    passes negative values). Calibrating again after a first FATReLU moves
    the thresholds to the new target, up or down.
    """

    name = "fatrelu"

    def score(self, act, x):
        # FATReLU zeroes exactly where the gate pre-activation is below t, whatever ran before it
        return x

    def make(self, block, threshold):
        return FATReLUModule(max(threshold, 0.0))


class CATS(_Thresholded):
    """CATS: zero |act(gate)| below a per-layer calibrated threshold, no training (baseline).

    Keeps the model's own activation (SiLU, GELU); the threshold is chosen per
    layer from calibration quantiles of |act(x W_gate^T)| to hit
    ``target_sparsity`` (CATS, ``docs/methods.md#cats``).
    """

    name = "cats"

    def make(self, block, threshold):
        act = block.activation
        base = act.act if isinstance(act, MagnitudeThreshold) else act
        return MagnitudeThreshold(base, threshold)
