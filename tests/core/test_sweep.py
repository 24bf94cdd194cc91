"""Sweeps: grid expansion and its errors, registry records, running and resuming run by run."""
from __future__ import annotations

import json

import pytest
from helpers import sparsify, write, sparsify_here

from sparsify_core.errors import RecipeError
from sparsify_core.recipe import load_recipe, load_sweep
from sparsify_core.registry import Registry
from sparsify_core.runner import RunInterrupted
from sparsify_core.sweep import plan_from_record, run_sweep
from sparsify_plugins.prune import GMP

SWEEP = """\
name: sw
model:
  source: tiny
  params: {arch: llama, hidden_size: 16, intermediate_size: 32, layers: 1, heads: 2}
data:
  source: pydoc
  seq_len: 16
  splits:
    train: {samples: 4}
    eval: {samples: 2}
stages:
  - kind: prune
    method: gmp
    params:
      sparsity: 0.5
      every: 1
      train: {steps: 2, batch_size: 2, lr: 1.0e-3, checkpoint_every: 0}
evaluate: {metrics: [perplexity, weight_sparsity]}
output: {save: false}
sweep:
  grid:
    model.params: [{hidden_size: 16, intermediate_size: 32}, {hidden_size: 32, intermediate_size: 64}]
    stages.0.params.sparsity: [0.0, 0.5, 0.75]
"""


def test_grid_expands_in_order_with_names_and_overrides(tmp_path):
    plan = load_sweep(write(tmp_path / "sw.yaml", SWEEP))
    assert len(plan.points) == 6 and plan.name == "sw"
    first, last = plan.points[0], plan.points[-1]
    assert first.values == {"model.params": {"hidden_size": 16, "intermediate_size": 32}, "stages.0.params.sparsity": 0.0}
    assert plan.points[1].values["stages.0.params.sparsity"] == 0.5  # the last path varies fastest
    r = last.loaded.recipe
    assert r.name == "sw-hidden_size32-intermediate_size64-sparsity0.75"
    assert r.model.params == {"arch": "llama", "hidden_size": 32, "intermediate_size": 64, "layers": 1, "heads": 2}
    assert last.loaded.stages[0].params.sparsity == 0.75
    # a point's recorded overrides rebuild exactly its recipe (what `--resume RUN_ID` does)
    again = load_recipe(tmp_path / "sw.yaml", last.loaded.overrides)
    assert again.effective_json == last.loaded.effective_json
    assert len({p.key for p in plan.points}) == 6
    assert load_sweep(write(tmp_path / "plain.yaml", SWEEP.split("sweep:")[0])) is None


def test_name_template(tmp_path):
    text = SWEEP.replace("sweep:\n", 'sweep:\n  name: "{name}-n{model.params.hidden_size}-s{stages.0.params.sparsity}"\n')
    plan = load_sweep(write(tmp_path / "sw.yaml", text))
    assert [p.loaded.recipe.name for p in plan.points[:2]] == ["sw-n16-s0", "sw-n16-s0.5"]
    text = SWEEP.replace("sweep:\n", 'sweep:\n  name: "{name}-n{model.params.hidden_size}"\n')
    with pytest.raises(RecipeError, match=r"sw.yaml:21: sweep.name: points 0 and 1 both get the run name 'sw-n16'"):
        load_sweep(write(tmp_path / "sw.yaml", text))
    text = SWEEP.replace("sweep:\n", 'sweep:\n  name: "{name}-{model.params.width}"\n')
    with pytest.raises(RecipeError, match=r"sw.yaml:21: sweep.name: \{model.params.width\}: no such value"):
        load_sweep(write(tmp_path / "sw.yaml", text))


@pytest.mark.parametrize("change,where", [
    (("stages.0.params.sparsity: [", "stages.4.params.sparsity: ["), r"sw.yaml:23: stages.4: no list item 4"),
    (("[0.0, 0.5, 0.75]", "[0.0, 1.5]"), r"sw.yaml:23: stages.0.params.sparsity: Input should be less than 1"),
    (("hidden_size: 32, inter", "hiden_size: 32, inter"), r"sw.yaml:22: model.params.hiden_size: unknown key.*"
                                                         r"did you mean 'hidden_size'"),
    (("[0.0, 0.5, 0.75]", "[]"), r"sw.yaml:23: sweep.grid.stages.0.params.sparsity: needs at least one value"),
    (("    model.params: [", "    name: [a, b]\n    model.params: ["), r"sw.yaml:22: sweep.grid.name: a sweep cannot"),
    (("name: sw\n", ""), r"sw.yaml:\d+: name: required field is missing"),
    (("  grid:", "  grids:"), r"sw.yaml:21: sweep.grids: unknown key.*valid keys: grid, name.*did you mean .grid.?"),
])
def test_errors_name_file_line_and_field(tmp_path, change, where):
    with pytest.raises(RecipeError, match=where):
        load_sweep(write(tmp_path / "sw.yaml", SWEEP.replace(*change)))


def test_validate_cli_checks_every_point(workdir):
    ok = sparsify_here("validate", write(workdir / "sw.yaml", SWEEP), cwd=workdir)
    assert ok.returncode == 0 and "sweep sw of 6 runs" in ok.stdout, ok.stderr
    bad = sparsify_here("validate", write(workdir / "bad.yaml", SWEEP.replace("0.75]", "0.75, 1.0]")), cwd=workdir)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "bad.yaml:23: stages.0.params.sparsity: Input should be less than 1" in bad.stderr


def test_registry_records_sweeps(tmp_path):
    reg = Registry(str(tmp_path / "r.db"))
    sid = reg.create_sweep(name="sw", recipe_text="x", recipe_path=None, overrides=["a=1"],
                           grid={"seed": [0, 1]}, points=2)
    run = reg.create_run(recipe_name="sw-seed0", recipe_hash=None, recipe_text=None, recipe_json=None, overrides=[],
                         model=None, data=None, seed=0, output_dir=None, workdir=None, sweep_id=sid,
                         sweep_point=json.dumps({"seed": 0}))
    reg.create_run(recipe_name="other", recipe_hash=None, recipe_text=None, recipe_json=None, overrides=[],
                   model=None, data=None, seed=0, output_dir=None, workdir=None)
    got = reg.get_sweep(sid[:14])
    assert got.id == sid and got.grid == {"seed": [0, 1]} and got.overrides == ["a=1"] and got.points == 2
    (rec,) = reg.find_runs(sweep_id=sid)
    assert rec.id == run and rec.sweep_point == {"seed": 0}
    assert [s.id for s in reg.find_sweeps()] == [sid]
    with pytest.raises(Exception, match="no sweep 'sweep-nope'"):
        reg.get_sweep("sweep-nope")


def test_sweep_runs_resume_run_by_run(workdir, monkeypatch):
    text = SWEEP.replace("[0.0, 0.5, 0.75]", "[0.0, 0.5]")
    plan = load_sweep(write(workdir / "sw.yaml", text))
    reg = Registry(str(workdir / "registry.db"))  # the workdir fixture's, which the CLI below reads
    original, calls = GMP.apply, []

    def flaky(self, ctx, params):  # the second run fails, the third is interrupted
        calls.append(ctx.run_id)
        if len(calls) == 2:
            raise RuntimeError("boom")
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, ctx, params)

    monkeypatch.setattr(GMP, "apply", flaky)
    with pytest.raises(RunInterrupted, match="resume the whole sweep with `sparsify run --resume sweep-"):
        run_sweep(plan, reg, runs_dir=workdir / "runs")
    (sweep,) = reg.find_sweeps()
    first = {r.recipe_name: r for r in reg.find_runs(sweep_id=sweep.id)}
    assert sorted(r.status for r in first.values()) == ["failed", "finished", "interrupted"]

    monkeypatch.setattr(GMP, "apply", original)
    done = run_sweep(plan_from_record(reg.get_sweep(sweep.id)), reg, runs_dir=workdir / "runs", resume_id=sweep.id)
    assert len(done.skipped) == 1 and len(done.finished) == 3 and not done.failed
    runs = reg.find_runs(sweep_id=sweep.id)
    assert len(runs) == 4 and all(r.status == "finished" for r in runs)
    by_name = {r.recipe_name: r for r in runs}
    for name, before in first.items():  # the unfinished runs continued under their own ids
        assert by_name[name].id == before.id
        assert by_name[name].attempts == (1 if before.status == "finished" else 2)
    assert {json.dumps(r.sweep_point, sort_keys=True) for r in runs} == {p.key for p in plan.points}

    listed = sparsify_here("runs", "--sweep", sweep.id[:16], cwd=workdir)
    assert listed.returncode == 0 and all(r.id in listed.stdout for r in runs), listed.stderr
    cmp = sparsify_here("compare", "--sweep", sweep.id, "--format", "json", cwd=workdir)
    assert cmp.returncode == 0 and len(json.loads(cmp.stdout)) >= 4, cmp.stderr
    table = sparsify_here("sweeps", cwd=workdir)
    row = next(line for line in table.stdout.splitlines() if sweep.id in line)
    assert [c.strip() for c in row.split("│")][3:6] == ["4", "4", "0"], row  # runs, finished, failed
