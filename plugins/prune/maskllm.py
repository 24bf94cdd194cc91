"""MaskLLM (``prune/maskllm``): learned n:m masks, a Gumbel-softmax over the candidate patterns of every group.

Fang et al., "MaskLLM: Learnable Semi-Structured Sparsity for Large Language
Models", NeurIPS 2024, arXiv 2409.17481; reference code NVlabs/MaskLLM
(``learnable_sparsity/differentiable_mask.py``, ``pretrain_maskllm.py``), read
for the details, not copied (``docs/methods.md#maskllm``).

For every group of ``m`` consecutive inputs of a row (the n:m groups of
``masks.nm_mask``) there are ``P = C(m, n)`` candidate patterns (6 for 2:4);
each group holds ``P`` learnable logits (``gate``, float32). In each forward
of training the group's mask is the soft mixture of the patterns under a
Gumbel-softmax sample::

    probs = softmax((kappa * gate + gumbel) / tau)  # [..., P], rows sum to 1
    mask  = probs @ patterns                         # [..., m], n in expectation

and the Linear computes with ``W * mask``; the weights stay frozen, only the
logits train, with the shared loop (its ``train:`` block: LM and/or KD loss).
``tau`` (the temperature) and ``kappa`` (the logit scale) move linearly from
their first to their last value over the steps. A prior one-shot mask
(``prior``: SparseGPT, Wanda or magnitude at the same n:m) raises the initial
logits of the patterns that agree with it: ``gate += strength * std(gate) *
(overlap - (n - 1))`` with ``overlap`` the number of kept positions a pattern
shares with the prior (for 2:4: +1 on the prior's pattern, 0 for patterns
sharing one position, -1 for the complementary one, as in the reference).
The sparse weight regulariser of the paper subtracts ``weight_reg * (1 -
step / steps) * sum ||W * mask||^2`` (weights frozen, so its gradient reaches
the logits only): it prefers masks that keep large weights. At the end the
hard mask is the argmax pattern of each group, recorded in the run's
``MaskSet``; the logits and the masked forwards are removed, so the model and
the saved output are ordinary.

The learnable state lives on each targeted module while the stage runs: a
``mask_gate`` parameter (so the loop's optimizer, gradient clipping and
mid-stage checkpoints see it, and ``--resume`` inside the stage continues it)
and an instance ``forward`` computing with the masked weight. Not a
``torch.nn.utils.parametrize`` parametrization: that renames ``weight`` to
``parametrizations.weight.original``, and the run's masks and checkpoints are
keyed by the parameter names.
"""
from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from sparsify_core import Method, MetricInfo, Params, StageResult
from sparsify_core.ffn import is_conv1d
from sparsify_core.params import check_regexes
from sparsify_core.training import TrainCallback, TrainConfig, final_metrics, train

from .masks import nm_mask, parse_pattern
from .selection import (PruneParams, Target, assign_sparsities, check_targets, prior_pruned, record_mask,
                        select_targets, summary)

MAX_M = 8  # C(8, 4) = 70 logits per 8 weights: 35 bytes of float32 logits per weight, before Adam's moments


# -- the mask math, pure functions on tensors -------------------------------------------------------

def nm_patterns(n: int, m: int) -> torch.Tensor:
    """The ``C(m, n)`` keep-patterns of a group of ``m``, as a float32 ``[P, m]`` 0/1 matrix (n ones a row).

    Lexicographic order of the kept positions (2:4: 1100, 1010, 1001, 0110, 0101, 0011: the reference's).
    Raises ``ValueError`` unless ``0 < n < m``.
    """
    if not 0 < n < m:
        raise ValueError(f"n:m needs 0 < n < m, got {n}:{m}")
    rows = list(itertools.combinations(range(m), n))
    out = torch.zeros(len(rows), m, dtype=torch.float32)
    for i, kept in enumerate(rows):
        out[i, list(kept)] = 1.0
    return out


def gumbel_noise(shape, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise ``-log(-log U)``, ``U ~ Uniform(0, 1)``, float32 of ``shape``.

    From uniforms rather than ``F.gumbel_softmax``'s ``-log(Exp(1))``: the
    same distribution, but torch's CPU ``exponential_`` is ~6x slower than
    ``uniform_`` plus two ``log`` (3.6 s vs 0.6 s for SmolLM2's 159M logits on
    2 AVX2 cores), and the noise is most of a MaskLLM step's mask cost.
    ``U = 0`` gives ``-inf`` (that pattern's probability 0, harmless); torch's
    uniforms stay below 1, so the noise is never ``+inf``.
    """
    u = torch.rand(shape, device=device, generator=generator)
    return u.log_().neg_().log_().neg_()


def soft_nm_mask(gate: torch.Tensor, patterns: torch.Tensor, temperature: float, scale: float,
                 allowed: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One differentiable sample of the soft mask, ``[..., G, m]`` float32, from logits ``gate`` ``[..., G, P]``.

    ``softmax((scale * gate + g) / temperature) @ patterns`` with ``g`` Gumbel
    noise (Jang et al. 2017, the Gumbel-softmax; MaskLLM eq. 4-5): each
    group's pattern probabilities sum to 1, so each group's mask sums to n.
    ``allowed`` (``[..., G, P]`` bool, optional) rules patterns out
    (probability 0). ``noise`` (same shape as ``gate``) is the Gumbel sample;
    drawn from torch's global RNG (``gumbel_noise``) when omitted. The plain
    reference of ``soft_nm_mask_pmajor``, the layout training uses.
    """
    if noise is None:
        noise = gumbel_noise(gate.shape, gate.device)
    logits = gate.float() * scale + noise
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -torch.inf)
    probs = torch.softmax(logits / temperature, dim=-1)
    return probs @ patterns.to(probs.device)


def soft_nm_mask_pmajor(gate: torch.Tensor, patterns: torch.Tensor, temperature: float, scale: float,
                        allowed: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """``soft_nm_mask`` for logits stored pattern-major: ``gate`` ``[P, rows, G]`` -> mask ``[rows, G * m]``.

    The same sample as ``soft_nm_mask(gate.permute(1, 2, 0), ...)`` given the
    same noise (``noise`` and ``allowed`` pattern-major too), computed the way
    a CPU does fast: with P (6 for 2:4) as the outer dimension the softmax and
    the noise are elementwise passes over P contiguous slabs instead of
    softmaxes of 6 numbers (4x faster on AVX2 for SmolLM2's 26.5M groups),
    and the pattern mixture is one ``[m, P] @ [P, rows * G]`` product.
    The result is in the weight's ``[out, in]`` orientation for ``rows = out``.
    """
    P, rows, groups = gate.shape
    # (scale * gate + g) / tau in one autograd op; fresh noise is scaled in place (it needs no gradient)
    noise = gumbel_noise(gate.shape, gate.device).div_(temperature) if noise is None else noise / temperature
    logits = torch.add(noise, gate.float(), alpha=scale / temperature)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -torch.inf)
    probs = torch.softmax(logits, dim=0).reshape(P, rows * groups)
    mask = patterns.to(probs.device).t() @ probs  # [m, rows * G]
    return mask.t().reshape(rows, groups * patterns.shape[1])


def hard_nm_mask(gate: torch.Tensor, patterns: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The argmax pattern of each group: keep-mask ``[..., G, m]`` bool (exactly n kept per group).

    Ties go to the first pattern (``argmax``); ``allowed`` as in ``soft_nm_mask``.
    """
    logits = gate.detach().float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -torch.inf)
    return patterns.to(logits.device)[logits.argmax(-1)] > 0.5


def pattern_overlap(keep: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """How many kept positions each pattern shares with a keep-mask: ``[out, in]`` bool -> ``[out, in/m, P]``."""
    rows, cols = keep.shape
    m = patterns.shape[1]
    return keep.reshape(rows, cols // m, m).float() @ patterns.t().to(keep.device)


def prior_bonus(keep: torch.Tensor, patterns: torch.Tensor, n: int, strength: float, std: float) -> torch.Tensor:
    """What the prior adds to the initial logits ``[out, in/m, P]``: ``strength * std * (overlap - (n - 1))``.

    The reference's ``(priors - 1) * gate.std() * prior_strength`` for 2:4,
    written for any n:m so that each kept position shared with the prior
    raises a pattern's logit by ``strength * std`` (the constant shift does not
    change the softmax).
    """
    return (pattern_overlap(keep, patterns) - (n - 1)) * (strength * std)


def allowed_patterns(pruned: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Patterns that keep no weight an earlier stage pruned: ``[out, in]`` bool (pruned) -> ``[out, in/m, P]`` bool."""
    return pattern_overlap(pruned, patterns) == 0


def linear_schedule(start: float, end: float, step: int, steps: int) -> float:
    """``start`` at step 0, ``end`` at the last step (``steps - 1``), linear in between."""
    return start + (end - start) * (step / max(steps - 1, 1))


# -- params ----------------------------------------------------------------------------------------

def _span(name: str):
    def check(v: tuple[float, float]) -> tuple[float, float]:
        if not all(math.isfinite(x) and x > 0 for x in v):
            raise ValueError(f"{name} must be two positive numbers [first, last], got {list(v)}")
        return v
    return check


class MaskLLMParams(Params):
    pattern: str = Field("2:4", description="n:m pattern learned (keep n of every m consecutive inputs, m <= 8): "
                                            "2:4, 1:4, 4:8...")
    prior: Literal["sparsegpt", "wanda", "magnitude", "none"] = Field(
        "sparsegpt", description="one-shot n:m mask the logits start from (sparsegpt and wanda calibrate on "
                                 "calibration_split; the weights stay dense); none: random logits only")
    prior_strength: float = Field(3.0, ge=0, description="how far the prior's pattern starts ahead, in std of the "
                                                         "initial logits per shared kept position (paper: 3)")
    init_std: float = Field(0.01, gt=0, description="std of the random initial logits (reference: 0.01)")
    temperature: tuple[float, float] = Field((4.0, 0.05), description="Gumbel-softmax temperature [first, last], "
                                                                      "linear over the steps (paper: 4 -> 0.05)")
    kappa: tuple[float, float] = Field((100.0, 500.0), description="logit scale [first, last], linear over the "
                                                                   "steps (paper: 1e2 -> 5e2)")
    weight_reg: float = Field(1e-5, ge=0, description="sparse weight regularisation: subtract weight_reg x "
                                                      "sum ||W * mask||^2, decayed linearly to 0 (paper: 1e-5)")
    targets: list[str] | None = PruneParams.model_fields["targets"]
    exclude: list[str] = PruneParams.model_fields["exclude"]
    calibration_split: str = Field("calibration", description="data split the sparsegpt/wanda prior calibrates on")
    batch_size: int = Field(8, gt=0, description="calibration sequences per forward (the prior)")
    train: TrainConfig = Field(description="the shared training loop the logits learn in (weights frozen)")

    _temperature = field_validator("temperature")(_span("temperature"))
    _kappa = field_validator("kappa")(_span("kappa"))

    @field_validator("targets", "exclude")
    @classmethod
    def _regexes(cls, v):
        return check_regexes(v)

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, v):
        if isinstance(v, int):  # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124
            raise ValueError(f"got the number {v}: quote n:m patterns in YAML (pattern: \"2:4\")")
        if isinstance(v, str):
            nm = parse_pattern(v)
            if nm is None:
                raise ValueError("maskllm learns n:m masks: pattern must be n:m (2:4, 1:4, 4:8...), not "
                                 "unstructured")
            if nm[1] > MAX_M:
                raise ValueError(f"pattern {v}: m must be at most {MAX_M} (C(m, n) logits per group of m)")
        return v

    @property
    def nm(self) -> tuple[int, int]:
        return parse_pattern(self.pattern)

    def as_prune(self) -> PruneParams:
        """The shared pruning params of the same targets and pattern (selection, checks, the prior)."""
        return PruneParams(pattern=self.pattern, targets=self.targets, exclude=self.exclude,
                           calibration_split=self.calibration_split, batch_size=self.batch_size)

    @property
    def calibrates(self) -> bool:
        """True when the prior runs on calibration data (and its targets must lie inside the layers)."""
        return self.prior in ("sparsegpt", "wanda")


# -- the learnable masks on the model ---------------------------------------------------------------

class MaskLearner:
    """Learnable n:m masks on ``targets`` while the stage trains (see the module docstring).

    ``install`` adds to each target module a float32 ``mask_gate`` parameter
    ``[P, out, in/m]`` (the logits of ``gates`` ``[out, in/m, P]``, stored
    pattern-major for ``soft_nm_mask_pmajor``) and a masked forward;
    ``remove`` takes both away again, leaving the module as it was.
    ``temperature`` and ``scale`` (kappa) are read by every forward; with
    ``track_norms`` each forward also records ``||W * mask||^2`` of its module
    in ``norms`` (for the weight regulariser).
    """

    def __init__(self, targets: list[Target], n: int, m: int, gates: list[torch.Tensor],
                 allowed: list[torch.Tensor | None]):
        self.targets, self.n, self.m = targets, n, m
        self.patterns = nm_patterns(n, m)
        self.gates, self.allowed = gates, allowed
        self.temperature, self.scale = 1.0, 1.0
        self.track_norms = False
        self.norms: dict[str, torch.Tensor] = {}
        self.installed = False

    def soft_mask(self, t: Target, gate: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """The soft mask of target ``t`` (pattern-major ``gate``) in its weight's orientation (``[in, out]`` for Conv1D)."""
        mask = soft_nm_mask_pmajor(gate, self.patterns, self.temperature, self.scale, allowed)
        return mask.t() if is_conv1d(t.module) else mask

    def install(self) -> None:
        """Add the logits (pattern-major ``[P, out, in/m]``, the fast layout) and the masked forwards (once)."""
        for t, gate, allowed in zip(self.targets, self.gates, self.allowed):
            module = t.module
            device = module.weight.device
            pmajor = gate.to(device).permute(2, 0, 1).contiguous()
            module.register_parameter("mask_gate", nn.Parameter(pmajor, requires_grad=True))
            if allowed is not None:
                allowed = allowed.to(device).permute(2, 0, 1).contiguous()
            module.forward = self._forward(t, allowed)
        self.patterns = self.patterns.to(self.targets[0].module.weight.device)
        self.installed = True

    def _forward(self, t: Target, allowed: torch.Tensor | None):
        module, conv = t.module, is_conv1d(t.module)

        def forward(x: torch.Tensor) -> torch.Tensor:
            mask = self.soft_mask(t, module.mask_gate, allowed)
            w = module.weight * mask.to(module.weight.dtype)  # weight frozen: the gradient reaches the logits
            if self.track_norms:
                self.norms[t.name] = w.float().pow(2).sum()
            if conv:  # GPT-2 Conv1D: x @ W + b, W stored [in, out]
                y = x.reshape(-1, x.shape[-1]) @ w
                if module.bias is not None:
                    y = y + module.bias
                return y.reshape(*x.shape[:-1], w.shape[1])
            return F.linear(x, w, module.bias)
        return forward

    def hard_masks(self) -> list[torch.Tensor]:
        """The argmax pattern of every group of every target: keep-masks ``[out, in]`` bool on the CPU."""
        out = []
        for i, (t, allowed) in enumerate(zip(self.targets, self.allowed)):
            gate = self.gates[i] if not self.installed else t.module.mask_gate.detach().permute(1, 2, 0)
            keep = hard_nm_mask(gate, self.patterns, None if allowed is None else allowed.to(gate.device))
            out.append(keep.reshape(gate.shape[0], -1).cpu())
        return out

    def remove(self) -> None:
        """Take the logits and the masked forwards away (the last logits stay in ``gates``)."""
        if not self.installed:
            return
        for i, t in enumerate(self.targets):
            module = t.module
            self.gates[i] = module.mask_gate.detach().permute(1, 2, 0).contiguous()  # back to [out, in/m, P]
            del module.mask_gate
            module.__dict__.pop("forward", None)
        self.norms.clear()
        self.installed = False


class MaskSchedule(TrainCallback):
    """Anneals temperature and kappa over the steps and adds the sparse weight regulariser (a negative penalty).

    A function of the step alone (nothing to checkpoint: the logits are model
    parameters). Shows ``temperature`` and ``kappa`` after every step and
    ``kept_weight_norm`` (``sum ||W * mask||^2`` over the targets, of the last
    forward) while the regulariser is on.
    """

    shardable = False  # the masked forwards read whole weights and logits

    def __init__(self, learner: MaskLearner, params: MaskLLMParams):
        self.learner, self.params = learner, params
        self.steps = params.train.steps

    def before_step(self, step: int) -> None:
        p = self.params
        self.learner.temperature = linear_schedule(*p.temperature, step, self.steps)
        self.learner.scale = linear_schedule(*p.kappa, step, self.steps)
        self.coef = p.weight_reg * (1 - step / self.steps)
        self.learner.track_norms = self.coef > 0
        self.learner.norms.clear()

    def penalty(self, step: int):
        if not self.learner.track_norms or not self.learner.norms:
            return None, {}
        total = sum(self.learner.norms.values())
        self.learner.norms.clear()  # one forward's norms per penalty (each micro-batch has its own)
        return -self.coef * total, {"kept_weight_norm": float(total.detach())}

    def after_step(self, step: int) -> dict[str, float]:
        return {"temperature": self.learner.temperature, "kappa": self.learner.scale}

    def stop(self) -> None:
        self.learner.track_norms = False
        self.learner.norms.clear()


# -- the method --------------------------------------------------------------------------------------

MASKLLM_METRICS: dict[str, MetricInfo] = {
    # of the groups, the fraction whose learned pattern is the prior's (absent with prior none)
    "prior_agreement": MetricInfo(fraction=True),
    "mask_parameters": MetricInfo(unit="params"),  # learnable logits while the stage ran
}


class MaskLLM(Method):
    """MaskLLM: learn an n:m mask per group with Gumbel-softmax over its patterns, weights frozen (shared loop).

    The targets (default: every Linear inside the transformer layers) keep
    their dense weights; each group of m inputs gets ``C(m, n)`` logits,
    initialised at random (``init_std``) plus the ``prior`` mask's bonus, and
    trained by the ``train:`` block's loss through ``W * soft mask``
    (temperature and kappa annealed, the sparse weight regulariser decaying).
    The argmax pattern of every group becomes the mask: exactly n kept in
    every group, recorded in the run's ``MaskSet`` like any pruning, the
    pruned weights zeroed. Weights pruned by an earlier stage stay pruned:
    patterns that would keep them are ruled out (a group with more than
    ``m - n`` of them is refused, ``SparsifyError``, as for every n:m
    pruning). Memory while training: per targeted weight ``C(m, n) / m``
    float32 logits, their gradient and AdamW's two moments (2:4: 24 bytes per
    weight), plus the soft masks of one forward kept for backward.
    Metrics: the pruning ``sparsity``, ``weights_pruned``, ``modules_pruned``;
    ``prior_agreement``, ``mask_parameters``; the loop's ``final_loss``
    (``final_lm_loss``, ``final_kd_loss``); ``calibration_tokens`` of the prior.
    """

    kind = "prune"
    name = "maskllm"
    Params = MaskLLMParams

    def data_splits(self, params: MaskLLMParams):
        """The train split, and the calibration split when the prior calibrates."""
        return [(path, split) for path, split in super().data_splits(params)
                if path != ("calibration_split",) or params.calibrates]

    def check(self, model, params: MaskLLMParams) -> None:
        """Targets and n:m input widths on the model's skeleton (inside the layers for a calibrating prior)."""
        check_targets(model, params.as_prune(), inside_layers=params.calibrates)

    def prior_masks(self, ctx, params: MaskLLMParams, targets: list[Target]) -> tuple[list[torch.Tensor], float]:
        """The prior's keep-masks ``[out, in]`` (CPU bool) of ``targets`` and the calibration tokens it read.

        Magnitude: the n largest ``|w|`` of every m. SparseGPT and Wanda: the
        method itself runs at the same pattern and targets, then the targets'
        weights and the run's masks are put back as they were: only the masks
        are kept (the reference's prior, "weight update disabled").
        """
        n, m = params.nm
        prune = params.as_prune()
        if params.prior == "magnitude":
            return [nm_mask(t.weight().detach().abs(), n, m, prior_pruned(ctx, t)).cpu() for t in targets], 0.0
        from .sparsegpt import SparseGPT, SparseGPTParams
        from .wanda import Wanda, WandaParams

        if params.prior == "sparsegpt":
            method, mparams = SparseGPT(), SparseGPTParams(**prune.model_dump(), block_size=128 - 128 % m)
        else:
            method, mparams = Wanda(), WandaParams(**prune.model_dump())
        weights = {t.name: t.module.weight.detach().to("cpu", copy=True) for t in targets}
        masks = ctx.masks.state_dict()
        try:
            result = method.apply(ctx, mparams)
            keeps = []
            for t in targets:
                keep = ctx.masks.get(t.param)
                keeps.append((keep.t() if is_conv1d(t.module) else keep).clone())
        finally:
            with torch.no_grad():
                for t in targets:
                    t.module.weight.copy_(weights[t.name].to(t.module.weight.device))
            ctx.masks.load_state_dict(masks)
        return keeps, float(result.metrics.get("calibration_tokens", 0.0))

    def initial_gates(self, ctx, params: MaskLLMParams, targets: list[Target],
                      priors: list[torch.Tensor] | None) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Initial logits ``[out, in/m, P]`` (float32, CPU; seeded by the run's seed) and allowed patterns."""
        n, m = params.nm
        patterns = nm_patterns(n, m)
        gen = torch.Generator().manual_seed(ctx.seed * 7919 + 17)
        gates, allowed = [], []
        for i, t in enumerate(targets):
            rows, cols = t.weight().shape
            gate = torch.randn(rows, cols // m, patterns.shape[0], generator=gen) * params.init_std
            if priors is not None and params.prior_strength > 0:
                gate += prior_bonus(priors[i], patterns, n, params.prior_strength, float(gate.std()))
            pruned = prior_pruned(ctx, t)
            allowed.append(None if pruned is None or not bool(pruned.any()) else allowed_patterns(pruned, patterns))
            gates.append(gate)
        return gates, allowed

    def apply(self, ctx, params: MaskLLMParams) -> StageResult:
        n, m = params.nm
        prune = params.as_prune()
        targets = select_targets(ctx.model, prune, inside_layers=params.calibrates)
        assign_sparsities(ctx, prune, targets)  # refuses groups earlier masks already break; notes tied weights
        priors, tokens = (None, 0.0) if params.prior == "none" else self.prior_masks(ctx, params, targets)
        gates, allowed = self.initial_gates(ctx, params, targets, priors)
        learner = MaskLearner(targets, n, m, gates, allowed)
        size = sum(g.numel() for g in gates)
        ctx.info(f"{len(targets)} matrices, {size / 1e6:.3g}M mask logits ({size * 16 / 2**30:.2f} GiB with "
                 f"gradients and AdamW moments), prior {params.prior}, {params.train.steps} steps")
        trainable = [p for p in ctx.model.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)  # the weights are frozen: only the logits learn
        learner.install()
        try:
            final, declared = final_metrics(train(ctx, params.train, callbacks=[MaskSchedule(learner, params)]))
            keeps = learner.hard_masks()
        finally:
            learner.remove()
            for p in trainable:
                p.requires_grad_(True)
        for t, keep in zip(targets, keeps):
            record_mask(ctx, t, keep)
        metrics = {**final, "mask_parameters": float(size)}
        if priors is not None:
            patterns = nm_patterns(n, m)
            same = sum(int((k.reshape(k.shape[0], -1, m) == p.reshape(p.shape[0], -1, m)).all(-1).sum())
                       for k, p in zip(keeps, priors))
            metrics["prior_agreement"] = same / max(size // patterns.shape[0], 1)
        if params.calibrates:
            metrics["calibration_tokens"] = tokens
        return summary(ctx, targets, None, metric_info={**MASKLLM_METRICS, **declared}, **metrics)
