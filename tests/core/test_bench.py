"""``sparsify bench``: smoke-sized runs (correctness of the plumbing, not timings) and ``--record``."""
from __future__ import annotations

import json

import pytest
from rich.console import Console

from helpers import sparsify
from sparsify_core import bench
from sparsify_core.registry import Registry
from sparsify_core.report import show_run
from sparsify_kernels import ffn as K

needs_native = pytest.mark.skipif(not K.cpu_kernel_available(), reason="no C++ compiler: native kernels unavailable")


@needs_native
def test_record_stores_a_bench_run_apart_from_recipe_runs(tmp_path):
    result = bench.run(cases=(1,), quick=True, threads=1)
    assert result["rows"] and all(r["case"] == 1 for r in result["rows"])
    (pred,) = [r for r in result["rows"] if r["config"].endswith("predictor")]
    assert 0.9 <= pred["extra"]["recall"] <= 1 and pred["extra"]["held_out_computed_fraction"] < 0.5
    assert pred["extra"]["rel_err"] < 0.5  # approximate, but close to the exact FFN
    with Registry(f"sqlite:///{tmp_path}/r.db") as reg:
        recipe_run = reg.create_run(recipe_name="t", recipe_hash=None, recipe_text=None, recipe_json=None,
                                    overrides=None, model="m", data="d", seed=0, output_dir=None, workdir=None)
        run_id = bench.record(reg, result, tmp_path / "b.json")
        rec = reg.get_run(run_id)
        assert rec.kind == "bench" and rec.status == "finished" and rec.recipe_name == "bench"
        assert [s.name for s in rec.stages] == ["case 1"] and rec.stages[0].status == "completed"
        values = {m.name: m.value for m in rec.metrics}
        for row in result["rows"]:
            assert values[f"{row['config']} ours speedup"] == pytest.approx(row["ratio"]["ours"])
            assert values[f"{row['config']} dense ms"] == pytest.approx(row["dense_ms"])
        assert rec.artifacts[0].kind == "bench_json"
        assert [r.id for r in reg.find_runs(kinds=["recipe"])] == [recipe_run]
        assert [r.id for r in reg.find_runs(kinds=["bench"])] == [run_id]
        assert reg.get_run(recipe_run).kind == "recipe"
        text = Console(width=200, record=True, file=open(tmp_path / "show.txt", "w"))
        show_run(rec, text)
        assert "s=90% ours speedup" in text.export_text()


@needs_native
def test_moe_case_times_the_converted_module(monkeypatch):
    """Case 2 runs MoEFFN.forward (router, selection, kernel), selecting exactly the kept experts."""
    from sparsify_plugins.layouts.modules import MoEFFN
    calls = []
    forward = MoEFFN.forward
    monkeypatch.setattr(MoEFFN, "forward", lambda self, x: calls.append(1) or forward(self, x))
    (row,) = bench.case_moe(skipped=(0.5,), d=96, dff=320, expert=32, repeats=3)
    assert row.extra["experts"] == "5/10" and row.extra["rel_err"] < 1e-5
    assert len(calls) >= 3 and row.ours_ms["ours"] > 0


@needs_native
def test_cli_bench_record_then_runs_and_show(workdir):
    proc = sparsify("bench", "--case", "1", "--quick", "--threads", "1", "--record", "--json", "b.json",
                    cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stderr.split("recorded as ")[1].split(";")[0].strip()
    assert json.loads((workdir / "b.json").read_text())["rows"]
    listed = sparsify("runs", cwd=workdir, check=True).stdout
    assert run_id in listed and "bench" in listed
    shown = sparsify("show", run_id, cwd=workdir, check=True).stdout
    assert "case 1" in shown and "speedup" in shown
    resume = sparsify("run", "--resume", run_id, cwd=workdir)
    assert resume.returncode == 1 and "not a recipe run" in resume.stderr


def test_decode_case_runs_on_a_sparsify_output(workdir):
    """Case 4 on a saved ReLU model (as users pass their ProSparse output): same tokens, sparsity reported."""
    from helpers import tiny_recipe, write

    # the tiny recipe's ReLU stage only (no pruning), saved where case 4 can find it
    stages = "  - kind: substitute_activation\n    method: relu\n"
    write(workdir / "r.yaml", tiny_recipe(stages, output={"dir": "out", "save": True}))
    sparsify("run", "r.yaml", cwd=workdir, check=True)
    result = bench.run(cases=(4,), quick=True, threads=1, model_dir=workdir / "out")
    (row,) = result["rows"]
    assert row["extra"]["identical_tokens"] is True
    assert 0.3 < row["extra"]["activation_sparsity"] < 1 and "out" in row["extra"]["note"]
    bad = sparsify("bench", "--case", "4", "--model", str(workdir), cwd=workdir)
    assert bad.returncode != 0 and "not a sparsify output folder" in bad.stderr


def test_decode_case_runs_an_moe_output_against_dense_and_plain_torch(workdir):
    """Case 4 on a saved MoE (as users pass their LTE output): MoEFFN reproduces the plain-torch MoE's tokens."""
    from helpers import tiny_recipe, write

    stages = ("  - kind: moeify\n    method: param_cluster\n"
              "    params: {expert_size: 8, router: lte, fit: {epochs: 2}}\n")
    write(workdir / "m.yaml", tiny_recipe(stages, output={"dir": "moe", "save": True}))
    sparsify("run", "m.yaml", cwd=workdir, check=True)
    result = bench.run(cases=(4,), quick=True, threads=1, model_dir=workdir / "moe")
    (row,) = result["rows"]
    assert set(row["ratio"]) == {"ours", "torch_moe"} and row["best"] == "ours"
    assert row["extra"]["identical_tokens"] is True and row["config"].endswith("(MoE)")
    assert 0.2 < row["extra"]["expert_sparsity"] < 0.9
