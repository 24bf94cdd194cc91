"""The GGUF writer (sparsify_core.gguf_export), read back with gguf.GGUFReader: llama.cpp's llama conventions."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers as T

from sparsify_core.errors import SparsifyError
from sparsify_core.gguf_export import export_gguf, permute_rotary, write_gguf


def _llama(kv_heads=2, tied=False):
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=128,
                                            tie_word_embeddings=tied)).eval()


def _read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return r, fields, {t.name: t for t in r.tensors}


def _rope_gguf(x, pos, theta=10000.0):
    """GGML's llama rotary (interleaved pairs (2j, 2j+1) rotate by frequency j) on ``[T, heads, D]``."""
    D = x.shape[-1]
    freq = theta ** (-torch.arange(0, D, 2).float() / D)
    ang = pos[:, None].float() * freq  # [T, D/2]
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2)


@pytest.mark.parametrize("kv_heads,tied", [(4, False), (2, True), (1, False)])
def test_f32_tensors_names_shapes_values_and_metadata(tmp_path, kv_heads, tied):
    model = _llama(kv_heads, tied)
    path = write_gguf(model, None, tmp_path / "m.gguf", "f32")
    r, f, t = _read(path)
    cfg = model.config
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert (f["llama.embedding_length"], f["llama.feed_forward_length"]) == (64, 96)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, kv_heads)
    assert f["llama.rope.dimension_count"] == 16 and f["tokenizer.ggml.model"] == "none"
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(2) for n in (
        "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(t) == names | (set() if tied else {"output.weight"})
    layer = model.model.layers[1]
    # ggml shapes are [in, out] (ne0 first); the data reads back [out, in] as transformers stores it
    assert list(t["blk.1.ffn_down.weight"].shape) == [96, 64]
    np.testing.assert_array_equal(t["blk.1.ffn_down.weight"].data, layer.mlp.down_proj.weight.detach().numpy())
    np.testing.assert_array_equal(t["blk.1.attn_v.weight"].data, layer.self_attn.v_proj.weight.detach().numpy())
    np.testing.assert_array_equal(t["token_embd.weight"].data, model.model.embed_tokens.weight.detach().numpy())
    # q and k: with GGML's interleaved rotary, attention scores equal HF's (the permutation is llama.cpp's)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x, pos = torch.randn(5, 64), torch.arange(5)
    q_hf = (x @ layer.self_attn.q_proj.weight.T).view(5, 4, 16)
    k_hf = (x @ layer.self_attn.k_proj.weight.T).view(5, kv_heads, 16)
    cos, sin = model.model.rotary_emb(x, pos[None])
    q_r, k_r = apply_rotary_pos_emb(q_hf.transpose(0, 1)[None], k_hf.transpose(0, 1)[None], cos, sin)
    q_g = _rope_gguf((x @ torch.from_numpy(t["blk.1.attn_q.weight"].data.copy()).T).view(5, 4, 16), pos)
    k_g = _rope_gguf((x @ torch.from_numpy(t["blk.1.attn_k.weight"].data.copy()).T).view(5, kv_heads, 16), pos)
    rep = 4 // kv_heads
    s_hf = torch.einsum("hqd,hkd->hqk", q_r[0], k_r[0].repeat_interleave(rep, 0))
    s_g = torch.einsum("qhd,khd->hqk", q_g, k_g.repeat_interleave(rep, 1))
    torch.testing.assert_close(s_g, s_hf, atol=1e-4, rtol=1e-4)


def test_permute_rotary_moves_half_split_pairs_together():
    w = torch.arange(8.0)[:, None]  # one head, head_dim 8: rows 0..7
    assert permute_rotary(w, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("qtype,atol", [("q8_0", 0.02), ("q4_1", 0.2)])
def test_quantized_tensors_dequantize_close_to_the_weights(tmp_path, qtype, atol):
    model = _llama()
    _, f, t = _read(write_gguf(model, None, tmp_path / "m.gguf", qtype))
    up = t["blk.0.ffn_up.weight"]
    assert up.tensor_type.name == qtype.upper() and t["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    back = gguf.quants.dequantize(up.data, up.tensor_type)
    w = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    assert back.shape == w.shape and np.abs(back - w).max() < atol


def test_refuses_what_llama_cpp_would_compute_differently(tmp_path):
    model = _llama()
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.ReLU()
    with pytest.raises(SparsifyError, match="the FFNs use ReLU, which llama.cpp's llama graph does not compute"):
        write_gguf(model, None, tmp_path / "m.gguf")
    assert write_gguf(model, None, tmp_path / "m.gguf", allow_silu=True).is_file()
    with pytest.raises(SparsifyError, match="unknown GGUF type 'q2'"):
        write_gguf(model, None, tmp_path / "m.gguf", "q2")


def test_export_an_output_with_a_bpe_vocabulary(tmp_path):
    """A sparsify output (tiny llama with the SmolLM2 BPE tokenizer, if cached) through export_gguf."""
    from helpers import make_output
    from sparsify_plugins.sources.models import smollm2_folder_if_cached

    out = tmp_path / "out"
    make_output(out, "llama", [("prune", "magnitude", {"sparsity": 0.5})], hidden=32, ffn=64)
    _, f, t = _read(export_gguf(out, tmp_path / "m.gguf"))
    assert f["tokenizer.ggml.model"] == "none" and "blk.1.ffn_gate.weight" in t
    folder = smollm2_folder_if_cached()
    if folder is None:
        pytest.skip("SmolLM2 tokenizer not cached")
    tok = T.AutoTokenizer.from_pretrained(folder)
    model = _llama()
    model.resize_token_embeddings(len(tok))
    _, f, t = _read(write_gguf(model, tok, tmp_path / "v.gguf"))
    assert f["tokenizer.ggml.model"] == "gpt2" and len(f["tokenizer.ggml.tokens"]) == model.config.vocab_size
    assert f["tokenizer.ggml.tokens"][tok.eos_token_id] == tok.eos_token and f["tokenizer.ggml.merges"]


def test_export_cli_gguf_and_its_errors(tmp_path):
    from helpers import make_output, sparsify_here

    out = tmp_path / "out"
    make_output(out, "llama", [("substitute_activation", "relu", {})])
    proc = sparsify_here("export", out, tmp_path / "m.gguf", "--format", "gguf")
    assert proc.returncode == 1 and "the FFNs use ReLU" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = sparsify_here("export", out, tmp_path / "m.gguf", "--format", "gguf", "--gguf-type", "q8_0", "--allow-silu")
    assert proc.returncode == 0, proc.stderr
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).get_tensor(1).tensor_type.name in ("Q8_0", "F32")
    proc = sparsify_here("export", out, tmp_path / "d", "--format", "gguf", "--storage", "dense")
    assert proc.returncode == 1 and "--storage is for --format sparsify" in proc.stderr


@pytest.mark.parametrize("kv_heads,tied,qtype", [(2, False, "f32"), (4, True, "f32"), (2, False, "q8_0")])
def test_transformers_gguf_loader_reads_back_the_same_model(tmp_path, one_thread, kv_heads, tied, qtype):
    """transformers' GGUF loader (its own implementation of llama.cpp's conventions) gives the same logits."""
    model = _llama(kv_heads, tied)
    write_gguf(model, None, tmp_path / "m.gguf", qtype)
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (back(ids).logits - model(ids).logits).abs().max().item()
    assert diff == 0.0 if qtype == "f32" else diff < 0.05
