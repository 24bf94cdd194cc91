"""``train/ssd``: Switchable Sparse-Dense training (``docs/methods.md#ssd``), one pass of the shared loop.

SSD is a way to *train* a model (from scratch or onwards), so it is a
``train`` method: it adds no penalty to the loss (not ``regularize``) and is
not a one-shot conversion (not ``moeify``). A recipe reads "train with SSD".

1. Dense training while a stability monitor (``monitor``) measures, every
   ``monitor.every`` steps, the activation pattern of a fixed probe batch (the
   first ``monitor.samples`` rows of ``monitor.split``) and its similarity to
   the previous monitor point (``monitor.py``: mean Jaccard similarity of each
   token's active-neuron set). Every point is logged as ``pattern_similarity``.
2. When the pattern is stable (``schedule.py``: ``patience`` points at or
   above ``threshold``, not before ``min_dense`` of the steps; or, at the
   latest, at ``max_dense``), every FFN is MoE-ified the MoEfication way by
   the ``moeify`` method named in ``clustering`` with the ``experts`` params
   (experts by balanced k-means or co-activation, routers fitted on the
   calibration activations; ``plugins/moeify``), and training goes on sparsely:
   each token computes only its selected experts (``RoutedFFN``'s gather
   path), so unselected experts get no gradient. The optimizer state is
   permuted with the neurons, and an expert that no token selected in a step
   is not updated at all: its weights and Adam moments are put back after the
   optimizer step (momentum and weight decay would otherwise still move it,
   as in "lazy" sparse Adam). Routers are not trained by the loss; with
   ``refit_every`` they are fitted again to the current weights every so
   many sparse steps.
3. The last ``final_dense`` of the steps run the routed FFNs densely again.
   Afterwards the routers are refitted to the final weights (``refit_routers``)
   and the model is left in ``final_routing``: ``dense``, or ``moe`` (the
   ``experts`` selection); ``moeify/routing`` switches it later.

The phase of a step is a function of the step and the recorded switch step,
and the callback's checkpointed state holds the switch, the monitor curve,
the last probe pattern and the routed FFNs' structure: ``--resume`` rebuilds
the MoE before loading the weights and continues as if uninterrupted.

Recorded: the monitor curve (``pattern_similarity`` by step), the switch steps
(``ssd_switch`` events and the stage metrics ``switch_to_sparse_step`` /
``switch_to_dense_step``), and the FFN FLOPs spent in training against dense
training of the same length (``flops.py`` documents the accounting), with
the monitor, switch and refit work as a separate overhead.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from sparsify_core import Method, MetricInfo, Params, StageResult
from sparsify_core import distributed as dist
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import capture_intermediates, find_ffn_blocks, is_conv1d
from sparsify_core.training import TrainCallback, TrainConfig, final_metrics, train
from ...moeify import Coactivation, ParamCluster, RoutedFFN
from ...moeify.methods import ROUTER_FIT_METRICS, CoactivationParams, collect_router_data, fit_router, sharpen_router

from .flops import FFNShape, dense_training_flops, ffn_forward_flops, ffn_training_flops
from .monitor import active_neurons, pack_pattern, pattern_similarity, unpack_pattern
from .schedule import SwitchRule, phase_at, switch_reason

MOEIFY = {"param_cluster": ParamCluster, "coactivation": Coactivation}
_PHASE_CODE = {"dense": 0.0, "sparse": 1.0, "final_dense": 2.0}


class StabilityMonitor(Params):
    """The activation-pattern stability monitor (``monitor.py`` defines the similarity)."""

    every: int = Field(20, gt=0, description="optimizer steps between monitor points")
    threshold: float = Field(0.9, gt=0, le=1, description="pattern similarity at which the pattern counts as stable")
    patience: int = Field(2, gt=0, description="consecutive monitor points at or above threshold before switching")
    active_fraction: float | None = Field(0.1, gt=0, lt=1, description=(
        "a token's active neurons are its active_fraction largest |x1| (SiLU/GELU); null: x1 != 0 (ReLU family)"))
    split: str = Field("calibration", description="data split the probe batch is taken from")
    samples: int = Field(8, gt=0, description="probe sequences: the first rows of split")


class SSDParams(Params):
    monitor: StabilityMonitor = Field(default_factory=StabilityMonitor)
    min_dense: float = Field(0.1, ge=0, lt=1, description="fraction of the steps always trained densely first")
    max_dense: float | None = Field(0.5, gt=0, lt=1, description=(
        "switch at the first monitor point after this fraction of the steps even if the pattern is not stable "
        "(recorded as forced); null: only when stable"))
    final_dense: float = Field(0.1, ge=0, lt=1, description="fraction of the steps trained densely at the end")
    clustering: Literal["param_cluster", "coactivation"] = Field(
        "param_cluster", description="the moeify method that builds the experts at the switch")
    experts: CoactivationParams = Field(
        default_factory=lambda: CoactivationParams(expert_fraction=0.5),
        description="that moeify method's params: expert_size, router, selection (top_k / expert_fraction / tau)...")
    refit_every: int = Field(0, ge=0, description=(
        "during the sparse phase, refit the routers to the current weights every N steps (0: never)"))
    refit_routers: bool = Field(True, description="refit the routers to the final weights after training")
    final_routing: Literal["dense", "moe"] = Field(
        "dense", description="routing the model is left in: dense, or moe (the experts' selection)")
    train: TrainConfig

    @model_validator(mode="after")
    def _phases(self):
        if self.max_dense is not None and self.max_dense < self.min_dense:
            raise ValueError(f"max_dense ({self.max_dense}) is below min_dense ({self.min_dense})")
        if self.min_dense + self.final_dense >= 1:
            raise ValueError("min_dense + final_dense leave no steps for sparse training")
        if self.clustering == "param_cluster" and self.experts.active_fraction is not None:
            raise ValueError("experts.active_fraction applies to clustering: coactivation only")
        return self

    def rule(self) -> SwitchRule:
        m = self.monitor
        return SwitchRule.from_fractions(self.train.steps, threshold=m.threshold, patience=m.patience,
                                         min_dense=self.min_dense, max_dense=self.max_dense,
                                         final_dense=self.final_dense)


def _shape(block) -> FFNShape:
    return FFNShape(block.d_model, block.d_ff, 3 if block.gate is not None else 2)


def neuron_dim(role: str, param_name: str, conv1d: bool) -> int | None:
    """The dimension of a projection's parameter that indexes FFN neurons (``None``: no such dimension).

    Neurons are the rows of W_gate/W_up and the columns of W_down (``[out, in]``);
    Conv1D stores weights ``[in, out]``; the down projection's bias is per output.
    """
    if param_name == "bias":
        return None if role == "down" else 0
    dim = 1 if role == "down" else 0
    return 1 - dim if conv1d else dim


def _neuron_tensors(module: RoutedFFN, optimizer: torch.optim.Optimizer | None, *, weights: bool = True):
    """``(tensor, neuron_dim)`` for each neuron-indexed parameter of a routed FFN (unless ``weights`` is
    false) and its optimizer state (Adam's moments)."""
    for role in ("gate", "up", "down"):
        part = module.part(role)
        if part is None:
            continue
        for pname, p in part.named_parameters(recurse=False):
            dim = neuron_dim(role, pname, is_conv1d(part))
            if dim is None:
                continue
            if weights:
                yield p.data, dim
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    yield v, dim


class SSDCallback(TrainCallback):
    """Monitor, switch and account FLOPs inside the shared loop (see the module docs)."""

    shardable = False  # the switch swaps FFNs for routed ones and moves Adam's moments with their neurons

    def __init__(self, ctx, params: SSDParams):
        self.ctx, self.params = ctx, params
        self.moeify = MOEIFY[params.clustering]()
        self.rule = params.rule()
        self.switch_step: int | None = None
        self.reason: str | None = None
        self.curve: list[list[float]] = []  # [step, pattern similarity]
        self.previous: list[torch.Tensor] | None = None
        self.blocks: dict[str, dict] = {}  # routed FFN configs once switched
        self.switch_metrics: dict[str, float] = {}
        self.perms: dict[str, list[int]] = {}  # the neuron order moeify gave each block, reported as perm.<block>
        self.flops = {"train": 0.0, "dense": 0.0, "overhead": 0.0}
        blocks = find_ffn_blocks(ctx.model)
        self.names = [b.name for b in blocks]
        self.shapes = [_shape(b) for b in blocks]
        cfg = params.train
        seq_len = ctx.split(cfg.split).input_ids.shape[1]
        self.tokens = cfg.batch_size * cfg.grad_accum * seq_len  # per process and step
        self.probe = ctx.split(params.monitor.split).input_ids[:params.monitor.samples]
        self.routed: dict[int, RoutedFFN] = {}
        self.phase = "dense"
        self.optimizer = None
        self._handles: list = []
        self._saved: list = []
        self._reset_counts()

    # -- state through checkpoints -----------------------------------------------------

    def state_dict(self) -> dict:
        return {"switch_step": self.switch_step, "reason": self.reason, "curve": self.curve,
                "previous": pack_pattern(self.previous) if self.previous is not None else None,
                "blocks": self.blocks, "switch_metrics": self.switch_metrics, "flops": self.flops,
                "perms": self.perms}

    def load_state_dict(self, state: dict) -> None:
        self.switch_step, self.reason = state["switch_step"], state["reason"]
        self.curve = [list(c) for c in state["curve"]]
        self.previous = unpack_pattern(state["previous"]) if state["previous"] is not None else None
        self.switch_metrics, self.flops = dict(state["switch_metrics"]), dict(state["flops"])
        self.blocks = dict(state["blocks"])
        self.perms = dict(state.get("perms", {}))
        if self.blocks and not any(isinstance(b.module, RoutedFFN) for b in find_ffn_blocks(self.ctx.model)):
            # Called before the checkpoint's weights load: give them the routed structure they were saved from.
            self.moeify.rebuild(self.ctx, self.params.experts, StageResult(info={"blocks": self.blocks}))

    # -- loop hooks --------------------------------------------------------------------

    def start(self, loop) -> None:
        self.loop, self.optimizer = loop, loop.optimizer
        if self.optimizer is not None:
            self._handles += [self.optimizer.register_step_pre_hook(self._hold_idle_experts),
                              self.optimizer.register_step_post_hook(self._restore_idle_experts)]
        if self.blocks:
            self._attach()
        if self.switch_step is None and self.previous is None:
            self.previous = self._probe()  # the first monitor point has nothing to compare with

    def before_step(self, step: int) -> None:
        phase = phase_at(step, self.switch_step, self.rule.final_start)
        if phase == "final_dense" and self.phase == "sparse":
            self.ctx.info(f"step {step}: routed FFNs run densely again for the last {self.loop.cfg.steps - step} steps")
            self.ctx.log({"ssd_switch": _PHASE_CODE[phase]}, step=step)
        self.phase = phase
        e = self.params.experts
        for m in self.routed.values():
            if phase == "sparse":
                m.set_routing(e.routing(), top_k=e.k_for(m.num_experts), tau=e.tau)
                m.path = "gather"  # only the selected experts are computed (and receive gradients)
            else:
                m.set_routing("dense")
        self._reset_counts()

    def after_step(self, step: int) -> dict[str, float]:
        t = step + 1
        dense = dense_training_flops(self.shapes, self.tokens)
        spent, computed = 0.0, 0.0
        for i, shape in enumerate(self.shapes):
            m = self.routed.get(i)
            if self.phase == "sparse" and m is not None:
                spent += ffn_training_flops(shape, self.neuron_tokens[i], self.routed_tokens[i],
                                            m.router_flops_per_token())
                computed += self.neuron_tokens[i]
            else:
                spent += ffn_training_flops(shape, shape.d_ff * self.tokens)
                computed += shape.d_ff * self.tokens
        self.flops["train"] += spent
        self.flops["dense"] += dense
        out = {"ffn_sparsity": 1.0 - computed / (self.tokens * sum(s.d_ff for s in self.shapes)),
               "ffn_flops_ratio": self.flops["train"] / self.flops["dense"]}
        if self.switch_step is None and t % self.params.monitor.every == 0 and t < self.loop.cfg.steps:
            self._monitor(t)
        every = self.params.refit_every
        if self.phase == "sparse" and every and (t - self.switch_step) % every == 0 and t < self.rule.final_start:
            # the weights moved since the routers were fitted: fit them again, MoEfication's way
            self.ctx.log(refit_routers(self.ctx, list(self.routed.values()), self.params), step=t)
            self.flops["overhead"] += self._fit_overhead()
        return out

    def stop(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self.routed.values():
            for p in m.router.parameters():
                p.requires_grad_(True)

    # -- monitor and switch ------------------------------------------------------------

    def _probe(self) -> list[torch.Tensor]:
        """The probe batch's activation pattern, one boolean ``[tokens, d_ff]`` per FFN layer."""
        blocks = find_ffn_blocks(self.ctx.model)
        index = {id(b): i for i, b in enumerate(blocks)}
        pattern: list[torch.Tensor | None] = [None] * len(blocks)
        frac = self.params.monitor.active_fraction

        def record(block, x1):
            pattern[index[id(block)]] = active_neurons(x1, frac).cpu()

        model = self.ctx.model
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), capture_intermediates(blocks, record):
                model(input_ids=self.probe.to(self.ctx.device), use_cache=False)
        finally:
            model.train(was)
        self.flops["overhead"] += sum(ffn_forward_flops(s, s.d_ff * self.probe.numel()) for s in self.shapes)
        return pattern

    def _monitor(self, t: int) -> None:
        current = self._probe()
        sim = pattern_similarity(self.previous, current)
        self.previous = current
        self.curve.append([t, sim])
        self.ctx.log({"pattern_similarity": sim}, step=t)
        reason = switch_reason(t, [c[1] for c in self.curve], self.rule)
        if reason is not None:
            self._switch(t, reason, sim)

    def _switch(self, t: int, reason: str, sim: float) -> None:
        ctx, e = self.ctx, self.params.experts
        ctx.info(f"step {t}: activation pattern {'stable' if reason == 'stable' else 'not stable (forced)'} "
                 f"(similarity {sim:.3f}); MoE-ifying every FFN and training sparsely")
        result = self.moeify.apply(ctx, e)
        perms = {k[len("perm."):]: v for k, v in result.state.items() if k.startswith("perm.")}
        self.perms = {name: perm.tolist() for name, perm in perms.items()}
        by_name = {b.name: b for b in find_ffn_blocks(ctx.model)}
        if self.optimizer is not None:  # Adam's moments follow their neurons (moeify permuted the weights)
            with torch.no_grad():
                for name, perm in perms.items():
                    for tensor, dim in _neuron_tensors(by_name[name].module, self.optimizer, weights=False):
                        tensor.copy_(tensor.index_select(dim, perm.to(tensor.device)))
        self.blocks = result.info["blocks"]
        self.switch_metrics = {f"switch_{k}": v for k, v in result.metrics.items() if k.startswith("calibration_")}
        self.switch_step, self.reason, self.previous = t, reason, None
        self._attach()
        self.flops["overhead"] += self._fit_overhead()
        ctx.log({"ssd_switch": _PHASE_CODE["sparse"], **self.switch_metrics}, step=t)

    def _fit_overhead(self) -> float:
        """Estimated FFN FLOPs of a router fit: calibration forward(s) and router training (3x forward)."""
        e = self.params.experts
        tokens = self.ctx.split(e.split).input_ids.numel()
        passes = 2 if self.params.clustering == "coactivation" else 1
        total = passes * sum(ffn_forward_flops(s, s.d_ff * tokens) for s in self.shapes)
        for m in self.routed.values():
            total += 3.0 * e.fit.epochs * tokens * (1 - e.fit.holdout) * m.router.flops_per_token()
        return total

    def _attach(self) -> None:
        """Hook the routed FFNs: selections are counted, routers frozen."""
        self.routed = {i: b.module for i, b in enumerate(find_ffn_blocks(self.ctx.model))
                       if isinstance(b.module, RoutedFFN)}
        for i, m in self.routed.items():
            for p in m.router.parameters():
                p.requires_grad_(False)
            self._handles.append(m.register_selection_hook(
                lambda module, x, scores, selected, i=i: self._record(i, module, scores, selected)))
        self._reset_counts()

    # -- counting selections and holding idle experts --------------------------------------

    def _reset_counts(self) -> None:
        self.usage = {i: torch.zeros(m.num_experts, dtype=torch.bool) for i, m in self.routed.items()}
        self.neuron_tokens = [0.0] * len(self.shapes)
        self.routed_tokens = [0.0] * len(self.shapes)

    def _record(self, i: int, module: RoutedFFN, scores, selected) -> None:
        if not (torch.is_grad_enabled() and module.training):
            return  # probe, calibration and evaluation forwards are not training
        sel = selected.detach().reshape(-1, selected.shape[-1])
        self.usage[i] |= sel.any(dim=0).cpu()
        self.neuron_tokens[i] += float(sel.sum()) * module.expert_size
        if scores is not None:
            self.routed_tokens[i] += sel.shape[0]

    def _idle(self, i: int) -> torch.Tensor:
        used = self.usage[i]
        if dist.world_size() > 1:  # an expert any process used is updated by the averaged gradient
            import torch.distributed as tdist
            used = used.to(self.ctx.device, torch.int32)
            tdist.all_reduce(used, op=tdist.ReduceOp.MAX)
            used = used.bool().cpu()
        return ~used

    def _hold_idle_experts(self, optimizer, args, kwargs) -> None:
        self._saved = []
        if self.phase != "sparse":
            return
        for i, m in self.routed.items():
            idle = self._idle(i).nonzero().flatten()
            if idle.numel() == 0:
                continue
            idx = (idle[:, None] * m.expert_size + torch.arange(m.expert_size)).flatten()
            for tensor, dim in _neuron_tensors(m, optimizer):
                j = idx.to(tensor.device)
                self._saved.append((tensor, dim, j, tensor.index_select(dim, j).clone()))

    def _restore_idle_experts(self, optimizer, args, kwargs) -> None:
        with torch.no_grad():
            for tensor, dim, idx, value in self._saved:
                tensor.index_copy_(dim, idx, value)
        self._saved = []



_FLOPS, _STEPS = MetricInfo(higher_is_better=False, unit="FLOPs"), MetricInfo(unit="steps")
# What SSD reports besides the final losses (final_metrics); FLOPs of FFNs, summed over processes.
SSD_METRICS: dict[str, MetricInfo] = {
    "ffn_train_flops": _FLOPS, "ffn_overhead_flops": _FLOPS,  # spent training; monitor, switch and refits
    "ffn_train_flops_dense": MetricInfo(unit="FLOPs"),  # the same steps trained dense: the reference
    "ffn_train_flops_saved": MetricInfo(higher_is_better=True, fraction=True),
    "ffn_train_flops_saved_with_overhead": MetricInfo(higher_is_better=True, fraction=True),
    "monitor_points": MetricInfo(unit="points"),
    "switched_when_stable": MetricInfo(),  # 1 when the pattern was stable, 0 when max_dense forced the switch
    "last_pattern_similarity": MetricInfo(fraction=True),
    "switch_to_sparse_step": _STEPS, "switch_to_dense_step": _STEPS, "sparse_steps": _STEPS,
    **{f"switch_calibration_{k}": v for k, v in ROUTER_FIT_METRICS.items()},  # the moeify fit at the switch
    **{f"refit_{k}": v for k, v in ROUTER_FIT_METRICS.items()},  # refit_routers
}


class SSD(Method):
    """SSD: dense training until the activation pattern is stable, sparse MoE training, dense again at the end.

    Pre-trains (or trains on) with the shared loop. The switch builds experts
    and routers with a ``moeify`` method (``clustering``, ``experts``); the
    final model runs dense or as an MoE (``final_routing``, or ``moeify/routing``).
    """

    kind = "train"
    name = "ssd"
    Params = SSDParams

    def apply(self, ctx, params: SSDParams) -> StageResult:
        cb = SSDCallback(ctx, params)
        metrics, declared = final_metrics(train(ctx, params.train, [cb]))
        modules = list(cb.routed.values())
        if modules and params.refit_routers:
            metrics.update(refit_routers(ctx, modules, params))
            cb.flops["overhead"] += cb._fit_overhead()
        e = params.experts
        for m in modules:
            if params.final_routing == "moe":
                m.set_routing(e.routing(), top_k=e.k_for(m.num_experts), tau=e.tau)
            else:
                m.set_routing("dense")
        metrics.update(self._summary(cb, params))
        info = {"blocks": {cb.names[i]: m.config() for i, m in cb.routed.items()},
                "switch_step": cb.switch_step, "switch_reason": cb.reason, "final_dense_start": cb.rule.final_start,
                "monitor_curve": cb.curve}
        # the neurons moved when the FFNs were split into experts: masks moved with them, and anyone
        # tracking individual weights across this stage needs the permutation (StageResult convention)
        state = {f"perm.{name}": torch.tensor(perm, dtype=torch.long) for name, perm in cb.perms.items()}
        return StageResult(metrics=metrics, state=state, info=info, metric_info={**SSD_METRICS, **declared})

    @staticmethod
    def _summary(cb: SSDCallback, params: SSDParams) -> dict[str, float]:
        world = dist.world_size()
        spent, dense, overhead = (cb.flops[k] * world for k in ("train", "dense", "overhead"))
        out = {"ffn_train_flops": spent, "ffn_train_flops_dense": dense, "ffn_overhead_flops": overhead,
               "ffn_train_flops_saved": 1.0 - spent / dense,
               "ffn_train_flops_saved_with_overhead": 1.0 - (spent + overhead) / dense,
               "monitor_points": float(len(cb.curve)), "switched_when_stable": float(cb.reason == "stable")}
        if cb.curve:
            out["last_pattern_similarity"] = cb.curve[-1][1]
        if cb.switch_step is not None:
            final_start = max(cb.rule.final_start, cb.switch_step)
            out.update(switch_to_sparse_step=float(cb.switch_step), switch_to_dense_step=float(final_start),
                       sparse_steps=float(final_start - cb.switch_step), **cb.switch_metrics)
        else:
            out["sparse_steps"] = 0.0
        return out

    def plain_form(self, params) -> str | None:
        return "experts and a router"

    def rebuild(self, ctx, params: SSDParams, result: StageResult) -> None:
        if result.info.get("blocks"):
            MOEIFY[params.clustering]().rebuild(ctx, params.experts, StageResult(info={"blocks": result.info["blocks"]}))


def refit_routers(ctx, modules: list[RoutedFFN], params: SSDParams) -> dict[str, float]:
    """Fit the routers again (warm start, MoEfication's fitting) on the calibration activations of the final weights.

    Activations are collected with every FFN dense, as when the experts were
    built; the best epoch by held-out router recall is kept, the starting
    router included, so a refit never lowers it.
    """
    e = params.experts
    for m in modules:
        m.set_routing("dense")
    data = collect_router_data(ctx, modules, e)
    recalls, sparsities = [], []
    with ctx.progress(f"refit {e.router} routers", total=len(modules)) as task:
        for i, (m, (x, mass)) in enumerate(zip(modules, data)):
            m.set_routing(e.routing(), top_k=e.k_for(m.num_experts), tau=e.tau)
            frozen = [p for p in m.router.parameters() if not p.requires_grad]  # frozen while SSD trains
            for p in frozen:
                p.requires_grad_(True)
            try:
                res = fit_router(m.router, x, mass, m.select, e.fit, init_fraction=e.init_fraction,
                                 seed=ctx.seed + i)
            finally:
                for p in frozen:
                    p.requires_grad_(False)
            if e.router == "lte" and e.tau == 0.5:
                sharpen_router(m.router, x.to(next(m.router.parameters()).device), e.init_margin)
            recalls.append(res["router_recall"])
            sparsities.append(res["expert_sparsity"])
            task.advance(1)
    return {"refit_router_recall": sum(recalls) / len(recalls),
            "refit_expert_sparsity": sum(sparsities) / len(sparsities)}
