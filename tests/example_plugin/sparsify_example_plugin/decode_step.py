"""A lean-path decode step in plain torch (hook ``sparsify_lean_step``): the contract, readable in one screen.

A real plugin returns a faster step (the built-in one is one C++ call per token); this one calls the model's
own modules, so it covers any llama-shaped model, and is offered only when ``SPARSIFY_EXAMPLE_LEAN_STEP=1``
(installed next to the built-in plugins it would otherwise compete with them for the first place).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F


class TorchStep:
    """One greedy step of every layer, the final norm, the LM head and the argmax, through the model's modules."""

    name = "example torch"
    max_batch = 1 << 30

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv = getattr(cfg, "num_key_value_heads", None) or self.heads
        self._seconds = dict.fromkeys(("attention", "ffn", "head"), 0.0)

    def seconds(self, reset: bool = False) -> dict[str, float]:
        """Seconds spent so far in attention, FFN and head."""
        out = dict(self._seconds)
        if reset:
            self._seconds = dict.fromkeys(out, 0.0)
        return out

    @torch.no_grad()
    def __call__(self, x, pos, k_cache, v_cache, cos, sin, banned=None):
        B, hd = x.shape[0], cos.shape[-1]
        c, s = cos[pos], sin[pos]

        def rope(t):  # HF's rotate_half layout
            return t * c + torch.cat((-t[..., hd // 2:], t[..., : hd // 2]), -1) * s

        for i, layer in enumerate(self.model.model.layers):
            t0 = time.perf_counter()
            attn, h = layer.self_attn, layer.input_layernorm(x)
            q = rope(attn.q_proj(h).view(B, self.heads, 1, hd))
            k_cache[i, :, :, pos] = rope(attn.k_proj(h).view(B, self.kv, hd))
            v_cache[i, :, :, pos] = attn.v_proj(h).view(B, self.kv, hd)
            a = F.scaled_dot_product_attention(q, k_cache[i, :, :, : pos + 1], v_cache[i, :, :, : pos + 1],
                                               scale=hd ** -0.5, enable_gqa=self.kv != self.heads)
            x = x + attn.o_proj(a.reshape(B, -1))
            t1 = time.perf_counter()
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            t2 = time.perf_counter()
            self._seconds["attention"] += t1 - t0
            self._seconds["ffn"] += t2 - t1
        t3 = time.perf_counter()
        logits = self.model.lm_head(self.model.model.norm(x))
        if banned is not None:
            logits[:, banned] = float("-inf")
        nxt = logits.argmax(-1)
        self._seconds["head"] += time.perf_counter() - t3
        return nxt
