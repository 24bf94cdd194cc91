"""`sparsify fit`: the scaling law fitted to a sweep recorded in the registry."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import sparsify_here

from sparsify_core.registry import Registry
from sparsify_core.scaling_law import PUBLISHED

T5 = PUBLISHED["t5-c4"]


def _record_sweep(reg: Registry, noise: float = 0.002) -> str:
    """A finished sweep whose runs' losses follow the T5 law (N in millions, D in 1e5 steps)."""
    grid = {"model.params.hidden_size": [1, 2, 3, 4], "stages.0.params.sparsity": [0.0, 0.5, 0.75],
            "stages.1.params.train.steps": [50000, 100000, 200000]}
    sweep_id = reg.create_sweep(name="law", recipe_text=None, recipe_path=None, overrides=[], grid=grid, points=36)
    gen = np.random.default_rng(0)
    for n in (20, 60, 150, 400):
        for s in grid["stages.0.params.sparsity"]:
            for steps in grid["stages.1.params.train.steps"]:
                loss = T5(s, n, steps / 1e5) * np.exp(gen.normal(0, noise))
                recipe = {"stages": [{"params": {"sparsity": s}}, {"params": {"train": {"steps": steps}}}]}
                run = reg.create_run(recipe_name="law", recipe_hash=None, recipe_text=None, recipe_json=recipe,
                                     overrides=[], model="tiny", data="pydoc", seed=0, output_dir=None, workdir=None,
                                     sweep_id=sweep_id, sweep_point=json.dumps({"n": n, "s": s, "d": steps}))
                reg.record_evaluation(run, "dense", -1, {"perplexity": 1e3, "weight_sparsity": 0.0})
                reg.record_evaluation(run, "finetune", 1, {"perplexity": float(np.exp(loss)), "weight_sparsity": s,
                                                           "nonzero_parameters": n * 1e6})
                reg.set_run_status(run, "finished")
    run = reg.create_run(recipe_name="law", recipe_hash=None, recipe_text=None, recipe_json={}, overrides=[],
                         model="tiny", data="pydoc", seed=0, output_dir=None, workdir=None, sweep_id=sweep_id)
    reg.set_run_status(run, "failed", "boom")  # skipped by the fit
    return sweep_id


def test_fit_reports_coefficients_errors_optimum_and_plot(workdir):
    sweep_id = _record_sweep(Registry(str(workdir / "registry.db")))
    proc = sparsify_here("fit", sweep_id[:16], "--d-unit", "1e5", "--restarts", "2", "--bootstrap", "3", "--folds", "2",
                    "--budget-data", "5e4", "--budget-data", "5e7", "--json", "fit.json", "--plot", "fit.png",
                    cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "b_N" in proc.stdout and "held-out error (2-fold" in proc.stdout and "optimal sparsity" in proc.stdout
    assert "skipped 1 runs" in proc.stderr
    out = json.loads((workdir / "fit.json").read_text())
    assert out["data"] == "recipe:stages.1.params.train.steps" and out["points"] and len(out["points"]) == 36
    assert out["coefficients"]["b_N"] == pytest.approx(T5.b_N, rel=0.15)
    assert set(out["bootstrap_95"]) == set(out["coefficients"])
    assert out["heldout_error"]["mean_abs_rel"] < 0.02 and out["heldout_error"]["points"] == 36
    low, high = out["optimal_sparsity"]
    assert low["D"] == 5e4 and high["S_opt"] > low["S_opt"]  # more data, sparser optimum
    assert high["L_opt"] <= high["L_dense"] + 1e-12
    assert (workdir / "fit.png").read_bytes()[:4] == b"\x89PNG"

    none = sparsify_here("fit", "sweep-nope", cwd=workdir)
    assert none.returncode == 1 and "no sweep 'sweep-nope'" in none.stderr and "Traceback" not in none.stderr
