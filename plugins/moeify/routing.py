"""``moeify/routing``: switch how FFNs already split into experts route, without changing any weight.

An SSD model (``train/ssd``), or any MoE-ified one, runs ``dense`` (every
expert: the dense FFN), ``top_k`` (each token's ``top_k`` or
``expert_fraction`` best-scored experts) or ``threshold`` (experts scoring
above ``tau``). A recipe evaluates one model both ways by putting this stage
after the one that trained it (``evaluate.after: all``).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sparsify_core import Method, MetricInfo, Params, StageResult
from sparsify_core.errors import SparsifyError
from .modules import routed_modules


class RoutingParams(Params):
    routing: Literal["dense", "top_k", "threshold"]
    top_k: int | None = Field(None, gt=0, description="experts per token (routing top_k)")
    expert_fraction: float | None = Field(None, gt=0, le=1, description=(
        "fraction of each FFN's experts per token (routing top_k), instead of top_k"))
    tau: float | None = Field(None, gt=0, lt=1, description="score threshold (routing threshold; default: kept)")

    @model_validator(mode="after")
    def _rule(self):
        if self.routing == "top_k" and (self.top_k is None) == (self.expert_fraction is None):
            raise ValueError("routing top_k needs exactly one of top_k and expert_fraction")
        if self.routing != "top_k" and (self.top_k is not None or self.expert_fraction is not None):
            raise ValueError("top_k and expert_fraction apply to routing top_k only")
        if self.routing != "threshold" and self.tau is not None:
            raise ValueError("tau applies to routing threshold only")
        return self


class Routing(Method):
    """Set the routing of FFNs split into experts: dense, top_k or threshold (no weight changes)."""

    kind = "moeify"
    name = "routing"
    Params = RoutingParams

    def apply(self, ctx, params: RoutingParams) -> StageResult:
        modules = routed_modules(ctx.model)
        if not modules:
            raise SparsifyError("moeify/routing needs FFNs split into experts (a moeify stage or train/ssd before it)")
        self.rebuild(ctx, params, StageResult())
        k = [m.top_k for m in modules if m.top_k is not None]
        if params.routing != "top_k":
            return StageResult()
        return StageResult(metrics={"experts_per_token": sum(k) / len(k)},
                           metric_info={"experts_per_token": MetricInfo(unit="experts")})

    def plain_form(self, params) -> str | None:
        return "experts and a router"

    def rebuild(self, ctx, params: RoutingParams, result: StageResult) -> None:
        for m in routed_modules(ctx.model):
            k = None
            if params.routing == "top_k":
                k = params.top_k if params.top_k is not None else max(1, round(params.expert_fraction * m.num_experts))
                k = min(k, m.num_experts)
            m.set_routing(params.routing, top_k=k, tau=params.tau)
