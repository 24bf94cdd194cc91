"""``moeify/reap``: one-shot pruning of whole experts of a mixture of experts (``docs/methods.md#reap``).

REAP (Lasby et al. 2025, "REAP the Experts: Why Pruning Prevails for One-Shot
MoE compression", arXiv 2510.13999; reference code CerebrasResearch/reap):
the saliency of expert ``j`` of a layer is the mean, over the calibration
tokens routed to ``j``, of ``g_j(x) * ||f_j(x)||_2``: the router's gate value
times the L2 norm of the expert's output. The experts with the lowest
saliency are removed, the same number in every layer. ``criterion:
frequency`` ranks by how often the router selects an expert instead (the
simple baseline REAP compares with).

Two kinds of mixture are pruned, physically:

- native MoE models of transformers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
  whose experts are packed 3-D parameters ``[E, ...]`` and whose router is a
  softmax over ``x W_r^T`` followed by top-k): the experts' slices and the
  router's rows go, and the config's expert count shrinks, so the saved model
  is a plain transformers folder. ``g_j`` is the weight the block gives
  ``j``'s output: its softmax probability, renormalised over the token's
  top-k where the model renormalises (Mixtral; Qwen/OLMoE with
  ``norm_topk_prob``), as the reference code does with
  ``renormalize_router_weights`` (the setting of its published checkpoints).
- FFNs split into experts by ``moeify`` (``RoutedFFN``: experts of neurons,
  LTE or MoEfication router, sparsify's output format): the experts' neurons
  (rows of W_gate/W_up, columns of W_down) and the router's output rows go.
  ``g_j`` is the router's score of ``j`` (its sigmoid), computed in every
  routing mode; the tokens routed to ``j`` are those the current routing
  selects (every token under ``dense``).

Removing an expert is exactly routing as if its router logit were ``-inf``:
the softmax over the others, their top-k and the combination are unchanged
(for a sigmoid router, a score of 0 is never selected), so the pruned model
computes what the unpruned one computes with those experts masked out. The
number of experts a token uses (``top_k``) must stay at most the number kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from sparsify_core import Method, MetricInfo, Params, StageResult
from sparsify_core.errors import ParamsError, SparsifyError
from sparsify_core.ffn import find_ffn_blocks, is_conv1d, weight_out_in

from .modules import LTERouter, MLPRouter, RoutedFFN

CRITERIA = ("reap", "frequency")

# -- saliency (pure) ----------------------------------------------------------------------------


def reap_saliency(gates: torch.Tensor, norms: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """REAP saliency of each expert: ``mean over routed tokens of gate * ||output||``, ``[E]`` (float64).

    Args:
        gates: ``[T, E]`` router gate values ``g_j(x)``.
        norms: ``[T, E]`` L2 norms of the experts' outputs ``||f_j(x)||_2`` (read where ``routed`` only).
        routed: ``[T, E]`` bool, the experts each token was routed to.
    An expert no token was routed to scores 0. (Lasby et al. 2025, eq. for ``S_j``.)
    """
    stats = ExpertStats(gates.shape[-1])
    stats.add(gates, norms, routed)
    return stats.scores("reap")


def selection_frequency(routed: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens routed to each expert, ``[E]`` (float64), from ``routed`` ``[T, E]`` bool."""
    stats = ExpertStats(routed.shape[-1])
    stats.add(torch.zeros(routed.shape), torch.zeros(routed.shape), routed)
    return stats.scores("frequency")


@dataclass
class ExpertStats:
    """Running sums of one layer's calibration statistics (batches add up to the whole split)."""

    num_experts: int
    tokens: int = 0
    routed: torch.Tensor = field(default=None)  # [E] tokens routed to each expert
    weighted_norm: torch.Tensor = field(default=None)  # [E] sum over routed tokens of g * ||f||

    def __post_init__(self):
        self.routed = torch.zeros(self.num_experts, dtype=torch.float64)
        self.weighted_norm = torch.zeros(self.num_experts, dtype=torch.float64)

    def add(self, gates: torch.Tensor, norms: torch.Tensor, routed: torch.Tensor) -> None:
        """Add a batch: ``gates``, ``norms`` ``[T, E]`` float, ``routed`` ``[T, E]`` bool."""
        r = routed.reshape(-1, self.num_experts).to(torch.float64).cpu()
        g = gates.reshape(-1, self.num_experts).to(torch.float64).cpu()
        n = norms.reshape(-1, self.num_experts).to(torch.float64).cpu()
        self.tokens += r.shape[0]
        self.routed += r.sum(0)
        self.weighted_norm += (torch.where(r > 0, g * n, 0.0)).sum(0)  # unrouted entries may be garbage

    def scores(self, criterion: str) -> torch.Tensor:
        """``reap``: mean weighted norm per routed token; ``frequency``: routed fraction of tokens. ``[E]``."""
        if criterion == "frequency":
            return self.routed / max(self.tokens, 1)
        if criterion == "reap":
            return torch.where(self.routed > 0, self.weighted_norm / self.routed.clamp_min(1), 0.0)
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")


def experts_to_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` highest-scoring experts; ties keep the lower index."""
    if not 1 <= keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()} experts")
    order = torch.sort(-scores.to(torch.float64), stable=True).indices
    return order[:keep].sort().values


# -- params -------------------------------------------------------------------------------------


class ReapParams(Params):
    criterion: Literal["reap", "frequency"] = Field(
        "reap", description="reap: router-weighted expert activation norm (REAP); frequency: how often selected")
    experts_keep: float | None = Field(None, gt=0, le=1, description=(
        "fraction of each layer's experts kept (rounded; e.g. 0.75 prunes a quarter)"))
    prune_experts: int | None = Field(None, ge=0, description="experts removed from each layer, instead of "
                                                               "experts_keep")
    split: str = Field("calibration", description="data split the saliencies are measured on")
    batch_size: int = Field(8, gt=0, description="sequences per calibration forward")

    @model_validator(mode="after")
    def _one_amount(self):
        if (self.experts_keep is None) == (self.prune_experts is None):
            raise ValueError("give exactly one of experts_keep (a fraction) and prune_experts (a count)")
        return self

    def kept(self, num_experts: int, top_k: int | None) -> int:
        """Experts kept of ``num_experts``; ``ParamsError`` when fewer than 1 or than ``top_k`` would remain."""
        if self.prune_experts is not None:
            keep, field_ = num_experts - self.prune_experts, "prune_experts"
        else:
            keep, field_ = round(self.experts_keep * num_experts), "experts_keep"
        need = max(1, top_k or 1)
        if keep < need:
            what = f"{top_k} experts per token (top-k)" if top_k and top_k > 1 else "at least one expert"
            raise ParamsError(f"leaves {keep} of {num_experts} experts, but the layer routes each token to {what}",
                              field=field_)
        return keep


# -- native MoE blocks (transformers) -----------------------------------------------------------

# Routers whose forward is softmax(x W^T) then top-k (optionally renormalised): removing an expert's row is
# exactly masking its logit to -inf. Others (biased scores, grouped top-k, sigmoid gates) are refused.
SOFTMAX_TOPK_ROUTERS = ("MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "OlmoeTopKRouter")
_CONFIG_COUNTS = ("num_local_experts", "num_experts")  # Mixtral; Qwen-MoE, OLMoE


@dataclass
class NativeMoE:
    """One transformers sparse-MoE block: ``module.gate`` (router ``weight [E, d]``) and ``module.experts``."""

    name: str
    module: nn.Module

    @property
    def router(self) -> nn.Module:
        return self.module.gate

    @property
    def experts(self) -> nn.Module:
        return self.module.experts

    @property
    def num_experts(self) -> int:
        return int(self.router.weight.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)


def native_moe_blocks(model: nn.Module) -> list[NativeMoE]:
    """The model's transformers sparse-MoE blocks, in order; ``SparsifyError`` for an MoE layout not supported.

    A block is a module with an ``experts`` child. Supported: a router (``gate``)
    of a class in ``SOFTMAX_TOPK_ROUTERS`` and experts stored as packed 3-D
    parameters whose first dimension is the expert (transformers >= 5).
    Experts in a ``ModuleList`` (older transformers) or other routers are refused.
    """
    blocks = []
    for name, m in model.named_modules():
        experts = getattr(m, "experts", None)
        if not isinstance(experts, nn.Module) or isinstance(m, RoutedFFN):
            continue
        router = getattr(m, "gate", None) or getattr(m, "router", None)
        rname = type(router).__name__
        if isinstance(experts, nn.ModuleList):
            raise SparsifyError(f"{name}: experts stored as a ModuleList (transformers < 5?); moeify/reap prunes "
                                "the packed experts of transformers >= 5 (Mixtral, Qwen2/3-MoE, OLMoE)")
        if rname not in SOFTMAX_TOPK_ROUTERS:
            raise SparsifyError(f"{name}: router {rname} is not a plain softmax top-k router; moeify/reap supports "
                                f"{', '.join(SOFTMAX_TOPK_ROUTERS)}")
        E = router.weight.shape[0]
        packed = list(experts.named_parameters(recurse=False))
        if not packed or any(p.dim() != 3 or p.shape[0] != E for _, p in packed):
            raise SparsifyError(f"{name}: {type(experts).__name__} does not store its {E} experts as packed "
                                "[experts, ...] parameters; moeify/reap cannot remove them")
        blocks.append(NativeMoE(name, m))
    return blocks


def _config_count_field(config, num_experts: int) -> str:
    for key in _CONFIG_COUNTS:
        if getattr(config, key, None) == num_experts:
            return key
    raise SparsifyError(f"{type(config).__name__} has no expert count ({' or '.join(_CONFIG_COUNTS)}) equal to "
                        f"{num_experts}")


def _keep_rows(module: nn.Module, keep: torch.Tensor, old: int) -> None:
    """Replace every direct parameter of ``module`` whose first dimension is ``old`` by its ``keep`` rows."""
    for pname, p in list(module.named_parameters(recurse=False)):
        if p.shape[0] == old:
            setattr(module, pname, nn.Parameter(p.detach()[keep.to(p.device)].clone(), requires_grad=p.requires_grad))
    if getattr(module, "num_experts", None) == old:
        module.num_experts = int(keep.numel())


def shrink_native(block: NativeMoE, keep: torch.Tensor) -> None:
    """Remove the experts of ``block`` not in ``keep`` (indices): their packed slices and router rows."""
    old = block.num_experts
    _keep_rows(block.experts, keep, old)
    _keep_rows(block.router, keep, old)


def set_expert_count(model: nn.Module, old: int, new: int) -> None:
    """Record ``new`` experts per layer in the model's config (and ``model.num_experts``, Mixtral's aux loss)."""
    setattr(model.config, _config_count_field(model.config, old), int(new))
    if getattr(model, "num_experts", None) == old:
        model.num_experts = int(new)


@torch.no_grad()
def _native_hook(block: NativeMoE, stats: ExpertStats, chunk: int = 4096):
    """Forward hook on the router: each token's top-k experts, the gate weights it applies, the output norms."""
    def hook(router, args, output):
        x = args[0].reshape(-1, args[0].shape[-1])
        weights, idx = output[1], output[2]  # [T, k] each: the router's own top-k rule
        E, k = stats.num_experts, idx.shape[-1]
        gates = torch.zeros(x.shape[0], E, device=x.device).scatter_(-1, idx, weights.float())
        routed = torch.zeros(x.shape[0], E, dtype=torch.bool, device=x.device).scatter_(-1, idx, True)
        norms = torch.zeros(x.shape[0], E, device=x.device)
        pairs_tok = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
        pairs_exp = idx.reshape(-1)
        for s in range(0, pairs_tok.numel(), chunk):  # one call per chunk: each row through its own expert
            t, e = pairs_tok[s:s + chunk], pairs_exp[s:s + chunk]
            out = block.experts(x[t], e[:, None], torch.ones(t.numel(), 1, dtype=x.dtype, device=x.device))
            norms[t, e] = out.float().norm(dim=-1)
        stats.add(gates, norms, routed)
    return hook


# -- FFNs split into experts by moeify ------------------------------------------------------------


@torch.no_grad()
def _routed_hook(stats: ExpertStats, chunk: int = 512):
    """Selection hook of a ``RoutedFFN``: router scores as gates, each expert's output norm, the selection."""
    def hook(module: RoutedFFN, x, scores, selected):
        x2 = x.reshape(-1, x.shape[-1])
        gates = module.router(x2) if scores is None else scores.reshape(-1, module.num_experts)
        w_down = weight_out_in(module.part("down")).reshape(-1, module.num_experts, module.expert_size)
        norms = []
        for s in range(0, x2.shape[0], chunk):
            h = module.expert_intermediate(x2[s:s + chunk]).reshape(-1, module.num_experts, module.expert_size)
            norms.append(torch.einsum("tes,des->ted", h, w_down.to(h.dtype)).float().norm(dim=-1))
        stats.add(gates.detach(), torch.cat(norms), selected.reshape(-1, module.num_experts))
    return hook


def _shrink_projection(module: nn.Module, neurons: torch.Tensor, role: str) -> None:
    """Keep ``neurons`` of a projection: rows (and bias) of gate/up, columns of down; Linear or Conv1D."""
    w = weight_out_in(module).detach()
    idx = neurons.to(w.device)
    new = w[:, idx] if role == "down" else w[idx]
    stored = new.t() if is_conv1d(module) else new  # Conv1D stores [in, out]
    module.weight = nn.Parameter(stored.contiguous().clone(), requires_grad=module.weight.requires_grad)
    b = getattr(module, "bias", None)
    if b is not None and role != "down":
        module.bias = nn.Parameter(b.detach()[idx].clone(), requires_grad=b.requires_grad)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = new.shape
    elif is_conv1d(module):
        module.nf = new.shape[0]


def _shrink_router(router, keep: torch.Tensor) -> None:
    """Drop the router's output rows of the removed experts (an MLP router keeps its hidden layer)."""
    if isinstance(router, LTERouter):
        layer = router.proj
    elif isinstance(router, MLPRouter):
        layer = router.fc2
    else:
        raise SparsifyError(f"moeify/reap cannot prune experts scored by a {type(router).__name__}")
    w = layer.weight.detach()
    layer.weight = nn.Parameter(w[keep.to(w.device)].clone(), requires_grad=layer.weight.requires_grad)
    layer.out_features = int(keep.numel())
    router.num_experts = int(keep.numel())


def kept_neurons(keep: torch.Tensor, expert_size: int) -> torch.Tensor:
    """The neuron indices of experts ``keep`` (contiguous experts of ``expert_size``), ``[len(keep) * size]``."""
    return (keep[:, None] * expert_size + torch.arange(expert_size)[None, :]).reshape(-1)


def shrink_routed(model: nn.Module, name: str, module: RoutedFFN, keep: torch.Tensor, masks=None) -> RoutedFFN:
    """Replace ``module`` (at ``name``) by a ``RoutedFFN`` of the ``keep`` experts only; its masks follow."""
    if module.routing == "top_k" and module.top_k > keep.numel():
        raise SparsifyError(f"{name}: keeps {keep.numel()} experts, but routes each token to top_k {module.top_k}")
    neurons = kept_neurons(keep.cpu(), module.expert_size)
    parts = {}
    for role in ("gate", "up", "down"):
        part = module.part(role)
        if part is None:
            continue
        if not (isinstance(part, nn.Linear) or is_conv1d(part)):
            raise SparsifyError(f"{name}: its {role} projection is a {type(part).__name__}; prune experts before "
                                "converting layouts")
        path = f"{name}.{module.names[role]}.weight"
        old_mask = masks.get(path) if masks is not None else None
        _shrink_projection(part, neurons, role)
        if old_mask is not None:  # the removed weights leave with their mask entries
            k = old_mask.t() if is_conv1d(part) else old_mask
            k = k[:, neurons] if role == "down" else k[neurons]
            masks.drop(path)
            masks.set(path, (k.t() if is_conv1d(part) else k).contiguous())
        parts[role] = part
    _shrink_router(module.router, keep)
    new = RoutedFFN(module.kind, parts, module.names, module.part("act"), module.router, module.expert_size,
                    module.routing, module.top_k, module.tau, module.dropout)
    new.path = module.path
    new.train(module.training)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return new


def _routed(model: nn.Module) -> list[tuple[str, RoutedFFN]]:
    try:
        return [(b.name, b.module) for b in find_ffn_blocks(model) if isinstance(b.module, RoutedFFN)]
    except SparsifyError:  # no FFN blocks of a known kind (a native MoE model)
        return []


# -- the method ------------------------------------------------------------------------------------

_NOT_MOE = ("moeify/reap prunes experts: it needs a native MoE model (Mixtral, Qwen2/3-MoE, OLMoE) or FFNs split "
            "into experts by a moeify stage before it")


class Reap(Method):
    """REAP expert pruning: remove each MoE layer's least salient experts (router-weighted output norm).

    Calibrates on ``split``, scores every expert (``criterion``), removes the
    lowest ``prune_experts`` (or keeps ``experts_keep`` of them) in every
    layer, physically. Native MoE outputs stay plain transformers folders.
    """

    kind = "moeify"
    name = "reap"
    Params = ReapParams

    def check(self, model, params: ReapParams) -> None:
        """On the skeleton: a native MoE whose layers keep at least ``top_k`` experts (else a one-line error)."""
        blocks = native_moe_blocks(model)
        if not blocks:
            raise SparsifyError(f"{_NOT_MOE}; {type(model).__name__} has neither")
        for b in blocks:
            params.kept(b.num_experts, b.top_k)

    def apply(self, ctx, params: ReapParams) -> StageResult:
        native = native_moe_blocks(ctx.model)
        routed = [] if native else _routed(ctx.model)
        if not native and not routed:
            raise SparsifyError(f"{_NOT_MOE}; {type(ctx.model).__name__} has neither")
        layers = [(b.name, b.num_experts, b.top_k) for b in native] or \
                 [(n, m.num_experts, m.top_k if m.routing == "top_k" else None) for n, m in routed]
        keeps = {name: params.kept(E, k) for name, E, k in layers}  # refused before calibrating
        stats = {name: ExpertStats(E) for name, E, _ in layers}
        handles = [b.router.register_forward_hook(_native_hook(b, stats[b.name])) for b in native]
        handles += [m.register_selection_hook(_routed_hook(stats[n])) for n, m in routed]
        try:
            _calibrate(ctx, params)
        finally:
            for h in handles:
                h.remove()
        state, blocks_info, dropped = {}, {}, []
        for name, E, _ in layers:
            keep = experts_to_keep(stats[name].scores(params.criterion), keeps[name])
            state[f"experts.{name}"] = keep
            blocks_info[name] = {"experts_before": E, "experts_after": int(keep.numel())}
            dropped.append(E - keep.numel())
        if native:
            _config_count_field(ctx.model.config, native[0].num_experts)  # refused before anything changes
            for b in native:
                shrink_native(b, state[f"experts.{b.name}"])
            set_expert_count(ctx.model, layers[0][1], layers[0][1] - dropped[0])
        for name, m in routed:
            new = shrink_routed(ctx.model, name, m, state[f"experts.{name}"], ctx.masks)
            state[f"perm.{name}"] = kept_neurons(state[f"experts.{name}"], new.expert_size)
            blocks_info[name].update(kind="routed", expert_size=new.expert_size)
        for name in blocks_info:
            blocks_info[name].setdefault("kind", "native")
        before = sum(E for _, E, _ in layers)
        metrics = {"experts_pruned": float(sum(dropped)), "experts_pruned_fraction": sum(dropped) / before,
                   "experts_per_layer": float(layers[0][1] - dropped[0])}
        ctx.info(f"{len(layers)} MoE layers: {before} -> {before - sum(dropped)} experts ({params.criterion})")
        declared = {"experts_pruned": MetricInfo(unit="experts"),
                    "experts_pruned_fraction": MetricInfo(fraction=True),
                    "experts_per_layer": MetricInfo(unit="experts")}
        return StageResult(metrics=metrics, state=state, info={"blocks": blocks_info}, metric_info=declared)

    def rebuild(self, ctx, params: ReapParams, result: StageResult) -> None:
        """Remove the same experts from a model as loaded before this stage (values come with the weights).

        A native MoE block that already has the kept count (an output's config
        records it) is left as it is.
        """
        native = {b.name: b for b in native_moe_blocks(ctx.model)}
        routed = dict(_routed(ctx.model))
        counts = None
        for name, info in result.info.get("blocks", {}).items():
            keep = result.state[f"experts.{name}"]
            if name in native:
                E = native[name].num_experts
                if E == info["experts_before"]:
                    shrink_native(native[name], keep)
                    counts = (info["experts_before"], info["experts_after"])
                elif E != info["experts_after"]:
                    raise SparsifyError(f"moeify/reap rebuild: {name} has {E} experts, expected "
                                        f"{info['experts_before']} or {info['experts_after']}")
            elif name in routed and routed[name].num_experts == info["experts_before"]:
                shrink_routed(ctx.model, name, routed[name], keep)  # masks come saved in their new shape
            else:
                raise SparsifyError(f"moeify/reap rebuild: no MoE layer {name} with {info['experts_before']} "
                                    "experts in the loaded model")
        if counts is not None:
            set_expert_count(ctx.model, *counts)

    def needs_rebuild(self, params: ReapParams, result: StageResult) -> bool:
        """Native MoE: the config records the new expert count, so the output loads without this stage."""
        return any(b.get("kind") == "routed" for b in result.info.get("blocks", {}).values())


def _calibrate(ctx, params: ReapParams) -> None:
    model, was = ctx.model, ctx.model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in ctx.split(params.split).batches(params.batch_size):
                model(input_ids=batch.to(ctx.device), use_cache=False)
    finally:
        model.train(was)


__all__ = ["CRITERIA", "ExpertStats", "NativeMoE", "Reap", "ReapParams", "experts_to_keep", "kept_neurons",
           "native_moe_blocks", "reap_saliency", "selection_frequency", "set_expert_count", "shrink_native",
           "shrink_routed"]
