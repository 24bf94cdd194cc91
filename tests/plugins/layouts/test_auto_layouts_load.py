"""``load_output(layouts="auto")`` / ``sparsify generate --layouts``: a pruned output (no layout_convert stage)
decodes with the layout the measured table rates fastest per Linear, or dense where none wins; same outputs."""
from __future__ import annotations

import pytest
import torch

from helpers import make_output, sparsify_here
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import prunable_modules, weight_out_in
from sparsify_core.output import load_output
from sparsify_plugins.layouts import table as TBL
from sparsify_plugins.layouts.convert import AutoLayoutParams


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny LLaMA pruned 2:4 (magnitude), no layout stage: attention 32x32, FFN 64x32 and 32x64."""
    folder = tmp_path_factory.mktemp("auto") / "out"
    make_output(folder, "llama", [("prune", "magnitude", {"pattern": "2:4"})])
    return folder


def _table_at(monkeypatch, path) -> None:
    # the table file alone: a fresh SPARSIFY_CACHE would also rebuild the native kernels (minutes)
    monkeypatch.setattr(TBL, "table_path", lambda: path)


def _inject(monkeypatch, tmp_path, folder, rate) -> None:
    """A table (in a fresh cache) whose entry for every candidate that holds each pruned weight is
    ``rate(layout_name, shape)``; ``None`` leaves the entry out."""
    _table_at(monkeypatch, tmp_path / "table.json")
    tab = TBL.LayoutTable.load()
    model = load_output(folder, fast=False).model
    for _name, module in prunable_modules(model):
        w = weight_out_in(module).detach()
        for cls, lp in AutoLayoutParams().layouts():
            try:
                layout = cls.from_dense(w, lp)
            except ValueError:
                continue
            r = rate(cls.name, tuple(w.shape))
            if r is not None:
                tab.record(layout, 1, r)
    tab.save()


def _layouts(model) -> dict[str, str]:
    return {n: m.layout_name for n, m in model.named_modules() if type(m).__name__ == "SparseLinear"}


def _same_outputs(a, b):
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=1e-5, rtol=1e-5)
        for t in range(2):  # decoding, T=1: the layouts' kernels
            torch.testing.assert_close(a(ids[:, t:t + 1]).logits, b(ids[:, t:t + 1]).logits, atol=1e-5, rtol=1e-5)


def test_chosen_layouts_follow_the_table_and_compute_the_same(pruned, monkeypatch, tmp_path):
    # attention (32x32): csr fastest, nm faster than dense too; FFN: every layout slower than dense
    _inject(monkeypatch, tmp_path, pruned, lambda name, shape: ({"csr": 1.6, "nm": 1.3}.get(name, 0.9)
                                                                if shape == (32, 32) else 0.8))
    auto = load_output(pruned, layouts="auto")
    chosen = _layouts(auto.model)
    assert set(chosen) == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}
    assert set(chosen.values()) == {"csr"}
    (line,) = [x for x in auto.manifest["fast_modules"] if x.startswith("layouts auto")]
    assert line == "layouts auto: 14 pruned Linears: 8 in csr, 6 dense (no layout beats dense for T=1 on this machine)"
    assert len(auto.masks) == 6 and all("mlp" in k for k, _ in auto.masks.items())  # moved weights: the layout
    _same_outputs(auto.model, load_output(pruned, fast=False).model)
    none = load_output(pruned, layouts="none")
    assert not _layouts(none.model) and not any(x.startswith("layouts") for x in none.manifest["fast_modules"])


def test_dense_everywhere_when_no_layout_wins_or_the_table_is_empty(pruned, monkeypatch, tmp_path):
    _inject(monkeypatch, tmp_path, pruned, lambda name, shape: 0.7 if name == "nm" else None)
    loaded = load_output(pruned)  # auto is the default
    assert not _layouts(loaded.model)
    assert "layouts auto: 14 pruned Linears: 14 dense (no layout beats dense for T=1" in loaded.manifest["fast_modules"][-1]
    _table_at(monkeypatch, tmp_path / "empty.json")
    line = load_output(pruned).manifest["fast_modules"][-1]
    assert line.startswith("layouts auto: 14 pruned Linears: 14 dense (no table entry for T=1") and "--case 3" in line


def test_bad_layouts_choice_is_one_line(pruned):
    with pytest.raises(SparsifyError, match=r"^layouts 'fast': choose auto, measure or none$"):
        load_output(pruned, layouts="fast")
    proc = sparsify_here("generate", pruned, "--prompt", "a", "--layouts", "fast")
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --layouts fast: choose auto, measure or none"


def test_generate_says_which_layouts_it_chose(pruned, monkeypatch, tmp_path):
    _inject(monkeypatch, tmp_path, pruned, lambda name, shape: 2.0 if name == "csr" else 0.5)
    proc = sparsify_here("generate", pruned, "--prompt", "ab", "--max-new-tokens", "2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "layouts auto: 14 pruned Linears: 14 in csr" in proc.stderr
    proc = sparsify_here("generate", pruned, "--prompt", "ab", "--max-new-tokens", "2", "--device", "cpu",
                         "--layouts", "none")
    assert proc.returncode == 0 and "layouts auto" not in proc.stderr, proc.stderr


def test_measure_fills_the_missing_entries_then_chooses_from_them(pruned, monkeypatch, tmp_path):
    """``layouts="measure"``: every missing (layout, shape, density) entry is timed once, stored, and decides."""
    _table_at(monkeypatch, tmp_path / "m.json")
    timed = []

    def fake_measure(layout, tokens):  # the timing itself is table.measure's (tested with the table)
        timed.append(TBL.entry_key(layout, tokens))
        return 3.0 if layout.name == "nm" else 0.5

    monkeypatch.setattr(TBL, "measure", fake_measure)
    first = load_output(pruned, layouts="measure")
    # 3 weight shapes (32x32, 64x32, 32x64) x the candidates holding a 2:4 weight: each timed once, not per module
    assert len(timed) == len(set(timed)) and {k.split()[1] for k in timed} == {"32x32", "64x32", "32x64"}
    assert set(_layouts(first.model).values()) == {"nm"} and len(_layouts(first.model)) == 14
    line = first.manifest["fast_modules"][-1]
    assert line.startswith("layouts auto: 14 pruned Linears: 14 in nm") and f"measured {len(timed)} table" in line
    assert set(TBL.LayoutTable.load().entries) == set(timed)  # saved for the next load
    _same_outputs(first.model, load_output(pruned, fast=False).model)
    again = load_output(pruned, layouts="measure")  # nothing left to measure
    assert len(timed) == len(set(timed)) and "measured" not in again.manifest["fast_modules"][-1]
    assert set(_layouts(load_output(pruned, layouts="auto").model).values()) == {"nm"}
