"""A native greedy decode step for llama-style decoders: every layer, the final norm, the LM head and the argmax
in one C++ call per new token (``csrc/decode.cpp``), for one token per sequence (``T = 1``), fp32, CPU.

Why: at batch 1 a small model's decode step is a few hundred small GEMVs; through torch each pays a dispatch
and a thread-pool fork-join that on a 2-core CPU cost more than reading its weights (SmolLM2-135M: ~85 ms per
token against ~25 ms for its 540 MB), so sparsity could only shave the smaller part. One call per step leaves
the bytes.

A layer (``LayerWeights``) is HF's ``LlamaDecoderLayer`` in eval: RMSNorm with fp32 statistics, the q/k/v
GEMVs (one fused pass over the three weights), RoPE with the model's cos/sin tables (``rotate_half``
layout), the new key/value written into the caller's static cache, grouped-query attention over the cache
(``softmax(q k^T / sqrt(head_dim)) v``), ``o_proj`` and the residual, RMSNorm, and the FFN and its
residual. Any projection of a layer with a dense FFN may be TEAL's input-sparse one
(``LayerWeights.input_thresholds``: input entries below a threshold zeroed, their weight rows skipped). The FFN is ``dense`` (``down(act(gate(h)) * up(h))``, all neurons), ``sparse`` (the activation-sparse
kernel of ``ffn.py``/``csrc/ffn.cpp``: the gate for every neuron, up and down rows for the active ones only)
or ``predicted`` (the same over the neurons a low-rank predictor chooses, DejaVu / PowerInfer: approximate,
as ``ffn.ffn_predicted``). The activations are ``ffn.ACTIVATIONS`` (FATReLU ``threshold``, CATS ``cut``,
dReLU ``up_relu``).

Sources of the formulas: HF transformers' ``LlamaDecoderLayer`` / ``LlamaRMSNorm`` / ``apply_rotary_pos_emb``
(RMSNorm: Zhang & Sennrich 2019; RoPE: Su et al. 2021, RoFormer; grouped-query attention: Ainslie et al.
2023); the activation-sparse FFN as in ``ffn.py`` (ProSparse, Turbo Sparse's dReLU, DejaVu's predictor).

``decode_step_reference`` is the plain-torch definition the kernel is tested against; ``DecodeStep`` runs
the kernel. Sums run in another order than torch's (per-row dot products with several accumulators), so
the two agree to fp32 rounding, not bit for bit.
"""
from __future__ import annotations

import ctypes
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsify_core.ffn import zero_small_inputs

from . import native
from .ffn import ACTIVATIONS, MAX_TOKENS, UP_RELU, activation, ffn_reference, truncation_screen  # noqa: F401

_P, _I = ctypes.c_void_p, ctypes.c_int64
FFN_KINDS = {"dense": 0, "sparse": 1, "predicted": 2}
#: TEAL projection name -> its ``LayerWeights`` weight field, in ``sp_decoder_set_input_sparse``'s order
PROJECTION_WEIGHTS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
INPUT_PROJECTIONS = tuple(PROJECTION_WEIGHTS)


@dataclass
class LayerWeights:
    """One llama decoder layer's tensors (fp32, contiguous, CPU, for ``DecodeStep``).

    Shapes (``d`` hidden size, ``H``/``KV`` query/key-value heads, ``hd`` head dim, ``F`` FFN neurons):
    ``ln1``, ``ln2`` ``[d]``; ``wq`` ``[H hd, d]``, ``wk``/``wv`` ``[KV hd, d]``, ``wo`` ``[d, H hd]`` (biases
    ``[out]`` or ``None``); ``w_gate``/``w_up`` ``[F, d]``; ``w_down`` ``[d, F]`` (an ``nn.Linear``'s weight)
    for ``ffn="dense"`` and ``[F, d]`` (transposed: neuron j's down column is row j) for ``sparse`` and
    ``predicted``; ``p_in`` ``[r, d]``, ``p_out`` ``[F, r]``, ``p_bias`` ``[F]`` for ``predicted``.
    ``input_thresholds`` (TEAL, Liu et al. 2025): projection name (``q k v o gate up down``) -> threshold
    ``t >= 0``; that projection computes ``s(x) W + b`` with ``s`` zeroing the input entries ``|x| < t``
    (``sparsify_core.ffn.zero_small_inputs``), its weight stored transposed, ``[in, out]``, so the rows of
    the zeroed inputs are skipped. Only a dense FFN's projections may carry one.
    """

    ln1: torch.Tensor
    eps1: float
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    ln2: torch.Tensor
    eps2: float
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    ffn: str = "dense"
    act: str = "silu"
    threshold: float = 0.0
    cut: float = 0.0
    up_relu: bool = False
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None
    p_in: torch.Tensor | None = None
    p_out: torch.Tensor | None = None
    p_bias: torch.Tensor | None = None
    p_threshold: float = 0.0
    input_thresholds: dict[str, float] | None = None

    def threshold_of(self, proj: str) -> float | None:
        """The TEAL input threshold of projection ``proj`` (one of ``INPUT_PROJECTIONS``), or ``None``: plain."""
        return (self.input_thresholds or {}).get(proj)

    @property
    def dff(self) -> int:
        """The FFN's neuron count (``w_gate`` is ``[F, d]``, or ``[d, F]`` when its input is thresholded)."""
        return self.w_gate.shape[1 if self.threshold_of("gate") is not None else 0]

    def tensors(self) -> list[torch.Tensor | None]:
        """The 19 tensors in ``sp_decoder_set_layer``'s order."""
        return [self.ln1, self.ln2, self.wq, self.bq, self.wk, self.bk, self.wv, self.bv, self.wo, self.bo,
                self.w_gate, self.b_gate, self.w_up, self.b_up, self.w_down, self.b_down, self.p_in, self.p_out,
                self.p_bias]


def _proj(x, w, b, threshold):
    """A projection of ``decode_step_reference``: ``F.linear`` (weight ``[out, in]``), or TEAL's input-sparse
    form (``threshold`` set: the input thresholded, the weight ``[in, out]``)."""
    if threshold is None:
        return F.linear(x, w, b)
    y = zero_small_inputs(x, threshold) @ w
    return y + b if b is not None else y


def _rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def decode_step_reference(layers: list[LayerWeights], norm: torch.Tensor, eps: float, head_w: torch.Tensor,
                          head_b: torch.Tensor | None, heads: int, kv_heads: int, x: torch.Tensor, pos: int,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          banned=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode step in plain torch: ``(logits [B, vocab], next ids [B])``; writes position ``pos`` of the caches.

    ``x`` ``[B, d]``: the new tokens' embeddings; ``k_cache``/``v_cache`` ``[layers, B, KV, L, hd]`` with
    positions ``< pos`` filled; ``cos``/``sin`` ``[L, hd]``; ``banned``: token ids never chosen (``-inf``
    logits). The definition ``DecodeStep`` matches (to fp32 rounding).
    """
    B, d = x.shape
    hd = cos.shape[-1]
    c, s = cos[pos], sin[pos]
    for i, L in enumerate(layers):
        t = L.threshold_of
        h = _rms_norm(x, L.ln1, L.eps1)
        q = _rope(_proj(h, L.wq, L.bq, t("q")).view(B, heads, hd), c, s)
        k = _rope(_proj(h, L.wk, L.bk, t("k")).view(B, kv_heads, hd), c, s)
        k_cache[i, :, :, pos] = k
        v_cache[i, :, :, pos] = _proj(h, L.wv, L.bv, t("v")).view(B, kv_heads, hd)
        keys = k_cache[i, :, :, : pos + 1].repeat_interleave(heads // kv_heads, 1)  # [B, H, n, hd]
        vals = v_cache[i, :, :, : pos + 1].repeat_interleave(heads // kv_heads, 1)
        p = torch.softmax(torch.einsum("bhd,bhnd->bhn", q, keys) / math.sqrt(hd), -1)
        x = x + _proj(torch.einsum("bhn,bhnd->bhd", p, vals).reshape(B, heads * hd), L.wo, L.bo, t("o"))
        h = _rms_norm(x, L.ln2, L.eps2)
        if L.ffn == "dense":
            u = _proj(h, L.w_up, L.b_up, t("up"))
            u = torch.relu(u) if L.up_relu else u
            g = activation(L.act, _proj(h, L.w_gate, L.b_gate, t("gate")), L.threshold, L.cut)
            x = x + _proj(g * u, L.w_down, L.b_down, t("down"))
        else:
            select = None
            if L.ffn == "predicted":
                select = F.linear(F.linear(h, L.p_in), L.p_out, L.p_bias) >= L.p_threshold
            x = x + ffn_reference(h, L.w_gate, L.b_gate, L.w_up, L.b_up, L.w_down, L.b_down, L.act, L.threshold,
                                  L.cut, select=select, up_relu=L.up_relu)
    logits = F.linear(_rms_norm(x, norm, eps), head_w, head_b)
    if banned is not None and len(banned):
        logits[:, torch.as_tensor(banned, dtype=torch.long)] = float("-inf")
    return logits, logits.argmax(-1)


def _lib():
    lib = native.library()
    if lib is not None and not hasattr(lib, "_decode_typed"):
        lib.sp_decoder_new.argtypes = [_I, _I, _I, _I, _I, _I, _I, _P, ctypes.c_float, _P, _P]
        lib.sp_decoder_new.restype = _P
        lib.sp_decoder_free.argtypes = [_P]
        lib.sp_decoder_free.restype = None
        lib.sp_decoder_set_layer.argtypes = [_P, _I, _P, _P, _P]
        lib.sp_decoder_set_layer.restype = ctypes.c_int
        lib.sp_decoder_set_input_sparse.argtypes = [_P, _I, _P]
        lib.sp_decoder_set_input_sparse.restype = ctypes.c_int
        lib.sp_decoder_set_head_screen.argtypes = [_P, _P, _P]
        lib.sp_decoder_set_head_screen.restype = ctypes.c_int
        lib.sp_decoder_step.argtypes = [_P, _P, _I, _I, _P, _P, _I, _P, _P, _P, _P, _I, _P, _P, ctypes.c_int]
        lib.sp_decoder_step.restype = ctypes.c_int
        lib._decode_typed = True
    return lib


def available() -> bool:
    """True when the compiled kernels load here (else ``DecodeStep`` cannot be built)."""
    return _lib() is not None


def _check(name: str, t: torch.Tensor | None, shape: tuple | None) -> None:
    if t is None:
        return
    if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
        raise ValueError(f"{name}: the native decode step needs contiguous float32 CPU tensors, got "
                         f"{str(t.dtype).removeprefix('torch.')} on {t.device.type}"
                         + ("" if t.is_contiguous() else ", not contiguous"))
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {shape}")


class DecodeStep:
    """The native decode step of a llama-style decoder (``decode_step_reference`` is its definition).

    Weights are borrowed, not copied: keep them alive and do not replace them while the step is used (in-place
    changes are seen; the head's screen is rebuilt when the head's weight changed in place). ``name`` is the
    ISA variant that computes (``native.loaded_isa()``); ``max_batch`` the most sequences one step takes
    (``ffn.MAX_TOKENS`` with an activation-sparse FFN, else unbounded).
    With ``head_screen`` (the default) a call that asks for no logits reads the LM head's 16-bit high
    halves for every row (``truncation_screen``, 2 bytes per head weight of memory) and fp32 rows only
    where the bound leaves a row able to be the maximum: the same ids, half the head's bytes (SmolLM2-135M:
    113 -> 57 MB per token). Raises ``ValueError`` (naming the tensor) for a tensor that is not contiguous
    fp32 on the CPU or has the wrong shape, an unknown FFN kind or activation, and ``RuntimeError`` when the
    kernels are unavailable.
    """

    def __init__(self, layers: list[LayerWeights], norm: torch.Tensor, eps: float, head_w: torch.Tensor,
                 head_b: torch.Tensor | None, heads: int, kv_heads: int, head_dim: int, head_screen: bool = True):
        lib = _lib()
        if lib is None:
            raise RuntimeError(f"the native kernels are unavailable ({native.failure() or 'SPARSIFY_NO_NATIVE=1'})")
        vocab, d = head_w.shape
        dff = layers[0].dff
        self.d, self.vocab, self.heads, self.kv_heads, self.head_dim = d, vocab, heads, kv_heads, head_dim
        self.n_layers = len(layers)
        for name, t, shape in (("norm", norm, (d,)), ("lm_head.weight", head_w, None),
                               ("lm_head.bias", head_b, (vocab,))):
            _check(name, t, shape)
        self._keep = [norm, head_w, head_b]
        self._handle = lib.sp_decoder_new(len(layers), d, heads, kv_heads, head_dim, dff, vocab, norm.data_ptr(),
                                          float(eps), head_w.data_ptr(), None if head_b is None else head_b.data_ptr())
        if not self._handle:
            raise ValueError(f"bad dimensions: {heads} heads, {kv_heads} kv heads, head_dim {head_dim}")
        self._lib = lib
        self.max_batch = MAX_TOKENS if any(L.ffn != "dense" or L.input_thresholds for L in layers) else 1 << 30
        for i, L in enumerate(layers):
            self._set_layer(i, L, d, dff)
        self._head_w = head_w
        self.head_screen = None
        if head_screen:
            self._screen_head()
        self.name = native.loaded_isa()
        self._seconds = (ctypes.c_double * 3)()

    def _screen_head(self) -> None:
        """(Re)build the LM head's screen from its weights as they are now (``truncation_screen``)."""
        screen = truncation_screen(self._head_w)
        if screen is None:
            return
        if self._lib.sp_decoder_set_head_screen(self._handle, *(t.data_ptr() for t in screen)) != 0:
            raise ValueError("the LM head's screen was refused by the kernel")
        self.head_screen, self._head_version = screen, self._head_w._version  # the old screen is freed here

    def _set_layer(self, i: int, L: LayerWeights, d: int, dff: int) -> None:
        if L.ffn not in FFN_KINDS:
            raise ValueError(f"layer {i}: unknown FFN kind {L.ffn!r}; known: {', '.join(FFN_KINDS)}")
        if L.act not in ACTIVATIONS:
            raise ValueError(f"layer {i}: unknown activation {L.act!r}; known: {', '.join(ACTIVATIONS)}")
        H, KV, hd = self.heads, self.kv_heads, self.head_dim
        r = L.p_in.shape[0] if L.p_in is not None else 0
        down = (d, dff) if L.ffn == "dense" else (dff, d)
        shapes = {"ln1": (d,), "ln2": (d,), "wq": (H * hd, d), "bq": (H * hd,), "wk": (KV * hd, d),
                  "bk": (KV * hd,), "wv": (KV * hd, d), "bv": (KV * hd,), "wo": (d, H * hd), "bo": (d,),
                  "w_gate": (dff, d), "b_gate": (dff,), "w_up": (dff, d), "b_up": (dff,), "w_down": down,
                  "b_down": (d,), "p_in": (r, d), "p_out": (dff, r), "p_bias": (dff,)}
        unknown = set(L.input_thresholds or {}) - set(INPUT_PROJECTIONS)
        if unknown:
            raise ValueError(f"layer {i}: input_thresholds for {sorted(unknown)}; known: {', '.join(INPUT_PROJECTIONS)}")
        if L.ffn != "dense" and any(L.threshold_of(n) is not None for n in ("gate", "up", "down")):
            raise ValueError(f"layer {i}: input thresholds on a {L.ffn} FFN's projections")
        for proj, t in (L.input_thresholds or {}).items():
            if not (isinstance(t, float) and math.isfinite(t) and t >= 0):
                raise ValueError(f"layer {i}: input threshold of {proj} must be a finite float >= 0, got {t!r}")
            shapes[PROJECTION_WEIGHTS[proj]] = shapes[PROJECTION_WEIGHTS[proj]][::-1]  # stored [in, out]
        for name, shape in shapes.items():
            _check(f"layer {i} {name}", getattr(L, name), shape)
        if L.ffn == "predicted" and (L.p_in is None or L.p_out is None):
            raise ValueError(f"layer {i}: a predicted FFN needs p_in and p_out")
        tensors = L.tensors()
        self._keep += tensors
        ptrs = (ctypes.c_void_p * 19)(*[None if t is None else t.data_ptr() for t in tensors])
        fparams = (ctypes.c_float * 5)(L.eps1, L.eps2, L.threshold, L.cut, L.p_threshold)
        code = ACTIVATIONS[L.act] | (UP_RELU if L.up_relu else 0)
        iparams = (ctypes.c_int64 * 3)(FFN_KINDS[L.ffn], code, r)
        if self._lib.sp_decoder_set_layer(self._handle, i, ptrs, fparams, iparams) != 0:
            raise ValueError(f"layer {i}: refused by the kernel (FFN kind {L.ffn!r}, predictor rank {r})")
        if L.input_thresholds:
            ts = (ctypes.c_float * 7)(*[-1.0 if L.threshold_of(n) is None else L.threshold_of(n)
                                        for n in INPUT_PROJECTIONS])
            if self._lib.sp_decoder_set_input_sparse(self._handle, i, ts) != 0:
                raise ValueError(f"layer {i}: input thresholds refused by the kernel")

    def __del__(self):
        handle = getattr(self, "_handle", None)
        if handle:
            self._lib.sp_decoder_free(handle)
            self._handle = None

    def __call__(self, x: torch.Tensor, pos: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, banned: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None) -> torch.Tensor:
        """Next ids ``[B]`` (int64) after the new tokens' embeddings ``x`` ``[B, d]`` at position ``pos``.

        ``x`` is overwritten (the last hidden state before the final norm). ``k_cache``/``v_cache``:
        ``[layers, B, KV, L, hd]`` contiguous fp32, positions ``< pos`` filled, ``pos`` written here;
        ``cos``/``sin`` ``[L, hd]``; ``banned``: int64 ids never chosen; ``logits`` ``[B, vocab]``, if given,
        receives the logits. Raises ``ValueError`` for a position outside the cache, a batch over
        ``max_batch`` or tensors of other shapes or kinds.
        """
        B = x.shape[0]
        L = k_cache.shape[3]
        _check("x", x, (B, self.d))
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            _check(name, t, (self.n_layers, B, self.kv_heads, L, self.head_dim))
        _check("cos", cos, (L, self.head_dim))
        _check("sin", sin, (L, self.head_dim))
        if not 0 <= pos < L or B > self.max_batch:
            raise ValueError(f"position {pos} outside a cache of {L}, or batch {B} over {self.max_batch}")
        if logits is not None:
            _check("logits", logits, (B, self.vocab))
        if self.head_screen is not None and self._head_w._version != self._head_version:
            self._screen_head()  # the head changed in place since: a stale screen could drop the true maximum
        nxt = torch.empty(B, dtype=torch.int64)
        ban = banned.to(torch.int64).contiguous() if banned is not None else None
        rc = self._lib.sp_decoder_step(self._handle, x.data_ptr(), B, pos, k_cache.data_ptr(), v_cache.data_ptr(), L,
                                       cos.data_ptr(), sin.data_ptr(), None if logits is None else logits.data_ptr(),
                                       None if ban is None else ban.data_ptr(), 0 if ban is None else ban.numel(),
                                       nxt.data_ptr(), self._seconds, native.threads())
        if rc != 0:
            raise ValueError(f"the native decode step refused batch {B} at position {pos} (code {rc})")
        return nxt

    def seconds(self, reset: bool = False) -> dict[str, float]:
        """Seconds spent so far in ``attention``, ``ffn`` and ``head`` (norm, GEMV, argmax) by the calls."""
        out = {"attention": self._seconds[0], "ffn": self._seconds[1], "head": self._seconds[2]}
        if reset:
            for i in range(3):
                self._seconds[i] = 0.0
        return out
