"""The routed FFN (an FFN split into experts) and its routers.

``RoutedFFN`` replaces an FFN block module. Its neurons are permuted so that
expert ``e`` is the contiguous neurons ``[e*size, (e+1)*size)``: rows
``e*size:(e+1)*size`` of W_gate/W_up (W_fc1 for plain FFNs, bias included)
and the same columns of W_down. It keeps the block's own projection modules
under their own attribute names (``gate_proj``/``up_proj``/``down_proj``/
``act_fn``; ``c_fc``/``c_proj``/``act`` for GPT-2...), so
``find_ffn_blocks`` still finds it, masks and metrics still address its
weights, and its state dict is the dense block's (permuted) plus
``router.*``.

Routing modes (``RoutedFFN.routing``):

- ``dense``: every expert, unweighted: exactly the dense FFN.
- ``top_k``: each token uses its ``top_k`` best-scored experts (MoEfication).
- ``threshold``: expert ``e`` iff its score exceeds ``tau`` (LTE inference
  and LTE stage 2): a variable number of experts per token and layer.
- ``soft``: every expert, weighted by its score ``G(x)_e`` (LTE stage 1).

Selected experts are combined unweighted (``y = sum_{e selected} E_e(x)``).
With ``top_k``/``threshold`` the module computes only the selected experts
(``path = "gather"``: per expert, gather its tokens, run its slices of the
weights, scatter-add the outputs; autograd flows only into the selected
experts' slices, so sparse training computes and updates only them). The
``masked`` path computes every neuron and zeroes the unselected ones: the
same function, used when anything hooks the inner projections (metrics that
capture ``x1`` at the down projection see the routed ``x1``) and as the
reference the gather path is tested against.

Routers map the FFN input to one score per expert in (0, 1):
``LTERouter`` is LTE's ``sigmoid(x W_g^T)``; ``MLPRouter`` is MoEfication's
``Linear(d, E) -> Tanh -> Linear(E, E)`` on the L2-normalised input, with a
sigmoid on top (it is trained with BCE-with-logits, so the sigmoid of its
logits estimates the expert's normalised activation mass).
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections import OrderedDict
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import FFNBlock, find_ffn_blocks, linear_shape, weight_out_in

ROUTINGS = ("dense", "top_k", "threshold", "soft")


class Router(nn.Module, metaclass=ABCMeta):
    """Scores the experts of one FFN: ``forward(x)`` is ``sigmoid(logits(x))``, ``[..., E]`` in (0, 1).

    Subclasses set ``kind`` and implement ``logits`` and ``flops_per_token``.
    """

    kind: ClassVar[str]

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.d_model, self.num_experts = int(d_model), int(num_experts)

    @abstractmethod
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The experts' scores before the sigmoid: ``[..., d_model]`` -> ``[..., E]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

    @abstractmethod
    def flops_per_token(self) -> float:
        """FLOPs (2 x multiply-adds) of scoring one token."""

    def spec(self) -> dict[str, Any]:
        """What ``make_router`` needs to build an empty router of the same shape."""
        return {"type": self.kind, "d_model": self.d_model, "num_experts": self.num_experts}


class LTERouter(Router):
    """LTE's router: one linear layer, ``G(x)_e = sigmoid(x . w_e)`` for each expert independently."""

    kind = "lte"

    def __init__(self, d_model: int, num_experts: int):
        super().__init__(d_model, num_experts)
        self.proj = nn.Linear(d_model, num_experts, bias=False)

    def logits(self, x):
        return self.proj(x)

    def flops_per_token(self) -> float:
        return 2.0 * self.d_model * self.num_experts


class MLPRouter(Router):
    """MoEfication's router: ``Linear(d, H) -> Tanh -> Linear(H, E)`` on the L2-normalised FFN input.

    ``H`` (``hidden``) is ``E`` as built by moeify; it stays at the original
    ``E`` when experts are later pruned (``moeify/reap`` drops rows of ``fc2``
    only, so the remaining experts keep their scores).
    """

    kind = "mlp"

    def __init__(self, d_model: int, num_experts: int, hidden: int | None = None):
        super().__init__(d_model, num_experts)
        self.hidden = int(hidden) if hidden is not None else self.num_experts
        self.fc1 = nn.Linear(d_model, self.hidden, bias=False)
        self.fc2 = nn.Linear(self.hidden, num_experts, bias=False)

    def logits(self, x):
        return self.fc2(torch.tanh(self.fc1(F.normalize(x, dim=-1))))

    def flops_per_token(self) -> float:
        return 2.0 * (self.d_model * self.hidden + self.hidden * self.num_experts)

    def spec(self) -> dict[str, Any]:
        spec = super().spec()
        if self.hidden != self.num_experts:  # only pruned routers record it: older specs stay as they were
            spec["hidden"] = self.hidden
        return spec


ROUTERS: dict[str, type[Router]] = {"lte": LTERouter, "mlp": MLPRouter}


def make_router(spec: dict[str, Any]) -> Router:
    """A router from its ``spec()`` (weights uninitialised until loaded or fitted)."""
    extra = {"hidden": spec["hidden"]} if "hidden" in spec else {}
    return ROUTERS[spec["type"]](spec["d_model"], spec["num_experts"], **extra)


SelectionHook = Callable[["RoutedFFN", torch.Tensor, "torch.Tensor | None", torch.Tensor], None]


class RoutedFFN(nn.Module):
    """An FFN block split into equal experts of contiguous neurons, with a router (see the module docs).

    Args:
        kind: ``gated`` or ``plain``.
        parts: the projection modules by role (``gate`` (gated only), ``up``, ``down``).
        names: the attribute name of each role, and of the activation under ``act``.
        act: the activation module.
        router: a ``Router`` with ``num_experts = d_ff / expert_size``.
        expert_size: neurons per expert.
        routing, top_k, tau: the selection rule (see ``set_routing``).
        dropout: applied to the output in training (GPT-2's MLP has one), or ``None``.
    """

    def __init__(self, kind: str, parts: dict[str, nn.Module], names: dict[str, str], act: nn.Module,
                 router: Router, expert_size: int, routing: str = "dense", top_k: int | None = None,
                 tau: float = 0.5, dropout: nn.Module | None = None):
        super().__init__()
        self.kind = kind
        self.names = dict(names)
        for role, module in parts.items():
            setattr(self, names[role], module)
        setattr(self, names["act"], act)
        self.router = router
        self.dropout = dropout
        self.d_ff, self.d_model = linear_shape(parts["up"])
        self.expert_size = int(expert_size)
        if self.d_ff % self.expert_size:
            raise SparsifyError(f"d_ff {self.d_ff} is not a multiple of the expert size {expert_size}")
        self.num_experts = self.d_ff // self.expert_size
        if router.num_experts != self.num_experts:
            raise SparsifyError(f"router scores {router.num_experts} experts, the FFN has {self.num_experts}")
        self.path = "gather"  # or "masked": same function, every neuron computed
        self._selection_hooks: OrderedDict[int, SelectionHook] = OrderedDict()
        self.set_routing(routing, top_k=top_k, tau=tau)

    # -- parts ------------------------------------------------------------------

    def part(self, role: str) -> nn.Module | None:
        """The projection module of a role (``gate``, ``up``, ``down``) or the activation (``act``)."""
        name = self.names.get(role)
        return getattr(self, name) if name is not None else None

    def expert_slice(self, e: int) -> slice:
        """Expert ``e``'s neurons: rows of W_gate/W_up (W_fc1), columns of W_down."""
        return slice(e * self.expert_size, (e + 1) * self.expert_size)

    # -- routing ----------------------------------------------------------------

    def set_routing(self, routing: str, *, top_k: int | None = None, tau: float | None = None) -> None:
        """Choose the selection rule: ``dense``, ``top_k`` (needs ``top_k``), ``threshold`` (``tau``) or ``soft``."""
        if routing not in ROUTINGS:
            raise SparsifyError(f"unknown routing {routing!r}; expected one of {', '.join(ROUTINGS)}")
        if routing == "top_k" and not (top_k and 1 <= top_k <= self.num_experts):
            raise SparsifyError(f"top_k must be in 1..{self.num_experts} (experts of this FFN), got {top_k}")
        self.routing = routing
        self.top_k = int(top_k) if top_k is not None else None
        if tau is not None:
            self.tau = float(tau)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Router scores ``[..., E]`` in (0, 1)."""
        return self.router(x)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean ``[..., E]``: the experts each token uses under the current routing."""
        if self.routing == "top_k":
            top = scores.topk(self.top_k, dim=-1).indices
            return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        if self.routing == "threshold":
            return scores > self.tau
        return torch.ones_like(scores, dtype=torch.bool)

    def register_selection_hook(self, fn: SelectionHook) -> RemovableHandle:
        """Call ``fn(module, x, scores, selected)`` on every forward (``scores`` is ``None`` in ``dense``).

        ``selected`` is the boolean ``[..., E]`` of experts computed (all of
        them in ``dense`` and ``soft``); ``scores`` keeps its autograd graph,
        so a training penalty on it reaches the router.
        """
        handle = RemovableHandle(self._selection_hooks)
        self._selection_hooks[handle.id] = fn
        return handle

    def router_flops_per_token(self) -> float:
        """Router FLOPs per token (0 in ``dense``, where the router is not run)."""
        return 0.0 if self.routing == "dense" else self.router.flops_per_token()

    # -- compute ----------------------------------------------------------------

    def expert_intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """The un-routed intermediate ``x1`` of every neuron, ``[..., d_ff]`` (the dense FFN's)."""
        act, up, gate = self.part("act"), self.part("up"), self.part("gate")
        if gate is not None:
            return act(gate(x)) * up(x)
        return act(up(x))

    def _hooked(self) -> bool:
        down, up, gate = self.part("down"), self.part("up"), self.part("gate")
        return bool(down._forward_pre_hooks or down._forward_hooks or up._forward_hooks
                    or (gate is not None and gate._forward_hooks))

    def _masked(self, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        x1 = self.expert_intermediate(x)
        if weights is not None:
            x1 = x1 * weights.to(x1.dtype).repeat_interleave(self.expert_size, dim=-1)
        return self.part("down")(x1)

    def _gather(self, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Compute only the selected experts: per expert, its tokens through its weight slices."""
        act, up, down, gate = self.part("act"), self.part("up"), self.part("down"), self.part("gate")
        w_up, w_down = weight_out_in(up), weight_out_in(down)
        b_up, b_down = getattr(up, "bias", None), getattr(down, "bias", None)
        w_gate = weight_out_in(gate) if gate is not None else None
        b_gate = getattr(gate, "bias", None) if gate is not None else None
        x2 = x.reshape(-1, x.shape[-1])
        sel = selected.reshape(-1, selected.shape[-1])
        y = None
        for e in sel.any(dim=0).nonzero().flatten().tolist():
            idx = sel[:, e].nonzero().flatten()
            xe = x2.index_select(0, idx)
            s = self.expert_slice(e)
            u = F.linear(xe, w_up[s], None if b_up is None else b_up[s])
            if getattr(up, "output_relu", False):  # dReLU's up projection: ReLU on its output too
                u = torch.relu(u)
            if w_gate is None:
                h = act(u)
            else:  # gated: act(gate) * up
                h = act(F.linear(xe, w_gate[s], None if b_gate is None else b_gate[s])) * u
            ye = F.linear(h, w_down[:, s])
            if y is None:
                y = ye.new_zeros(x2.shape[0], w_down.shape[0])
            y.index_add_(0, idx, ye)
        if y is None:
            y = x2.new_zeros(x2.shape[0], w_down.shape[0])
        if b_down is not None:
            y = y + b_down.to(y.dtype)
        return y.reshape(*x.shape[:-1], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing == "dense":
            if self._selection_hooks:
                every = torch.ones(*x.shape[:-1], self.num_experts, dtype=torch.bool, device=x.device)
                for fn in list(self._selection_hooks.values()):
                    fn(self, x, None, every)
            y = self._masked(x, None)
        else:
            scores = self.scores(x)
            selected = self.select(scores)
            for fn in list(self._selection_hooks.values()):
                fn(self, x, scores, selected)
            if self.routing == "soft":
                y = self._masked(x, scores)
            elif self.path == "masked" or self._hooked():
                y = self._masked(x, selected)
            else:
                y = self._gather(x, selected)
        return self.dropout(y) if self.dropout is not None else y

    def extra_repr(self) -> str:
        rule = {"top_k": f"top_k={self.top_k}", "threshold": f"tau={self.tau}"}.get(self.routing, self.routing)
        return f"{self.kind}, {self.num_experts} experts x {self.expert_size} neurons, routing: {rule}"

    # -- construction -------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """JSON-serialisable structure (what ``from_config`` needs on a fresh dense block)."""
        return {"kind": self.kind, "names": self.names, "expert_size": self.expert_size,
                "routing": self.routing, "top_k": self.top_k, "tau": self.tau, "router": self.router.spec(),
                "dropout": self.dropout is not None}

    @staticmethod
    def _names(block: FFNBlock) -> dict[str, str]:
        prefix = f"{block.name}." if block.name else ""
        names = {}
        for role, path in block.module_names.items():
            rel = path[len(prefix):]
            if "." in rel:
                raise SparsifyError(f"{block.name}: the FFN's {role} projection is {rel}, not a direct "
                                    "attribute of the block; moeify supports FFN blocks that are their own module "
                                    "(LLaMA/Mistral/Qwen, GPT-2, GPT-NeoX)")
            names[role] = rel
        if block.activation_owner is not block.module:
            raise SparsifyError(f"{block.name}: the activation does not sit on the FFN block; moeify supports FFN "
                                "blocks that are their own module (LLaMA/Mistral/Qwen, GPT-2, GPT-NeoX)")
        names["act"] = block.activation_attr
        return names

    @classmethod
    def from_config(cls, block: FFNBlock, config: dict[str, Any]) -> "RoutedFFN":
        """Wrap a block whose weights are (or will be loaded) already permuted; a fresh router."""
        dropout = getattr(block.module, "dropout", None) if config.get("dropout") else None
        return cls(config["kind"], block.projections(), config["names"], block.activation,
                   make_router(config["router"]), config["expert_size"], config["routing"], config["top_k"],
                   config["tau"], dropout)

    @classmethod
    def from_block(cls, block: FFNBlock, labels: torch.Tensor, router: Router, expert_size: int) -> "RoutedFFN":
        """Permute ``block``'s neurons so expert ``labels[j]`` holds neuron ``j``, and wrap it (routing ``dense``).

        Checks on a random input that the block module computes nothing but
        its FFN (an FFN inlined in its transformer layer, as in OPT or BERT,
        cannot be wrapped) and that the wrapped, un-routed block computes
        what the dense one did.
        """
        names = cls._names(block)
        labels = labels.to(torch.long).cpu()
        if labels.numel() != block.d_ff or torch.bincount(labels).ne(expert_size).any():
            raise SparsifyError(f"{block.name}: labels must put exactly {expert_size} of the {block.d_ff} "
                                "neurons in each expert")
        perm = torch.argsort(labels, stable=True)
        w = block.weight("up")
        x = torch.randn(3, block.d_model, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
        training = block.module.training
        block.module.eval()
        try:
            with torch.no_grad():
                before = block.module(x)
        except Exception as exc:  # noqa: BLE001 - any failure means "not a standalone FFN"
            raise SparsifyError(f"{block.name}: its module does not compute the FFN alone ({exc.__class__.__name__}); "
                                "moeify supports FFN blocks that are their own module") from None
        finally:
            block.module.train(training)
        before = before[0] if isinstance(before, tuple) else before
        with torch.no_grad():
            reference = block.forward(x)
            if before.shape != reference.shape or not _same_output(before, reference):
                raise SparsifyError(f"{block.name}: its module computes more than down(act(...)) (norms, residuals?); "
                                    "moeify supports FFN blocks that are their own module")
            permute_neurons(block, perm)
        dropout = getattr(block.module, "dropout", None)
        dropout = dropout if isinstance(dropout, nn.Dropout) else None
        module = cls(block.kind, block.projections(), names, block.activation, router.to(w.device, w.dtype),
                     expert_size, "dense", dropout=dropout)
        module.train(training)
        with torch.no_grad():
            module.eval()
            after = module(x)
            module.train(training)
        if not _same_output(after, reference):
            raise SparsifyError(f"{block.name}: the MoE FFN does not reproduce the dense FFN (max difference "
                                f"{float((after - reference).abs().max()):.3g})")
        return module


def _same_output(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding: differences within 1e-4 of the output's largest magnitude.

    Element-wise ``allclose`` is wrong here: summing thousands of neuron terms in
    another order moves a near-zero output by rounding errors of the *large*
    terms (SmolLM2's layer 9 under co-activation experts: 8.5e-4 where
    the output reaches hundreds), while a wrong permutation errs by O(1).
    """
    if not b.numel():
        return True
    return bool((a - b).abs().max() <= 1e-4 * float(b.abs().max()) + 1e-6)


@torch.no_grad()
def permute_neurons(block: FFNBlock, perm: torch.Tensor) -> None:
    """Reorder an FFN's neurons in place: rows of W_gate/W_up (and their biases), columns of W_down.

    The FFN computes the same function; neuron ``perm[i]`` becomes neuron ``i``.
    """
    perm = perm.to(block.weight("up").device)
    for role in ("gate", "up"):
        module = block.projections().get(role)
        if module is None:
            continue
        w = weight_out_in(module)
        w.copy_(w[perm].clone())
        b = getattr(module, "bias", None)
        if b is not None:
            b.copy_(b[perm].clone())
    w = weight_out_in(block.down)
    w.copy_(w[:, perm].clone())


def routed_modules(model) -> list[RoutedFFN]:
    """The model's routed FFNs, in layer order."""
    return [b.module for b in find_ffn_blocks(model) if isinstance(b.module, RoutedFFN)]
