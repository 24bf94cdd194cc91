"""The lean path's native step (hook ``sparsify_lean_step``, ``plugins/layouts/lean_step.py``): HF generate's and the
torch step's tokens, dense and activation-sparse FFNs, per ISA, odd shapes; the fallbacks say why."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from helpers import import_example_plugin, make_output
from sparsify_core import lean
from sparsify_core.generation import timed_generate
from sparsify_core.output import load_output
from sparsify_kernels import native


# hidden size and head_dim off the 8/16-float vector widths; grouped (3 heads on 1 kv head) and 4 on 2, biases
SHAPES = {"mqa36": dict(hidden_size=36, num_attention_heads=3, num_key_value_heads=1, head_dim=12,
                        intermediate_size=50),
          "gqa40_bias": dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=10,
                             intermediate_size=72, attention_bias=True, mlp_bias=True)}


def _llama(shape: str, seed: int = 0, tied: bool = False):
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(num_hidden_layers=2, vocab_size=100, eos_token_id=5, bos_token_id=1,
                        tie_word_embeddings=tied, max_position_embeddings=64, **SHAPES[shape])
    model = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than HF's 0.02 init: logits far apart, so greedy choices are stable
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    return model


def _hf(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              temperature=None, top_p=None, top_k=None, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("prompt,batch", [(1, 1), (2, 3), (7, 1)])
def test_native_tokens_equal_hf_generate_and_the_torch_step(isa, one_thread, shape, prompt, batch):
    model = _llama(shape, seed=prompt, tied=batch > 1)
    ids = torch.randint(0, 100, (batch, prompt), generator=torch.Generator().manual_seed(prompt))
    decoder = lean.LeanDecoder(model)
    assert decoder.path == f"lean native ({isa})"
    got = decoder.generate(ids, 18).ids
    assert torch.equal(got, _hf(model, ids, 18))
    assert torch.equal(got, lean.LeanDecoder(model, native=False).generate(ids, 18).ids)


def test_native_logits_match_the_torch_step_at_every_position(isa, one_thread):
    """Fed one token at a time, the native step's logits equal the torch step's prefill logits (fp32 rounding)."""
    model = _llama("gqa40_bias", seed=3)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = lean.LeanDecoder(model, native=False).logits(ids)
    decoder = lean.LeanDecoder(model)
    n, kv, hd = 12, decoder.n_kv, decoder.head_dim
    k_cache = torch.zeros(2, 2, kv, n, hd)
    v_cache = torch.zeros_like(k_cache)
    cos, sin = decoder.rotary(k_cache[0, :1, 0], torch.arange(n)[None])
    logits = torch.empty(2, 100)
    with torch.no_grad():
        for t in range(n):
            nxt = decoder.step(decoder.embed(ids[:, t]).contiguous(), t, k_cache, v_cache, cos[0].contiguous(),
                               sin[0].contiguous(), None, logits)
            torch.testing.assert_close(logits, ref[:, t], atol=1e-4, rtol=1e-4)
            assert torch.equal(nxt, logits.argmax(-1))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Sparse outputs of the tiny llama: ReLU (pruned) and dReLU."""
    root = tmp_path_factory.mktemp("lean_step")
    make_output(root / "relu", "llama", [("substitute_activation", "relu", {}),
                                         ("prune", "magnitude", {"sparsity": 0.5})], hidden=40, ffn=50)
    make_output(root / "drelu", "llama", [("substitute_activation", "drelu", {})], hidden=40, ffn=50)
    return root


@pytest.mark.parametrize("name", ["relu", "drelu"])
def test_activation_sparse_ffn_native_tokens_equal_dense_and_torch_step(isa, one_thread, outputs, name):
    fast, dense = load_output(outputs / name, fast=True), load_output(outputs / name, fast=False)
    assert all(type(layer.mlp).__name__ == "ActivationSparseFFN" for layer in fast.model.model.layers)
    ids = fast.tokenizer(["The cat sat on", "A dog ran to a"], return_tensors="pt").input_ids
    ids = ids[:, : min(4, ids.shape[1])]
    sparse = timed_generate(fast.model, ids, 16, fast.tokenizer, min_new_tokens=16)
    assert sparse.path == f"lean native ({isa})"
    for model, path in ((dense.model, "lean"), (fast.model, "lean-torch"), (dense.model, "lean-torch")):
        ref = timed_generate(model, ids, 16, fast.tokenizer, min_new_tokens=16, path=path)
        assert torch.equal(sparse.ids, ref.ids), (model is fast.model, path)
    assert timed_generate(fast.model, ids, 4, fast.tokenizer, path="lean-torch").path == "lean torch (asked for)"


def test_predictor_ffn_native_tokens_equal_the_torch_step(isa, one_thread, outputs):
    """With an activation predictor (approximate) the native step chooses the neurons the module's kernel does."""
    from sparsify_plugins.layouts import ActivationPredictor

    fast = load_output(outputs / "relu", fast=True)
    gen = torch.Generator().manual_seed(0)
    for layer in fast.model.model.layers:
        p = ActivationPredictor.empty(40, 50, 4)
        with torch.no_grad():
            for t in (p.p_in, p.p_out, p.p_bias):
                t.copy_(torch.randn(t.shape, generator=gen))
        layer.mlp.predictor = p
    ids = torch.tensor([[3, 17, 40, 8]])
    decoder = lean.LeanDecoder(fast.model)
    assert decoder.path == f"lean native ({isa})"
    got = decoder.generate(ids, 16).ids
    assert torch.equal(got, lean.LeanDecoder(fast.model, native=False).generate(ids, 16).ids)


def test_uncovered_models_take_the_torch_step_and_say_why(monkeypatch, one_thread):
    model = _llama("mqa36")
    ids = torch.tensor([[3, 4, 5]])
    ref = _hf(model, ids, 6)
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: None)
    decoder = lean.LeanDecoder(model)
    assert decoder.path == "lean torch (layer 1: forward hooks)"
    assert torch.equal(decoder.generate(ids, 6).ids, ref)
    handle.remove()
    monkeypatch.setenv("SPARSIFY_NO_NATIVE", "1")
    assert lean.LeanDecoder(model).path == "lean torch (native kernels unavailable (SPARSIFY_NO_NATIVE=1))"
    monkeypatch.delenv("SPARSIFY_NO_NATIVE")
    model.model.layers[0].mlp.act_fn = torch.nn.Tanh()  # an activation the kernels do not know
    assert lean.LeanDecoder(model).path == "lean torch (layer 0 mlp: activation Tanh)"
    if native.library() is None:
        return
    bf16 = _llama("mqa36").to(torch.bfloat16)
    assert "needs contiguous float32 CPU tensors, got bfloat16" in lean.LeanDecoder(bf16).path


def test_the_example_plugins_torch_step_keeps_the_contract(monkeypatch, one_thread):
    """A third-party step (the example plugin's, plain torch) decodes HF generate's tokens through the same loop."""
    monkeypatch.setenv("SPARSIFY_EXAMPLE_LEAN_STEP", "1")
    step = import_example_plugin().sparsify_lean_step(model=_llama("gqa40_bias"))
    model = step.model
    decoder = lean.LeanDecoder(model, native=False)
    decoder.step, decoder.step_reason = step, None
    ids = torch.tensor([[7, 8, 9], [1, 2, 3]])
    res = decoder.generate(ids, 16, profile=True)
    assert decoder.path == "lean native (example torch)"
    assert torch.equal(res.ids, _hf(model, ids, 16))
    assert res.profile["attention"] > 0 and res.profile["ffn"] > 0 and res.profile["head"] > 0
