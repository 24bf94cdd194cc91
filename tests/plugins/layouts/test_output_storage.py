"""Outputs stored dense and compressed: every storage form round-trips bit for bit on tiny models of every
architecture it applies to, loads without densifying layouts, exports both ways, and refuses bad input."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import make_output
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import weight_out_in
from sparsify_core.masks import MaskSet
from sparsify_core.output import export_output, load_output, save_output
from sparsify_core.storage import COMPRESSED_FILE, folder_bytes, iter_tensors

PRUNE50 = ("prune", "magnitude", {"sparsity": 0.5})
PRUNE24 = ("prune", "magnitude", {"pattern": "2:4"})
NMG = ("prune", "nmg", {"n": 2, "m": 4, "g": 2})
RELU = ("substitute_activation", "relu", {})
LAYOUTS = [NMG, ("layout_convert", "nmg", {"n": 2, "m": 4, "g": 2, "targets": ["q_proj|c_attn|query"]}),
           ("layout_convert", "csr", {"targets": ["k_proj|attn.c_proj|key"]}),
           ("layout_convert", "bsr", {"block": [8, 8], "targets": ["v_proj|out_proj|o_proj|value|mlp.c_fc"]}),
           ("layout_convert", "nm", {"n": 2, "m": 4, "targets": ["mlp|fc1|fc2|intermediate|output.dense"]})]
MOE = [("moeify", "param_cluster", {"expert_size": 16, "router": "mlp", "top_k": 2, "batch_size": 4}),
       ("layout_convert", "moe_ffn", {})]

#: storage form -> (stages, architectures it applies to); every one but MoE has a plain transformers form
FORMS = {
    "unstructured": ([PRUNE50], ["llama", "gpt2", "opt", "bert"]),
    "n:m": ([PRUNE24], ["llama", "gpt2", "opt", "bert"]),
    "n:m:g": ([NMG], ["llama", "opt"]),
    "layouts csr/bsr/nm/nmg": (LAYOUTS, ["llama", "gpt2", "opt", "bert"]),
    "activation-sparse FFN": ([RELU, PRUNE50, ("layout_convert", "activation_sparse_ffn", {})], ["llama", "gpt2", "opt"]),
    "MoE FFN": ([PRUNE50] + MOE, ["llama", "gpt2"]),
}
CASES = [(form, arch) for form, (_, archs) in FORMS.items() for arch in archs]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.is_floating_point() else t


def assert_identical(model, masks, loaded):
    """Every tensor of the state dict and every mask, bit for bit."""
    want, got = model.state_dict(), loaded.model.state_dict()
    assert set(want) == set(got)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(_bits(got[k]), _bits(v)), k
    assert {k: torch.equal(m, loaded.masks.get(k)) for k, m in masks.items()} == {k: True for k, _ in masks.items()}
    assert len(loaded.masks) == len(masks)


def _plain_model(folder, arch):
    from transformers import AutoModel, AutoModelForCausalLM

    return (AutoModel if arch == "bert" else AutoModelForCausalLM).from_pretrained(folder).eval()


def _outputs(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _dense_files_identical(a, b) -> bool:
    want, got = dict(iter_tensors(a, {})), dict(iter_tensors(b, {}))
    return set(want) == set(got) and all(torch.equal(_bits(want[k]), _bits(got[k])) for k in want)


@pytest.mark.parametrize("form,arch", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_round_trip_every_storage_form(tmp_path, form, arch):
    """Saved compressed (the default with masks), loaded, exported dense and back: bit-identical throughout;
    the dense export is a plain transformers model with the same outputs (every layout, every architecture)."""
    model, masks = make_output(tmp_path / "c", arch, FORMS[form][0])
    manifest = json.loads((tmp_path / "c" / "sparsify.json").read_text())
    assert manifest["format"] == 2 and manifest["storage"]["form"] == "compressed"
    assert (tmp_path / "c" / COMPRESSED_FILE).exists() and not (tmp_path / "c" / "model.safetensors").exists()
    assert_identical(model, masks, load_output(tmp_path / "c", fast=False))
    if form == "MoE FFN":  # experts and a router: no plain transformers form, so no dense export
        with pytest.raises(SparsifyError) as err:
            export_output(tmp_path / "c", tmp_path / "d", "dense")
        assert re.match(r"(model|transformer)\.\S*mlp: a MoEFFN where plain transformers has a \w+MLP, with no plain form", str(err.value))
        assert "\n" not in str(err.value) and not (tmp_path / "d").exists()
        return
    export_output(tmp_path / "c", tmp_path / "d", "dense")
    assert (tmp_path / "d" / "model.safetensors").exists() and not (tmp_path / "d" / COMPRESSED_FILE).exists()
    assert_identical(model, masks, load_output(tmp_path / "d", fast=False))  # sparsify rebuilds its modules
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    plain = _plain_model(tmp_path / "d", arch)
    assert not {type(m).__name__ for m in plain.modules()} & {"SparseLinear", "TransposedLinear",
                                                              "ActivationSparseFFN"}
    torch.testing.assert_close(_outputs(plain, ids), _outputs(model, ids), atol=1e-5, rtol=1e-5)
    for name, m in model.named_modules():  # layouts densified bit for bit
        if hasattr(m, "dense_weight"):
            like = plain.get_submodule(name.removeprefix(f"{plain.base_model_prefix}.") if arch == "bert" else name)
            assert torch.equal(_bits(weight_out_in(like)), _bits(m.dense_weight())), name
    export_output(tmp_path / "d", tmp_path / "c2", "compressed")
    assert_identical(model, masks, load_output(tmp_path / "c2", fast=False))
    export_output(tmp_path / "c2", tmp_path / "d2", "dense")
    assert _dense_files_identical(tmp_path / "d", tmp_path / "d2")
    if masks:  # pruned: the compressed folder is smaller
        assert folder_bytes(tmp_path / "c2") < folder_bytes(tmp_path / "d")


@pytest.mark.parametrize("stages,refused", [
    ([("substitute_activation", "fatrelu", {"threshold": 0.01})], "act_fn: a FATReLUModule where plain transformers has a"),
    ([RELU, ("layout_convert", "activation_sparse_ffn", {"predictor": {"rank": 4, "max_tokens": 64}})],
     "mlp: a ActivationSparseFFN with no plain form: its activation predictor"),
])
def test_dense_refuses_what_plain_transformers_cannot_compute(tmp_path, stages, refused):
    """An output whose function plain transformers cannot compute: one line naming the module, nothing written,
    both when saved dense and when exported dense; the model saved is left as it was."""
    model, _ = make_output(tmp_path / "c", "llama", stages)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SparsifyError, match=refused) as err:
        export_output(tmp_path / "c", tmp_path / "d", "dense")
    assert "\n" not in str(err.value) and not (tmp_path / "d").exists()
    with pytest.raises(SparsifyError, match=refused):
        save_output(tmp_path / "d", model, None, MaskSet(), json.loads((tmp_path / "c" / "sparsify.json").read_text()),
                    "", {}, storage="dense")
    assert not (tmp_path / "d").exists()
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_saved_dense_is_plain_and_the_model_is_left_as_it_was(tmp_path):
    """output.storage: dense on a layout-converted model: plain transformers loads it; the live model keeps
    its layouts (the plain modules are swapped in only while the folder is written)."""
    model, masks = make_output(tmp_path / "d", "llama", LAYOUTS, storage="dense")
    assert sum(type(m).__name__ == "SparseLinear" for m in model.modules()) == 14
    block = json.loads((tmp_path / "d" / "sparsify.json").read_text())["storage"]
    assert block["form"] == "dense" and len(block["plain"]) == 14
    ids = torch.randint(0, 100, (1, 9))
    torch.testing.assert_close(_outputs(_plain_model(tmp_path / "d", "llama"), ids), _outputs(model, ids),
                               atol=1e-5, rtol=1e-5)
    assert_identical(model, masks, load_output(tmp_path / "d", fast=False))


def test_dense_storage_loads_in_plain_transformers_and_compressed_refuses(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = make_output(tmp_path / "d", "gpt2", [PRUNE50], storage="dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=0)
    export_output(tmp_path / "d", tmp_path / "c", "compressed")
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


class _Allocations(TorchDispatchMode):
    """Records the shapes of every real (not meta) tensor an op fills with data.

    Uninitialised ``empty`` is left out: ``nn.Linear.__init__`` makes one that
    the meta-device construction (accelerate) moves to meta at once, and the
    pages of an untouched allocation are never resident. Anything that writes
    a dense weight (``zeros``, a copy, ``to_dense``'s scatter) is recorded."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith("empty"):
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("storage", ["compressed"])
def test_load_never_densifies_layouts(tmp_path, storage):
    """Every FFN weight in a layout (48 x 40, a shape nothing else has): no tensor of its dense shape is made.

    (Compressed only: ``dense`` stores the plain, densified weights, which a load reads before it rebuilds
    the layouts.)"""
    stages = [NMG, ("layout_convert", "csr", {"targets": ["gate_proj|down_proj"]}),
              ("layout_convert", "nm", {"n": 2, "m": 4, "targets": ["up_proj"]})]
    model, masks = make_output(tmp_path / "o", "llama", stages, storage=storage, hidden=40, ffn=48)
    with _Allocations() as seen:
        loaded = load_output(tmp_path / "o", fast=False)
    assert {type(m).__name__ for m in loaded.model.modules()} >= {"SparseLinear"}
    assert not seen.shapes & {(48, 40), (40, 48)}, seen.shapes & {(48, 40), (40, 48)}
    assert (40, 40) in seen.shapes  # the probe sees the attention weights being decoded
    assert_identical(model, masks, loaded)


def test_fast_modules_are_exact_and_follow_the_masks(tmp_path):
    """load_output(fast=True): ReLU FFNs become activation-sparse, routed FFNs MoE FFNs; same logits."""
    for name, stages, kind in [("relu", [RELU, PRUNE50], "ActivationSparseFFN"),
                               ("moe", [PRUNE50, MOE[0]], "MoEFFN")]:
        model, _ = make_output(tmp_path / name, "llama", stages)
        fast = load_output(tmp_path / name, fast=True)
        assert any(type(m).__name__ == kind for m in fast.model.modules())
        assert fast.manifest["fast_modules"] and len(fast.masks) == 14
        fast.masks.check(fast.model)  # masks moved with the transposed weights
        ids = torch.randint(0, 100, (1, 6))
        with torch.no_grad():
            torch.testing.assert_close(fast.model(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
            for t in range(2):  # decoding: the kernels
                torch.testing.assert_close(fast.model(ids[:, t:t + 1]).logits, model(ids[:, t:t + 1]).logits,
                                           atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_one_clear_error(tmp_path):
    with pytest.raises(SparsifyError, match="not a sparsify output"):
        load_output(tmp_path)
    with pytest.raises(SparsifyError, match="no such output folder"):
        export_output(tmp_path / "nope", tmp_path / "x", "dense")
    make_output(tmp_path / "o", "llama", [PRUNE50])
    with pytest.raises(SparsifyError, match="unknown storage 'zip'"):
        export_output(tmp_path / "o", tmp_path / "x", "zip")
    with pytest.raises(SparsifyError, match="not onto the output itself"):
        export_output(tmp_path / "o", tmp_path / "o", "dense")
    with pytest.raises(SparsifyError, match="unknown output storage"):
        save_output(tmp_path / "y", None, None, None, {}, "", {}, storage="zip")
    manifest = json.loads((tmp_path / "o" / "sparsify.json").read_text())
    manifest["storage"]["form"] = "rle"
    (tmp_path / "o" / "sparsify.json").write_text(json.dumps(manifest))
    with pytest.raises(SparsifyError, match=r"sparsify.json: storage.form: unknown storage 'rle'"):
        load_output(tmp_path / "o")
    assert not (tmp_path / "x").exists()


def test_iter_tensors_reads_old_outputs_as_dense(tmp_path):
    """Outputs written before the storage block existed are dense (format 1)."""
    make_output(tmp_path / "d", "opt", [PRUNE50], storage="dense")
    names = {k for k, _ in iter_tensors(tmp_path / "d", {})}
    assert any(k.endswith("fc1.weight") for k in names)
