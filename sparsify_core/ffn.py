"""FFN blocks: the one way every method and metric finds them and hooks their activations.

Notation (see ``docs/methods.md#notation``). Gated FFN (LLaMA, Mistral, Qwen, SmolLM):
``x1 = act(x W_gate^T) * (x W_up^T)``, ``y = x1 W_down^T``. Plain FFN (GPT-2,
OPT, BERT, GPT-NeoX, Phi): ``x1 = act(x W_fc1^T + b1)``, ``y = x1 W_fc2^T + b2``.
``x1`` (the "intermediate activation") is exactly the input of the down
projection, which is where ``capture_intermediates`` hooks it.

Blocks are matched by *structure* (attribute names and shapes), never by model
class name, so an unseen architecture with a known layout works. Also here:
the transformer layers that hold the blocks, and the Linear/Conv1D modules
inside them (``prunable_modules``), the set that weight pruning targets.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal

import torch
from torch import nn

from .errors import SparsifyError


# -- linear-like modules --------------------------------------------------------
# Three kinds of module compute a linear layer ``y = x W^T + b`` with ``W`` of
# shape ``[out, in]``, and every method and metric reads them through the
# functions below, never through ``module.weight`` directly:
#
# - ``nn.Linear``: ``weight`` is ``[out, in]``.
# - Conv1D-like (``nf``/``nx`` and a tensor ``weight`` stored ``[in, out]``):
#   GPT-2's ``Conv1D``, sparsify's ``TransposedLinear``.
# - stored linear (the *stored-linear protocol*): a module holding ``W`` in
#   some other storage (a sparse layout), which has ``in_features`` and
#   ``out_features`` (ints) and a method ``dense_weight()`` returning the
#   logical weight as a new dense ``[out, in]`` tensor (zeros where the storage
#   holds none). It counts as the dense matrix it stores: same shape, same
#   non-zeros, so a conversion to it changes no measurement. Its weight cannot
#   be written through ``weight_out_in``, so pruning happens before the
#   conversion (``prunable_modules`` lists it only when asked: ``stored=True``).


def zero_small_inputs(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x`` with the entries ``|x| < threshold`` set to zero (same shape and dtype); ``x`` itself when ``threshold <= 0``.

    The input rule of a projection that carries ``input_threshold`` (TEAL, Liu et al.
    2025): its own module and its input-sparse fast module both apply it, identically."""
    if threshold <= 0:
        return x
    return x * (x.abs() >= threshold).to(x.dtype)


def input_threshold(module: nn.Module) -> float | None:
    """The magnitude threshold a projection applies to its own input (``input_threshold``, TEAL), else ``None``.

    Read by structure (a float attribute), so any module may carry the rule:
    metrics and kernels that see it count or skip the zeroed inputs."""
    t = getattr(module, "input_threshold", None)
    return float(t) if isinstance(t, float) else None


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2 style ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    cls = _conv1d_class()
    return (cls is not None and isinstance(module, cls)) or (
        hasattr(module, "nf") and hasattr(module, "nx") and isinstance(getattr(module, "weight", None), torch.Tensor))


def is_stored_linear(module: nn.Module) -> bool:
    """True for modules of the stored-linear protocol (``dense_weight()``, ``in_features``, ``out_features``)."""
    return (callable(getattr(module, "dense_weight", None)) and hasattr(module, "in_features")
            and hasattr(module, "out_features"))


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear``, ``Conv1D`` and stored linears: the weight matrices pruning, layouts and metrics see."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_stored_linear(module)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(out_features, in_features)`` of a linear-like module, whatever its weight orientation.

    Reads ``nf``/``nx`` (Conv1D), then ``out_features``/``in_features`` (Linear,
    stored linears and modules that mimic them), then a 2-D ``weight``; ``None``
    if none apply.
    """
    if is_conv1d(module):
        return int(module.nf), int(module.nx)
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return int(module.out_features), int(module.in_features)
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[0]), int(w.shape[1])
    return None


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``[out, in]``.

    A transposed *view* for Conv1D and the parameter itself for Linear (edits
    write through); for a stored linear, its ``dense_weight()``: a new tensor,
    to read only (edits do not reach the module).
    """
    if is_stored_linear(module):
        return module.dense_weight()
    w = module.weight
    return w.t() if is_conv1d(module) else w


def weight_numel(module: nn.Module) -> int:
    """Entries of a linear-like module's logical ``[out, in]`` weight (stored zeros or not)."""
    out, inp = linear_shape(module)
    return out * inp


# -- FFN blocks -----------------------------------------------------------------

Role = Literal["gate", "up", "down"]


@dataclass(frozen=True)
class _Pattern:
    """One known FFN layout: dotted attribute paths relative to the block module."""

    kind: Literal["gated", "plain"]
    up: str
    down: str
    act: str
    gate: str | None = None
    seen_in: str = ""


# Order matters only for modules matching several patterns (none known).
PATTERNS: tuple[_Pattern, ...] = (
    _Pattern("gated", "up_proj", "down_proj", "act_fn", gate="gate_proj",
             seen_in="LLaMA, Mistral, Qwen2/3, SmolLM, Gemma"),
    _Pattern("plain", "c_fc", "c_proj", "act", seen_in="GPT-2 (Conv1D)"),
    _Pattern("plain", "intermediate.dense", "output.dense", "intermediate.intermediate_act_fn",
             seen_in="BERT, RoBERTa, MiniLM"),
    _Pattern("plain", "dense_h_to_4h", "dense_4h_to_h", "act", seen_in="GPT-NeoX, Pythia"),
    _Pattern("plain", "fc1", "fc2", "activation_fn", seen_in="OPT, Phi"),
)


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass(eq=False)
class FFNBlock:
    """One FFN of a transformer layer, with handles on its parts.

    Attributes:
        name: module path of the block (``model.layers.3.mlp``; for OPT and
            BERT, whose FFN parts sit on the layer, the layer's path).
        index: position among the model's FFN blocks, in layer order.
        kind: ``gated`` or ``plain``.
        module: the block module itself.
        up: the input projection (up_proj / fc1 / c_fc / intermediate.dense).
        down: the output projection (down_proj / fc2 / c_proj / output.dense).
        gate: the gate projection (gated blocks only, else ``None``).
        activation_owner, activation_attr: where the activation lives
            (``set_activation`` replaces it there).
        module_names: full module path of each projection, by role
            (``gate``/``up``/``down``): masks are keyed ``f"{path}.weight"``.
    """

    name: str
    index: int
    kind: Literal["gated", "plain"]
    module: nn.Module
    up: nn.Module
    down: nn.Module
    gate: nn.Module | None
    activation_owner: nn.Module
    activation_attr: str
    module_names: dict[str, str]

    @property
    def activation(self):
        """The current activation module (or function)."""
        return getattr(self.activation_owner, self.activation_attr)

    def set_activation(self, module: nn.Module) -> None:
        """Replace the activation, on whichever module owns it."""
        setattr(self.activation_owner, self.activation_attr, module)

    @property
    def d_model(self) -> int:
        """Width of the FFN input and output (hidden size)."""
        return linear_shape(self.up)[1]

    @property
    def d_ff(self) -> int:
        """Number of FFN neurons (intermediate size)."""
        return linear_shape(self.up)[0]

    def in_projections(self) -> list[nn.Module]:
        """The projections applied to the block input: ``[gate, up]`` or ``[up]``."""
        return [self.gate, self.up] if self.gate is not None else [self.up]

    def projections(self) -> dict[str, nn.Module]:
        """Every projection by role: ``gate`` (gated only), ``up``, ``down``."""
        out = {"gate": self.gate} if self.gate is not None else {}
        out.update(up=self.up, down=self.down)
        return out

    def weight(self, role: Role) -> torch.Tensor:
        """A projection's weight as ``[out, in]`` (a view for Conv1D).

        Neuron ``j`` is row ``j`` of ``weight("gate")``/``weight("up")`` and
        column ``j`` of ``weight("down")``.
        """
        module = self.projections().get(role)
        if module is None:
            raise KeyError(f"{self.name} ({self.kind}) has no {role!r} projection")
        return weight_out_in(module)

    def intermediate(self, h: torch.Tensor) -> torch.Tensor:
        """``x1`` computed from the block's parts for input ``h`` of shape ``[..., d_model]``."""
        act = self.activation
        if self.gate is not None:
            return act(self.gate(h)) * self.up(h)
        return act(self.up(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The FFN output ``down(x1)`` (no residual, norm or dropout of the enclosing layer)."""
        return self.down(self.intermediate(h))


def _match(module: nn.Module, pattern: _Pattern):
    parts = {"up": _get_path(module, pattern.up), "down": _get_path(module, pattern.down)}
    if pattern.gate is not None:
        parts["gate"] = _get_path(module, pattern.gate)
    if not all(isinstance(p, nn.Module) for p in parts.values()):
        return None
    owner_path, _, attr = pattern.act.rpartition(".")
    owner = _get_path(module, owner_path) if owner_path else module
    if owner is None or not callable(getattr(owner, attr, None)):
        return None
    shapes = {role: linear_shape(p) for role, p in parts.items()}
    if any(s is None for s in shapes.values()):
        return None
    d_ff, d_model = shapes["up"]
    if shapes["down"] != (d_model, d_ff):  # e.g. GPT-2 attention has c_proj but no c_fc anyway
        return None
    if pattern.gate is not None and shapes["gate"] != (d_ff, d_model):
        return None
    return parts, owner, attr


def find_ffn_blocks(model: nn.Module) -> list[FFNBlock]:
    """The FFN blocks of ``model`` in layer order.

    Raises ``SparsifyError`` naming every layout looked for when there is none.
    """
    blocks: list[FFNBlock] = []
    matched: list[str] = []
    for name, module in model.named_modules():
        if any(name == m or name.startswith(m + ".") for m in matched):
            continue  # inside a block already found
        for pattern in PATTERNS:
            hit = _match(module, pattern)
            if hit is None:
                continue
            parts, owner, attr = hit
            prefix = f"{name}." if name else ""
            paths = {"up": pattern.up, "down": pattern.down}
            if pattern.gate is not None:
                paths = {"gate": pattern.gate, **paths}
            blocks.append(FFNBlock(
                name=name, index=len(blocks), kind=pattern.kind, module=module, up=parts["up"],
                down=parts["down"], gate=parts.get("gate"), activation_owner=owner, activation_attr=attr,
                module_names={role: prefix + p for role, p in paths.items()}))
            matched.append(name)
            break
    if not blocks:
        looked = "; ".join(
            f"{'/'.join(x for x in (p.gate, p.up, p.down, p.act) if x)} ({p.seen_in})" for p in PATTERNS)
        raise SparsifyError(f"no FFN blocks found in {type(model).__name__}: looked for modules with {looked}")
    return blocks


@contextmanager
def capture_intermediates(blocks: Iterable[FFNBlock],
                          fn: Callable[[FFNBlock, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(block, x1)`` with each block's intermediate activation during forwards.

    ``x1`` is the very tensor the down projection receives (shape ``[...,
    d_ff]``, tokens on the leading dimensions: ``[batch, seq, d_ff]`` for most
    models, ``[batch*seq, d_ff]`` for OPT), so gradients flow through it (an
    L1 penalty on it trains the model). ``fn``'s return value is ignored: to
    change the activation, use ``FFNBlock.set_activation``. The hooks are
    forward pre-hooks on each ``down`` module, removed on exit, even on error.
    """
    handles = []

    def make_hook(block: FFNBlock):
        def hook(module, args, kwargs):
            x1 = args[0] if args else next(iter(kwargs.values()))
            fn(block, x1)
        return hook

    try:
        for block in blocks:
            handles.append(block.down.register_forward_pre_hook(make_hook(block), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


# -- transformer layers and prunable modules --------------------------------------

def transformer_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer layers holding the FFN blocks, as ``(path, module)`` in order.

    A layer is the nearest ancestor of an FFN block (or the block itself) that
    is an element of an ``nn.ModuleList`` (``model.layers.3``,
    ``transformer.h.3``, ``encoder.layer.3``). A block with no such ancestor
    counts as its own layer.
    """
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for block in find_ffn_blocks(model):
        path = block.name
        layer = block.name
        while path:
            parent = path.rpartition(".")[0]
            if isinstance(modules.get(parent), nn.ModuleList):
                layer = path
                break
            path = parent
        out.setdefault(layer, modules[layer])
    return list(out.items())


def _compile(patterns: Iterable[str], what: str) -> list[re.Pattern]:
    try:
        return [re.compile(p) for p in patterns]
    except re.error as exc:
        raise SparsifyError(f"invalid {what} regex: {exc}") from None


def prunable_modules(model: nn.Module, targets: Iterable[str] | None = None,
                     exclude: Iterable[str] = ("lm_head",), *, stored: bool = False) -> list[tuple[str, nn.Module]]:
    """Linear/Conv1D modules that weight pruning targets, as ``(path, module)``.

    Default (``targets=None``): every Linear/Conv1D inside the transformer
    layers (attention and FFN projections; never embeddings, the LM head or a
    pooler). With ``targets``, every Linear/Conv1D of the whole model whose
    path matches one of the regexes (``re.search``). Modules whose path
    matches an ``exclude`` regex are dropped in both cases. Shared weights are
    listed once. ``stored=True`` also lists the stored linears (weights held
    in a sparse layout) in their place: metrics measure them as the Linear
    they replaced, while pruning and layout conversion, which cannot change a
    stored weight, leave them out.
    """
    inc = None if targets is None else _compile(targets, "targets")
    exc = _compile(exclude, "exclude")
    if inc is None:
        roots = [p for p, _ in transformer_layers(model)]
        inside = lambda n: any(n.startswith(r + ".") for r in roots)  # noqa: E731
    else:
        inside = lambda n: any(r.search(n) for r in inc)  # noqa: E731
    out, seen = [], set()
    for name, module in model.named_modules():
        if not is_linear(module) or not inside(name) or any(r.search(name) for r in exc):
            continue
        if is_stored_linear(module) and not stored:
            continue
        key = id(getattr(module, "weight", module))  # a tied weight is one matrix
        if key in seen:
            continue
        seen.add(key)
        out.append((name, module))
    return out
