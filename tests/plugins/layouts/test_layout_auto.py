"""``layout: auto``: the choice from the measured layout table (injected here: no timing in tests)."""
from __future__ import annotations

import pytest
import torch

from sparsify_core.errors import SparsifyError
from sparsify_plugins.layouts import table as TBL
from sparsify_plugins.layouts.convert import AutoLayoutParams, WeightConvert
from sparsify_plugins.layouts.weight import BSR, CSR, BSRParams

from .test_layout_convert import _ctx, _logits, _tiny


def test_choose_takes_the_fastest_that_beats_dense():
    assert TBL.choose({"csr": 1.2, "bsr": 2.5, "nm": 0.9})[:2] == ("bsr", 2.5)
    assert TBL.choose({"csr": 2.0, "bsr": 2.0})[0] == "csr"  # ties: the first candidate listed
    name, ratio, why = TBL.choose({"csr": 0.7, "bsr": 1.0})
    assert name is None and ratio == 1.0 and why.startswith("kept dense") and "csr 0.70x" in why
    assert TBL.choose({"csr": 1.1}, margin=1.2)[0] is None
    assert TBL.choose({})[0] is None


def test_entry_keys_follow_layout_params_shape_density_and_tokens():
    w = torch.randn(32, 48) * (torch.rand(32, 48) < 0.25)
    k = TBL.entry_key(CSR.from_dense(w), 1)
    density = (w != 0).float().mean().item()
    assert k == f"csr{{}} 32x48 d={round(density, 2):.2f} T=1"
    assert TBL.entry_key(BSR.from_dense(w, BSRParams(block=(8, 8))), 128).startswith('bsr{"block":[8,8]} 32x48 d=')


def test_table_is_kept_per_machine_and_refuses_other_files(tmp_path):
    path = tmp_path / "t.json"
    lay = CSR.from_dense(torch.eye(8))
    a = TBL.LayoutTable.load(path, key="machine A")
    a.record(lay, 1, 1.5)
    a.save()
    b = TBL.LayoutTable.load(path, key="machine B")
    assert b.ratio(lay, 1) is None  # measured elsewhere: not used here
    b.record(lay, 1, 0.5)
    b.save()
    assert TBL.LayoutTable.load(path, key="machine A").ratio(lay, 1) == 1.5
    path.write_text("[1, 2]")
    with pytest.raises(SparsifyError, match="not a layout table"):
        TBL.LayoutTable.load(path, key="machine A")


def test_machine_key_names_the_kernel_path(monkeypatch):
    from sparsify_kernels import native
    monkeypatch.setenv(native.ENV, "portable")
    key = TBL.machine_key()
    assert " | portable | " in key and f" | kernels {native.source_key()} | " in key
    assert f" | dense {torch.backends.cpu.get_cpu_capability()} | " in key  # dense torch's ISA: its side of a ratio
    assert len(native.source_key()) == 12


def _inject(monkeypatch, tmp_path, model, params: AutoLayoutParams, rate) -> TBL.LayoutTable:
    """A table for this machine rating every candidate of every target module by ``rate(name, layout)``."""
    from sparsify_core.ffn import prunable_modules, weight_out_in
    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path / "cache"))
    tab = TBL.LayoutTable.load()
    for name, module in prunable_modules(model, None, ["lm_head"]):
        for cls, lp in params.layouts():
            try:
                layout = cls.from_dense(weight_out_in(module).detach(), lp)
            except ValueError:
                continue
            tab.record(layout, params.tokens, rate(name, layout))
    tab.save()
    return tab


def test_auto_picks_per_module_from_the_table_keeps_dense_and_rebuilds(monkeypatch, tmp_path):
    from sparsify_plugins.prune import NMGPrune
    model = _tiny("llama")
    ctx = _ctx(model, tmp_path)
    NMGPrune().apply(ctx, NMGPrune.Params(n=2, m=4, g=2))  # every weight 2:4 (so nm, nmg, csr and bsr all fit)
    ap = AutoLayoutParams(candidates=["csr", "bsr", "nm"], params={"bsr": {"block": [8, 8]}}, measure=False)

    def rate(name, layout):  # attention: nothing beats dense; MLP: nm in the up/gate, bsr in down
        if "self_attn" in name:
            return 0.8
        return {"nm": 3.0, "csr": 1.5, "bsr": 0.5}[layout.name] if "down" not in name else \
            {"nm": 1.1, "csr": 1.2, "bsr": 2.0}[layout.name]

    _inject(monkeypatch, tmp_path, model, ap, rate)
    ids = torch.randint(0, 200, (1, 7))
    ref = _logits(model, ids)
    params = WeightConvert.Params(layout="auto", candidates=["csr", "bsr", "nm"], params={"bsr": {"block": [8, 8]}},
                                  measure=False)
    res = WeightConvert().apply(ctx, params)
    auto = res.info["auto"]
    for name, d in auto.items():
        if "self_attn" in name:
            assert d["layout"] == "dense" and d["ratio"] == 0.8 and "kept dense" in d["why"]
            assert type(model.get_submodule(name)) is torch.nn.Linear  # untouched
        elif "down" in name:
            assert (d["layout"], d["ratio"]) == ("bsr", 2.0)
        else:
            assert (d["layout"], d["ratio"]) == ("nm", 3.0) and d["candidates"] == {"csr": 1.5, "bsr": 0.5, "nm": 3.0}
    assert res.metrics["modules_kept_dense"] == sum("self_attn" in n for n in auto) > 0
    assert res.metrics["modules_converted"] == len(res.info["modules"]) == len(auto) - res.metrics["modules_kept_dense"]
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-4, rtol=1e-4)  # exact either way
    rebuilt = _tiny("llama")
    WeightConvert().rebuild(_ctx(rebuilt, tmp_path), params, res)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(_logits(rebuilt.eval(), ids), ref, atol=1e-4, rtol=1e-4)


def test_auto_skips_candidates_that_cannot_hold_the_weight(monkeypatch, tmp_path):
    model = _tiny("llama")  # not pruned: n:m cannot hold these weights, csr and bsr can
    ap = AutoLayoutParams(candidates=["nm", "csr"], measure=False)
    _inject(monkeypatch, tmp_path, model, ap, lambda name, layout: 1.3)
    res = WeightConvert().apply(_ctx(model, tmp_path), WeightConvert.Params(layout="auto", candidates=["nm", "csr"],
                                                                            measure=False))
    assert {d["layout"] for d in res.info["auto"].values()} == {"csr"}
    assert all(set(d["candidates"]) == {"csr"} for d in res.info["auto"].values())


def test_auto_without_an_entry_and_measure_false_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path / "empty"))
    with pytest.raises(SparsifyError, match=r"has no entry 'csr\{\} .*measure: true"):
        WeightConvert().apply(_ctx(_tiny("llama"), tmp_path),
                              WeightConvert.Params(layout="auto", candidates=["csr"], measure=False))


@pytest.mark.parametrize("extra,msg", [({"candidates": ["nope"]}, "nope"),
                                       ({"candidates": ["bsr"], "params": {"bsr": {"block": [0, 4]}}}, "bsr layout"),
                                       ({"params": {"csr": {}}, "candidates": ["bsr"]}, "not among the candidates"),
                                       ({"tokens": 0}, "tokens"), ({"bogus": 1}, "bogus")])
def test_auto_params_are_validated(extra, msg):
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match=msg):
        WeightConvert.Params(layout="auto", **extra)


def test_auto_in_a_recipe_names_file_line_and_field(workdir):
    from helpers import tiny_recipe, write
    from sparsify_core.recipe import load_recipe
    path = write(workdir / "auto.yaml", tiny_recipe("""\
  - kind: layout_convert
    method: weight
    params: {layout: auto, tokens: 0}
"""))
    with pytest.raises(SparsifyError) as exc:
        load_recipe(path)
    text = str(exc.value)
    assert "auto.yaml" in text and "tokens" in text and "\n" not in text.strip()


def test_bench_case_3_fills_the_table_auto_reads(monkeypatch, tmp_path):
    from sparsify_plugins.layouts.bench import case_sparse_linear
    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path))
    rows = case_sparse_linear(shapes=((32, 32),), tokens=(1,), sparsities=(0.5,), layouts=("csr", "bsr"), repeats=2,
                              budget_s=0.05)
    (row,) = rows
    tab = TBL.LayoutTable.load()
    assert set(tab.entries) == {'csr{} 32x32 d=0.50 T=1', 'bsr{"block":[16,16]} 32x32 d=0.50 T=1'}
    assert tab.entries['csr{} 32x32 d=0.50 T=1'] == row.ratio["csr"]
    assert row.extra["kernel_isa"] in {"avx512", "avx2", "portable", "torch"}
