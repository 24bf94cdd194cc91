"""Metrics of routed (MoE) FFNs, measured in the shared evaluation forward.

- ``expert_sparsity``: the fraction of FFN neurons not computed, per token,
  averaged over tokens; the model value is the mean over every FFN layer
  (a layer that is not split into experts computes all its neurons: 0).
- ``router_recall``: per token, the fraction of the FFN's un-routed
  activation mass ``sum_j |x1_j|`` (all neurons, computed on the same FFN
  input) that lies in the selected experts, averaged over tokens; the model
  value is the mean over routed layers.

Both apply only to models with at least one ``RoutedFFN``. FFN FLOPs
including routers are ``ffn_flops_per_token`` (plugins/metrics), which reads
routed FFNs through the same selection hooks.
"""
from __future__ import annotations

from abc import abstractmethod

import torch

from sparsify_core import Metric, MetricValue
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import find_ffn_blocks

from .modules import RoutedFFN


def _routed(model) -> list[tuple[str, RoutedFFN]]:
    try:
        blocks = find_ffn_blocks(model)
    except SparsifyError:
        return []
    return [(b.name, b.module) for b in blocks if isinstance(b.module, RoutedFFN)]


class _RoutedMetric(Metric):
    uses_forward = True

    def applies_to(self, ctx):
        return super().applies_to(ctx) and bool(_routed(ctx.model))

    def start(self, ctx):
        self._handles = []
        self._sums: dict[str, float] = {}
        self._tokens: dict[str, int] = {}
        for name, module in _routed(ctx.model):
            self._sums[name], self._tokens[name] = 0.0, 0
            self._handles.append(module.register_selection_hook(
                lambda m, x, scores, sel, name=name: self._record(name, m, x, sel)))

    @abstractmethod
    def _record(self, name, module, x, selected) -> None:
        """Add one forward's tokens of the RoutedFFN ``name`` to ``self._sums`` and ``self._tokens``."""

    def close(self):
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []


class ExpertSparsity(_RoutedMetric):
    """Fraction of FFN neurons not computed per token (unselected experts), mean over tokens and FFN layers."""

    name = "expert_sparsity"
    higher_is_better = True
    unit = ""
    fraction = True

    def _record(self, name, module, x, selected):
        sel = selected.detach().reshape(-1, selected.shape[-1])
        self._sums[name] += float((~sel).float().mean(-1).sum())
        self._tokens[name] += sel.shape[0]

    def finish(self, ctx):
        blocks = find_ffn_blocks(ctx.model)
        per_layer = [MetricValue(self.name, self._sums[b.name] / max(self._tokens[b.name], 1)
                                 if b.name in self._sums else 0.0, layer=b.name) for b in blocks]
        mean = sum(v.value for v in per_layer) / len(per_layer)
        return [MetricValue(self.name, mean), *per_layer]


class RouterRecall(_RoutedMetric):
    """Fraction of the un-routed FFN activation mass sum|x1| covered by the selected experts, per token, averaged."""

    name = "router_recall"
    higher_is_better = True
    unit = ""
    fraction = True

    def _record(self, name, module, x, selected):
        with torch.no_grad():
            x1 = module.expert_intermediate(x.detach()).abs().float()
            mass = x1.reshape(-1, module.num_experts, module.expert_size).sum(-1)
            sel = selected.detach().reshape(-1, selected.shape[-1])
            total = mass.sum(-1)
            ratio = torch.where(total > 0, (mass * sel.float()).sum(-1) / total.clamp_min(1e-30),
                                torch.ones_like(total))
        self._sums[name] += float(ratio.sum())
        self._tokens[name] += ratio.numel()

    def finish(self, ctx):
        per_layer = [MetricValue(self.name, self._sums[n] / max(self._tokens[n], 1), layer=n) for n in self._sums]
        mean = sum(v.value for v in per_layer) / len(per_layer)
        return [MetricValue(self.name, mean), *per_layer]
