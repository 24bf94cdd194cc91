"""Sparse layouts and the ``layout_convert`` stage methods.

Weight layouts (``csr``, ``bsr``, ``nm``, ``nmg``) store a Linear's weight;
the activation-sparse FFN computes only the active neurons of an FFN block
(optionally only those an activation predictor chooses: ``predictor``); the
MoE FFN reads only the experts a token's router selects (``moe_ffn``); the
input-sparse Linear reads only the weight rows of inputs that pass a TEAL
threshold (chosen by ``fast``).
Formats are pure functions (``formats``), layouts wrap them and hand out the
fast kernels of ``sparsify_kernels`` (``weight``), modules hold layouts and
compute with their kernels (``modules``), stage methods swap modules in a
model (``convert``: ``weight`` takes any catalog layout by name),
the fast modules of a loaded model are chosen in one place (``fast``:
``sparsify generate``, ``load_output`` and bench case 4), the lean decode
path's native step is built in one place (``lean_step``), and
predictors are fitted by pure functions (``predictor``). Their benchmark
cases for ``sparsify bench`` are in ``bench``. (``prune/nmg``, which prunes
into the n:m:g structure, is the prune plugin's.)
"""
from __future__ import annotations

from sparsify_core import hookimpl

from .convert import ActivationSparseFFNConvert, MoEFFNConvert, WeightConvert, weight_methods
from .modules import (ActivationPredictor, ActivationSparseFFN, InputSparseLinear, MoEFFN, SparseLinear,
                      TransposedLinear)
from .weight import BSR, CSR, NM, NMG, WEIGHT_LAYOUTS, StoredLayout

__all__ = ["BSR", "CSR", "NM", "NMG", "StoredLayout", "WEIGHT_LAYOUTS", "ActivationPredictor", "ActivationSparseFFN",
           "InputSparseLinear", "MoEFFN", "SparseLinear", "TransposedLinear", "ActivationSparseFFNConvert", "MoEFFNConvert", "WeightConvert"]


@hookimpl
def sparsify_layouts():
    """Weight layouts: CSR, BSR, n:m, n:m:g."""
    return list(WEIGHT_LAYOUTS)


@hookimpl
def sparsify_methods():
    """``layout_convert`` methods (activation-sparse FFN, MoE FFN, ``weight`` and its aliases)."""
    return [ActivationSparseFFNConvert, MoEFFNConvert, *weight_methods()]


@hookimpl
def sparsify_fast_modules(model, masks, device, layouts):
    """Activation-sparse FFNs and MoE FFNs where a loaded model can skip work (``fast.fast_modules``); with
    ``layouts="auto"``, pruned Linears in the layout the measured table rates fastest (``fast.auto_layouts``);
    with ``"measure"``, the same after measuring the table's missing entries on this machine."""
    from .fast import auto_layouts, fast_modules

    done = fast_modules(model, masks, device)
    if layouts in ("auto", "measure"):
        done += auto_layouts(model, masks, measure=layouts == "measure")
    return done


@hookimpl
def sparsify_lean_step(model):
    """The native decode step (``lean_step``): dense and activation-sparse llama FFNs, one C++ call per token."""
    from .lean_step import lean_step

    return lean_step(model)


@hookimpl
def sparsify_bench_cases():
    """``sparsify bench`` cases 1-4: activation-sparse FFN, MoE FFN, sparse Linear, end-to-end decode."""
    from .bench import CASES  # imported when benchmarking only

    return list(CASES)
