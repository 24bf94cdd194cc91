"""One cost axis for every family: bytes of weights read per generated token at batch 1, and FLOPs.

Decoding one token at batch 1 is bound by reading weights, so the bytes a
token reads compare a pruned model, an activation-sparse one and an MoE on
one axis. The accounting (``BytesPerToken``), per tensor of the model:

- a Linear-like weight ``[out, in]`` stored densely: ``out * in * itemsize``;
- a masked weight (a mask in the run's ``MaskSet``): as the compressed output
  stores it (``sparsify_core.storage``): ``itemsize`` per stored entry (kept
  or non-zero) plus one bit per entry (the bitmask);
- a weight in a sparse layout (``SparseLinear``...): the layout's storage,
  ``Layout.nbytes()`` (values and indices);
- an embedding: one row per token;
- everything else (norms, biases, routers, activation predictors,
  position tables): read in full every token;
- a projection that thresholds its own input (``input_threshold``, TEAL):
  only the columns of the input entries that survive the threshold, for the
  eval tokens where they do (the input-sparse GEMV skips the rest).

FFN blocks (``find_ffn_blocks``) read by neuron. Neuron ``j`` is non-zero
(``x1[j] != 0``) for a fraction ``f_j`` of the eval split's tokens; where it
is zero its row of ``W_up`` and its column of ``W_down`` (``W_fc2``) are not
read; the gate (gated) or ``W_fc1`` (plain), which decides that, is read in
full (an activation predictor's own weights are counted, the gate rows it
lets a kernel skip are not: a bound from above). In an FFN split into experts
(``moeify``) neuron ``j`` belongs to the selected experts for a fraction
``c_j`` of tokens: its gate / ``W_fc1`` row is read for those, the rest as
above, plus the router in full. A row's or column's bytes are its share of
the tensor's storage: exact for dense and bitmask storage (per entry), for
a layout apportioned by the non-zeros of the row or column.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsify_core import Metric, MetricValue
from sparsify_core.ffn import find_ffn_blocks, is_linear, is_stored_linear, linear_shape, weight_out_in
from sparsify_core.metric import MetricInfo

from .sparsity import (_has_ffn_blocks, _InputActivity, _NeuronActivity, close_probes, projection_flops,
                       read_fractions)


def weight_read_bytes(w: torch.Tensor, itemsize: int, *, keep: torch.Tensor | None = None,
                      stored_bytes: int | None = None, dim: int | None = None) -> torch.Tensor | float:
    """Bytes of storage of a ``[out, in]`` weight ``w``, whole (``dim=None``) or per row (0) or column (1).

    Dense: ``itemsize`` per entry. With ``keep`` (the mask, ``[out, in]``
    bool): bitmask storage, ``itemsize`` per stored entry (``keep | w != 0``)
    plus 1/8 byte per entry. With ``stored_bytes`` (a layout's ``nbytes``):
    those bytes, a row's or column's share in proportion to its non-zeros
    (an even share when the weight is all zeros). Returns a float, or a
    float64 tensor ``[out]`` (``dim=0``) / ``[in]`` (``dim=1``).
    """
    other = None if dim is None else 1 - dim
    if stored_bytes is not None:
        nnz = (w != 0).sum(dim=other).double() if dim is not None else None
        if dim is None:
            return float(stored_bytes)
        total = float(nnz.sum())
        return nnz * (stored_bytes / total) if total else torch.full_like(nnz, stored_bytes / nnz.numel())
    if keep is not None:
        stored = (keep.to(torch.bool) | (w != 0)).double()
        per_entry = stored * itemsize + 0.125
    else:
        per_entry = torch.full(w.shape, float(itemsize), dtype=torch.float64)
    return float(per_entry.sum()) if dim is None else per_entry.sum(dim=other)


def _itemsize(module: nn.Module) -> int:
    t = next((t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
              if t.is_floating_point()), None)
    return t.element_size() if t is not None else 4


class _Weights:
    """Reads each Linear-like module's weight and its storage bytes as the accounting above says."""

    def __init__(self, model: nn.Module, masks):
        self.keep = {}
        params = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        for m in model.modules():
            if is_linear(m) and not is_stored_linear(m):
                name = params.get(id(m.weight))
                mask = masks.get(name) if masks is not None and name is not None else None
                if mask is not None:  # Conv1D-style masks are [in, out] like their weight
                    self.keep[id(m)] = mask.t() if tuple(mask.shape) != linear_shape(m) else mask

    def bytes(self, module: nn.Module, dim: int | None = None):
        w = weight_out_in(module).detach().cpu()
        if is_stored_linear(module) and callable(getattr(module, "layout", None)):
            return weight_read_bytes(w, 0, stored_bytes=module.layout().nbytes(), dim=dim)
        return weight_read_bytes(w, _itemsize(module), keep=self.keep.get(id(module)), dim=dim)

    @staticmethod
    def tensors(module: nn.Module) -> list[torch.Tensor]:
        """The tensors a linear's weight storage consists of (counted by ``bytes``, not again in full)."""
        if is_stored_linear(module):
            return [b for b in module.buffers(recurse=False)] + [p for n, p in module.named_parameters(recurse=False)
                                                                   if n != "bias"]
        return [module.weight]


def _full_bytes(tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point()))


class BytesPerToken(Metric):
    """Bytes of weights read per generated token at batch 1, given storage, masks and measured sparsity.

    By the accounting of this module's docstring (``plugins/metrics/cost.py``):
    masked weights as their compressed storage, layouts as stored, FFN
    neurons read only for the eval tokens where they are non-zero (and, in
    an MoE, selected). Per FFN block too (``layer`` = its path). Also
    records ``bytes_per_token_dense`` (every weight dense, every neuron read:
    the same model with no sparsity) and ``flops_per_token``: 2 x the
    non-zero weights multiplied per token with the same neuron fractions
    (every Linear-like module, the LM head included; not embeddings or
    attention scores, which depend on the context length).
    """

    name = "bytes_per_token"
    uses_forward = True
    higher_is_better = False
    unit = "B/token"
    fraction = False

    @classmethod
    def value_info(cls):
        """Also ``bytes_per_token_dense`` (no direction: a reference) and ``flops_per_token``."""
        return {cls.name: cls.info(), f"{cls.name}_dense": MetricInfo(higher_is_better=None, unit=cls.unit),
                "flops_per_token": MetricInfo(higher_is_better=False, unit="FLOPs/token")}

    def applies_to(self, ctx):
        return super().applies_to(ctx) and _has_ffn_blocks(ctx.model)

    def start(self, ctx):
        self._probe = _NeuronActivity(find_ffn_blocks(ctx.model))
        self._inputs = _InputActivity(ctx.model)

    def finish(self, ctx):
        model, p = ctx.model, self._probe
        weights = _Weights(model, ctx.masks)
        counted: set[int] = set()  # tensors already accounted for (by id)
        per_layer, total, dense, flops = [], 0.0, 0.0, 0.0
        with torch.no_grad():
            for b in p.blocks:
                projections = b.projections()
                nbytes = 0.0
                for role, (dim, frac) in read_fractions(b, p, self._inputs).items():
                    nbytes += float((frac * weights.bytes(projections[role], dim=dim)).sum())
                    flops += projection_flops(projections[role], dim, frac)
                if p.computed_fraction(b) is not None:
                    flops += b.module.router_flops_per_token()
                for m in projections.values():
                    counted.update(id(t) for t in weights.tensors(m))
                    dense += _full_bytes([weight_out_in(m)])
                rest = [t for t in (*b.module.parameters(), *b.module.buffers()) if id(t) not in counted]
                counted.update(id(t) for t in rest)
                nbytes += _full_bytes(rest)  # biases, router, predictor: read every token
                dense += _full_bytes(rest)
                per_layer.append(MetricValue(self.name, nbytes, layer=b.name))
                total += nbytes
            for m in model.modules():
                if is_linear(m) and not any(id(t) in counted for t in weights.tensors(m)):
                    counted.update(id(t) for t in weights.tensors(m))
                    g = self._inputs.fraction(m)  # TEAL: only the columns of surviving inputs are read
                    total += weights.bytes(m) if g is None else float((g * weights.bytes(m, dim=1)).sum())
                    flops += projection_flops(m) if g is None else projection_flops(m, 1, g)
                    dense += _full_bytes([weight_out_in(m).detach()])
            rows = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
            for w in rows.values():  # one row per token, even when the LM head (tied) read it all
                row = w.shape[1] * w.element_size()
                total, dense = total + row, dense + row
            counted.update(rows)
            rest = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in counted]
            total += _full_bytes(rest)
            dense += _full_bytes(rest)
        return [MetricValue(self.name, total), MetricValue(f"{self.name}_dense", dense),
                MetricValue("flops_per_token", flops), *per_layer]

    def close(self):
        close_probes(self)
