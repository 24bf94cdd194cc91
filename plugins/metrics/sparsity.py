"""Sparsity and cost metrics: activation sparsity, weight sparsity, effective FFN FLOPs."""
from __future__ import annotations

from contextlib import ExitStack

import torch

from sparsify_core import Metric, MetricValue
from sparsify_core.metric import MetricInfo
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import (FFNBlock, capture_intermediates, find_ffn_blocks, input_threshold, is_linear,
                               prunable_modules, weight_numel, weight_out_in, zero_small_inputs)


def _has_ffn_blocks(model) -> bool:
    try:
        return bool(find_ffn_blocks(model))
    except SparsifyError:
        return False


def is_routed(block: FFNBlock) -> bool:
    """True for FFN blocks split into experts with a router (the routed-FFN protocol of ``plugins/moeify``).

    Such a block module has ``num_experts``, ``expert_size`` (expert e is the
    neurons ``[e*size, (e+1)*size)``), ``register_selection_hook(fn)`` (``fn(module,
    x, scores, selected)`` with ``selected`` the boolean ``[..., E]`` of experts
    computed) and ``router_flops_per_token()``.
    """
    return hasattr(block.module, "register_selection_hook") and hasattr(block.module, "router_flops_per_token")


class _NeuronActivity:
    """Counts, per FFN block and neuron, the tokens where ``x1 != 0`` during forwards.

    For routed FFN blocks it also counts, per neuron, the tokens whose
    selected experts include it (``computed_fraction``).
    """

    def __init__(self, blocks: list[FFNBlock]):
        self.blocks = blocks
        self.active = {b.name: torch.zeros(b.d_ff, dtype=torch.int64) for b in blocks}
        self.tokens = {b.name: 0 for b in blocks}
        self.computed = {b.name: torch.zeros(b.d_ff, dtype=torch.int64) for b in blocks if is_routed(b)}
        self.routed_tokens = {name: 0 for name in self.computed}
        self._stack = ExitStack()
        self._stack.enter_context(capture_intermediates(blocks, self._record))
        for b in blocks:
            if is_routed(b):
                handle = b.module.register_selection_hook(
                    lambda m, x, scores, sel, name=b.name: self._record_selection(name, m, sel))
                self._stack.callback(handle.remove)

    def _record(self, block: FFNBlock, x1: torch.Tensor) -> None:
        nz = (x1.detach() != 0).reshape(-1, x1.shape[-1])
        self.active[block.name] += nz.sum(dim=0).cpu()
        self.tokens[block.name] += nz.shape[0]

    def _record_selection(self, name: str, module, selected: torch.Tensor) -> None:
        sel = selected.detach().reshape(-1, selected.shape[-1])
        self.computed[name] += sel.sum(dim=0).cpu().repeat_interleave(module.expert_size)
        self.routed_tokens[name] += sel.shape[0]

    def active_fraction(self, block: FFNBlock) -> torch.Tensor:
        """Per neuron, the fraction of tokens where it is non-zero (``[d_ff]`` float64)."""
        return self.active[block.name].double() / max(self.tokens[block.name], 1)

    def computed_fraction(self, block: FFNBlock) -> torch.Tensor | None:
        """Routed blocks: per neuron, the fraction of tokens that computed it; ``None`` for dense blocks."""
        if block.name not in self.computed:
            return None
        return self.computed[block.name].double() / max(self.routed_tokens[block.name], 1)

    def close(self) -> None:
        self._stack.close()


class _InputActivity:
    """Counts, per projection that thresholds its own input (``input_threshold``: TEAL), the tokens where each
    input entry survives the threshold: the weight columns an input-sparse GEMV reads for that token."""

    def __init__(self, model: torch.nn.Module):
        self.nonzero: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}
        self._stack = ExitStack()
        for m in model.modules():
            if is_linear(m) and input_threshold(m) is not None:
                self.nonzero[id(m)], self.tokens[id(m)] = 0, 0
                self._stack.callback(m.register_forward_pre_hook(self._record).remove)

    def _record(self, module, args) -> None:
        x = args[0].detach()
        nz = (zero_small_inputs(x, input_threshold(module)) != 0).reshape(-1, x.shape[-1])
        self.nonzero[id(module)] = self.nonzero[id(module)] + nz.sum(dim=0).cpu()
        self.tokens[id(module)] += nz.shape[0]

    def fraction(self, module) -> torch.Tensor | None:
        """Per input entry, the fraction of tokens where it is non-zero after the threshold (``[in]`` float64);
        ``None`` for a module without one, or one no token reached."""
        if not self.tokens.get(id(module)):
            return None
        return self.nonzero[id(module)].double() / self.tokens[id(module)]

    def close(self) -> None:
        self._stack.close()


def close_probes(metric) -> None:
    """Remove the hooks of a metric's ``_probe`` (neurons) and ``_inputs`` (thresholded inputs); idempotent."""
    for attr in ("_probe", "_inputs"):
        probe = getattr(metric, attr, None)
        if probe is not None:
            probe.close()
            setattr(metric, attr, None)


def read_fractions(block: FFNBlock, neurons: _NeuronActivity,
                   inputs: _InputActivity | None = None) -> dict[str, tuple[int, torch.Tensor]]:
    """Per projection role of ``block``, ``(dim, fraction)``: the share of tokens that read each row (``dim`` 0)
    or column (1) of its ``[out, in]`` weight; the accounting of ``ffn_flops_per_token``, per projection.

    The gate (gated) or ``W_fc1`` (plain) is read in full, or, routed, for the tokens whose experts hold the
    row (``c_j``); ``W_up`` rows and ``W_down`` columns for the tokens where the neuron is non-zero (``f_j``).
    A projection that thresholds its own input (TEAL) is read by input column instead, for the tokens where
    that entry survives (the input-sparse GEMV skips the others; for ``W_down`` this already includes the
    neuron's own zeros).
    """
    f = neurons.active_fraction(block)
    c = neurons.computed_fraction(block)
    first = "gate" if block.gate is not None else "up"
    out = {first: (0, c if c is not None else torch.ones_like(f)), "down": (1, f)}
    if block.gate is not None:
        out["up"] = (0, f)
    for role, m in block.projections().items():
        g = inputs.fraction(m) if inputs is not None else None
        if role in out and g is not None:
            out[role] = (1, g)
    return out


def projection_flops(module, dim: int | None = None, fraction: torch.Tensor | None = None) -> float:
    """``2 x`` the non-zero weights of ``module`` multiplied per token: all of them, or each row (``dim`` 0) or
    column (1) weighted by the share of tokens that read it."""
    nz = weight_out_in(module) != 0
    if dim is None:
        return 2.0 * float(nz.sum())
    return 2.0 * float((nz.sum(dim=1 - dim).cpu().double() * fraction).sum())


def activation_sparsity(active: torch.Tensor, tokens: int) -> float:
    """Fraction of zeros in ``x1`` averaged over tokens, from per-neuron non-zero counts.

    Every token of a layer has the same ``d_ff`` entries, so the mean over
    tokens of the per-token zero fraction is ``1 - sum(active) / (tokens * d_ff)``.
    """
    return 1.0 - float(active.sum()) / (tokens * active.numel())


class ActivationSparsity(Metric):
    """Fraction of exact zeros in the FFN intermediate activation x1 (per token, mean over tokens and layers).

    The model value is the unweighted mean over FFN layers of each layer's
    mean over tokens of the per-token zero fraction (ProSparse's definition);
    per-layer values carry ``layer`` = the block's module path.
    """

    name = "activation_sparsity"
    higher_is_better = True
    unit = ""
    fraction = True
    uses_forward = True

    def applies_to(self, ctx):
        return super().applies_to(ctx) and _has_ffn_blocks(ctx.model)

    def start(self, ctx):
        self._probe = _NeuronActivity(find_ffn_blocks(ctx.model))

    def finish(self, ctx):
        p = self._probe
        per_layer = [MetricValue(self.name, activation_sparsity(p.active[b.name], p.tokens[b.name]), layer=b.name)
                     for b in p.blocks]
        mean = sum(v.value for v in per_layer) / len(per_layer)
        return [MetricValue(self.name, mean), *per_layer]

    def close(self):
        probe = getattr(self, "_probe", None)
        if probe is not None:
            probe.close()
            self._probe = None


class WeightSparsity(Metric):
    """Fraction of zero weights over every Linear/Conv1D inside the transformer layers.

    These are the matrices pruning targets by default (``prunable_modules``:
    attention and FFN projections; not embeddings, LM head or pooler), a
    weight held in a sparse layout read as its dense ``[out, in]`` matrix (the
    zeros moved into the layout, they did not go away). Also one value per
    module (``layer`` = module path), for all of them.
    """

    name = "weight_sparsity"
    higher_is_better = True
    unit = ""
    fraction = True

    def applies_to(self, ctx):
        return super().applies_to(ctx) and _has_ffn_blocks(ctx.model)

    def finish(self, ctx):
        values, zeros, total = [], 0, 0
        for name, module in prunable_modules(ctx.model, stored=True):
            w = weight_out_in(module).detach()
            z = w.numel() - int(torch.count_nonzero(w))
            values.append(MetricValue(self.name, z / w.numel(), layer=name))
            zeros, total = zeros + z, total + w.numel()
        return [MetricValue(self.name, zeros / total), *values]


class FFNFlops(Metric):
    """Effective FFN FLOPs per token, given weight zeros and the measured activation zeros.

    Per layer (``layer`` = block path) and summed over layers: neuron ``j``,
    non-zero for a fraction ``f_j`` of the eval tokens, costs its row of
    ``W_up`` and its column of ``W_down`` only then (ProSparse's exact
    acceleration), counting its own non-zero weights, so weight and
    activation sparsity combine exactly; the gate (gated) or ``W_fc1``
    (plain) is always computed, since it decides which neurons are zero:

    - gated: ``2 * (nnz(W_gate) + sum_j f_j * (nnz(W_up[j, :]) + nnz(W_down[:, j])))``
    - plain: ``2 * (nnz(W_fc1) + sum_j f_j * nnz(W_fc2[:, j]))``

    Biases and the activation itself are not counted.
    Also records ``ffn_flops_per_token_dense``: ``2 x`` all FFN weights, the
    same model with no zeros at all. FFNs split into experts (``moeify``)
    count only the neurons of the experts each token selected: the gate row
    (W_fc1 row) of neuron ``j`` weighted by the fraction ``c_j >= f_j`` of
    tokens whose selected experts hold it, plus the router's own FLOPs. A projection that thresholds its own input (TEAL) counts, per
    input column, the tokens where that entry survives (``read_fractions``).
    """

    name = "ffn_flops_per_token"
    uses_forward = True
    higher_is_better = False
    unit = "FLOPs/token"
    fraction = False

    @classmethod
    def value_info(cls):
        """Also ``ffn_flops_per_token_dense``: the same count without any zeros (a reference, not a goal)."""
        return {cls.name: cls.info(), f"{cls.name}_dense": MetricInfo(higher_is_better=None, unit=cls.unit)}

    def applies_to(self, ctx):
        return super().applies_to(ctx) and _has_ffn_blocks(ctx.model)

    def start(self, ctx):
        self._probe = _NeuronActivity(find_ffn_blocks(ctx.model))
        self._inputs = _InputActivity(ctx.model)

    def finish(self, ctx):
        p = self._probe
        per_layer, dense = [], 0.0
        with torch.no_grad():
            for b in p.blocks:
                projections = b.projections()
                flops = sum(projection_flops(projections[role], dim, frac)
                            for role, (dim, frac) in read_fractions(b, p, self._inputs).items())
                if p.computed_fraction(b) is not None:
                    flops += b.module.router_flops_per_token()
                per_layer.append(MetricValue(self.name, flops, layer=b.name))
                dense += 2.0 * sum(weight_numel(m) for m in b.projections().values())
        total = sum(v.value for v in per_layer)
        return [MetricValue(self.name, total), MetricValue(f"{self.name}_dense", dense), *per_layer]

    def close(self):
        close_probes(self)
