"""The lean decode path: greedy decoding of llama-style causal LMs without HF ``generate``'s per-step generality.

Why: at batch 1 a small model's decode step is a few hundred small matrix-
vector products; HF ``generate`` adds, per step, a cache object's updates,
mask construction, output dataclasses and logits processors, which on a CPU
cost more than streaming the weights (SmolLM2-135M: ~80 ms per token against
~30 ms to read its 540 MB). Sparsity can only shave the bytes, so a dense
baseline with that overhead would make any sparse path look better than it
is. Both sides of every comparison (``sparsify bench`` case 4, ``sparsify
generate --compare-dense``) therefore decode here.

What it does: a static KV cache allocated once per call (``[layers, batch,
kv heads, prompt + new tokens, head dim]``), rotary tables computed once by
the model's own rotary module, and one step per layer that calls the HF
modules' weights directly (``F.linear`` on ``q/k/v/o_proj``, the RMSNorm
formula of ``LlamaRMSNorm``, HF's dense ``LlamaMLP`` inline) and any other FFN
*as a module* (``layer.mlp(x)``), so whatever a stage or ``fast_modules`` put
there (an activation-sparse FFN, ``MoEFFN``, a ``SparseLinear`` projection)
computes as it would under HF; so does a block with hooks.
Projections and heads that are not plain ``nn.Linear`` are called as modules
too.

Native step: where a plugin provides one (hook ``sparsify_lean_step``; the
layouts plugin's runs every layer, the final norm, the LM head and the argmax
in one C++ call per token, for dense FFNs and activation-sparse ones alike),
each one-token step (every decode step, and a one-token prompt) runs there;
prompts of several tokens, and models or batches it does not cover, take the
torch step. ``LeanDecoder.path`` says which: ``lean native (avx2)`` or
``lean torch (<why>)``. ``native=False`` asks for the torch step.

Exactness: the same operations in the same order as HF's llama forward
(fp32 RMSNorm, ``rotate_half`` rotary, SDPA with the ``1/sqrt(head_dim)``
scale), so greedy tokens equal HF ``generate``'s; the logits agree to fp32
rounding (tested: max abs difference <= 1e-4 on tiny llamas), not bit for
bit, because SDPA may pick another kernel for the grouped key/value heads.
The native step computes the same formulas with its own order of sums
(per-row dot products): logits within 1e-4 of the torch step's at every
position and the same greedy tokens on tiny llamas (tested per ISA).

Coverage: ``supports(model)`` says whether a model can decode here
(``LlamaForCausalLM``-shaped: ``model.model.layers`` of decoder layers with
``self_attn.{q,k,v,o}_proj``, ``input_layernorm``, ``post_attention_layernorm``,
``mlp``; rotary types whose tables do not depend on the sequence length; no
sliding window; no logits processors in the generation config that greedy
HF decoding would apply). Anything else falls back to HF ``generate`` (see
``sparsify_core.generation``), which says so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

#: ``config.model_type`` values whose decoder layers have the llama structure this path implements.
LLAMA_TYPES = ("llama",)
#: rotary types whose cos/sin depend on the position only (``dynamic`` rescales with the length: not here).
_STATIC_ROPE = (None, "default", "linear", "llama3")
#: generation-config fields that would add a logits processor to greedy HF decoding, with their no-op values.
_PROCESSORS = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
               "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
               "forced_eos_token_id": (None,), "sequence_bias": (None,), "encoder_repetition_penalty": (None, 1.0)}


def unsupported_reason(model) -> str | None:
    """Why ``model`` cannot decode on the lean path (one phrase), or ``None`` when it can."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in LLAMA_TYPES:
        return f"architecture {getattr(cfg, 'model_type', type(model).__name__)!r} (the lean path covers llama)"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return "not a LlamaForCausalLM-shaped model"
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                or not all(hasattr(layer, p) for p in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return "a decoder layer without the llama structure"
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type not in _STATIC_ROPE:
        return f"rope type {rope_type!r}"
    if getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    gen = getattr(model, "generation_config", None)
    for name, neutral in _PROCESSORS.items():
        if gen is not None and getattr(gen, name, None) not in neutral:
            return f"generation_config.{name} = {getattr(gen, name)!r}"
    return None


def supports(model) -> bool:
    """Whether ``model`` decodes on the lean path (``unsupported_reason`` is ``None``)."""
    return unsupported_reason(model) is None


def _linear(module: nn.Module):
    """A callable computing ``module``: ``F.linear`` on its tensors for a plain ``nn.Linear``, else the module."""
    if type(module) is nn.Linear:
        w, b = module.weight, module.bias
        return lambda x: F.linear(x, w, b)
    return module


def _rms_norm(module: nn.Module):
    """A callable computing an RMSNorm: ``LlamaRMSNorm``'s formula inline, or the module when it is another kind."""
    w, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if w is None or eps is None or type(module).__name__ != "LlamaRMSNorm":
        return module

    def norm(x):  # LlamaRMSNorm.forward, operation for operation (fp32 statistics)
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return w * x.to(dtype)
    return norm


def _hooked(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _ffn(mlp: nn.Module):
    """A callable computing an FFN block: HF's ``LlamaMLP`` of plain Linears inline (the same operations,
    without four module calls), anything else (a sparse or MoE FFN, a hooked block) as the module."""
    parts = [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
    if type(mlp).__name__ != "LlamaMLP" or any(type(p) is not nn.Linear for p in parts) or _hooked(mlp):
        return mlp
    gate, up, down = (_linear(p) for p in parts)
    act = mlp.act_fn
    return lambda x: down(act(gate(x)) * up(x))


@dataclass
class DecodeResult:
    """One greedy decode: ``ids`` ``[B, T + n]`` (prompt and new tokens), ``n`` new tokens, seconds.

    ``prefill_s``: the prompt's forward and the first token's choice;
    ``decode_s``: the ``n - 1`` later steps; ``step_s``: each later step's
    seconds. ``profile`` (only with ``profile=True``): seconds per part of the
    decode steps (``attention``, ``ffn``, ``head`` and ``rest``: norms, residuals,
    embedding, argmax)."""

    ids: torch.Tensor
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    step_s: list[float] = field(default_factory=list)
    profile: dict[str, float] = field(default_factory=dict)


class LeanDecoder:
    """Greedy decoding of a llama-style causal LM with a static KV cache and one plain step per layer.

    ``native`` (default ``True``): one-token steps run on a plugin's native
    step where one covers the model (``native_step``; ``path`` names it).

    ``model`` must pass ``supports`` (``ValueError`` naming the reason
    otherwise); its weights are used in place (no copy), so a decoder built
    before ``fast_modules`` swapped the FFNs still calls the new ones only if
    rebuilt: build it after the model is final. Inputs and caches live on the
    model's device, in its dtype.
    """

    def __init__(self, model: nn.Module, native: bool = True):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the lean decode path does not cover this model: {reason}")
        self.model = model
        self.step, self.step_reason = native_step(model) if native else (None, "asked for")
        cfg = model.config
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = self.head_dim ** -0.5
        self.gqa = self.n_kv != self.n_heads
        self.layers = [(_rms_norm(l.input_layernorm), _linear(l.self_attn.q_proj), _linear(l.self_attn.k_proj),
                        _linear(l.self_attn.v_proj), _linear(l.self_attn.o_proj),
                        _rms_norm(l.post_attention_layernorm), _ffn(l.mlp))
                       for l in inner.layers[: cfg.num_hidden_layers]]
        self.norm = _rms_norm(inner.norm)
        self.head = _linear(model.lm_head)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @property
    def path(self) -> str:
        """Which step decodes: ``lean native (<step name>)`` or ``lean torch (<why not native>)``."""
        return f"lean native ({self.step.name})" if self.step is not None else f"lean torch ({self.step_reason})"

    @staticmethod
    def _rope(x, cos, sin):
        """``apply_rotary_pos_emb`` of HF llama for one tensor ``[B, H, T, D]`` (``rotate_half`` layout)."""
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _forward(self, x, pos: int, k_cache, v_cache, cos, sin, prof: dict | None):
        """Hidden states ``[B, T, d]`` at positions ``pos .. pos + T - 1`` through every layer, caching k/v."""
        B, T, _ = x.shape
        end = pos + T
        c, s = cos[:, None, pos:end], sin[:, None, pos:end]  # [1, 1, T, D]
        clock = time.perf_counter if prof is not None else None
        for i, (ln1, q_p, k_p, v_p, o_p, ln2, mlp) in enumerate(self.layers):
            t0 = clock() if clock else 0.0
            h = ln1(x)
            q = q_p(h).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            k = k_p(h).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            v = v_p(h).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, c, s), self._rope(k, c, s)
            k_cache[i, :, :, pos:end] = k
            v_cache[i, :, :, pos:end] = v
            a = F.scaled_dot_product_attention(q, k_cache[i, :, :, :end], v_cache[i, :, :, :end],
                                               is_causal=T > 1, scale=self.scale, enable_gqa=self.gqa)
            x = x + o_p(a.transpose(1, 2).reshape(B, T, -1))
            t1 = clock() if clock else 0.0
            x = x + mlp(ln2(x))
            if clock:
                t2 = clock()
                prof["attention"] += t1 - t0
                prof["ffn"] += t2 - t1
        return x

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` of ids ``[B, T]`` through the lean layers (one prefill; for checks)."""
        ids = ids.to(self.device)
        B, T = ids.shape
        k_cache = torch.zeros(len(self.layers), B, self.n_kv, T, self.head_dim, device=self.device, dtype=self.dtype)
        cos, sin = self.rotary(k_cache[0, :1, 0], torch.arange(T, device=self.device)[None])
        x = self._forward(self.embed(ids), 0, k_cache, torch.zeros_like(k_cache), cos, sin, None)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id=None, pad_token_id=None,
                 min_new_tokens: int | None = None, on_token=None, profile: bool = False) -> DecodeResult:
        """Greedily extend prompts ``ids`` ``[B, T]`` (one length, no padding) by up to ``max_new_tokens``.

        As HF ``generate(do_sample=False)``: a sequence ends at an
        ``eos_token_id`` (an int or a list; none: never) and is padded with
        ``pad_token_id`` (default: the first EOS) while others go on;
        decoding stops when every sequence ended or after ``max_new_tokens``.
        EOS is not chosen before ``min_new_tokens`` tokens. ``on_token(t)``
        receives each step's new tokens ``[B]`` (for streaming). Raises
        ``ValueError`` for ids that are not ``[B, T]`` with ``T >= 1``. One-token
        steps run on the native step (``path``) unless the batch exceeds its
        ``max_batch``.
        """
        if ids.dim() != 2 or ids.shape[1] < 1:
            raise ValueError(f"prompt ids of shape [batch, tokens], got {list(ids.shape)}")
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        ids = ids.to(self.device)
        B, T = ids.shape
        total = T + max_new_tokens
        k_cache = torch.zeros(len(self.layers), B, self.n_kv, total, self.head_dim, device=self.device,
                              dtype=self.dtype)
        v_cache = torch.zeros_like(k_cache)
        positions = torch.arange(total, device=self.device)[None]
        cos, sin = self.rotary(k_cache[0, :1, 0], positions)  # [1, total, D], the model's own tables
        eos_t = torch.tensor(eos, device=self.device, dtype=torch.long) if eos else None
        step = self.step if self.step is not None and B <= self.step.max_batch else None
        if step is not None:
            cos_n, sin_n = cos[0].contiguous(), sin[0].contiguous()  # [total, D]
            step.seconds(reset=True)
        prof = dict.fromkeys(("attention", "ffn", "head", "rest"), 0.0) if profile else None
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        step_s: list[float] = []
        start = time.perf_counter()
        x = self.embed(ids)
        pos, n, prefill_s = 0, 0, 0.0
        while n < max_new_tokens:
            t_step = time.perf_counter()
            hold_eos = eos_t is not None and min_new_tokens is not None and n < min_new_tokens
            if step is not None and x.shape[1] == 1:  # one C++ call: layers, norm, head, argmax
                if profile and n == 1:
                    step.seconds(reset=True)  # the prefill's call is not a decode step
                # a copy: the step overwrites its input, which must never alias the embedding's weights
                nxt = step(x[:, 0].clone().contiguous(), pos, k_cache, v_cache, cos_n, sin_n,
                           eos_t if hold_eos else None)
                pos += 1
            else:
                x = self._forward(x, pos, k_cache, v_cache, cos, sin, prof if n > 0 else None)
                pos += x.shape[1]
                t_head = time.perf_counter()
                logits = self.head(self.norm(x[:, -1]))
                if profile and n > 0:
                    prof["head"] += time.perf_counter() - t_head
                if hold_eos:
                    logits[:, eos_t] = float("-inf")
                nxt = logits.argmax(-1)
            if eos_t is not None:
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                done = done | torch.isin(nxt, eos_t)
            out[:, n] = nxt
            n += 1
            if on_token is not None:
                on_token(nxt)
            now = time.perf_counter()
            if n == 1:
                prefill_s = now - start
            else:
                step_s.append(now - t_step)
            if eos_t is not None and bool(done.all()):
                break
            x = self.embed(nxt[:, None])
        decode_s = sum(step_s)
        if prof is not None and step is not None:
            for part, seconds in step.seconds().items():
                prof[part] += seconds
        if prof is not None:
            prof["rest"] = max(decode_s - prof["attention"] - prof["ffn"] - prof["head"], 0.0)
        return DecodeResult(ids=torch.cat([ids, out[:, :n]], 1), prompt_tokens=T, new_tokens=n,
                            prefill_s=prefill_s, decode_s=decode_s, step_s=step_s, profile=prof or {})


def native_step(model: nn.Module):
    """``(step, None)``: the first native decode step a plugin provides for ``model`` (hook
    ``sparsify_lean_step``); ``(None, reason)`` where none does (the plugins' reasons, joined)."""
    from .plugin_manager import plugin_manager

    reasons = []
    for got in plugin_manager()[0].hook.sparsify_lean_step(model=model):
        if isinstance(got, str):
            reasons.append(got)
        elif got is not None:
            return got, None
    return None, "; ".join(reasons) or "no plugin provides a native step"


def weight_bytes(model: nn.Module, ffn_density: float | None = None, head_screened: bool = False) -> dict[str, float]:
    """Bytes of weights one decode step reads, by part, for a llama-style ``model`` (``supports``).

    ``attention``: q/k/v/o projections; ``ffn``: the FFN blocks, all of it
    dense, or with ``ffn_density`` (fraction of neurons active) the gate read
    whole and the up and down rows of active neurons only (what an
    activation-sparse FFN reads); ``head``: the LM head, or with
    ``head_screened`` half of it (the native greedy step's 16-bit screen,
    ``sparsify_kernels.decode.truncation_screen``; the few fp32 rows it then
    computes are left out); ``embedding``: one row per token (negligible).
    Norms are left out. Values in bytes."""
    inner = model.model

    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))

    attn = sum(nbytes(l.self_attn) for l in inner.layers)
    ffn = 0.0
    for l in inner.layers:
        parts = {n: getattr(l.mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")}
        if ffn_density is None or any(p is None for p in parts.values()):
            ffn += nbytes(l.mlp)
        else:
            ffn += nbytes(parts["gate_proj"]) + ffn_density * (nbytes(parts["up_proj"]) + nbytes(parts["down_proj"]))
    head = nbytes(model.lm_head) / (2 if head_screened else 1)
    emb = inner.embed_tokens.weight
    return {"attention": float(attn), "ffn": float(ffn), "head": float(head),
            "embedding": float(emb.shape[1] * emb.element_size())}
