"""The header of a GGUF file (metadata and tensor names), read without its tensors.

transformers reads a GGUF config through ``gguf.GGUFReader``, which parses
every tensor into numpy views first (seconds for SmolLM2-135M); a skeleton
for validation needs only the hyper-parameters, which the header holds.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (v2, v3).
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    return f.read(n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS:  # read in one go: vocabularies hold tens of thousands of entries
            fmt = _SCALARS[item]
            return list(struct.unpack(f"<{count}{fmt[1]}", f.read(count * struct.calcsize(fmt))))
        return [_value(f, item) for _ in range(count)]
    raise ValueError(f"unknown GGUF value type {kind}")


def read_header(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """``(metadata, tensor names)`` of a GGUF file (versions 2 and 3), reading no tensor data."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version = _read(f, "<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
        meta = {}
        for _ in range(n_kv):
            key = _string(f)
            meta[key] = _value(f, _read(f, "<I"))
        names = []
        for _ in range(n_tensors):
            names.append(_string(f))
            dims = _read(f, "<I")
            f.read(8 * dims + 4 + 8)  # dims, type, offset
    return meta, names


def llama_config(path: str | Path):
    """The ``LlamaConfig`` of a llama-architecture GGUF file, from its header."""
    from transformers import LlamaConfig

    meta, names = read_header(path)
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path}: architecture {meta.get('general.architecture')!r}, not llama")
    heads = meta["llama.attention.head_count"]
    return LlamaConfig(
        vocab_size=len(meta["tokenizer.ggml.tokens"]), hidden_size=meta["llama.embedding_length"],
        intermediate_size=meta["llama.feed_forward_length"], num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=heads, num_key_value_heads=meta.get("llama.attention.head_count_kv", heads),
        max_position_embeddings=meta.get("llama.context_length", 2048),
        rms_norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-6),
        tie_word_embeddings="output.weight" not in names)  # no separate output matrix: tied to the embeddings
