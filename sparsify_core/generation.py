"""Greedy generation, timed: what ``sparsify generate`` prints and ``sparsify bench`` case 4 times.

One call (``timed_generate``) for both, so the tokens/s that ``generate``
reports and the bench's come from the same code. It decodes on the lean path
(``sparsify_core.lean``: static KV cache, one native call or one plain torch
step per layer per token) when the
model is llama-shaped, and through HF ``generate`` otherwise
(``greedy_generate``); ``GenerationStats.path`` says which ran. Prefill (the
prompt's forward, up to the first new token) and decode (every later token)
are timed apart.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch


def greedy_generate(model, ids: torch.Tensor, max_new_tokens: int, tokenizer, streamer=None,
                    min_new_tokens: int | None = None) -> torch.Tensor:
    """``model.generate`` greedily from prompt ids ``[1, T]``: the prompt and new tokens ``[1, T + n]``.

    ``min_new_tokens`` forces that many (no early end of sequence: what a
    benchmark wants); ``streamer`` receives tokens as transformers' streamers do."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              min_new_tokens=min_new_tokens, do_sample=False, temperature=None, top_p=None,
                              top_k=None, pad_token_id=pad, streamer=streamer)


#: ``timed_generate``'s ``path`` values: ``auto`` (lean where it covers the model), ``lean``, ``lean-torch``
#: (the lean path without its native step), ``hf``.
PATHS = ("auto", "lean", "lean-torch", "hf")


@dataclass
class GenerationStats:
    """One timed generation: ``ids`` ``[B, T + n]``, prompt length ``T``, ``n`` new tokens, seconds.

    ``path`` is ``lean native (<isa>)``, ``lean torch (<why not native>)`` or
    ``hf generate (<why not lean>)``; ``profile``
    (lean path with ``profile=True``) splits the decode seconds into
    ``attention``, ``ffn``, ``head`` and ``rest``."""

    ids: torch.Tensor
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  # from the call to the first new token: the prompt's forward (and one sampling step)
    decode_s: float  # from the first new token to the last: new_tokens - 1 decoding steps
    path: str = "lean"
    profile: dict = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second of prefill."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second after the first (``nan`` with fewer than two new tokens)."""
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    def summary(self) -> str:
        """One line: ``prefill 812.4 tok/s (7 tokens), decode 41.2 tok/s (63 tokens)``."""
        return (f"prefill {self.prefill_tokens_per_s:.1f} tok/s ({self.prompt_tokens} tokens), "
                f"decode {self.decode_tokens_per_s:.1f} tok/s ({max(self.new_tokens - 1, 0)} tokens)")


class _Clock:
    """A transformers streamer that timestamps each put and forwards decoded text to ``write``."""

    def __init__(self, tokenizer, write: Callable[[str], None] | None):
        self.times: list[float] = []
        self.text = None
        if write is not None:
            from transformers import TextStreamer

            class _Text(TextStreamer):
                def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                    write(text + ("\n" if stream_end else ""))

            self.text = _Text(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def put(self, value) -> None:
        self.times.append(time.perf_counter())  # first put: the prompt; later ones: one new token each
        if self.text is not None:
            self.text.put(value)

    def end(self) -> None:
        if self.text is not None:
            self.text.end()


def timed_generate(model, ids: torch.Tensor, max_new_tokens: int, tokenizer,
                   write: Callable[[str], None] | None = None, min_new_tokens: int | None = None,
                   path: str = "auto", profile: bool = False) -> GenerationStats:
    """Generate greedily from ``ids`` ``[B, T]``, streaming text to ``write`` (if given, batch 1 only); timed.

    ``path``: ``auto`` decodes on the lean path when ``lean.supports(model)``
    and through HF ``generate`` otherwise; ``lean`` insists (``ValueError``
    with the reason when the model is not covered); ``lean-torch`` too, with
    the torch step even where a native one covers the model (one C++ call per
    token, ``lean.native_step``); ``hf`` always uses HF
    ``generate`` (batch 1). The tokens are the same either way (greedy, fp32:
    tested). ``min_new_tokens`` forces that many tokens (no early end of
    sequence: what a benchmark wants). Raises ``ValueError`` for an unknown
    ``path``, for a batch on the HF path or with ``write``."""
    from . import lean

    if path not in PATHS:
        raise ValueError(f"unknown decode path {path!r}: choose {', '.join(PATHS)}")
    if ids.dim() != 2:
        raise ValueError(f"prompt ids of shape [batch, tokens], got {list(ids.shape)}")
    reason = lean.unsupported_reason(model) if path != "hf" else "asked for"
    if path in ("lean", "lean-torch") and reason is not None:
        raise ValueError(f"the lean decode path does not cover this model: {reason}")
    if reason is None:
        if write is not None and ids.shape[0] != 1:
            raise ValueError("streaming text needs one prompt: ids of shape [1, T]")
        text = _Clock(tokenizer, write) if write is not None else None
        if text is not None:
            text.put(ids.cpu())
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # the end-of-sequence ids HF generate stops at: the generation config's, not the tokenizer's
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        decoder = lean.LeanDecoder(model, native=path != "lean-torch")
        res = decoder.generate(ids, max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                               min_new_tokens=min_new_tokens, profile=profile,
                               on_token=None if text is None else lambda t: text.put(t.cpu()))
        if text is not None:
            text.end()
        return GenerationStats(ids=res.ids.cpu(), prompt_tokens=res.prompt_tokens, new_tokens=res.new_tokens,
                               prefill_s=res.prefill_s, decode_s=res.decode_s, path=decoder.path,
                               profile=res.profile)
    if ids.shape[0] != 1:
        raise ValueError(f"one prompt at a time on the HF path: ids of shape [1, T], got {list(ids.shape)}")
    clock = _Clock(tokenizer, write)
    start = time.perf_counter()
    out = greedy_generate(model, ids, max_new_tokens, tokenizer, streamer=clock, min_new_tokens=min_new_tokens)
    end = time.perf_counter()
    new = out.shape[1] - ids.shape[1]
    stamps = clock.times[1:]  # one per new token
    first = stamps[0] if stamps else end
    return GenerationStats(ids=out.cpu(), prompt_tokens=ids.shape[1], new_tokens=new, prefill_s=first - start,
                           decode_s=(stamps[-1] - first) if stamps else 0.0, path=f"hf generate ({reason})")
