"""The lean decode path (sparsify_core.lean): the same greedy tokens as HF generate, on every covered variant."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from helpers import make_output
from sparsify_core import lean
from sparsify_core.generation import greedy_generate, timed_generate
from sparsify_core.output import load_output


def _llama(kv_heads=4, tied=False, rope=None, eos=5, seed=0):
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=kv_heads, vocab_size=100, eos_token_id=eos, bos_token_id=1,
                        tie_word_embeddings=tied, max_position_embeddings=64)
    if rope is not None:
        cfg.rope_parameters = rope
    return T.LlamaForCausalLM(cfg).eval()


def _hf(model, ids, n, min_new=None):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=min_new,
                              do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0}


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("native", [True, False])
def test_lean_tokens_equal_hf_generate(one_thread, kv_heads, tied, batch, native):
    """Multi-head, grouped and single key/value heads; tied head or not; one prompt or a batch; the native step
    (where a plugin provides one) and the torch step."""
    model = _llama(kv_heads, tied, seed=kv_heads)
    ids = torch.randint(0, 100, (batch, 6), generator=torch.Generator().manual_seed(batch))
    ref = _hf(model, ids, 12)
    res = lean.LeanDecoder(model, native=native).generate(ids, 12, eos_token_id=5, pad_token_id=0)
    assert torch.equal(res.ids, ref)
    assert res.new_tokens == ref.shape[1] - 6 and len(res.step_s) == res.new_tokens - 1


def test_lean_logits_match_hf_forward_within_fp32_rounding(one_thread):
    for model in (_llama(2), _llama(4, rope=LLAMA3_ROPE)):
        ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(ids).logits
        got = lean.LeanDecoder(model).logits(ids)
        assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("native", [True, False])
def test_lean_end_of_sequence_padding_and_min_new_tokens(one_thread, native):
    """A sequence that ends is padded while the others go on; EOS is held back before min_new_tokens."""
    model = _llama(2, seed=3)
    ids = torch.randint(0, 100, (4, 5), generator=torch.Generator().manual_seed(1))
    free = _hf(model, ids, 10)
    # make the most common first new token an end of sequence, so some sequences end early
    eos = int(free[:, 5].mode().values)
    model.generation_config.eos_token_id = eos
    for min_new in (None, 4):
        ref = _hf(model, ids, 10, min_new)
        res = lean.LeanDecoder(model, native=native).generate(ids, 10, eos_token_id=eos, pad_token_id=0,
                                                              min_new_tokens=min_new)
        assert torch.equal(res.ids, ref), min_new
    assert (free[:, 5] == eos).any()


def test_long_context_rope_llama3(one_thread):
    model = _llama(2, rope=LLAMA3_ROPE)
    ids = torch.randint(0, 100, (1, 20), generator=torch.Generator().manual_seed(2))
    assert torch.equal(lean.LeanDecoder(model).generate(ids, 30, eos_token_id=None).ids, _hf(model, ids, 30))


def test_uncovered_models_fall_back_to_hf_generate_and_say_why(one_thread):
    from helpers import tiny_model

    gpt2 = tiny_model("gpt2").eval()
    assert "architecture 'gpt2'" in lean.unsupported_reason(gpt2)

    class Tok:
        pad_token_id, eos_token_id = 0, 0

    ids = torch.tensor([[3, 4, 5]])
    stats = timed_generate(gpt2, ids, 4, Tok())
    assert stats.path.startswith("hf generate (architecture 'gpt2'")
    assert torch.equal(stats.ids, greedy_generate(gpt2, ids, 4, Tok()))
    with pytest.raises(ValueError, match="does not cover this model"):
        timed_generate(gpt2, ids, 4, Tok(), path="lean")
    model = _llama()
    model.generation_config.repetition_penalty = 1.3  # a logits processor the lean path does not apply
    assert lean.unsupported_reason(model) == "generation_config.repetition_penalty = 1.3"
    model.generation_config.repetition_penalty = 1.0
    assert lean.supports(model)


@pytest.fixture(scope="module")
def relu_output(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lean") / "out"
    make_output(folder, "llama", [("substitute_activation", "relu", {}), ("prune", "magnitude", {"sparsity": 0.5})])
    return folder


def test_sparse_lean_tokens_equal_dense_hf_generate(relu_output, one_thread):
    """The activation-sparse FFNs on the lean path give HF generate's dense tokens (issue 16's test, in process)."""
    fast, dense = load_output(relu_output, fast=True), load_output(relu_output, fast=False)
    assert any("activation-sparse" in line for line in fast.manifest["fast_modules"])
    tok = fast.tokenizer
    ids = tok(["The cat sat", "on a mat!!!"], return_tensors="pt").input_ids
    for batch in (ids[:1], ids):
        sparse = timed_generate(fast.model, batch, 8, tok, min_new_tokens=8)
        lean_dense = timed_generate(dense.model, batch, 8, tok, min_new_tokens=8)
        assert sparse.path == lean_dense.path and sparse.path.startswith("lean ")
        assert torch.equal(sparse.ids, lean_dense.ids)
    hf = greedy_generate(dense.model, ids[:1], 8, tok, min_new_tokens=8)
    assert torch.equal(timed_generate(fast.model, ids[:1], 8, tok, min_new_tokens=8).ids, hf)


def test_profile_splits_the_decode_time_and_weight_bytes_add_up(relu_output, one_thread):
    dense = load_output(relu_output, fast=False)
    ids = torch.tensor([[3, 4, 5]])
    res = lean.LeanDecoder(dense.model).generate(ids, 5, profile=True)
    assert set(res.profile) == {"attention", "ffn", "head", "rest"}
    assert abs(sum(res.profile.values()) - res.decode_s) < 1e-6 + 0.05 * res.decode_s
    full = lean.weight_bytes(dense.model)
    params = sum(p.numel() * 4 for p in dense.model.model.layers.parameters() if p.dim() == 2)
    assert full["attention"] + full["ffn"] == params
    half = lean.weight_bytes(dense.model, ffn_density=0.5)
    assert half["ffn"] == pytest.approx(full["ffn"] * (1 + 0.5 * 2) / 3)


def test_hooks_on_ffn_parts_still_run(one_thread):
    """A dense LlamaMLP runs inline, unless something hooks it (then as the module, so the hook sees each step)."""
    model = _llama(2)
    seen = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    ids = torch.tensor([[3, 4, 5]])
    res = lean.LeanDecoder(model).generate(ids, 4, eos_token_id=None)
    handle.remove()
    assert seen == [(1, 3, 64)] + [(1, 1, 64)] * 3
    assert torch.equal(res.ids, lean.LeanDecoder(model).generate(ids, 4, eos_token_id=None).ids)
