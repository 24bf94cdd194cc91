"""Sources: ``arithmetic`` (data: written-out sums) and ``arithmetic_gpt2`` (a model for exactly that text).

The model's tokenizer has one token per character of a sum (digits, space,
``+``, ``=``, ``.``) plus end-of-text, padding and unknown, built offline with
``tokenizers``: nothing is downloaded, and ``save_pretrained`` /
``AutoTokenizer.from_pretrained`` round-trip it as for any model.
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

from sparsify_core import DataSource, LoadedModel, ModelSource, Params

#: Every character a written-out sum uses, in token-id order.
CHARS = "0123456789 +=."
EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<|unk|>"


class Arithmetic(DataSource):
    """Written-out sums ("12 + 30 = 42."), one document each; every ``eval_every``-th is held out for eval."""

    name = "arithmetic"

    class Params(Params):
        limit: int = Field(100, ge=4, le=1000, description="operands run from 0 to limit - 1")
        eval_every: int = Field(10, ge=2, description="every n-th sum goes to the eval partition")

    def texts(self, params):
        sums = [f"{a} + {b} = {a + b}." for a in range(params.limit) for b in range(params.limit)]
        return {"train": [s for i, s in enumerate(sums) if i % params.eval_every],
                "eval": sums[::params.eval_every]}


def char_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per character of ``CHARS``, then EOS (also BOS), PAD, UNK."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(CHARS)}
    for special in (EOS, PAD, UNK):
        vocab[special] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character a word
    core.decoder = decoders.Fuse()  # and back without separators
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, clean_up_tokenization_spaces=False)


class ArithmeticGPT2(ModelSource):
    """A tiny randomly initialised GPT-2 over the characters of written-out sums (for the ``arithmetic`` data)."""

    name = "arithmetic_gpt2"

    class Params(Params):
        hidden_size: int = Field(32, ge=1, description="embedding width; a multiple of heads")
        layers: int = Field(2, ge=1)
        heads: int = Field(4, ge=1)
        max_positions: int = Field(128, ge=2, description="longest sequence (learned position embeddings)")
        init_seed: int = Field(0, description="seed of the random initialisation")

        @model_validator(mode="after")
        def _heads_divide(self):
            if self.hidden_size % self.heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
            return self

    @staticmethod
    def _config(params, tokenizer):
        from transformers import GPT2Config

        return GPT2Config(vocab_size=len(tokenizer), n_embd=params.hidden_size, n_layer=params.layers,
                          n_head=params.heads, n_inner=4 * params.hidden_size, n_positions=params.max_positions,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)

    def load(self, params, *, device, dtype):
        from transformers import GPT2LMHeadModel

        tokenizer = char_tokenizer()
        with torch.random.fork_rng(devices=[]):  # the same weights for the same seed; the caller's RNG untouched
            torch.manual_seed(params.init_seed)
            model = GPT2LMHeadModel(self._config(params, tokenizer))
        model = model.to(device=device, dtype=dtype).eval()
        count = sum(p.numel() for p in model.parameters())
        return LoadedModel(model, tokenizer, "causal_lm", f"arithmetic gpt2 ({count / 1e3:.0f}K params)")

    def skeleton(self, params):
        """The same GPT-2 on the meta device: no weights, no memory."""
        from transformers import GPT2LMHeadModel

        with torch.device("meta"):
            return GPT2LMHeadModel(self._config(params, char_tokenizer()))
