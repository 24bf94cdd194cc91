"""Writes ``registry-v6.db`` and ``registry-v6-expected.json``: a registry as release v6 recorded it.

Run once, with the sparsify of schema version 6 (commit 7424793), from this
folder: ``python make_registry_v6.py``. The database is the fixture of
``test_registry_migration.py``; the JSON holds what that release answered
about it (final evaluation points, ``compare --format json``, ``show``, the
scaling-law fit), which the current code must still answer after migrating.
The file is committed: re-running it with a later sparsify would record that
release's schema instead, so don't.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

from rich.console import Console

from sparsify_core import report
from sparsify_core.metric import MetricValue
from sparsify_core.registry import SCHEMA_VERSION, Registry
from sparsify_core.scaling_law import fit_runs

HERE = Path(__file__).parent
DB, EXPECTED = HERE / "registry-v6.db", HERE / "registry-v6-expected.json"
FIT = dict(data="recipe:stages.1.params.train.steps", d_unit=1e5, restarts=2, seed=0)


def _run(reg, name, *, recipe_json, sweep_id=None, sweep_point=None, kind="recipe", model="tiny"):
    return reg.create_run(recipe_name=name, recipe_hash="h" + name, recipe_text=f"name: {name}\n",
                          recipe_json=recipe_json, overrides=[], model=model, data="pydoc", seed=0,
                          output_dir=None, workdir=None, sweep_id=sweep_id, sweep_point=sweep_point, kind=kind)


def _stage(reg, run, idx, name, kind, method, metrics, seconds):
    reg.start_stage(run, idx, name=name, kind=kind, method=method, params={"x": idx})
    reg.log_metrics(run, name, idx, {**metrics, "stage_seconds": seconds, "peak_memory_mb": 100.0 + idx})
    reg.finish_stage(run, idx, "completed", duration_s=seconds, peak_memory_mb=100.0 + idx)


def build() -> dict:
    assert SCHEMA_VERSION == 6, "written by the release of schema version 6 only"
    DB.unlink(missing_ok=True)
    reg = Registry(str(DB))
    grid = {"model.params.hidden_size": [8, 16], "stages.0.params.sparsity": [0.0, 0.5],
            "stages.1.params.train.steps": [100000, 200000]}
    sweep = reg.create_sweep(name="law", recipe_text="name: law\n", recipe_path=None, overrides=[], grid=grid,
                             points=8)
    for i, (h, s, steps) in enumerate([(h, s, d) for h in (8, 16) for s in (0.0, 0.5) for d in (100000, 200000)]):
        n = h * 1e6
        loss = (0.6 * (1 - s) ** 0.7 + 1.5) * (n / 1e6) ** -0.25 + (0.1 / (steps / 1e5)) ** 0.2 + 0.65
        recipe = {"name": "law", "stages": [{"name": "prune", "params": {"sparsity": s}},
                                            {"name": "finetune", "params": {"train": {"steps": steps}}}]}
        run = _run(reg, "law", recipe_json=recipe, sweep_id=sweep,
                   sweep_point=json.dumps({"hidden_size": h, "sparsity": s, "steps": steps}))
        reg.log_metrics(run, "dense", -1, [MetricValue("perplexity", 40.0 + i), MetricValue("weight_sparsity", 0.0),
                                           MetricValue("nonzero_parameters", n),
                                           MetricValue("kl_divergence", 0.0)])
        _stage(reg, run, 0, "prune", "prune", "magnitude", {"sparsity": s}, 1.5)
        _stage(reg, run, 1, "finetune", "train", "finetune", {}, 7.25)
        reg.log_metrics(run, "finetune", 1, {"loss": 3.0 - 0.1 * i}, step=0)
        reg.log_metrics(run, "finetune", 1, {"loss": 2.0 - 0.1 * i}, step=10)
        reg.log_metrics(run, "finetune", 1, [
            MetricValue("perplexity", math.exp(loss)), MetricValue("weight_sparsity", s),
            MetricValue("weight_sparsity", s * 0.9, layer="layers.0.mlp.up"),
            MetricValue("weight_sparsity", min(1.0, s * 1.1), layer="layers.1.mlp.up"),
            MetricValue("nonzero_parameters", n * (1 - s)),
            MetricValue("kl_divergence", math.nan, error="RuntimeError: no reference" if i == 3 else None)
            if i == 3 else MetricValue("kl_divergence", 0.01 * (i + 1))])
        reg.add_artifact(run, "output", f"/outputs/law-{i}")
        reg.set_run_status(run, "finished")
    failed = _run(reg, "law", recipe_json={"name": "law", "stages": []}, sweep_id=sweep, sweep_point="{}")
    reg.start_stage(failed, 0, name="prune", kind="prune", method="magnitude", params={})
    reg.set_run_status(failed, "failed", "RuntimeError: boom")

    # evaluated after stage 0 only; stage 1 timed itself (the old rule must not take it for an evaluation)
    lone = _run(reg, "relu-ffn", recipe_json={"name": "relu-ffn", "stages": [
        {"name": "relufy", "kind": "activation", "method": "relu"}, {"name": "save", "kind": "output"}]})
    reg.log_metrics(lone, "dense", -1, {"perplexity": 20.0, "activation_sparsity": 0.02})
    _stage(reg, lone, 0, "relufy", "activation", "relu", {}, 4.0)
    reg.log_metrics(lone, "relufy", 0, {"perplexity": 25.0, "activation_sparsity": 0.6})
    _stage(reg, lone, 1, "save", "output", "noop", {}, 1.0)
    reg.set_run_status(lone, "finished")

    # no dense baseline: the last point counts
    nodense = _run(reg, "nodense", recipe_json={"name": "nodense", "stages": [{"name": "a"}, {"name": "b"}]})
    _stage(reg, nodense, 0, "a", "prune", "magnitude", {"sparsity": 0.3}, 2.0)
    reg.log_metrics(nodense, "a", 0, {"perplexity": 31.0})
    _stage(reg, nodense, 1, "b", "prune", "magnitude", {"sparsity": 0.4}, 2.0)
    reg.log_metrics(nodense, "b", 1, {"perplexity": 33.0})
    reg.set_run_status(nodense, "interrupted", "stopped by SIGTERM")

    bench = _run(reg, "bench", recipe_json=None, kind="bench", model=None)
    reg.start_stage(bench, 0, name="case 1", kind="bench", method="case", params={})
    reg.log_metrics(bench, "case 1", 0, {"speedup": 1.8, "dense_ms": 2.0})
    reg.finish_stage(bench, 0, "completed", duration_s=0.5)
    reg.record_machine(bench, cpu_model="Test CPU", isa="avx2", isa_flags=["avx2"], threads=2, cpus=2,
                       torch_version="2.0", load_before=0.5, load_after=0.7)
    reg.set_run_status(bench, "finished")

    records = reg.find_runs()
    recipe_runs = [r for r in records if r.kind == "recipe"]
    law = reg.find_runs(sweep_id=sweep)
    result = fit_runs(law, **FIT)

    def shown(r) -> str:
        console = Console(file=io.StringIO(), width=200, color_system=None)
        report.show_run(r, console)
        return console.file.getvalue()

    expected = {
        "sweep": sweep,
        "final_point": {r.id: report.final_point(r) for r in records},
        "compare_json": json.loads(report.format_compare(recipe_runs, "json")),
        "show": {r.id: shown(r) for r in records},
        "fit": {"labels": result.points.labels, "skipped": result.skipped, "S": result.points.S.tolist(),
                "N": result.points.N.tolist(), "D": result.points.D.tolist(), "L": result.points.L.tolist(),
                "coefficients": result.fit.law.as_dict()},
    }
    reg.close()
    for suffix in ("-wal", "-shm"):
        Path(str(DB) + suffix).unlink(missing_ok=True)
    EXPECTED.write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    return expected


if __name__ == "__main__":
    build()
    print(f"wrote {DB} ({DB.stat().st_size} bytes) and {EXPECTED}")
