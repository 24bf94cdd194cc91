"""Activation-sparse and mixture-of-experts FFN kernels for decoding (few tokens).

Notation as in ``sparsify_core.ffn``: ``w_in`` is the gate (gated FFN) or
fc1 (plain FFN), ``w_up`` the up projection (gated only), ``w_down_t`` the
down projection *transposed* (``[d_ff, d]``), so that neuron j's up row and
down column are both contiguous rows. ``act`` names the activation
(``relu`` with an optional FATReLU ``threshold``, ``silu``, ``gelu``,
``gelu_tanh``); ``cut`` zeroes activations with ``|a| < cut`` (CATS);
``up_relu`` passes the up projection's value through ReLU as well (dReLU,
Turbo Sparse: a neuron is active only where gate and up are both positive).
``ranges`` lists the neurons to compute as ``[n, 2]`` half-open ranges
(experts stored contiguously); ``None`` means every neuron.

``ffn_reference`` is the plain-torch definition; ``ffn_sparse`` runs the
compiled CPU kernel (``csrc/ffn.cpp``) and returns ``None`` where it cannot
(other device or dtype, too many tokens, no compiler).

With an activation predictor (DejaVu / PowerInfer), a rank-r map
``logits = p_out (p_in x) + p_bias`` chooses, per token, the neurons to
compute (``logits >= p_threshold``, see ``predict``); the others count as
inactive without their gate being computed. ``ffn_reference(select=...)``
defines the result, ``ffn_predicted`` is the CPU kernel.

For one token and a ReLU/FATReLU gate, a screen of the gate's 16-bit upper
halves (``truncation_screen``) bounds every gate; only the neurons it cannot
rule out need the rest of their gate row: ``ffn_screened`` reads their fp32
rows, ``ffn_planes`` their lower halves from the gate stored as two 16-bit
planes (``gate_planes``). Both are exact.

A mixture of experts (MoEfication, LTE) routes each token to its own set of
experts (boolean ``experts [..., E]``, any number per token), expert ``e``
being neurons ``[e*size, (e+1)*size)``: ``ffn_moe`` is the CPU kernel, and
``ffn_reference(select=expert_neurons(experts, size))`` the definition.
"""
from __future__ import annotations

import ctypes
import math
import sys
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import native

ACTIVATIONS = {"relu": 0, "silu": 1, "gelu": 2, "gelu_tanh": 3}
MAX_TOKENS = 16  # the kernel keeps one gate value per token in registers
UP_RELU = 16  # or-ed into the activation code: ReLU on the up value too (csrc/ffn.cpp kUpReLU)

_P, _I = ctypes.c_void_p, ctypes.c_int64


def activation(name: str, v: torch.Tensor, threshold: float = 0.0, cut: float = 0.0) -> torch.Tensor:
    """The activation ``name`` (FATReLU when ``relu`` has a threshold), then the magnitude ``cut``."""
    if name == "relu":
        y = torch.where(v >= threshold, v, torch.zeros((), dtype=v.dtype, device=v.device)) if threshold else torch.relu(v)
    elif name == "silu":
        y = F.silu(v)
    elif name == "gelu":
        y = F.gelu(v)
    elif name == "gelu_tanh":
        y = F.gelu(v, approximate="tanh")
    else:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return y * (y.abs() >= cut).to(y.dtype) if cut else y


def neuron_index(ranges: torch.Tensor) -> torch.Tensor:
    """The neuron indices that ``[n, 2]`` half-open ranges list, in order."""
    ranges = ranges.reshape(-1, 2).long()
    return torch.cat([torch.arange(int(a), int(b)) for a, b in ranges.tolist()]) if len(ranges) else \
        torch.zeros(0, dtype=torch.long)


def expert_neurons(experts: torch.Tensor, expert_size: int) -> torch.Tensor:
    """Boolean ``[..., E * size]``: the neurons of each token's selected experts (``experts [..., E]``)."""
    return experts.bool().repeat_interleave(expert_size, dim=-1)


def predict(x, p_in, p_out, p_bias, p_threshold: float) -> torch.Tensor:
    """The predictor's choice, boolean ``[..., d_ff]``: ``p_out (p_in x) + p_bias >= p_threshold``."""
    return F.linear(F.linear(x, p_in), p_out, p_bias) >= p_threshold


def _up(x, w_up, b_up, up_relu: bool) -> torch.Tensor:
    u = F.linear(x, w_up, b_up)
    return torch.relu(u) if up_relu else u


def _code(act: str, up_relu: bool) -> int:
    return ACTIVATIONS[act] | (UP_RELU if up_relu else 0)


def ffn_reference(x, w_in, b_in, w_up, b_up, w_down_t, b_down, act="relu", threshold=0.0, cut=0.0,
                  ranges=None, select=None, up_relu: bool = False) -> torch.Tensor:
    """Plain-torch FFN output over the listed neurons (all by default): the definition kernels match.

    ``select`` (boolean ``[..., d_ff]``, e.g. from ``predict``) zeroes each
    token's unselected neurons; it cannot be combined with ``ranges``.
    """
    if select is not None:
        if ranges is not None:
            raise ValueError("select and ranges cannot be combined")
        h = activation(act, F.linear(x, w_in, b_in), threshold, cut) * select.to(x.dtype)
        if w_up is not None:
            h = h * _up(x, w_up, b_up, up_relu)
        y = h @ w_down_t
        return y + b_down if b_down is not None else y
    if ranges is not None:
        idx = neuron_index(ranges).to(x.device)
        w_in, w_down_t = w_in[idx], w_down_t[idx]
        b_in = b_in[idx] if b_in is not None else None
        if w_up is not None:
            w_up = w_up[idx]
            b_up = b_up[idx] if b_up is not None else None
    h = activation(act, F.linear(x, w_in, b_in), threshold, cut)
    if w_up is not None:
        h = h * _up(x, w_up, b_up, up_relu)
    y = h @ w_down_t
    return y + b_down if b_down is not None else y


def _lib():
    lib = native.library()
    if lib is not None and not hasattr(lib, "_ffn_typed"):
        lib.sp_ffn_decode_f32.argtypes = [_P, _I, _I, _P, _P, _P, _P, _P, _P, _P, _I, ctypes.c_int,
                                          ctypes.c_float, ctypes.c_float, _P, ctypes.c_int]
        lib.sp_ffn_decode_f32.restype = ctypes.c_int
        lib.sp_ffn_predicted_f32.argtypes = [_P, _I, _I, _P, _P, _P, _P, _P, _P, _I, ctypes.c_int,
                                             ctypes.c_float, ctypes.c_float, _P, _P, _P, _I, ctypes.c_float,
                                             _P, _P, ctypes.c_int]
        lib.sp_ffn_predicted_f32.restype = ctypes.c_int
        lib.sp_ffn_moe_f32.argtypes = [_P, _I, _I, _P, _P, _P, _P, _P, _P, _P, _I, _I, ctypes.c_int,
                                       ctypes.c_float, ctypes.c_float, _P, _P, ctypes.c_int]
        lib.sp_ffn_moe_f32.restype = ctypes.c_int
        lib.sp_ffn_screened_f32.argtypes = [_P, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, ctypes.c_int,
                                            ctypes.c_float, ctypes.c_float, _P, _P, ctypes.c_int]
        lib.sp_ffn_screened_f32.restype = ctypes.c_int
        lib.sp_ffn_planes_f32.argtypes = [_P, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, ctypes.c_int,
                                          ctypes.c_float, ctypes.c_float, _P, _P, ctypes.c_int]
        lib.sp_ffn_planes_f32.restype = ctypes.c_int
        lib.sp_sparse_input_linear_f32.argtypes = [_P, _I, _I, _P, _P, _I, _P, ctypes.c_int]
        lib.sp_sparse_input_linear_f32.restype = ctypes.c_int
        lib.sp_ffn_moe_threshold_f32.argtypes = [_P, _I, _I, _P, _P, _P, _P, _P, _P, _P, ctypes.c_double,
                                                 ctypes.c_double, _I, _I, ctypes.c_int, ctypes.c_float,
                                                 ctypes.c_float, _P, _P, ctypes.c_int]
        lib.sp_ffn_moe_threshold_f32.restype = ctypes.c_int
        lib._ffn_typed = True
    return lib


def _ok(*tensors) -> bool:
    for t in tensors:  # a plain loop: this runs once per FFN call in a decode loop
        if t is not None and (t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous()):
            return False
    return True


_RANGES: dict[int, torch.Tensor] = {}


def _all_neurons(dff: int) -> int:
    """Pointer to a cached ``[[0, dff]]`` range (no tensor built per call)."""
    if dff not in _RANGES:
        _RANGES[dff] = torch.tensor([[0, dff]], dtype=torch.int64)
    return _RANGES[dff].data_ptr()


def _ptr(t):
    return None if t is None else t.data_ptr()


def _shapes_ok(dff: int, d: int, w_in, b_in, w_up, b_up, w_down_t, b_down) -> bool:
    """The FFN's tensors have the shapes the C kernels index them by: ``w_in``/``w_up``/``w_down_t`` ``[dff, d]``,
    ``b_in``/``b_up`` ``[dff]``, ``b_down`` ``[d]`` (``None``: absent). A mismatched one would be read out of bounds."""
    return ((w_in is None or w_in.shape == (dff, d)) and (w_up is None or w_up.shape == (dff, d))
            and w_down_t.shape == (dff, d) and (b_in is None or b_in.shape == (dff,))
            and (b_up is None or b_up.shape == (dff,)) and (b_down is None or b_down.shape == (d,)))


def cpu_kernel_available() -> bool:
    """True when the compiled CPU kernels load here."""
    return _lib() is not None


def _decodes(x: torch.Tensor, T: int, act: str) -> bool:
    """What the CPU FFN kernels take: 1..MAX_TOKENS tokens, a known activation, no autograd graph to keep."""
    return 1 <= T <= MAX_TOKENS and act in ACTIVATIONS and not (torch.is_grad_enabled() and x.requires_grad)


def _tokens(x: torch.Tensor, d: int, act: str) -> torch.Tensor | None:
    """``x`` as contiguous ``[T, d]`` tokens when the CPU FFN kernels take it (``_decodes``); else ``None``."""
    x2 = x.reshape(-1, d)
    return x2.contiguous() if _decodes(x, x2.shape[0], act) else None


def ffn_sparse(x, w_in, b_in, w_up, b_up, w_down_t, b_down, act="relu", threshold=0.0, cut=0.0,
               ranges=None, up_relu: bool = False) -> torch.Tensor | None:
    """The FFN computing only non-zero activations (and only ``ranges``), or ``None`` if the CPU kernel cannot.

    ``x`` is ``[..., d]`` with at most ``MAX_TOKENS`` tokens, float32, on the
    CPU; the weights must be float32 and contiguous, of matching shapes
    (``None`` otherwise). ``ValueError`` for ``ranges`` outside the neurons.
    """
    d = w_in.shape[1]
    x2 = _tokens(x, d, act)
    if x2 is None:
        return None
    T = x2.shape[0]
    dff = w_in.shape[0]
    if not _ok(x2, w_in, b_in, w_up, b_up, w_down_t, b_down) or not _shapes_ok(dff, d, w_in, b_in, w_up, b_up,
                                                                             w_down_t, b_down):
        return None
    lib = _lib()
    if lib is None:
        return None
    if ranges is None:
        ranges_ptr, n_ranges = _all_neurons(dff), 1
    else:
        ranges = ranges.to(torch.int64).reshape(-1, 2).contiguous()
        if ranges.numel() and not (int(ranges.min()) >= 0 and int(ranges.max()) <= dff
                                   and bool((ranges[:, 0] <= ranges[:, 1]).all())):
            raise ValueError(f"ranges must be half-open [start, end) within the {dff} neurons; got "
                             f"{ranges.tolist()}")
        ranges_ptr, n_ranges = ranges.data_ptr(), ranges.numel() // 2
    y = torch.empty(T, d, dtype=torch.float32)
    rc = lib.sp_ffn_decode_f32(x2.data_ptr(), T, d, w_in.data_ptr(), _ptr(b_in), _ptr(w_up), _ptr(b_up),
                               w_down_t.data_ptr(), _ptr(b_down), ranges_ptr, n_ranges,
                               _code(act, up_relu), float(threshold), float(cut), y.data_ptr(), native.threads())
    if rc != 0:
        return None
    return y.reshape(*x.shape[:-1], d)


def ffn_predicted(x, w_in, b_in, w_up, b_up, w_down_t, b_down, act="relu", threshold=0.0, cut=0.0, *,
                  p_in, p_out, p_bias=None, p_threshold: float = 0.0, counts: list | None = None,
                  up_relu: bool = False) -> torch.Tensor | None:
    """The FFN over the neurons the predictor chooses per token (see ``predict``); ``None`` if the CPU kernel cannot.

    Same conditions as ``ffn_sparse``, and float32 contiguous predictor
    weights ``p_in [r, d]``, ``p_out [d_ff, r]``, ``p_bias [d_ff]``. With
    ``counts`` (a list), the number of neurons computed for some token is appended.
    """
    d = w_in.shape[1]
    x2 = _tokens(x, d, act)
    if x2 is None:
        return None
    T = x2.shape[0]
    dff = w_in.shape[0]
    if not _ok(x2, w_in, b_in, w_up, b_up, w_down_t, b_down, p_in, p_out, p_bias) \
            or not _shapes_ok(dff, d, w_in, b_in, w_up, b_up, w_down_t, b_down) or p_in.dim() != 2 \
            or p_in.shape[1] != d or p_out.shape != (dff, p_in.shape[0]) \
            or (p_bias is not None and p_bias.shape != (dff,)):
        return None
    lib = _lib()
    if lib is None:
        return None
    y = torch.empty(T, d, dtype=torch.float32)
    n_sel = ctypes.c_int64(0)
    rc = lib.sp_ffn_predicted_f32(x2.data_ptr(), T, d, w_in.data_ptr(), _ptr(b_in), _ptr(w_up), _ptr(b_up),
                                  w_down_t.data_ptr(), _ptr(b_down), w_in.shape[0], _code(act, up_relu),
                                  float(threshold), float(cut), p_in.data_ptr(), p_out.data_ptr(), _ptr(p_bias),
                                  p_in.shape[0], float(p_threshold), y.data_ptr(), ctypes.addressof(n_sel),
                                  native.threads())
    if rc != 0:
        return None
    if counts is not None:
        counts.append(int(n_sel.value))
    return y.reshape(*x.shape[:-1], d)


def truncation_screen(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A screen of the rows of ``w`` (fp32 ``[rows, n]``): ``(hi, err)``, or ``None`` on a big-endian host.

    ``hi`` (int16 ``[rows, n]``) holds the upper 16 bits of every weight: each
    truncated to bfloat16, half the bytes. ``err`` (float32 ``[rows]``) bounds
    how far a row's product with any ``x`` computed from ``hi`` can be from
    the one computed in fp32, per unit of ``||x||_2``: ``||w_j - hi_j||_2``
    (Cauchy-Schwarz) plus the worst-case rounding of two fp32 dot products of
    length ``n`` (Higham's ``gamma_n``: ``2 (n + 4) 2^-24 (||w_j|| + ||w_j -
    hi_j||)``), rounded up; ``inf`` for a row with a non-finite weight. The
    native step uses it for the LM head of greedy decoding: the screened
    logits bound every logit, and only the rows that can still be the
    maximum are computed in fp32 (``DecodeStep(head_screen=True)``);
    ``ffn_screened`` for the gate of a FATReLU FFN.
    """
    if sys.byteorder != "little":
        return None
    w = w.detach().float().contiguous()
    hi = w.view(torch.int16).reshape(*w.shape, 2)[..., 1].contiguous()  # little-endian: the upper half is second
    hi_f = torch.stack([torch.zeros_like(hi), hi], -1).view(torch.float32).reshape(w.shape)
    wd = w.double()
    r = (wd - hi_f.double()).norm(dim=1)
    err = (r + 2 * (w.shape[1] + 4) * 2.0 ** -24 * (wd.norm(dim=1) + r)) * (1 + 2.0 ** -20)
    err = torch.where(torch.isfinite(wd).all(dim=1) & torch.isfinite(err), err, torch.full_like(err, math.inf))
    err32 = err.float()
    err32 = torch.where(err32.double() < err, torch.nextafter(err32, torch.full_like(err32, math.inf)), err32)
    return hi, err32.contiguous()


def ffn_screened(x, w_in, b_in, w_up, b_up, w_down_t, b_down, threshold=0.0, cut=0.0, *, screen,
                 counts: list | None = None, up_relu: bool = False) -> torch.Tensor | None:
    """The exact FATReLU / ReLU FFN for one token, its gate screened by ``screen = truncation_screen(w_in)``.

    The gate's 16-bit high halves are read for every neuron; a neuron whose
    screened gate plus its bound (``||x||_2 err[j]``) stays below
    ``threshold`` cannot be active, and only the others (the candidates) get
    their fp32 gate row, then their up and down rows where active: the same
    neurons and gate values as ``ffn_sparse``, for half the gate's bytes
    plus the candidates' rows (``csrc/ffn.cpp``, ``sp_ffn_screened_f32``).
    The result equals ``ffn_sparse``'s up to the order of the final sums.
    ``x`` is ``[..., d]`` holding one token; ``None`` where the kernel cannot
    (more tokens, other dtype or device, no screen). With ``counts`` (a list),
    the number of candidates is appended. Costs ``2 d_ff d`` bytes of memory
    for ``screen``.
    """
    d = w_in.shape[1]
    if screen is None or x.numel() != d:
        return None
    x2 = _tokens(x, d, "relu")
    hi, err = screen
    if x2 is None or not _ok(x2, w_in, b_in, w_up, b_up, w_down_t, b_down, err) or hi.dtype != torch.int16 \
            or not hi.is_contiguous() or hi.shape != w_in.shape or err.shape != (w_in.shape[0],) \
            or not _shapes_ok(w_in.shape[0], d, w_in, b_in, w_up, b_up, w_down_t, b_down):
        return None
    return _one_token_screened("sp_ffn_screened_f32", x, x2, (w_in, hi, err), b_in, w_up, b_up, w_down_t, b_down,
                               threshold, cut, counts, up_relu)


def _one_token_screened(kernel: str, x, x2, gate, b_in, w_up, b_up, w_down_t, b_down, threshold, cut, counts,
                        up_relu) -> torch.Tensor | None:
    """Call a screened one-token kernel (``kernel``: its C name; ``gate``: its three gate tensors) on checked
    arguments; the candidates' count goes to ``counts``."""
    lib = _lib()
    if lib is None:
        return None
    d = x2.shape[1]
    y = torch.empty(1, d, dtype=torch.float32)
    n_cand = ctypes.c_int64(0)
    rc = getattr(lib, kernel)(x2.data_ptr(), d, *(t.data_ptr() for t in gate), _ptr(b_in), _ptr(w_up), _ptr(b_up),
                              w_down_t.data_ptr(), _ptr(b_down), w_down_t.shape[0], _code("relu", up_relu),
                              float(threshold), float(cut), y.data_ptr(), ctypes.addressof(n_cand),
                              native.threads())
    if rc != 0:
        return None
    if counts is not None:
        counts.append(int(n_cand.value))
    return y.reshape(x.shape)


def gate_planes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The rows of ``w`` (fp32 ``[rows, n]``) as two 16-bit planes and the screen's bound: ``(hi, lo, err)``.

    ``hi`` and ``err`` are ``truncation_screen(w)``'s (each weight's upper 16
    bits, bfloat16 by truncation, and the per-row bound); ``lo`` (int16
    ``[rows, n]``) holds the lower 16 bits, so ``hi`` and ``lo`` together are
    ``w`` bit for bit, split by halves: ``ffn_planes`` reads the lower halves
    only of the rows the screen cannot rule out. ``None`` on a big-endian host.
    """
    screen = truncation_screen(w)
    if screen is None:
        return None
    w = w.detach().float().contiguous()
    lo = w.view(torch.int16).reshape(*w.shape, 2)[..., 0].contiguous()  # little-endian: the lower half is first
    return screen[0], lo, screen[1]


def ffn_planes(x, b_in, w_up, b_up, w_down_t, b_down, threshold=0.0, cut=0.0, *, planes,
               counts: list | None = None, up_relu: bool = False) -> torch.Tensor | None:
    """The exact FATReLU / ReLU FFN for one token, its gate stored as ``planes = gate_planes(w_in)``.

    Chunk by chunk (16 neurons), the gate's upper halves are screened as in
    ``ffn_screened`` and the candidates' exact fp32 gates are assembled from
    the upper halves just read (in cache) and their lower halves, then the
    active neurons' up and down rows are read (``csrc/ffn.cpp``,
    ``sp_ffn_planes_f32``). Gate bytes: 2 per weight plus 2 per candidate's
    weight, where ``ffn_screened`` reads 2 plus 4 (its fp32 rows, after a
    separate pass over the upper halves) and ``ffn_sparse`` 4. About even
    with ``ffn_sparse`` at 30-50% sparsity, ahead at 70%; at 90% and above
    ``ffn_screened``'s single pass over the upper halves streams faster
    (measured on a 2-core Xeon, AVX-512, 4096 x 11008, ``sparsify bench
    --case 1``: 1.21 / 1.46 / 1.88 / 2.98x dense at 30 / 50 / 70 / 90%,
    against 1.22 / 1.40 / 1.70 / 2.26x for ``ffn_sparse`` and 1.07 / 1.32 /
    1.82 / 3.10x for ``ffn_screened``). The result is ``ffn_sparse``'s bit for bit
    (the same gates, neurons, chunks and sums). ``x`` is ``[..., d]`` holding
    one token; ``None`` where the kernel cannot (more tokens, other dtype or
    device, planes of another shape). With ``counts`` (a list), the number
    of candidates is appended.
    """
    if planes is None:
        return None
    hi, lo, err = planes
    d = hi.shape[-1]
    if x.numel() != d:
        return None
    x2 = _tokens(x, d, "relu")
    if x2 is None or not _ok(x2, b_in, w_up, b_up, w_down_t, b_down, err) or hi.dtype != torch.int16 \
            or lo.dtype != torch.int16 or not (hi.is_contiguous() and lo.is_contiguous()) or hi.dim() != 2 \
            or lo.shape != hi.shape or err.shape != (hi.shape[0],) \
            or not _shapes_ok(hi.shape[0], d, None, b_in, w_up, b_up, w_down_t, b_down):
        return None
    return _one_token_screened("sp_ffn_planes_f32", x, x2, (hi, lo, err), b_in, w_up, b_up, w_down_t, b_down,
                               threshold, cut, counts, up_relu)


def ffn_moe(x, w_in, b_in, w_up, b_up, w_down_t, b_down, act="relu", threshold=0.0, cut=0.0, *,
            experts, expert_size: int, counts: list | None = None, up_relu: bool = False) -> torch.Tensor | None:
    """The FFN over each token's selected experts only; ``None`` if the CPU kernel cannot.

    ``experts`` is boolean ``[..., E]`` over the same leading dims as ``x``
    (``E * expert_size = d_ff``); a token may select any number of experts,
    none included (its output is then ``b_down``). Only the experts some token
    selected are read: their gate (fc1) and up rows and their rows of
    ``w_down_t``. Same conditions as ``ffn_sparse``. With ``counts`` (a
    list), the number of experts selected by some token is appended.
    """
    d = w_in.shape[1]
    x2 = _tokens(x, d, act)
    if x2 is None:
        return None
    T, E = x2.shape[0], experts.shape[-1]
    if E * expert_size != w_in.shape[0] or experts.numel() != T * E or not experts.is_cpu:
        raise ValueError(f"experts {tuple(experts.shape)} x size {expert_size} do not cover {w_in.shape[0]} neurons "
                         f"for {T} tokens")
    if not _ok(x2, w_in, b_in, w_up, b_up, w_down_t, b_down) \
            or not _shapes_ok(w_in.shape[0], d, w_in, b_in, w_up, b_up, w_down_t, b_down):
        return None
    lib = _lib()
    if lib is None:
        return None
    sel = experts.reshape(T, E).to(torch.bool).contiguous().view(torch.uint8)
    y = torch.empty(T, d, dtype=torch.float32)
    n_listed = ctypes.c_int64(0)
    rc = lib.sp_ffn_moe_f32(x2.data_ptr(), T, d, w_in.data_ptr(), _ptr(b_in), _ptr(w_up), _ptr(b_up),
                            w_down_t.data_ptr(), _ptr(b_down), sel.data_ptr(), E, int(expert_size),
                            _code(act, up_relu),
                            float(threshold), float(cut), y.data_ptr(), ctypes.addressof(n_listed), native.threads())
    if rc != 0:
        return None
    if counts is not None:
        counts.append(int(n_listed.value))
    return y.reshape(*x.shape[:-1], d)


@lru_cache(maxsize=64)
def logit_bracket(tau: float) -> tuple[float, float] | None:
    """``(lo, hi)`` around ``logit(tau)``: fp32 ``sigmoid(z) > tau`` holds for every ``z >= hi``, fails for ``z <= lo``.

    ``tau`` as torch compares an fp32 tensor with it (rounded to fp32). The
    bracket is ``1e-4 (1 + |logit(tau)|)`` wide on each side, and at least
    ``64 u / (tau (1 - tau))`` (u = 2^-24): there the exact sigmoid is 64 u
    away from ``tau``, far beyond the few ulps of torch's fp32 sigmoid, which
    is checked at both ends. ``None`` for a ``tau`` within 1e-6 of 0 or 1
    (fp32 sigmoid saturates or underflows there): the caller lets torch decide.
    """
    t = float(torch.tensor(tau, dtype=torch.float32))
    if not 1e-6 <= t <= 1 - 1e-6:
        return None
    z0 = math.log(t / (1.0 - t))
    margin = max(1e-4 * (1.0 + abs(z0)), 64 * 2.0 ** -24 / (t * (1.0 - t)))
    lo, hi = z0 - margin, z0 + margin
    ends = torch.sigmoid(torch.tensor([lo, hi], dtype=torch.float32))
    if not bool(ends[1] > tau) or bool(ends[0] > tau):
        return None
    return lo, hi


def ffn_moe_threshold(x, logits, tau: float, w_in, b_in, w_up, b_up, w_down_t, b_down, act="relu", threshold=0.0,
                      cut=0.0, *, expert_size: int, up_relu: bool = False) -> torch.Tensor | None:
    """``ffn_moe`` with LTE's threshold routing decided in the kernel; ``None`` where the kernel does not decide.

    ``logits`` ``[..., E]`` are the router's pre-sigmoid outputs for ``x``
    (``x W_r^T + b_r``, computed by the caller); expert e is selected for a
    token where ``sigmoid(logit) > tau``, exactly as ``torch.sigmoid(logits)
    > tau`` selects (``logit_bracket``). The result equals
    ``ffn_moe(x, ..., experts=torch.sigmoid(logits) > tau)``. One call and
    two tensor operations (this output's allocation, nothing else) instead
    of the sigmoid, the comparison and the selection's conversions: each
    costs ~0.1 ms on a 2-core Xeon when a model's weights have just streamed
    through the caches. ``None`` when a logit lies within the bracket
    (~1e-4 of ``logit(tau)``) or is NaN, or for a ``tau`` near 0 or 1: the
    caller selects with torch and calls ``ffn_moe``. Also ``None`` where
    ``ffn_moe`` cannot run (device, dtype, non-contiguous input, more than
    ``MAX_TOKENS`` tokens, autograd, no compiler). ``ValueError`` when the
    logits' experts times ``expert_size`` do not cover ``w_in``'s rows or
    their tokens are not ``x``'s.
    """
    d = w_in.shape[1]
    E = logits.shape[-1]
    T = x.numel() // d if d else 0
    if E * expert_size != w_in.shape[0] or x.shape[-1] != d or logits.numel() != T * E:
        raise ValueError(f"logits {tuple(logits.shape)} x expert size {expert_size} do not cover {w_in.shape[0]} "
                         f"neurons for x {tuple(x.shape)}")
    if not _decodes(x, T, act) or not _ok(x, logits, w_in, b_in, w_up, b_up, w_down_t, b_down) \
            or not _shapes_ok(w_in.shape[0], d, w_in, b_in, w_up, b_up, w_down_t, b_down):
        return None
    bracket = logit_bracket(float(tau))
    lib = _lib()
    if bracket is None or lib is None:
        return None
    y = torch.empty(x.shape, dtype=torch.float32)
    rc = lib.sp_ffn_moe_threshold_f32(x.data_ptr(), T, d, w_in.data_ptr(), _ptr(b_in), _ptr(w_up), _ptr(b_up),
                                      w_down_t.data_ptr(), _ptr(b_down), logits.data_ptr(), bracket[0], bracket[1],
                                      E, int(expert_size), _code(act, up_relu), float(threshold), float(cut),
                                      y.data_ptr(), None, native.threads())
    return y if rc == 0 else None


def sparse_input_linear_reference(x1, w_t, b=None) -> torch.Tensor:
    """``x1 @ w_t + b`` in plain torch (``w_t`` is the weight transposed, ``[in, out]``)."""
    y = x1 @ w_t
    return y + b if b is not None else y


def sparse_input_linear(x1, w_t, b=None) -> torch.Tensor | None:
    """``x1 @ w_t + b`` reading only the rows of ``w_t`` where ``x1`` is non-zero; ``None`` if the CPU kernel cannot."""
    n_in, n_out = w_t.shape
    x2 = x1.reshape(-1, n_in)
    T = x2.shape[0]
    if not 1 <= T <= MAX_TOKENS or torch.is_grad_enabled() and x1.requires_grad:
        return None
    x2 = x2.contiguous()
    if not _ok(x2, w_t, b) or (b is not None and b.shape != (n_out,)):
        return None
    lib = _lib()
    if lib is None:
        return None
    y = torch.empty(T, n_out, dtype=torch.float32)
    if lib.sp_sparse_input_linear_f32(x2.data_ptr(), T, n_in, w_t.data_ptr(), _ptr(b), n_out, y.data_ptr(),
                                      native.threads()) != 0:
        return None
    return y.reshape(*x1.shape[:-1], n_out)
