"""Layer-by-layer calibration: run a model's transformer layers one at a time over calibration data.

Every method that needs the inputs of Linear layers (Wanda, SparseGPT, OWL,
and later MoEfication and CATS) goes through here, so that calibrating a 7B
model needs one layer's worth of hidden states, never the whole model's
activations:

1. The inputs of the first transformer layer are captured batch by batch: a
   forward pre-hook (with kwargs) on that layer stores its hidden states and
   whatever else the model passes it (attention mask, position embeddings,
   position ids...), then aborts the forward with an exception, so nothing
   after the embeddings runs.
2. Layer by layer, ``visit(layer)`` is called. It may call
   ``layer.observe(fn)`` to run the layer over every calibration batch while
   ``fn`` sees the input of each Linear/Conv1D inside it, and it may change the
   layer (prune, reconstruct, swap modules).
3. The (possibly changed) layer is then run over every batch and its outputs
   overwrite its inputs in place: they are the next layer's inputs. So each
   layer is calibrated on the outputs of the layers already processed, as the
   Wanda and SparseGPT reference implementations do.

With ``model.offload`` (``sparsify_core.offload``) the layers live off the
device: each one is held on it only while it is visited and re-run, so the
device holds one layer plus the calibration hidden states. ``DevicePeak``
records the peak of what the device holds (``device_memory_mb``).

Assumption, true of transformers decoder and encoder layers: a layer's output
is its first return value (a tensor, or the first element of a tuple) and has
the shape of its hidden-state input.
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .ffn import is_linear, transformer_layers
from .offload import Offload, device_bytes

# fn(names, x): ``names`` are the modules that received the very tensor ``x`` in
# this batch (q/k/v share one input, gate/up another); ``x`` is [tokens, in_features].
InputObserver = Callable[[tuple[str, ...], torch.Tensor], None]


class _Captured(Exception):
    """Raised by the capture hook to stop a forward pass once the first layer's inputs are stored."""


class _AllSeen(Exception):
    """Raised by an observing hook once every observed module of a layer has had its input."""


def _same(a: Any, b: Any) -> bool:
    """Structural equality of layer arguments (tensors compared by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a is b or a == b)
    except Exception:  # objects without a usable __eq__
        return False


@dataclass
class LayerInputs:
    """The current layer's inputs over all calibration batches.

    ``hidden`` is ``[samples, seq_len, hidden]`` (one buffer, overwritten by
    each layer's outputs); ``extras[i]`` is ``(args, kwargs)``, the remaining
    positional and keyword arguments of batch ``i`` (batches with equal
    arguments share one object, so per-batch attention masks cost memory once).
    """

    hidden: torch.Tensor
    batch_size: int
    extras: list[tuple[tuple, dict]] = field(default_factory=list)

    def batches(self) -> Iterable[tuple[slice, tuple, dict]]:
        for i, (args, kwargs) in enumerate(self.extras):
            yield slice(i * self.batch_size, (i + 1) * self.batch_size), args, kwargs

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]

    def nbytes(self) -> int:
        """Bytes of the hidden states and of the distinct tensors among the batches' other arguments."""
        seen: dict[int, int] = {}

        def walk(x):
            if isinstance(x, torch.Tensor):
                seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            elif isinstance(x, (tuple, list)):
                for y in x:
                    walk(y)
            elif isinstance(x, dict):
                for y in x.values():
                    walk(y)

        walk(self.hidden)
        for extra in {id(e): e for e in self.extras}.values():
            walk(extra)
        return sum(seen.values())


def _forward_kwargs(model: nn.Module) -> dict:
    """``use_cache=False`` where the model takes it: a KV cache would grow across layer re-runs."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtin forwards
        return {}
    if "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    return {}


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8,
                               layer: nn.Module | None = None) -> LayerInputs:
    """The inputs of the first transformer layer for every batch of ``input_ids`` (``[samples, seq_len]``).

    Runs the model batch by batch with a forward pre-hook on ``layer``
    (default: the first of ``transformer_layers(model)``) that stores the
    layer's arguments and aborts the forward. ``input_ids`` should be on the
    model's device; the hidden states stay there.
    """
    if layer is None:
        layer = transformer_layers(model)[0][1]
    n = input_ids.shape[0]
    hidden: torch.Tensor | None = None
    extras: list[tuple[tuple, dict]] = []
    box: dict[str, Any] = {}

    def hook(_module, args, kwargs):
        if args:
            box["x"], box["args"], box["kwargs"] = args[0], tuple(args[1:]), dict(kwargs)
        else:
            kwargs = dict(kwargs)
            box["x"], box["args"], box["kwargs"] = kwargs.pop("hidden_states"), (), kwargs
        raise _Captured

    extra_kwargs = _forward_kwargs(model)
    # prepended: it stops the forward before any other pre-hook (offload's) moves the layer to the device
    handle = layer.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        for start in range(0, n, batch_size):
            box.clear()
            try:
                model(input_ids=input_ids[start:start + batch_size], **extra_kwargs)
            except _Captured:
                pass
            if "x" not in box:
                raise RuntimeError("the first transformer layer was never called by the model's forward")
            x = box["x"]
            if hidden is None:
                hidden = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
            hidden[start:start + x.shape[0]] = x
            extra = (box["args"], box["kwargs"])
            for prev in extras[-1:] + extras[:1]:  # batches of one shape usually share every argument
                if _same(prev, extra):
                    extra = prev
                    break
            extras.append(extra)
    finally:
        handle.remove()
    assert hidden is not None
    return LayerInputs(hidden, batch_size, extras)


def _output_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass(eq=False)
class CalibrationLayer:
    """One transformer layer during layer-wise calibration.

    Attributes:
        index: position among the model's transformer layers.
        name: module path (``model.layers.3``).
        module: the layer module.
        linears: Linear/Conv1D modules inside it, by full module path.
        inputs: the layer's inputs (hidden states of every calibration batch).
    """

    index: int
    name: str
    module: nn.Module
    linears: dict[str, nn.Module]
    inputs: LayerInputs

    @property
    def tokens(self) -> int:
        """Calibration tokens the layer sees."""
        return self.inputs.tokens

    @torch.no_grad()
    def observe(self, fn: InputObserver, modules: Iterable[str] | None = None) -> None:
        """Run the layer over every calibration batch; ``fn`` sees the inputs of ``modules``.

        ``modules`` are full paths among ``linears`` (default: all). For each
        batch, ``fn(names, x)`` is called once per distinct input tensor, with
        every observed module that received it (``q_proj``, ``k_proj`` and
        ``v_proj`` share one) and ``x`` reshaped to ``[tokens, in_features]``,
        in the layer's dtype. The forward of a batch stops as soon as every
        observed module has had its input, so the rest of the layer is not
        computed. The layer's outputs are discarded: this changes nothing.
        """
        names = list(self.linears) if modules is None else list(modules)
        unknown = [n for n in names if n not in self.linears]
        if unknown:
            raise KeyError(f"not Linear modules of layer {self.name}: {unknown}")
        seen: list[tuple[torch.Tensor, int, list[str]]] = []  # (input, its version, modules that got it)
        got: set[str] = set()

        def make_hook(name: str):
            def hook(_module, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                for t, _, group in seen:
                    if t is x:
                        group.append(name)
                        break
                else:
                    seen.append((x, x._version, [name]))
                got.add(name)
                if len(got) == len(names):
                    raise _AllSeen
            return hook

        handles = [self.linears[n].register_forward_pre_hook(make_hook(n), with_kwargs=True) for n in names]
        try:
            for rows, args, kwargs in self.inputs.batches():
                seen.clear()
                got.clear()
                try:
                    self.module(self.inputs.hidden[rows], *args, **kwargs)
                except _AllSeen:
                    pass
                for x, version, group in seen:
                    if x._version != version:  # fn would see a value the module never saw
                        raise RuntimeError(f"{self.name}: the input of {group[0]} was modified in place "
                                           "during the forward; cannot observe it")
                    fn(tuple(group), x.reshape(-1, x.shape[-1]))
                seen.clear()
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def advance(self) -> None:
        """Run the layer over every batch, overwriting its inputs with its outputs (the next layer's inputs)."""
        hidden = self.inputs.hidden
        for rows, args, kwargs in self.inputs.batches():
            out = _output_tensor(self.module(hidden[rows], *args, **kwargs))
            if out.shape != hidden[rows].shape:
                raise RuntimeError(f"{self.name}: output shape {tuple(out.shape)} differs from its input's "
                                   f"{tuple(hidden[rows].shape)}")
            hidden[rows] = out


@dataclass
class DevicePeak:
    """The most bytes a calibration held on the compute device: model tensors there plus calibration buffers.

    A tensor-bytes probe (``offload.device_bytes`` plus the hidden states and
    per-batch arguments), sampled after the first layer's inputs are captured
    and after each layer's visit, while that layer is on the device. It leaves
    out what one batch's forward through one layer allocates and frees again
    (and a method's own statistics, such as SparseGPT's Hessians), so it is a
    lower bound of the allocator's peak; it is the same on CPU and GPU, which
    is what lets an in-memory and an offloaded run be compared on a CPU.
    """

    bytes: int = 0

    def sample(self, model: nn.Module, device: torch.device, inputs: "LayerInputs", offload: Offload | None) -> None:
        self.bytes = max(self.bytes, device_bytes(model, device, offload) + inputs.nbytes())

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


def _no_progress(description: str, total: float | None = None):
    class _Task:
        def advance(self, n: float = 1, **fields) -> None: ...
    return nullcontext(_Task())


@torch.no_grad()
def calibrate_layerwise(model: nn.Module, input_ids: torch.Tensor, visit: Callable[[CalibrationLayer], None], *,
                        batch_size: int = 8, layers: list[tuple[str, nn.Module]] | None = None,
                        progress: Callable | None = None, description: str = "calibrate",
                        offload: Offload | None = None, peak: DevicePeak | None = None) -> int:
    """Call ``visit`` on each transformer layer in order, feeding each the outputs of the ones before.

    ``input_ids`` (``[samples, seq_len]``, on the model's device) is cut into
    batches of ``batch_size``. ``visit(layer)`` receives a ``CalibrationLayer``:
    it may ``observe`` the inputs of the layer's Linear modules (any number of
    times) and change the layer; after it returns, the layer is run once more
    and its outputs become the next layer's inputs. ``layers`` defaults to
    ``transformer_layers(model)``; ``progress`` is a ``ctx.progress``-like
    context-manager factory. Memory: one layer's hidden states (updated in
    place) plus what one batch's forward through one layer needs, plus the
    model's weights on the device: all of them, or with ``offload`` (the
    model's ``Offload``) only what lives outside the layers and the layer
    being visited, held there from ``visit`` to its re-run. ``peak``, when
    given, records the most the device held (``DevicePeak``). The model
    is put in eval mode for the duration (its modes are restored). Returns the
    number of calibration tokens.
    """
    layers = transformer_layers(model) if layers is None else layers
    progress = progress or _no_progress
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        inputs = capture_first_layer_inputs(model, input_ids, batch_size=batch_size, layer=layers[0][1])
        device = inputs.hidden.device
        if peak is not None:
            peak.sample(model, device, inputs, offload)
        with progress(description, total=len(layers)) as task:
            for index, (name, module) in enumerate(layers):
                with offload.held(name, module) if offload is not None else nullcontext():
                    linears = {f"{name}.{sub}": m for sub, m in module.named_modules() if sub and is_linear(m)}
                    layer = CalibrationLayer(index, name, module, linears, inputs)
                    visit(layer)
                    if peak is not None:
                        peak.sample(model, device, inputs, offload)
                    if index + 1 < len(layers):  # the last layer's outputs feed nothing we calibrate
                        layer.advance()
                task.advance(1)
        return inputs.tokens
    finally:
        if offload is not None:
            offload.release()
        for m, mode in modes.items():
            m.training = mode


def calibrate(ctx, visit: Callable[[CalibrationLayer], None], *, split: str = "calibration",
              batch_size: int = 8, description: str = "calibrate") -> int:
    """``calibrate_layerwise`` on ``ctx.model`` over the ``split`` data split, with ``ctx.progress``.

    Uses the run's offload (``ctx.offload``) and records the device peak in ``ctx.device_peak``.
    """
    ids = ctx.split(split).input_ids.to(ctx.device)
    return calibrate_layerwise(ctx.model, ids, visit, batch_size=batch_size, progress=ctx.progress,
                               description=description, offload=ctx.offload, peak=ctx.device_peak)
