"""A byte-level tokenizer built offline: one token per UTF-8 byte, plus EOS and PAD.

Token id ``b`` is byte ``b`` (0..255), so any text round-trips exactly and no
vocabulary file has to be downloaded. It is a real transformers tokenizer:
``save_pretrained`` / ``AutoTokenizer.from_pretrained`` work as for any model.
"""
from __future__ import annotations

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def _byte_symbols() -> list[str]:
    """The printable symbol byte-level BPE uses for each byte (GPT-2's ``bytes_to_unicode``), by byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:  # bytes without a printable form get code points past 255, in order
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def bytes_tokenizer():
    """A ``PreTrainedTokenizerFast`` with 258 tokens: the 256 bytes, ``<|endoftext|>`` (EOS/BOS), ``<|pad|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {sym: b for b, sym in enumerate(_byte_symbols())}
    vocab[EOS], vocab[PAD] = 256, 257
    # BPE without merges over byte-level symbols: exactly one token per byte.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False)
