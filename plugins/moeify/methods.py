"""``moeify`` stage methods: split dense FFNs into experts and fit a router to each (``docs/methods.md#moefication``).

- ``param_cluster``: MoEfication's parameter clustering, balanced k-means on
  the L2-normalised gate rows (gated FFN) or fc1 rows (plain FFN).
- ``coactivation``: MoEfication's co-activation split, a balanced partition
  of the graph whose edge weights count the calibration tokens on which two
  neurons are active together.

Both then wrap each FFN in a ``RoutedFFN`` (neurons permuted so experts are
contiguous; the un-routed module equals the dense FFN) and fit its router on
the FFN inputs of the calibration split:

- ``mlp`` (MoEfication): the target of expert e for token t is its activation
  mass ``sum_{j in e} |x1_tj|`` divided by the batch maximum, the loss
  BCE-with-logits, Adam; the first layer starts at the cluster centres (mean
  normalised gate/fc1 rows), the second at the identity. Selection: ``top_k``
  (or ``expert_fraction`` of the experts) or ``threshold`` on the sigmoid.
- ``lte``: one sigmoid linear layer per FFN, selection ``G(x)_e > tau``. It is
  trained by ``regularize/lte``; here it starts fitted (BCE) to select the
  ``init_fraction`` of experts with the largest activation mass, so LTE's
  stage 1 starts from a router that already ranks experts sensibly, then
  rescaled so its median |logit| is ``init_margin`` (scores start away from
  tau = 0.5 without changing which experts pass it, so the separability loss
  does not dominate the first steps).

The best epoch of each router, by router recall on the held-out tail of the
calibration tokens, is kept; ``router_recall`` and ``expert_sparsity`` on those
tokens are stage metrics.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from sparsify_core import Method, MetricInfo, Params, StageResult
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import FFNBlock, capture_intermediates, find_ffn_blocks, input_threshold, is_conv1d
from sparsify_core.method import LayerIndices

from .clustering import balanced_partition, cluster_rows
from .modules import ROUTERS, RoutedFFN, Router


class RouterFit(Params):
    """How routers are fitted on calibration activations."""

    epochs: int = Field(30, gt=0, description="passes over the calibration tokens (MoEfication: 30)")
    lr: float = Field(0.01, gt=0, description="Adam learning rate (MoEfication: 0.01)")
    batch_size: int = Field(512, gt=0, description="tokens per router step")
    holdout: float = Field(0.1, gt=0, lt=1, description="tail fraction of tokens held out to pick the best epoch")


class MoEifyParams(Params):
    expert_size: int = Field(32, gt=0, description="neurons per expert")
    router: Literal["mlp", "lte"] = Field("mlp", description="mlp (MoEfication) or lte (sigmoid linear, threshold)")
    selection: Literal["top_k", "threshold"] | None = Field(
        None, description="top_k or threshold; default: top_k for mlp, threshold for lte")
    top_k: int | None = Field(None, gt=0, description="experts per token (selection top_k)")
    expert_fraction: float | None = Field(None, gt=0, le=1, description=(
        "fraction of each FFN's experts per token (selection top_k), instead of top_k"))
    tau: float = Field(0.5, gt=0, lt=1, description="score threshold (selection threshold)")
    init_fraction: float = Field(0.5, gt=0, lt=1, description=(
        "lte: the router starts fitted to select this fraction of experts (largest activation mass)"))
    init_margin: float = Field(3.0, gt=0, description=(
        "lte: the fitted router is rescaled so the median |logit| on held-out tokens is this: scores start away "
        "from tau (the selection is unchanged), so LTE's separability loss starts small"))
    fit: RouterFit = Field(default_factory=RouterFit)
    split: str = Field("calibration", description="data split the routers (and co-activations) are measured on")
    batch_size: int = Field(8, gt=0, description="sequences per calibration forward")
    layers: LayerIndices = Field(None, description="FFN layer indices (0-based) to convert; default: all")
    kmeans_iters: int = Field(30, gt=0, description="balanced k-means iterations")

    @model_validator(mode="after")
    def _selection(self):
        selection = self.selection or ("top_k" if self.router == "mlp" else "threshold")
        if self.router == "lte" and selection != "threshold":
            raise ValueError("the lte router selects by threshold (tau), not top_k")
        if selection == "top_k" and (self.top_k is None) == (self.expert_fraction is None):
            raise ValueError("selection top_k needs exactly one of top_k and expert_fraction")
        if selection == "threshold" and (self.top_k is not None or self.expert_fraction is not None):
            raise ValueError("top_k and expert_fraction apply to selection top_k only")
        return self

    def routing(self) -> str:
        return self.selection or ("top_k" if self.router == "mlp" else "threshold")

    def k_for(self, num_experts: int) -> int | None:
        """Experts per token for ``top_k`` selection in an FFN of ``num_experts`` experts."""
        if self.routing() != "top_k":
            return None
        k = self.top_k if self.top_k is not None else max(1, round(self.expert_fraction * num_experts))
        if k > num_experts:
            raise SparsifyError(f"top_k {k} exceeds the {num_experts} experts of an FFN")
        return k


class CoactivationParams(MoEifyParams):
    active_fraction: float | None = Field(None, gt=0, lt=1, description=(
        "count a neuron as active on a token when it is among the token's active_fraction largest |x1|; "
        "default: when x1 != 0 (ReLU-family activations)"))


# -- calibration ------------------------------------------------------------------------


def _calibration_forward(ctx, params) -> None:
    model = ctx.model
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in ctx.split(params.split).batches(params.batch_size):
                model(input_ids=batch.to(ctx.device), use_cache=False) if ctx.task == "causal_lm" \
                    else model(input_ids=batch.to(ctx.device))
    finally:
        model.train(was)


def coactivation_counts(ctx, blocks: list[FFNBlock], params: CoactivationParams) -> list[torch.Tensor]:
    """Per block, ``[d_ff, d_ff]`` counts of calibration tokens on which both neurons are active."""
    counts = [torch.zeros(b.d_ff, b.d_ff, dtype=torch.float64) for b in blocks]
    density = [0.0 for _ in blocks]
    index = {id(b): i for i, b in enumerate(blocks)}

    def record(block, x1):
        a = x1.detach().reshape(-1, x1.shape[-1]).float()
        if params.active_fraction is None:
            active = (a != 0).float()
        else:
            k = max(1, round(params.active_fraction * a.shape[-1]))
            top = a.abs().topk(k, dim=-1).indices
            active = torch.zeros_like(a).scatter_(-1, top, 1.0)
        i = index[id(block)]
        counts[i] += (active.t() @ active).double().cpu()
        density[i] = max(density[i], float(active.mean()))

    with capture_intermediates(blocks, record):
        _calibration_forward(ctx, params)
    if params.active_fraction is None and max(density) > 0.9:
        raise SparsifyError("coactivation: the FFN activations have almost no exact zeros (non-ReLU activation); "
                            "set active_fraction (e.g. 0.1) to count a token's largest activations as active")
    return counts


def collect_router_data(ctx, modules: list[RoutedFFN], params) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per routed FFN, its calibration inputs ``[T, d]`` and expert activation masses ``[T, E]`` (float32, CPU)."""
    data: list[tuple[list, list]] = [([], []) for _ in modules]
    handles = []
    for i, m in enumerate(modules):
        def hook(module, args, i=i):
            x = args[0].detach()
            mass = module.expert_intermediate(x).abs().float()
            mass = mass.reshape(-1, module.num_experts, module.expert_size).sum(-1)
            data[i][0].append(x.reshape(-1, x.shape[-1]).float().cpu())
            data[i][1].append(mass.cpu())
        handles.append(m.register_forward_pre_hook(hook))
    try:
        _calibration_forward(ctx, params)
    finally:
        for h in handles:
            h.remove()
    return [(torch.cat(xs), torch.cat(ms)) for xs, ms in data]


# -- router fitting (pure given the data) ----------------------------------------------------


def router_targets(mass: torch.Tensor, kind: str, init_fraction: float = 0.5) -> torch.Tensor:
    """BCE targets: ``mlp``, mass over the batch maximum (MoEfication); ``lte``, 1 for each token's top experts."""
    if kind == "mlp":
        return mass / mass.max().clamp_min(1e-12)
    k = max(1, round(init_fraction * mass.shape[-1]))
    top = mass.topk(k, dim=-1).indices
    return torch.zeros_like(mass).scatter_(-1, top, 1.0)


def router_recall(mass: torch.Tensor, selected: torch.Tensor) -> float:
    """Mean over tokens of the fraction of activation mass in the selected experts."""
    total = mass.sum(-1)
    keep = total > 0
    covered = (mass * selected.to(mass.dtype)).sum(-1)
    return float((covered[keep] / total[keep]).mean()) if bool(keep.any()) else 1.0


def sharpen_router(router: Router, x: torch.Tensor, margin: float) -> float:
    """Scale an ``lte`` router's weights so the median ``|logit|`` over ``x`` is ``margin``; returns the factor.

    ``sigmoid(c * z) > 1/2`` iff ``z > 0``: the threshold-0.5 selection is unchanged.
    """
    with torch.no_grad():
        median = float(router.logits(x.to(router.proj.weight.dtype)).abs().median())
        factor = margin / median if median > 0 else 1.0
        router.proj.weight.mul_(factor)
    return factor


# What fit_router's numbers are (means over blocks, reported with a prefix: calibration_, refit_...).
ROUTER_FIT_METRICS = {
    "router_recall": MetricInfo(higher_is_better=True, fraction=True),
    "expert_sparsity": MetricInfo(fraction=True),  # set by the routing (k, tau) more than by the fit: no direction
}


def fit_router(router: Router, x: torch.Tensor, mass: torch.Tensor, select, fit: RouterFit, *,
               init_fraction: float = 0.5, seed: int = 0) -> dict[str, float]:
    """Fit ``router`` (BCE-with-logits, Adam) on inputs ``x`` and expert masses ``mass``.

    ``select(scores) -> bool`` is the selection rule used at inference; the
    epoch with the best held-out router recall is kept. Returns that recall
    and the held-out fraction of experts not selected.
    """
    n = x.shape[0]
    n_hold = max(1, int(n * fit.holdout)) if n > 1 else 0
    x_tr, m_tr, x_ho, m_ho = x[:n - n_hold], mass[:n - n_hold], x[n - n_hold:], mass[n - n_hold:]
    dev, dt = next(router.parameters()).device, next(router.parameters()).dtype
    router.float().cpu()
    opt = torch.optim.Adam(router.parameters(), lr=fit.lr)
    gen = torch.Generator().manual_seed(seed)

    def evaluate():
        with torch.no_grad():
            sel = select(router(x_ho))
        return router_recall(m_ho, sel), 1.0 - float(sel.float().mean())

    best = [*evaluate(), {k: v.clone() for k, v in router.state_dict().items()}]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only wait on each other
    try:
        _fit_epochs(router, opt, gen, x_tr, m_tr, fit, init_fraction, evaluate, best)
    finally:
        torch.set_num_threads(threads)
    router.load_state_dict(best[2])
    router.to(dev, dt)
    return {"router_recall": best[0], "expert_sparsity": best[1]}


def _fit_epochs(router, opt, gen, x_tr, m_tr, fit, init_fraction, evaluate, best: list) -> None:
    with torch.enable_grad():
        for _ in range(fit.epochs):
            order = torch.randperm(x_tr.shape[0], generator=gen)
            for s in range(0, x_tr.shape[0], fit.batch_size):
                idx = order[s:s + fit.batch_size]
                target = router_targets(m_tr[idx], router.kind, init_fraction)
                loss = F.binary_cross_entropy_with_logits(router.logits(x_tr[idx]), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
            recall, sparsity = evaluate()
            if recall > best[0]:
                best[:] = [recall, sparsity, {k: v.clone() for k, v in router.state_dict().items()}]


# -- methods ------------------------------------------------------------------------------


def _blocks(model, params) -> list[FFNBlock]:
    blocks = find_ffn_blocks(model)
    wanted = sorted(set(params.layers)) if params.layers is not None else list(range(len(blocks)))
    bad = [i for i in wanted if i >= len(blocks)]
    if bad:
        raise SparsifyError(f"layers {bad} out of range: the model has {len(blocks)} FFN layers")
    chosen = [blocks[i] for i in wanted]
    routed = [b.name for b in chosen if isinstance(b.module, RoutedFFN)]
    if routed:
        raise SparsifyError(f"FFN blocks already split into experts: {', '.join(routed)}")
    # TEAL: a projection that thresholds its own input; the expert gather and kernels read the weights alone
    cut = [b.name for b in chosen if any(input_threshold(m) is not None for m in b.projections().values())]
    if cut:
        raise SparsifyError(f"{cut[0]}: its projections threshold their inputs (TEAL), which the expert "
                            "kernels would skip; moeify and teal do not combine")
    return chosen


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _permute_masks(ctx, block: FFNBlock, perm: torch.Tensor) -> None:
    for role, path in block.module_names.items():
        keep = ctx.masks.get(f"{path}.weight")
        if keep is None:
            continue
        conv = is_conv1d(block.projections()[role])  # Conv1D masks are stored [in, out]
        k = keep.t() if conv else keep
        k = k[:, perm.to(k.device)] if role == "down" else k[perm.to(k.device)]
        # replace, not set: the permuted mask moves with its weights (intersecting it with the old
        # order would prune kept weights and leave pruned ones unmasked)
        ctx.masks.replace(f"{path}.weight", (k.t() if conv else k).contiguous())


class _MoEify(Method):
    """Base of the ``moeify`` methods: labels from a subclass, then wrap, fit routers, set the routing."""

    kind = "moeify"

    @abstractmethod
    def labels(self, ctx, blocks: list[FFNBlock], params) -> list[torch.Tensor]:
        """Per block, each FFN neuron's expert (``[d_ff]`` ints, ``params.expert_size`` neurons an expert)."""

    def _init_router(self, block: FFNBlock, labels: torch.Tensor, params, seed: int) -> Router:
        E = block.d_ff // params.expert_size
        torch.manual_seed(seed)
        router = ROUTERS[params.router](block.d_model, E)
        if params.router == "mlp":  # MoEfication: cluster centres, then the identity
            w_in = block.weight("gate" if block.gate is not None else "up").detach().float().cpu()
            rows = F.normalize(w_in, dim=1)
            centres = torch.zeros(E, rows.shape[1]).index_add_(0, labels, rows) / params.expert_size
            with torch.no_grad():
                router.fc1.weight.copy_(centres)
                router.fc2.weight.copy_(torch.eye(E))
        return router

    def apply(self, ctx, params) -> StageResult:
        blocks = _blocks(ctx.model, params)
        for b in blocks:
            if b.d_ff % params.expert_size:
                raise SparsifyError(f"{b.name}: d_ff {b.d_ff} is not a multiple of expert_size {params.expert_size}")
        labels = self.labels(ctx, blocks, params)
        modules, state = [], {}
        with ctx.progress("build experts", total=len(blocks)) as task:
            for b, lab in zip(blocks, labels):
                router = self._init_router(b, lab, params, ctx.seed + b.index)
                perm = torch.argsort(lab, stable=True)
                module = RoutedFFN.from_block(b, lab, router, params.expert_size)
                _permute_masks(ctx, b, perm)
                _set_module(ctx.model, b.name, module)
                modules.append(module)
                state[f"perm.{b.name}"] = perm
                task.advance(1)
        data = collect_router_data(ctx, modules, params)
        metrics: dict[str, float] = {}
        recalls, sparsities = [], []
        with ctx.progress(f"fit {params.router} routers", total=len(modules)) as task:
            for b, m, (x, mass) in zip(blocks, modules, data):
                m.set_routing(params.routing(), top_k=params.k_for(m.num_experts), tau=params.tau)
                res = fit_router(m.router, x, mass, m.select, params.fit, init_fraction=params.init_fraction,
                                 seed=ctx.seed + b.index)
                if params.router == "lte" and params.tau == 0.5:
                    sharpen_router(m.router, x.to(next(m.router.parameters()).device), params.init_margin)
                recalls.append(res["router_recall"])
                sparsities.append(res["expert_sparsity"])
                task.advance(1)
        metrics.update(blocks_converted=float(len(modules)), experts_per_ffn=float(modules[0].num_experts),
                       calibration_router_recall=sum(recalls) / len(recalls),
                       calibration_expert_sparsity=sum(sparsities) / len(sparsities))
        ctx.info(f"{len(modules)} FFNs -> {modules[0].num_experts} experts of {params.expert_size}; "
                 f"held-out router recall {metrics['calibration_router_recall']:.3f} at expert sparsity "
                 f"{metrics['calibration_expert_sparsity']:.3f}")
        info = {"blocks": {b.name: m.config() for b, m in zip(blocks, modules)}}
        declared = {"blocks_converted": MetricInfo(unit="blocks"), "experts_per_ffn": MetricInfo(unit="experts"),
                    **{f"calibration_{k}": v for k, v in ROUTER_FIT_METRICS.items()}}
        return StageResult(metrics=metrics, state=state, info=info, metric_info=declared)

    def plain_form(self, params) -> str | None:
        return "experts and a router"

    def rebuild(self, ctx, params, result) -> None:
        by_name = {b.name: b for b in find_ffn_blocks(ctx.model)}
        for name, config in result.info["blocks"].items():
            if name not in by_name:
                raise SparsifyError(f"moeify rebuild: no FFN block {name} in the freshly loaded model")
            module = RoutedFFN.from_config(by_name[name], config)
            p = next(by_name[name].module.parameters())
            _set_module(ctx.model, name, module.to(p.device, p.dtype))


class ParamCluster(_MoEify):
    """MoEfication parameter clustering: balanced k-means on L2-normalised gate (or fc1) rows, then a router.

    Experts of ``expert_size`` neurons (32 by default), deterministic with the
    recipe's seed; routers ``mlp`` (MoEfication, top-k or threshold) or ``lte``.
    """

    name = "param_cluster"
    Params = MoEifyParams

    def labels(self, ctx, blocks, params):
        out = []
        with ctx.progress("balanced k-means", total=len(blocks)) as task:
            for b in blocks:
                w = b.weight("gate" if b.gate is not None else "up")
                out.append(cluster_rows(w.float().cpu(), params.expert_size, iters=params.kmeans_iters,
                                        seed=ctx.seed + b.index))
                task.advance(1)
        return out


class Coactivation(_MoEify):
    """MoEfication co-activation split: balanced partition of the neuron co-activation graph, then a router.

    Edge ``(i, j)`` weighs the calibration tokens on which neurons i and j are
    both active; parts of ``expert_size`` maximise the weight inside experts.
    """

    name = "coactivation"
    Params = CoactivationParams

    def labels(self, ctx, blocks, params):
        counts = coactivation_counts(ctx, blocks, params)
        out = []
        with ctx.progress("partition co-activation graphs", total=len(blocks)) as task:
            for b, a in zip(blocks, counts):
                out.append(balanced_partition(a, b.d_ff // params.expert_size, seed=ctx.seed + b.index))
                task.advance(1)
        return out


__all__ = ["Coactivation", "MoEifyParams", "ParamCluster", "RouterFit", "collect_router_data", "fit_router",
           "router_recall", "router_targets"]
