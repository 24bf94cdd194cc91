"""The storage encodings alone, on small tensors: bits, bitmask + values, masks; exact to the bit."""
from __future__ import annotations

import pytest
import torch

from sparsify_core import storage as S


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.is_floating_point() else torch.equal(a, b)


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5), (4, 6, 2), (33, 65)])
def test_pack_bits_round_trip_and_size(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.4
    bits = S.pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-mask.numel() // 8)
    assert torch.equal(S.unpack_bits(bits, shape), mask)
    with pytest.raises(ValueError, match="cannot hold"):
        S.unpack_bits(bits[:-1], (mask.numel() + 8,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["masked", "masked_keeps_a_zero", "pruned_nonzero", "negative_zero_and_nan",
                                  "dense", "small"])
def test_encode_decode_is_bit_exact(dtype, kind):
    g = torch.Generator().manual_seed(1)
    n = 8 if kind == "small" else 64
    w = torch.randn(n, 48, generator=g).to(dtype)
    keep = torch.rand(n, 48, generator=g) > 0.5
    if kind != "dense":
        w = w * keep  # pruned entries: +0.0 or -0.0
    if kind == "masked_keeps_a_zero":
        w[keep.nonzero()[0].tolist()] = 0.0  # a kept weight that is exactly zero: the mask must survive it
    if kind == "pruned_nonzero":  # a mask not applied yet: the weight must still come back whole
        w[(~keep).nonzero()[0].tolist()] = 1.5
    if kind == "negative_zero_and_nan":
        w[0, 0], w[1, 1] = -0.0, float("nan")
    mask = None if kind in ("dense", "small") else keep
    stored, entry = S.encode_tensor("w", w, mask)
    if kind == "dense":
        assert entry is None and set(stored) == {"w"}  # nothing to gain
    elif kind == "small":
        assert entry is None
    else:
        assert entry["form"] == "bitmask" and "w" not in stored  # never under the name transformers would read
        assert sum(t.numel() * t.element_size() for t in stored.values()) < 0.7 * w.numel() * w.element_size()
        assert ("w::keep" in stored) == bool((w[~keep] != 0).any())  # only a mask the bits do not tell
        assert ("w::zsign" in stored) == bool(torch.signbit(w[~keep & (w == 0)]).any())
        got_mask = S.decode_mask("w", {"shape": list(w.shape), "keep": "w::keep" in stored}, stored.__getitem__)
        assert torch.equal(got_mask, keep)
    assert _bits_equal(S.decode_tensor("w", entry, stored.__getitem__, stored.__contains__), w)


def test_sparse_tensor_without_mask_is_compressed_when_it_pays():
    w = torch.zeros(64, 64)
    w[::8, ::8] = 1.0
    stored, entry = S.encode_tensor("w", w)
    assert entry is not None and _bits_equal(S.decode_tensor("w", entry, stored.__getitem__), w)


def test_unknown_form_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown storage form 'rle'"):
        S.decode_tensor("w", {"form": "rle"}, {}.__getitem__)
    with pytest.raises(ValueError, match="unknown storage 'zip'"):
        S.write_storage(".", {}, {}, "zip")


def test_write_and_read_back_both_storages(tmp_path):
    g = torch.Generator().manual_seed(2)
    keep = torch.rand(40, 50, generator=g) > 0.5
    tensors = {"a.weight": torch.randn(40, 50, generator=g) * keep, "a.bias": torch.randn(40, generator=g),
               "idx": torch.arange(12, dtype=torch.int32)}
    masks = {"a.weight": keep}
    for form in S.STORAGES:
        folder = tmp_path / form
        folder.mkdir()
        block = S.write_storage(folder, tensors, masks, form)
        manifest = {"storage": block}
        got = dict(S.iter_tensors(folder, manifest))
        assert set(got) == set(tensors) and all(_bits_equal(got[k], v) for k, v in tensors.items())
        assert {k: torch.equal(v, masks[k]) for k, v in S.read_masks(folder, manifest).items()} == {"a.weight": True}
    assert S.folder_bytes(tmp_path / "compressed") < 0.75 * S.folder_bytes(tmp_path / "dense")
    with pytest.raises(ValueError, match="mask of 'b.weight'"):
        S.write_storage(tmp_path, tensors, {"b.weight": keep}, "compressed")
    with pytest.raises(ValueError, match="newer than this sparsify"):
        list(S.iter_tensors(tmp_path / "compressed", {"storage": {"form": "compressed", "version": 99}}))


@pytest.mark.parametrize("storage", ["dense", "compressed"])
def test_a_pruned_tied_lm_head_saves_and_loads_with_its_mask(workdir, one_thread, storage):
    """save_pretrained keeps one name of a tied tensor (the embedding's): the mask recorded under
    ``lm_head.weight`` is saved under that name (compressed form) and still covers the one tensor when loaded."""
    from helpers import tiny_recipe, write

    from sparsify_core import load_output
    from sparsify_core.recipe import load_recipe
    from sparsify_core.registry import Registry
    from sparsify_core.runner import Runner

    text = tiny_recipe("  - kind: prune\n    method: magnitude\n    params: {sparsity: 0.5, targets: [lm_head], "
                       "exclude: []}\n", evaluate={"after": "last", "metrics": ["weight_sparsity"]},
                       output={"dir": str(workdir / "out"), "save": True, "storage": storage})
    Runner(load_recipe(write(workdir / "tied.yaml", text)), Registry(f"sqlite:///{workdir}/r.db"),
           runs_dir=workdir / "runs").run()
    out = load_output(workdir / "out")
    head = out.model.get_output_embeddings().weight
    assert head is out.model.get_input_embeddings().weight  # still tied
    (name, keep), = out.masks.items()
    assert name in ("lm_head.weight", "model.embed_tokens.weight")
    assert float((~keep).float().mean()) == pytest.approx(0.5, abs=1e-3) and bool((head[~keep] == 0).all())
    out.masks.check(out.model)


def test_iter_masks_hands_the_stored_bits_packed_in_both_forms(tmp_path):
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(13, 11, generator=g) > 0.3
    keep2 = torch.rand(9, generator=g) > 0.5
    tensors = {"a.weight": torch.randn(13, 11, generator=g) * keep, "b.weight": torch.randn(9, generator=g)}
    for form in S.STORAGES:
        folder = tmp_path / form
        folder.mkdir()
        manifest = {"storage": S.write_storage(folder, tensors, {"a.weight": keep, "b.weight": keep2}, form)}
        got = {name: (bits, shape) for name, bits, shape in S.iter_masks(folder, manifest)}
        assert set(got) == {"a.weight", "b.weight"}
        for name, want in (("a.weight", keep), ("b.weight", keep2)):
            bits, shape = got[name]
            assert bits.dtype == torch.uint8 and bits.numel() == -(-want.numel() // 8) and shape == tuple(want.shape)
            assert torch.equal(S.unpack_bits(bits, shape), want)


def test_maskset_holds_bits_and_hands_out_fresh_bool_masks():
    from sparsify_core.masks import MaskSet

    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(17, 5, generator=g) > 0.5, torch.rand(17, 5, generator=g) > 0.5
    m = MaskSet()
    m.set("w", a)
    bits, shape = m.packed("w")
    assert bits.dtype == torch.uint8 and bits.numel() == -(-a.numel() // 8) and shape == (17, 5)
    got = m.get("w")
    got.fill_(False)  # a copy: the set does not change
    assert torch.equal(m.get("w"), a)
    m.set("w", b)  # intersected
    assert torch.equal(m.get("w"), a & b) and m.pruned() == int((~(a & b)).sum())
    with pytest.raises(ValueError, match="does not match"):
        m.set("w", torch.ones(5, 17, dtype=torch.bool))
    m.replace("w", (a & b).flip(0))
    assert torch.equal(m.get("w"), (a & b).flip(0))
    m.select("w", rows=torch.tensor([0, 3]), cols=torch.tensor([4]))
    assert torch.equal(m.get("w"), (a & b).flip(0)[[0, 3]][:, [4]]) and m.packed("w")[1] == (2, 1)
    state = m.state_dict()
    assert state["w"].dtype == torch.uint8 and state["w"].shape == (2, 1)
    m2 = MaskSet()
    m2.set_packed("v", S.pack_bits(a), (17, 5))
    m2.load_state_dict(state)  # replaces everything
    assert [n for n, _ in m2.items()] == ["w"] and torch.equal(m2.get("w"), m.get("w"))
    with pytest.raises(ValueError, match="bytes of bits"):
        m2.set_packed("v", S.pack_bits(a)[:-1], (17, 5))
    lin = torch.nn.Linear(5, 17, bias=False)
    m3 = MaskSet()
    m3.set("weight", a)
    m3.apply(lin)
    assert torch.equal(lin.weight != 0, a & (lin.weight != 0)) and bool((lin.weight[~a] == 0).all())
