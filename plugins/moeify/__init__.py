"""MoE-ify: mixtures of experts carved out of dense FFNs (``docs/methods.md#moefication``).

- ``moeify/param_cluster`` and ``moeify/coactivation``: split each FFN into
  equal experts (``clustering``) and wrap it in a ``RoutedFFN`` with an
  ``mlp`` (MoEfication) or ``lte`` router fitted on calibration activations
  (``methods``, ``modules``).
- ``moeify/routing`` (``routing``): run a model split into experts dense or as
  an MoE (top-k, threshold) without changing its weights.
- ``moeify/reap`` (``reap``): remove each layer's least salient experts (REAP,
  or selection frequency), from native transformers MoE models or from FFNs
  split into experts here.
- Metrics ``expert_sparsity`` and ``router_recall`` (``metrics``); FFN FLOPs
  with routers are the built-in ``ffn_flops_per_token``.

The routed-FFN modules here are shared by ``regularize/lte``, ``train/ssd``
and ``layout_convert/moe_ffn``.
"""
from __future__ import annotations

from sparsify_core import hookimpl

from .methods import Coactivation, ParamCluster
from .metrics import ExpertSparsity, RouterRecall
from .modules import LTERouter, MLPRouter, RoutedFFN, Router, routed_modules
from .reap import Reap
from .routing import Routing

__all__ = ["Coactivation", "ExpertSparsity", "LTERouter", "MLPRouter", "ParamCluster", "Reap", "RoutedFFN",
           "Router", "RouterRecall", "Routing", "routed_modules"]


@hookimpl
def sparsify_methods():
    """``moeify/param_cluster``, ``moeify/coactivation``, ``moeify/routing`` and ``moeify/reap``."""
    return [ParamCluster, Coactivation, Routing, Reap]


@hookimpl
def sparsify_metrics():
    """``expert_sparsity`` and ``router_recall``."""
    return [ExpertSparsity, RouterRecall]
