"""Mixtures of experts carved out of dense FFNs (``docs/methods.md#moefication``, ``docs/methods.md#lte``).

- ``moeify/param_cluster`` and ``moeify/coactivation``: split each FFN into
  equal experts (``clustering``) and wrap it in a ``RoutedFFN`` with an
  ``mlp`` (MoEfication) or ``lte`` router fitted on calibration activations
  (``methods``, ``modules``).
- ``regularize/lte``: LTE's two-stage training of routers and model (``lte``).
- Metrics ``expert_sparsity`` and ``router_recall`` (``metrics``); FFN FLOPs
  with routers are the built-in ``ffn_flops_per_token``.
"""
from __future__ import annotations

from sparsify_core import hookimpl

from .lte import LTE
from .methods import Coactivation, ParamCluster
from .metrics import ExpertSparsity, RouterRecall
from .modules import LTERouter, MLPRouter, RoutedFFN, Router

__all__ = ["LTE", "Coactivation", "ExpertSparsity", "LTERouter", "MLPRouter", "ParamCluster", "RoutedFFN",
           "Router", "RouterRecall"]


@hookimpl
def sparsify_methods():
    """``moeify/param_cluster``, ``moeify/coactivation`` and ``regularize/lte``."""
    return [ParamCluster, Coactivation, LTE]


@hookimpl
def sparsify_metrics():
    """``expert_sparsity`` and ``router_recall``."""
    return [ExpertSparsity, RouterRecall]
