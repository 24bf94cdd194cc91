"""A llama-style causal LM written as a GGUF file that llama.cpp loads (``sparsify export --format gguf``).

Why: to compare sparsify's decode with llama.cpp's on the same weights
(``sparsify bench`` case 4) the weights must reach llama.cpp through a file
sparsify writes itself. The ``gguf`` package (llama.cpp's own Python
writer) does the encoding; this module only maps names and applies
llama.cpp's conventions, those of its ``convert_hf_to_gguf.py`` for
``LlamaForCausalLM``:

- tensors ``token_embd``, ``blk.N.{attn_norm, attn_q, attn_k, attn_v,
  attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}``, ``output_norm`` and
  ``output`` (left out when the head is tied to the embedding), each
  ``.weight``;
- the rows of ``attn_q`` and ``attn_k`` permuted per head from HF's
  ``rotate_half`` rotary layout to GGML's interleaved pairs (row ``j`` and
  ``j + head_dim/2`` of a head become rows ``2j`` and ``2j + 1``);
- quantization ``f32`` (every tensor as is), ``q8_0`` or ``q4_1`` (the 2-D
  weights, embedding included, in 32-value blocks; norms stay f32).

llama.cpp's llama graph computes ``down(silu(gate(x)) * up(x))``: an FFN with
another activation (ReLU, FATReLU from a ProSparse recipe) cannot be
written faithfully, so ``write_gguf`` refuses it unless ``allow_silu``
(the file then computes the SiLU model with the same weights: the same bytes
and FLOPs, for speed comparisons only). The vocabulary is written as
llama.cpp's ``gpt2`` BPE when the tokenizer is a byte-level BPE with merges,
else as ``none`` (llama.cpp then takes token ids only, which is all a
benchmark feeds it).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import SparsifyError
from .ffn import weight_out_in

#: the GGUF tensor types ``write_gguf`` writes, by the name users give.
QTYPES = ("f32", "q8_0", "q4_1")


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection ``[n_heads * head_dim, d]`` from HF's half-split rotary layout to GGML's
    interleaved pairs (``convert_hf_to_gguf``'s ``LlamaModel.permute``); ``n_heads`` is the projection's heads."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _weight(module: nn.Module) -> torch.Tensor:
    """The dense ``[out, in]`` weight of a projection (Linear, Conv1D-like, or a layout's ``dense_weight``)."""
    return weight_out_in(module).detach()


def _activation_name(act: nn.Module) -> str:
    return type(act).__name__


def llama_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The GGUF tensors (llama.cpp names, float32, q/k permuted) of a llama-style ``model``.

    Raises ``SparsifyError`` when a layer is not llama-shaped (its FFN split
    into experts, a bias on a projection, no ``gate_proj``)."""
    cfg = model.config
    inner = model.model
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    out = {"token_embd.weight": inner.embed_tokens.weight.detach()}
    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        parts = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
        if not all(hasattr(mlp, p) for p in parts) or hasattr(mlp, "num_experts"):
            raise SparsifyError(f"layer {i}: a {type(mlp).__name__} FFN, which llama.cpp's llama graph has no "
                                "tensors for (export the dense FFN form)")
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if getattr(getattr(attn, p), "bias", None) is not None:
                raise SparsifyError(f"layer {i}: self_attn.{p} has a bias, which llama.cpp's llama graph lacks")
        b = f"blk.{i}."
        out[b + "attn_norm.weight"] = layer.input_layernorm.weight.detach()
        out[b + "attn_q.weight"] = permute_rotary(_weight(attn.q_proj), n_heads)
        out[b + "attn_k.weight"] = permute_rotary(_weight(attn.k_proj), n_kv)
        out[b + "attn_v.weight"] = _weight(attn.v_proj)
        out[b + "attn_output.weight"] = _weight(attn.o_proj)
        out[b + "ffn_norm.weight"] = layer.post_attention_layernorm.weight.detach()
        for p, name in parts.items():
            out[b + name + ".weight"] = _weight(getattr(mlp, p))
    out["output_norm.weight"] = inner.norm.weight.detach()
    head = _weight(model.lm_head)
    if not getattr(cfg, "tie_word_embeddings", False) or head.data_ptr() != out["token_embd.weight"].data_ptr():
        out["output.weight"] = head
    return {k: v.float().contiguous().cpu() for k, v in out.items()}


def _vocab(writer, tokenizer, vocab_size: int) -> str:
    """Write the tokenizer's vocabulary; returns the GGUF tokenizer model written (``gpt2`` or ``none``)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not model.get("merges"):
        writer.add_tokenizer_model("none")
        return "none"
    special = set(getattr(tokenizer, "all_special_ids", []))
    added = {t.content: i for t, i in ((t, i) for i, t in tokenizer.added_tokens_decoder.items())}
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if i in special or (t in added and i in special)
                         else gguf.TokenType.USER_DEFINED if t in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if "smollm" in str(getattr(tokenizer, "name_or_path", "")).lower()
                             else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, fn in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, name, None) is not None:
            fn(int(getattr(tokenizer, name)))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return "gpt2"


def write_gguf(model: nn.Module, tokenizer, dest, qtype: str = "f32", allow_silu: bool = False,
               name: str = "sparsify") -> Path:
    """Write llama-style ``model`` (and ``tokenizer``'s vocabulary) to the GGUF file ``dest``; returns ``dest``.

    ``qtype`` is one of ``QTYPES``. Raises ``SparsifyError`` (one line) when
    the model is not llama-shaped, ``qtype`` is unknown, or its FFN activation
    is not SiLU and ``allow_silu`` is false."""
    import gguf

    if qtype not in QTYPES:
        raise SparsifyError(f"unknown GGUF type {qtype!r}: choose {', '.join(QTYPES)}")
    if qtype != "f32" and not callable(getattr(getattr(gguf, "quants", None), "quantize", None)):
        raise SparsifyError(f"gguf {getattr(gguf, '__version__', '(old)')} cannot quantize to {qtype}: "
                            "pip install 'sparsify[gguf]'")
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise SparsifyError(f"a {getattr(cfg, 'model_type', type(model).__name__)} model: the GGUF export "
                            "writes llama-architecture models only")
    acts = {_activation_name(l.mlp.act_fn) for l in model.model.layers if hasattr(l.mlp, "act_fn")}
    if acts - {"SiLU", "SiLUActivation"} and not allow_silu:
        raise SparsifyError(f"the FFNs use {', '.join(sorted(acts))}, which llama.cpp's llama graph does not "
                            "compute (it applies SiLU); export anyway only to compare speed (allow_silu / "
                            "--allow-silu)")
    tensors = llama_tensors(model)
    dest = Path(dest)
    writer = gguf.GGUFWriter(str(dest), "llama")
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or n_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[qtype]
    writer.add_file_type(ftype)
    if tokenizer is not None:
        _vocab(writer, tokenizer, cfg.vocab_size)
    else:
        writer.add_tokenizer_model("none")
    gtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_1": gguf.GGMLQuantizationType.Q4_1}.get(qtype)
    for key, t in tensors.items():
        data = t.numpy()
        if gtype is not None and data.ndim == 2 and data.shape[-1] % 32 == 0:
            writer.add_tensor(key, gguf.quants.quantize(data, gtype), raw_dtype=gtype)
        else:
            writer.add_tensor(key, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def export_gguf(output, dest, qtype: str = "f32", allow_silu: bool = False) -> Path:
    """Write sparsify output folder ``output`` as the GGUF file ``dest`` (``write_gguf``); returns ``dest``.

    The model loads as saved (``load_output(fast=False)``), layouts densified
    tensor by tensor. Raises ``SparsifyError`` as ``write_gguf`` does and
    when ``output`` is not an output folder."""
    from .output import load_output

    loaded = load_output(output, fast=False)
    return write_gguf(loaded.model, loaded.tokenizer, dest, qtype, allow_silu,
                      name=Path(output).name)
