"""Modules that compute with sparse layouts, and the one policy for falling back.

- ``SparseLinear``: a Linear whose weight is held in a weight layout (any
  ``sparsify_core.Layout``: CSR, BSR, n:m, n:m:g or a plugin's) as buffers;
  computes with the layout's kernel (``Layout.kernel``), else densely.
- ``TransposedLinear``: a Linear stored ``[in, out]`` (like transformers'
  ``Conv1D``, so the engine reads it as a linear layer); when its input has
  few tokens it reads only the rows of non-zero inputs (the down projection
  of an activation-sparse FFN).
- ``ActivationSparseFFN``: a gated FFN block (gate/up/down/act) that computes
  the gate, then only the active neurons' up rows and down rows; with an
  ``ActivationPredictor`` (approximate), only the predicted neurons' gate rows.
  An up projection marked ``output_relu`` (dReLU) has its value rectified too.
- ``InputSparseLinear``: a ``TransposedLinear`` that first zeroes inputs with
  ``|x| < input_threshold`` (TEAL), so the input-sparse GEMV skips the weight
  rows of the zeroed inputs.
- ``MoEFFN``: a ``RoutedFFN`` (``plugins/moeify``) whose weights are stored by
  neuron rows (W_down transposed), so each token reads only its selected
  experts' gate, up and down rows.

Fast paths are taken only in inference (no autograd graph) and when nobody
hooks the inner modules (metrics that capture activations get the dense
path, which computes the same thing). Where no fast kernel exists for the
device or dtype, each module computes densely and warns once; with strict
mode (``strict=True`` or ``SPARSIFY_STRICT=1``) it raises instead. It never
computes something else.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from sparsify_core import Layout
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import input_threshold, zero_small_inputs
from sparsify_core.layout import find_layout
from sparsify_kernels import ffn as ffn_kernels
from sparsify_plugins.moeify.modules import LTERouter, RoutedFFN, Router

_warned: set[str] = set()


def strict_mode(flag: bool = False) -> bool:
    """Strict when asked by the stage or by ``SPARSIFY_STRICT=1``."""
    return flag or os.environ.get("SPARSIFY_STRICT") == "1"


def fallback(what: str, why: str, strict: bool) -> None:
    """Dense fallback: an error in strict mode, else one warning per (module kind, reason)."""
    if strict_mode(strict):
        raise SparsifyError(f"{what}: no fast kernel {why} (strict mode); run without strict to compute densely")
    key = f"{what}|{why}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"sparsify: {what} has no fast kernel {why}; computing densely (same result, no speedup)",
                      RuntimeWarning, stacklevel=3)


def _inference(x: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and x.requires_grad)


def _module_hooks(*modules: nn.Module) -> bool:
    """True when calling these modules would run a forward hook: their own or a global one."""
    from torch.nn.modules import module as M
    return bool(M._global_forward_hooks or M._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def _triton_ok(x: torch.Tensor) -> bool:
    if x.device.type != "cuda":
        return False
    from sparsify_kernels import triton_kernels
    return triton_kernels.available()


def _plain_linear(like: nn.Module, weight_out_in: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A copy of ``like`` (an ``nn.Linear`` or ``Conv1D`` of a plain model, on meta) holding this weight and bias.

    The plain-form protocol (``sparsify_core.plain``); ``ValueError`` when
    ``like`` is not linear or the shapes or the bias do not fit."""
    import copy

    from sparsify_core.ffn import is_conv1d

    conv1d = is_conv1d(like)
    if not (conv1d or isinstance(like, nn.Linear)):
        raise ValueError(f"plain transformers has a {type(like).__name__} here, not a linear layer")
    w = weight_out_in.detach().t() if conv1d else weight_out_in.detach()
    if tuple(w.shape) != tuple(like.weight.shape):
        raise ValueError(f"weight {list(w.shape)} where plain transformers has {list(like.weight.shape)}")
    if (bias is None) != (getattr(like, "bias", None) is None):
        raise ValueError("bias " + ("missing" if bias is None else "where plain transformers has none"))
    new = copy.deepcopy(like)
    new.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return new


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored in a weight layout (buffers named after its tensors).

    Any ``sparsify_core.Layout`` works, built-in or from a plugin: the module
    keeps the layout's name and params, finds the class in the plugin catalog
    when rebuilt by name (``empty``), and computes with the layout's
    ``kernel(device, dtype)`` in inference; where the layout has none (or it
    declines an input) it computes densely under the ``fallback`` policy, and
    always densely when autograd records.

    A stored linear (``sparsify_core.ffn``): ``dense_weight()`` gives ``W``
    back, so the engine and metrics see it as the Linear it replaced.
    """

    def __init__(self, layout: Layout, bias: torch.Tensor | None = None, strict: bool = False):
        super().__init__()
        self.layout_cls = type(layout)
        self.layout_name = layout.name
        self.layout_params = layout.params
        self.out_features, self.in_features = layout.shape
        self.strict = strict
        for k, t in layout.tensors().items():
            self.register_buffer(k, t)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._kernels: dict = {}  # (device, dtype) -> the layout's kernel or None, built on first use
        self._dense = self._last = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module._forget())

    def _forget(self) -> None:
        self._kernels, self._dense, self._last = {}, None, None  # _last: (dtype, kernel) of the last CPU call

    def _apply(self, fn, *args, **kwargs):
        self._forget()  # storage moved or cast: kernels packed from the old tensors are stale
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        return {**super().__getstate__(), "_kernels": {}, "_dense": None, "_last": None}  # copies pack their own

    def dense_weight(self) -> torch.Tensor:
        """The weight as a new dense ``[out_features, in_features]`` tensor, bit for bit.

        The stored-linear protocol of ``sparsify_core.ffn``: metrics and
        ``weight_out_in`` read this module as the Linear it replaced.
        """
        return self.layout().to_dense()

    def layout(self) -> Layout:
        """The layout object over this module's buffers."""
        return self.layout_cls.from_tensors((self.out_features, self.in_features), self.layout_params,
                                            {k: getattr(self, k) for k in self.layout_cls.names})

    @classmethod
    def empty(cls, layout_name: str, params, shape, storage: dict, has_bias: bool, dtype, strict=False):
        """A module with zero-filled storage of the recorded shapes (filled by ``load_state_dict``).

        ``layout_name`` is looked up in the plugin catalog (``SparsifyError`` if
        no installed plugin provides it); ``storage`` is ``storage_spec()``."""
        layout_cls = find_layout(layout_name)
        tensors = {k: torch.zeros(s, dtype=getattr(torch, dt)) for k, (s, dt) in storage.items()}
        bias = torch.zeros(shape[0], dtype=dtype) if has_bias else None
        return cls(layout_cls.from_tensors(shape, params, tensors), bias, strict)

    def plain_module(self, like: nn.Module) -> nn.Module:
        """The plain-form protocol (``sparsify_core.plain``): the ``nn.Linear``/``Conv1D`` ``like`` holding
        ``dense_weight()`` (bit for bit, zeros stored) and the bias."""
        return _plain_linear(like, self.dense_weight(), self.bias)

    def load_plain(self, plain: nn.Module) -> None:
        """The inverse of ``plain_module``: this layout's storage (same params) of ``plain``'s weight, in place.

        ``ValueError`` when the weight does not fit the layout (it was not the one ``plain_module`` wrote)."""
        from sparsify_core.ffn import weight_out_in

        layout = self.layout_cls.from_dense(weight_out_in(plain).detach().contiguous(), self.layout_params)
        for k, t in layout.tensors().items():
            self._buffers[k] = t
        bias = getattr(plain, "bias", None)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        self._forget()

    def storage_spec(self) -> dict:
        """Shapes and dtypes of the storage tensors (what ``empty`` needs to rebuild)."""
        return {k: [list(getattr(self, k).shape), str(getattr(self, k).dtype).removeprefix("torch.")]
                for k in self.layout_cls.names}

    def kernel(self, x: torch.Tensor):
        """The layout's kernel for ``x``'s device and dtype (cached), or ``None``."""
        key = (x.device, x.dtype)
        if key not in self._kernels:
            self._kernels[key] = self.layout().kernel(x.device, x.dtype)
        return self._kernels[key]

    def _cpu_kernel(self, x: torch.Tensor):
        run = self.kernel(x)
        self._last = (x.dtype, run) if x.is_cpu else None
        return run

    def forward(self, x):
        if not (x.requires_grad and torch.is_grad_enabled()):
            # as kernel(x), minus its per-call dict key: this runs once per token per layer when decoding
            last = self._last
            run = last[1] if last is not None and last[0] is x.dtype and x.is_cpu else self._cpu_kernel(x)
            y = run(x, self._parameters.get("bias")) if run is not None else None
            if y is not None:
                return y
            fallback(f"{self.layout_name} Linear", f"for {x.device.type}/{str(x.dtype).removeprefix('torch.')}",
                     self.strict)
        if self._dense is None or self._dense.device != x.device:
            self._dense = self.layout().to_dense().to(x.device)
        return F.linear(x, self._dense.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, layout={self.layout_name}({self.layout_params!r})"


class TransposedLinear(nn.Module):
    """A Linear stored ``[in, out]`` (``nx``/``nf`` as transformers' Conv1D, so the engine treats it as one).

    With few tokens on the CPU it skips the rows of zero inputs (exact).
    """

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None = None, strict: bool = False):
        super().__init__()
        self.nx, self.nf = weight_t.shape
        self.in_features, self.out_features = self.nx, self.nf
        self.weight = nn.Parameter(weight_t.detach().contiguous(), requires_grad=weight_t.requires_grad)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad) if bias is not None else None
        self.strict = strict

    @classmethod
    def from_linear(cls, module: nn.Module, strict: bool = False) -> "TransposedLinear":
        """From an ``nn.Linear`` (weight transposed) or a Conv1D (already ``[in, out]``)."""
        from sparsify_core.ffn import is_conv1d
        w = module.weight if is_conv1d(module) else module.weight.t()
        return cls(w.detach().contiguous(), getattr(module, "bias", None), strict)

    def plain_module(self, like: nn.Module) -> nn.Module:
        """The plain-form protocol (``sparsify_core.plain``): the ``nn.Linear`` (weight transposed back) or
        ``Conv1D`` (as stored) ``like`` holding this weight and bias."""
        return _plain_linear(like, self.weight.t(), self.bias)

    def plain_transposed(self, like: nn.Module) -> bool:
        """Whether ``like``'s weight (and so its mask) is this one's transpose: yes for an ``nn.Linear``."""
        from sparsify_core.ffn import is_conv1d
        return not is_conv1d(like)

    def load_plain(self, plain: nn.Module) -> None:
        """The inverse of ``plain_module``, in place (``[in, out]`` again)."""
        from sparsify_core.ffn import weight_out_in

        self.weight = nn.Parameter(weight_out_in(plain).detach().t().contiguous(), requires_grad=False)
        bias = getattr(plain, "bias", None)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    def forward(self, x):
        if _inference(x) and x[..., 0].numel() <= ffn_kernels.MAX_TOKENS:  # decoding: where skipping pays
            if x.device.type == "cpu" and x.dtype == torch.float32:
                y = ffn_kernels.sparse_input_linear(x, self.weight, self.bias)
                if y is not None:
                    return y
            fallback("sparse-input Linear", f"for {x.device.type}/{str(x.dtype).removeprefix('torch.')}",
                     self.strict)
        y = x @ self.weight.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.nx} -> {self.nf}, stored transposed"


class InputSparseLinear(TransposedLinear):
    """``y = s(x) W^T + b`` with ``s(x) = x where |x| >= input_threshold, else 0`` (TEAL), stored ``[in, out]``.

    The fast form of a Linear whose input is magnitude-thresholded (any module
    with a float ``input_threshold``, e.g. TEAL's ``ThresholdedLinear``):
    with few tokens on the CPU the input-sparse GEMV reads only the weight rows
    of the inputs that survive the threshold; otherwise a dense matmul of the
    thresholded input (the same result). ``x`` is ``[..., in_features]``.
    """

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None, input_threshold: float,
                 strict: bool = False):
        super().__init__(weight_t, bias, strict)
        self.input_threshold = float(input_threshold)

    @classmethod
    def from_thresholded(cls, module: nn.Module, strict: bool = False) -> "InputSparseLinear":
        """From an ``nn.Linear`` or Conv1D carrying ``input_threshold`` (its weight shared or transposed)."""
        t = TransposedLinear.from_linear(module, strict)
        return cls(t.weight.data, t.bias, module.input_threshold, strict)

    def plain_module(self, like: nn.Module) -> nn.Module:
        """No plain form: plain transformers would not threshold the input (``ValueError``)."""
        raise ValueError(f"it zeroes inputs below {self.input_threshold:.6g} (TEAL), which plain transformers "
                         "does not")

    def forward(self, x):
        return super().forward(zero_small_inputs(x, self.input_threshold))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input_threshold={self.input_threshold:.6g}"


def activation_spec(act) -> tuple[str, float, float] | None:
    """``(name, threshold, cut)`` of an activation module the kernels know, else ``None``.

    Recognised by structure, not by import: ReLU; FATReLU-like modules (a
    ``threshold`` and ReLU in the class name); CATS-like ``MagnitudeThreshold``
    (an inner ``act`` and a ``threshold``); SiLU and GELU (for experts).
    """
    name = type(act).__name__.lower()
    if isinstance(act, nn.ReLU) or name in ("reluactivation",):
        return ("relu", 0.0, 0.0)
    if "relu" in name and isinstance(getattr(act, "threshold", None), float):
        return ("relu", float(act.threshold), 0.0)
    inner = getattr(act, "act", None)
    if isinstance(inner, nn.Module) and isinstance(getattr(act, "threshold", None), float):
        spec = activation_spec(inner)
        return None if spec is None or spec[2] else (spec[0], spec[1], float(act.threshold))
    if isinstance(act, nn.SiLU) or name in ("siluactivation",):
        return ("silu", 0.0, 0.0)
    if isinstance(act, nn.GELU):
        return ("gelu_tanh" if act.approximate == "tanh" else "gelu", 0.0, 0.0)
    if name in ("geluactivation",):
        return ("gelu", 0.0, 0.0)
    if name in ("pytorchgelutanh", "newgeluactivation", "gelutanh"):
        return ("gelu_tanh", 0.0, 0.0)
    return None


def is_sparse_activation(spec) -> bool:
    """True for activations with exact zeros (ReLU, FATReLU, or any activation with a magnitude cut)."""
    return spec is not None and (spec[0] == "relu" or spec[2] > 0)


class ActivationPredictor(nn.Module):
    """Which neurons of an FFN to compute, guessed from its input (DejaVu / PowerInfer; approximate).

    ``logits = p_out (p_in x) + p_bias`` (``p_in [r, d]``, ``p_out [d_ff, r]``);
    neuron j is computed for a token iff ``logits[j] >= threshold``. Buffers
    (not parameters: no optimizer or pruning stage touches them), saved with
    the model. Fitted by ``layout_convert/activation_sparse_ffn``'s
    ``predictor`` option (see ``predictor.py``).
    """

    def __init__(self, p_in: torch.Tensor, p_out: torch.Tensor, p_bias: torch.Tensor, threshold: float):
        super().__init__()
        self.register_buffer("p_in", p_in.detach().contiguous())
        self.register_buffer("p_out", p_out.detach().contiguous())
        self.register_buffer("p_bias", p_bias.detach().contiguous())
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=p_in.dtype))
        self._threshold_value = None
        self.register_load_state_dict_post_hook(lambda module, _keys: setattr(module, "_threshold_value", None))

    @classmethod
    def empty(cls, d: int, d_ff: int, rank: int, dtype=torch.float32) -> "ActivationPredictor":
        """Zero-filled, of the recorded shape (filled by ``load_state_dict``)."""
        return cls(torch.zeros(rank, d, dtype=dtype), torch.zeros(d_ff, rank, dtype=dtype),
                   torch.zeros(d_ff, dtype=dtype), 0.0)

    @property
    def rank(self) -> int:
        return self.p_in.shape[0]

    def threshold_value(self) -> float:
        """The threshold as a Python float (cached: read once per decode step, not synced each call)."""
        if self._threshold_value is None:
            self._threshold_value = float(self.threshold)
        return self._threshold_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean ``[..., d_ff]``: the neurons computed for each token."""
        return ffn_kernels.predict(x, self.p_in.to(x.dtype), self.p_out.to(x.dtype), self.p_bias.to(x.dtype),
                                   self.threshold_value())

    def extra_repr(self) -> str:
        return f"{self.p_in.shape[1]} -> rank {self.rank} -> {self.p_out.shape[0]}"


class ActivationSparseFFN(nn.Module):
    """Gated FFN ``down(act(gate(x)) * up(x))`` computing only active neurons' up and down rows.

    Keeps the attribute names of the block it replaces (``gate_proj``,
    ``up_proj``, ``down_proj``, ``act_fn``), so the engine still finds it as an
    FFN; ``down_proj`` is a ``TransposedLinear`` (W_down stored ``[d_ff, d]``).
    With a ``predictor``, each token computes only the neurons it predicts
    (gate rows included), in the kernels and in the dense path alike, so the
    block is the same function however many tokens it gets; without one it
    is exact.

    ``gate_screen`` (ReLU/FATReLU, one token, CPU): keep the gate also as two
    16-bit planes, its weights' upper and lower halves
    (``sparsify_kernels.ffn.gate_planes``), and read the upper halves for
    every neuron, the rest of the gate only for the neurons that screen cannot
    rule out (the candidates): exact, the same neurons and values. Two
    kernels, chosen by the last call's candidate fraction: above
    ``SCREEN_TWO_PASS``, chunk by chunk, the candidates' lower halves right
    after their upper halves (``ffn_planes``: 2 bytes per gate weight plus 2
    per candidate's, bit for bit ``ffn_sparse``); at or below it, one pass
    over the upper halves, then the candidates' fp32 rows (``ffn_screened``,
    which streams faster where candidates are few). Measured on a 2-core Xeon
    (``sparsify bench --case 1``, AVX-512), 4096 x 11008, dense / ours at 30 /
    50 / 70 / 90% sparsity (78 / 60 / 39 / 15% candidates): 1.22 / 1.40 /
    1.70 / 2.26x reading the whole gate, 1.21 / 1.46 / 1.88 / 2.98x in
    planes, 1.07 / 1.32 / 1.82 / 3.10x screened. It costs the gate's bytes
    again in memory (built on first use, rebuilt when the gate weight
    changes); where a call finds more than ``SCREEN_MAX_CANDIDATES`` of the
    neurons to be candidates, the next ``SCREEN_BACKOFF`` calls read the whole
    gate.
    """

    SCREEN_MAX_CANDIDATES = 0.7  #: above this candidate fraction the planes read as much as the fp32 gate
    SCREEN_TWO_PASS = 0.2  #: at or below this candidate fraction the two-pass screened kernel streams faster
    SCREEN_BACKOFF = 64  #: one-token calls without the screen after such a call

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: TransposedLinear, act_fn: nn.Module,
                 strict: bool = False, predictor: ActivationPredictor | None = None, gate_screen: bool = False):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn
        self.strict = strict
        self.predictor = predictor
        self.gate_screen = gate_screen
        self._screen = None  # (hi, lo, err, weight version, weight address) once built
        self._screen_skip = 0
        self._screen_frac = self.SCREEN_MAX_CANDIDATES  # the last screened call's candidate fraction

    def __getstate__(self):
        return {**super().__getstate__(), "_screen": None}  # a copy builds its own from its own weights

    def _screen_for(self, w: torch.Tensor):
        """The gate's planes ``(hi, lo, err)`` (``gate_planes``), rebuilt when the weight changed since built."""
        sc = self._screen
        if sc is None or sc[3] != w._version or sc[4] != w.data_ptr():
            planes = ffn_kernels.gate_planes(w)
            if planes is None:
                return None
            self._screen = sc = (*planes, w._version, w.data_ptr())
        return sc[:3]

    def _screened(self, x, args):
        """A screened kernel for a one-token CPU call, or ``None`` (not applicable, or backing off)."""
        if self._screen_skip > 0:
            self._screen_skip -= 1
            return None
        w = args["w_in"]
        if x.numel() != w.shape[1] or args["act"] != "relu" or w.dtype != torch.float32:
            return None
        planes = self._screen_for(w)
        if planes is None:
            return None
        counts: list[int] = []
        rest = {k: v for k, v in args.items() if k not in ("w_in", "act")} | {"counts": counts}  # act is relu
        if self._screen_frac <= self.SCREEN_TWO_PASS:
            y = ffn_kernels.ffn_screened(x, w, screen=(planes[0], planes[2]), **rest)
        else:
            y = ffn_kernels.ffn_planes(x, planes=planes, **rest)
        if counts:
            self._screen_frac = counts[0] / max(1, w.shape[0])
            if self._screen_frac > self.SCREEN_MAX_CANDIDATES:
                self._screen_skip = self.SCREEN_BACKOFF
        return y

    def plain_module(self, like: nn.Module) -> nn.Module:
        """The plain-form protocol (``sparsify_core.plain``): a copy of ``like`` (the architecture's FFN block)
        with these children (already plain). ``ValueError`` with a predictor (approximate: plain
        transformers computes every neuron) or when ``like`` has other children."""
        import copy

        if self.predictor is not None:
            raise ValueError("its activation predictor computes only the neurons it predicts (approximate); "
                             "plain transformers computes them all")
        new = copy.deepcopy(like)
        for name in like._modules:
            if not hasattr(self, name):
                raise ValueError(f"plain transformers' {type(like).__name__} has a {name!r} this block lacks")
            setattr(new, name, getattr(self, name))
        return new

    def _hooked(self) -> bool:
        return any(m._forward_pre_hooks or m._forward_hooks for m in (self.gate_proj, self.up_proj, self.down_proj))

    def _fast(self, x):
        spec = activation_spec(self.act_fn)
        if spec is None or self._hooked():
            return None
        args = dict(w_in=self.gate_proj.weight, b_in=self.gate_proj.bias, w_up=self.up_proj.weight,
                    b_up=self.up_proj.bias, w_down_t=self.down_proj.weight, b_down=self.down_proj.bias,
                    act=spec[0], threshold=spec[1], cut=spec[2])
        if x[..., 0].numel() > ffn_kernels.MAX_TOKENS:
            return None  # prefill: dense matmuls are the right tool there, not a fallback
        p = self.predictor
        if p is not None:
            args.update(p_in=p.p_in, p_out=p.p_out, p_bias=p.p_bias, p_threshold=p.threshold_value())
        up_relu = getattr(self.up_proj, "output_relu", False)  # dReLU
        if up_relu:
            args.update(up_relu=True)
        if x.device.type == "cpu":
            y = self._screened(x, args) if self.gate_screen and p is None else None
            if y is None:
                y = ffn_kernels.ffn_sparse(x, **args) if p is None else ffn_kernels.ffn_predicted(x, **args)
            if y is None:
                fallback("activation-sparse FFN", f"for cpu/{str(x.dtype).removeprefix('torch.')}", self.strict)
            return y
        if _triton_ok(x) and not up_relu:
            from sparsify_kernels import triton_kernels
            return triton_kernels.ffn_sparse(x, **args) if p is None else triton_kernels.ffn_predicted(x, **args)
        fallback("activation-sparse FFN", f"for {x.device.type}" + (" with dReLU" if up_relu else ""), self.strict)
        return None

    def forward(self, x):
        if _inference(x):
            y = self._fast(x)
            if y is not None:
                return y
        h = self.act_fn(self.gate_proj(x))
        if self.predictor is not None:
            h = h * self.predictor(x).to(h.dtype)
        return self.down_proj(h * self.up_proj(x))


class MoEFFN(RoutedFFN):
    """A ``RoutedFFN`` stored for the MoE kernels: each token reads only its selected experts' rows.

    The same function, router, routing (``top_k``/``threshold``; ``dense`` and
    ``soft`` too, computed densely as before), selection hooks and metrics as
    the ``RoutedFFN`` it is converted from (``from_routed``); only the storage
    differs. W_gate/W_up (W_fc1 of a plain FFN) are ``nn.Linear`` ``[d_ff, d]``
    (a GPT-2 ``Conv1D`` is transposed into one) and W_down is a
    ``TransposedLinear`` ``[d_ff, d]``, so expert e is rows
    ``[e*size, (e+1)*size)`` of all three: contiguous bytes that the kernels
    read only for the tokens that selected e (``sparsify_kernels.ffn.ffn_moe``,
    ``triton_kernels.ffn_moe``). That is decoding (up to ``MAX_TOKENS`` tokens,
    no autograd); longer inputs and training take ``RoutedFFN``'s torch
    gather of the selected experts (the right tool there, not a fallback).
    Hooked projections take the masked path, as in ``RoutedFFN``.
    """

    def __init__(self, kind: str, parts: dict[str, nn.Module], names: dict[str, str], act: nn.Module,
                 router: Router, expert_size: int, routing: str = "threshold", top_k: int | None = None,
                 tau: float = 0.5, dropout: nn.Module | None = None, strict: bool = False):
        bad = [r for r in ("gate", "up") if r in parts and not isinstance(parts[r], nn.Linear)]
        if bad or not isinstance(parts["down"], TransposedLinear):
            raise SparsifyError("MoEFFN stores W_gate/W_up as nn.Linear and W_down as a TransposedLinear; "
                                "build it with MoEFFN.from_routed")
        super().__init__(kind, parts, names, act, router, expert_size, routing, top_k, tau, dropout)
        self.strict = strict

    @classmethod
    def from_routed(cls, routed: RoutedFFN, strict: bool = False) -> "MoEFFN":
        """The kernel-backed module of a ``RoutedFFN``: its router, routing and weights (W_down transposed).

        Linear gate/up modules are kept (the same parameters); a ``Conv1D``
        fc1 becomes an ``nn.Linear`` holding its transpose.
        """
        parts = {}
        for role in ("gate", "up"):
            module = routed.part(role)
            if module is not None:
                parts[role] = _row_major_linear(module)
        parts["down"] = TransposedLinear.from_linear(routed.part("down"), strict)
        module = cls(routed.kind, parts, routed.names, routed.part("act"), routed.router, routed.expert_size,
                     routed.routing, routed.top_k, routed.tau, routed.dropout, strict)
        return module.train(routed.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._threshold_decode(x)
        if y is None:
            return super().forward(x)
        return self.dropout(y) if self.dropout is not None else y

    def _threshold_decode(self, x: torch.Tensor) -> torch.Tensor | None:
        """LTE threshold routing when decoding on the CPU: the router's GEMV, then one kernel call; else ``None``.

        The same function as ``RoutedFFN.forward``: the router's logits from
        the same ``F.linear`` its ``nn.Linear`` runs, experts where torch's
        ``sigmoid(logits) > tau`` (the kernel decides every logit outside a
        ~1e-4 bracket around ``logit(tau)``, ``ffn_kernels.logit_bracket``;
        inside it torch's sigmoid does). Fewer torch operations per step
        than scores, selection and the kernel apart (``ffn_moe_threshold``).
        ``None`` (the general path) with selection or forward hooks (on this
        module's router or projections, or global ones), another routing,
        router or path, on other devices, or while autograd records ``x``.
        """
        router = self.router
        if (self.routing != "threshold" or self.path != "gather" or x.device.type != "cpu"
                or type(router) is not LTERouter or type(router.proj) is not nn.Linear or self._selection_hooks
                or not _inference(x) or self._hooked() or _module_hooks(router, router.proj)):
            return None
        args = self._kernel_args()
        if args is None:
            return None
        logits = F.linear(x, router.proj.weight, router.proj.bias)  # what the router's nn.Linear computes
        y = ffn_kernels.ffn_moe_threshold(x, logits, self.tau, **args)
        if y is None:  # a logit the kernel cannot decide, or a shape it does not take: torch selects
            y = self._gather(x, torch.sigmoid(logits) > self.tau)
        return y

    def _kernel_args(self) -> dict | None:
        """The MoE kernels' weight and activation arguments (``None``: an activation they do not know)."""
        act, up, down, gate = self.part("act"), self.part("up"), self.part("down"), self.part("gate")
        spec = activation_spec(act)
        if spec is None:
            return None
        first = gate if gate is not None else up  # the rows the activation is applied to
        args = dict(w_in=first.weight, b_in=first.bias, w_up=up.weight if gate is not None else None,
                    b_up=up.bias if gate is not None else None, w_down_t=down.weight, b_down=down.bias,
                    act=spec[0], threshold=spec[1], cut=spec[2], expert_size=self.expert_size)
        if gate is not None and getattr(up, "output_relu", False):  # dReLU
            args.update(up_relu=True)
        return args

    def _gather(self, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """The selected experts only: the kernels when decoding, else ``RoutedFFN``'s torch gather."""
        if _inference(x) and x[..., 0].numel() <= ffn_kernels.MAX_TOKENS:
            y = self._kernel(x, selected)
            if y is not None:
                return y
        return super()._gather(x, selected)

    def _kernel(self, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor | None:
        args = self._kernel_args()
        if args is None:
            fallback("MoE FFN", f"for the activation {type(self.part('act')).__name__}", self.strict)
            return None
        args.update(experts=selected)
        up_relu = args.get("up_relu", False)
        if x.device.type == "cpu":
            y = ffn_kernels.ffn_moe(x, **args)
            if y is None:
                fallback("MoE FFN", f"for cpu/{str(x.dtype).removeprefix('torch.')}", self.strict)
            return y
        if _triton_ok(x) and not up_relu:
            from sparsify_kernels import triton_kernels
            return triton_kernels.ffn_moe(x, **args)
        fallback("MoE FFN", f"for {x.device.type}" + (" with dReLU" if up_relu else ""), self.strict)
        return None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stored for the MoE kernels"


def _row_major_linear(module: nn.Module) -> nn.Linear:
    """``module`` as an ``nn.Linear`` with contiguous ``[out, in]`` rows (a ``Conv1D`` is transposed)."""
    from sparsify_core.ffn import is_conv1d
    if isinstance(module, nn.Linear):
        if not module.weight.is_contiguous():
            module.weight.data = module.weight.data.contiguous()
        return module
    if not is_conv1d(module):
        raise SparsifyError(f"MoE FFN: cannot store a {type(module).__name__} projection by rows")
    w = module.weight
    linear = nn.Linear(int(module.nx), int(module.nf), bias=module.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.weight.requires_grad_(w.requires_grad)
    return linear
