"""The fast modules of a loaded model: the one conversion ``sparsify generate``, ``load_output(fast=True)``
and ``sparsify bench`` case 4 use.

``fast_modules`` swaps, exactly, every FFN that can skip work for its fast
form: FFNs split into experts with ``top_k``/``threshold`` routing become
``MoEFFN`` (``layout_convert/moe_ffn``), FFNs whose activation has exact
zeros (ReLU, FATReLU, CATS, dReLU) become activation-sparse
(``layout_convert/activation_sparse_ffn``), and every Linear that thresholds
its own input (TEAL) becomes an ``InputSparseLinear`` (the input-sparse GEMV).
Weights already held in a layout
(``SparseLinear``) compute with their kernels as they are. Masks of moved
weights follow them, as in the stages.
"""
from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import torch

from sparsify_core import progress as _progress
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import find_ffn_blocks
from sparsify_core.masks import MaskSet

from .convert import ActivationSparseFFNConvert, MoEFFNConvert, _rewrite_masks
from .convert import _set_module
from .modules import (InputSparseLinear, MoEFFN, TransposedLinear, activation_spec, input_threshold,
                      is_sparse_activation)


def routed_blocks(model) -> list[int]:
    """Indices of the FFN blocks split into experts whose routing skips experts (``top_k``/``threshold``)."""
    return [i for i, b in enumerate(find_ffn_blocks(model))
            if callable(getattr(b.module, "set_routing", None)) and not isinstance(b.module, MoEFFN)
            and getattr(b.module, "routing", None) in ("top_k", "threshold")]


def sparse_activation_blocks(model) -> list[int]:
    """Indices of the unconverted FFN blocks whose activation has exact zeros."""
    out = []
    for i, b in enumerate(find_ffn_blocks(model)):
        if callable(getattr(b.module, "set_routing", None)) or isinstance(b.down, TransposedLinear):
            continue
        if any(input_threshold(m) is not None for m in b.projections().values()):
            continue  # TEAL thresholds the projections' inputs: each becomes an InputSparseLinear instead
        if is_sparse_activation(activation_spec(b.activation)):
            out.append(i)
    return out


def input_sparse_linears(model) -> list[tuple[str, torch.nn.Module]]:
    """``(path, module)`` of the Linear/Conv1D modules that threshold their own input (TEAL), unconverted."""
    return [(n, m) for n, m in model.named_modules()
            if input_threshold(m) is not None and not isinstance(m, InputSparseLinear)]


def fast_modules(model: torch.nn.Module, masks: MaskSet | None = None, device=None) -> list[str]:
    """Swap ``model``'s FFNs for their fast, exact forms in place; one line per kind of change.

    ``masks`` (optional) is rewritten for the weights that change orientation.
    ``device`` is where the model runs; the modules pick their kernels per
    input (CPU kernels, Triton on CUDA, torch otherwise), so it only labels
    the result. A block whose structure a conversion does not support (a
    gated FFN without ``gate_proj``) is left as it is and reported.
    """
    masks = masks if masks is not None else MaskSet()
    done: list[str] = []
    change: dict = {}
    moe = routed_blocks(model)
    if moe:
        MoEFFNConvert()._convert(model, MoEFFNConvert.Params(layers=moe), change)
        done.append(f"MoE FFN in {len(moe)} blocks")
    act = sparse_activation_blocks(model)
    converted, skipped = [], []
    for i in act:
        try:
            ActivationSparseFFNConvert()._convert(model, ActivationSparseFFNConvert.Params(layers=[i]), change)
            converted.append(i)
        except SparsifyError as exc:
            skipped.append(f"layer {i}: {exc}")
    if converted:
        done.append(f"activation-sparse FFN in {len(converted)} blocks")
    thresholded = input_sparse_linears(model)
    for path, module in thresholded:
        _set_module(model, path, InputSparseLinear.from_thresholded(module))
        if isinstance(module, torch.nn.Linear):
            change[f"{path}.weight"] = "t"
    if thresholded:
        done.append(f"input-sparse Linear in {len(thresholded)} modules")
    if skipped:
        done.append(f"left dense: {skipped[0]}" + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""))
    _rewrite_masks(SimpleNamespace(masks=masks), change)
    return done


def auto_layouts(model: torch.nn.Module, masks: MaskSet | None = None, tokens: int = 1,
                 measure: bool = False) -> list[str]:
    """Move each pruned Linear/Conv1D (one with a mask) into the weight layout the measured table rates fastest.

    The decision is ``layout: auto``'s (``table.choose`` over the default
    candidates, each with its default params, margin 1), read from this
    machine's table (``table.LayoutTable.load``) for ``tokens`` tokens per
    call (1: decoding): a layout replaces the dense weight only where its
    entry says it beats dense. Entries missing from the table are measured
    here first with ``measure`` (``table.measure`` on the weight itself,
    float32 on the CPU, about 1.5 s each, progress shown; stored in the table,
    so one per layout, shape and density, once per machine); without it they
    are not (``sparsify bench --case 3``, a ``layout: auto`` stage or
    ``--layouts measure`` measures them) and a weight with none stays dense.
    Exact: the layout holds the weight's zeros (``from_dense``), and the
    masks of moved weights are dropped, as in ``layout_convert``. Returns one
    line saying how many modules went into which layout and how many stayed
    dense, and why (and how many entries were measured). Raises
    ``SparsifyError`` when the table file is not a table.
    """
    from sparsify_core.ffn import prunable_modules, weight_out_in

    from . import table as TBL
    from .convert import AutoLayoutParams
    from .modules import SparseLinear

    masks = masks if masks is not None else MaskSet()
    pruned = [(n, m) for n, m in prunable_modules(model) if f"{n}.weight" in masks
              and not isinstance(m, TransposedLinear) and input_threshold(m) is None]
    if not pruned:
        return []
    tab = TBL.LayoutTable.load()
    candidates = AutoLayoutParams().layouts()
    chosen: dict[str, int] = {}
    dense_reasons: dict[str, int] = {}
    change: dict = {}
    measured = 0
    shown = _progress.task("layouts: measuring missing table entries", len(pruned)) if measure else nullcontext()
    with shown as bar:
        for name, module in pruned:
            w = weight_out_in(module).detach().contiguous()
            ratios, held = {}, {}
            for layout_cls, lp in candidates:
                try:
                    layout = layout_cls.from_dense(w, lp)
                except ValueError:
                    continue  # does not hold this weight exactly
                r = tab.ratio(layout, tokens)
                if r is None and measure:
                    # on a CPU copy: the table is a CPU measurement, whatever device the model is on
                    cpu = layout if w.device.type == "cpu" else layout_cls.from_dense(w.float().cpu(), lp)
                    r = TBL.measure(cpu, tokens)
                    tab.record(cpu, tokens, r)
                    tab.save()  # each entry as it is measured: an interrupted load keeps what it measured
                    measured += 1
                if r is not None:
                    ratios[layout_cls.name], held[layout_cls.name] = r, layout
            if bar is not None:
                bar.advance(1, measured=measured)
            best, _ratio, _why = TBL.choose(ratios)
            if best is None:
                why = "no table entry" if not ratios else "no layout beats dense"
                dense_reasons[why] = dense_reasons.get(why, 0) + 1
                continue
            _set_module(model, name, SparseLinear(held[best], getattr(module, "bias", None)).to(w.device))
            change[f"{name}.weight"] = None
            chosen[best] = chosen.get(best, 0) + 1
    _rewrite_masks(SimpleNamespace(masks=masks), change)
    parts = [f"{n} in {k}" for k, n in sorted(chosen.items())]
    parts += [f"{n} dense ({why} for T={tokens} on this machine)" for why, n in sorted(dense_reasons.items())]
    line = f"layouts auto: {len(pruned)} pruned Linears: " + ", ".join(parts)
    if measured:
        line += f"; measured {measured} table entries on this machine ({tab.path})"
    if dense_reasons.get("no table entry"):
        line += "; `--layouts measure` (or `sparsify bench --case 3`) measures the missing entries"
    return [line]
