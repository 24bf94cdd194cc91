"""Greedy generation, timed: what ``sparsify generate`` prints and ``sparsify bench`` case 4 times.

One generation call (``greedy_generate``) for both, so the tokens/s that
``generate`` reports and the bench's come from the same code; the bench
times whole calls interleaved with the dense model, ``generate`` splits one
call into prefill (the prompt's forward, up to the first new token) and
decode (every later token) with a streamer's timestamps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
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


@dataclass
class GenerationStats:
    """One timed generation: ``ids`` ``[1, T + n]``, prompt length ``T``, ``n`` new tokens, seconds."""

    ids: torch.Tensor
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  # from the call to the first new token: the prompt's forward (and one sampling step)
    decode_s: float  # from the first new token to the last: new_tokens - 1 decoding steps

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
                   write: Callable[[str], None] | None = None, min_new_tokens: int | None = None) -> GenerationStats:
    """Generate greedily from ``ids`` ``[1, T]``, streaming text to ``write`` (if given); timed.

    Raises ``ValueError`` for a batch of more than one prompt."""
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"one prompt at a time: ids of shape [1, T], got {list(ids.shape)}")
    clock = _Clock(tokenizer, write)
    start = time.perf_counter()
    out = greedy_generate(model, ids, max_new_tokens, tokenizer, streamer=clock, min_new_tokens=min_new_tokens)
    end = time.perf_counter()
    new = out.shape[1] - ids.shape[1]
    stamps = clock.times[1:]  # one per new token
    first = stamps[0] if stamps else end
    return GenerationStats(ids=out.cpu(), prompt_tokens=ids.shape[1], new_tokens=new, prefill_s=first - start,
                           decode_s=(stamps[-1] - first) if stamps else 0.0)
