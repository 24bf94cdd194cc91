"""A third-party plugin distribution, pip-installed, is listed and usable in a recipe.

The example plugin (tests/example_plugin) implements every hook: a method of a
built-in kind, one of a kind of its own, a model and a data source, a metric,
a layout, a bench case and a tracker on every lifecycle hook; a recipe uses
them through the CLI (installed) or in-process (registered from its folder).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pluggy
import pytest
import torch
from helpers import REPO, import_example_plugin, plugin_env, sparsify, tiny_recipe, write

from sparsify_core import hookspecs, load_output
from sparsify_core.errors import RecipeError
from sparsify_core.ffn import prunable_modules
from sparsify_core.recipe import check_model, load_recipe
from sparsify_core.registry import Registry
from sparsify_core.runner import Runner

EXAMPLE = REPO / "tests" / "example_plugin"


@pytest.fixture(scope="module")
def example_plugin():
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", str(EXAMPLE)], check=True,
                   capture_output=True)
    try:
        yield
    finally:
        subprocess.run(pip + ["uninstall", "-y", "sparsify-example-plugin"], check=False, capture_output=True)


def test_listed_with_its_distribution(example_plugin):
    proc = sparsify("plugins")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "prune/random" in line]
    assert rows and "sparsify-example-plugin 0.1.0" in rows[0]
    for provided in ("quantize/round_to_grid", "arithmetic_gpt2", "arithmetic", "weight_l2", "example_coo",
                     "101 (example COO layout)"):
        assert any(provided in line and "sparsify-example-plugin 0.1.0" in line
                   for line in proc.stdout.splitlines()), provided
    # Built-ins come through the same entry-point group, from the sparsify distribution.
    assert any("prune/magnitude" in line and "sparsify 0.1.0" in line for line in proc.stdout.splitlines())
    schema = json.loads(sparsify("schema", check=True).stdout)  # installed: in the schema with no edit to sparsify
    assert {"Stage_prune_random", "Stage_quantize_round_to_grid", "Model_arithmetic_gpt2"} <= set(schema["$defs"])


STAGES = """\
  - kind: substitute_activation
    method: relu
  - kind: prune
    method: random
    params: {sparsity: 0.5}
  - kind: quantize
    method: round_to_grid
    params: {bits: 4}
"""
FAIL = "  - kind: test\n    method: fail\n    params: {message: kaput}\n"


def _recipe(workdir, stages):
    text = tiny_recipe(stages, evaluate={"after": "all", "metrics": ["perplexity", "weight_sparsity", "weight_l2"]},
                       output={"dir": str(workdir / "out")})
    return write(workdir / "r.yaml", text.replace("  source: pydoc\n", "  source: arithmetic\n  params: {limit: 40}\n"))


def _events(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_new_kind_data_source_metric_and_tracker(example_plugin, workdir):
    log = workdir / "tracker.jsonl"
    proc = sparsify("run", _recipe(workdir, STAGES), cwd=workdir, env={"SPARSIFY_EXAMPLE_LOG": str(log)})
    assert proc.returncode == 0, proc.stderr
    assert "data: arithmetic" in proc.stderr
    events = _events(log)
    assert len({e["run"] for e in events}) == 1
    assert [(e["event"], e.get("stage") if e["event"] != "stage_finished" else e["status"]) for e in events] == [
        ("run_started", None), ("metrics_logged", "dense"),
        ("stage_started", "relu"), ("stage_finished", "completed"), ("metrics_logged", "relu"),
        ("stage_started", "random"), ("stage_finished", "completed"), ("metrics_logged", "random"),
        ("stage_started", "round_to_grid"), ("stage_finished", "completed"), ("metrics_logged", "round_to_grid"),
        ("run_finished", None)]
    assert events[0]["resumed"] is False and events[-1] == {"event": "run_finished", "run": events[0]["run"],
                                                            "status": "finished", "reason": None}
    assert events[8]["kind"] == "quantize" and events[9]["metrics"]["max_abs_error"] > 0
    evals = {e["stage"]: e["metrics"] for e in events if e["event"] == "metrics_logged"}
    assert 0.45 < evals["random"]["weight_sparsity"] < 0.55
    assert evals["round_to_grid"]["weight_sparsity"] >= evals["random"]["weight_sparsity"]  # zeros stay zero
    assert evals["round_to_grid"]["weight_l2"] != evals["random"]["weight_l2"]
    # The saved weights lie on the 4-bit grid: 7 steps per sign of the largest magnitude.
    model = load_output(workdir / "out").model
    for _, module in prunable_modules(model):
        steps = module.weight / (module.weight.abs().max() / 7)
        assert (steps - steps.round()).abs().max() < 1e-4
    (run,) = Registry(f"sqlite:///{workdir}/registry.db").find_runs()
    assert run.data == "arithmetic"


def test_the_tracker_sees_a_failed_stage(example_plugin, workdir):
    log = workdir / "tracker.jsonl"
    proc = sparsify("run", _recipe(workdir, STAGES.split("  - kind: prune")[0] + FAIL), cwd=workdir,
                    env={**plugin_env(workdir), "SPARSIFY_EXAMPLE_LOG": str(log)})
    assert proc.returncode == 1 and "kaput" in proc.stderr
    events = _events(log)
    assert [e["event"] for e in events] == ["run_started", "metrics_logged", "stage_started", "stage_finished",
                                            "metrics_logged", "stage_started", "stage_finished", "run_finished"]
    failed = events[6]
    assert failed["stage"] == "fail" and failed["index"] == 1 and failed["status"] == "failed"
    assert list(failed["metrics"]) == ["stage_seconds"]
    assert events[-1]["status"] == "failed" and "kaput" in events[-1]["reason"]


# Under torchrun only rank 0 calls the lifecycle hooks: tests/core/test_distributed.py (the one torchrun launch
# there runs with this plugin installed).


# -- in-process: every hook, and the plugin's model source ------------------------------------


def test_the_example_plugin_implements_every_hookspec():
    """Every hook of sparsify_core/hookspecs.py has an implementation; every provider hook provides something."""
    specs = sorted(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "sparsify_spec"))
    assert specs == sorted(n for n in vars(hookspecs) if n.startswith("sparsify_")) and PROVIDERS < set(specs)
    pm = pluggy.PluginManager("sparsify")
    pm.add_hookspecs(hookspecs)
    pm.register(import_example_plugin(), name="example")  # also checks each implementation's signature
    assert [n for n in specs if not getattr(pm.hook, n).get_hookimpls()] == []
    provided = {n: getattr(pm.hook, n)() for n in specs if n in PROVIDERS}
    assert set(provided) == PROVIDERS and all(p and p[0] for p in provided.values()), provided


def test_the_example_fast_modules_hook_swaps_all_zero_linears_exactly():
    """``sparsify_fast_modules``: an all-zero Linear computes its bias only, the model's output unchanged."""
    import torch

    from sparsify_core.masks import MaskSet

    pm = pluggy.PluginManager("sparsify")
    pm.add_hookspecs(hookspecs)
    pm.register(import_example_plugin(), name="example")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    masks = MaskSet()
    masks.set("0.weight", torch.zeros(16, 8, dtype=torch.bool))
    masks.apply(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = model(x)
        (done,) = pm.hook.sparsify_fast_modules(model=model, masks=masks, device=torch.device("cpu"))
        after = model(x)
    assert done == ["0: all-zero weight, bias only (ZeroLinear)"]
    assert type(model[0]).__name__ == "ZeroLinear" and type(model[2]) is torch.nn.Linear  # only the zero one
    assert "0.weight" not in masks
    torch.testing.assert_close(after, before, rtol=0, atol=0)


#: The hooks that return what a plugin provides (the others observe a run's lifecycle).
PROVIDERS = {"sparsify_methods", "sparsify_model_sources", "sparsify_data_sources", "sparsify_metrics",
             "sparsify_layouts", "sparsify_bench_cases"}

GPT2_RECIPE = """\
name: {name}
model: {{source: arithmetic_gpt2, params: {{max_positions: {positions}}}}}
data:
  source: arithmetic
  params: {{limit: 30}}
  seq_len: 24
  splits: {{eval: {{samples: 2}}}}
stages:
  - {{kind: prune, method: magnitude, params: {{sparsity: 0.5}}}}
{convert}evaluate: {{metrics: [perplexity, weight_l2]}}
output: {{dir: {out}}}
"""
CONVERT = "  - {kind: layout_convert, method: weight, params: {layout: example_coo, strict: true}}\n"


def test_the_example_model_source_runs_saves_and_loads_back(workdir, example_plugin_module):
    """``arithmetic_gpt2`` on ``arithmetic`` data, pruned, held in ``example_coo``: saved, loaded back, same logits."""
    from sparsify_plugins.layouts.modules import SparseLinear

    reg = Registry(f"sqlite:///{workdir}/registry.db")

    def recipe(name, positions=32, convert=CONVERT):
        return write(workdir / f"{name}.yaml", GPT2_RECIPE.format(name=name, positions=positions, convert=convert,
                                                                  out=workdir / name))

    with pytest.raises(RecipeError, match="learned positions for 16"):
        check_model(load_recipe(recipe("long", positions=16)))  # the skeleton's position table, no weights loaded
    for name, convert in (("coo", CONVERT), ("dense", "")):
        Runner(load_recipe(recipe(name, convert=convert)), reg, runs_dir=workdir / "runs").run()
    assert {(r.recipe_name, r.model, r.data, r.status) for r in reg.find_runs()} == {
        ("coo", "arithmetic_gpt2", "arithmetic", "finished"), ("dense", "arithmetic_gpt2", "arithmetic", "finished")}
    coo, dense = load_output(workdir / "coo"), load_output(workdir / "dense")
    stored = [m for m in coo.model.modules() if isinstance(m, SparseLinear)]
    assert len(stored) == 2 * 4 and all(m.layout_name == "example_coo" for m in stored)  # 2 layers x 4 Conv1D
    text = "12 + 30 = 42."
    ids = coo.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and coo.tokenizer.decode(ids) == text  # the saved tokenizer, one id per character
    with torch.no_grad():
        torch.testing.assert_close(coo.model(torch.tensor([ids])).logits, dense.model(torch.tensor([ids])).logits,
                                   atol=1e-5, rtol=1e-5)


def test_the_example_bench_case_runs_quick(example_plugin_module):
    """Case 101 through the harness's discovery, at smoke sizes: rows of its number, its kernel exact."""
    from sparsify_core import bench

    case = bench.cases()[101]
    assert not case.default
    rows = case.run(bench.BenchOptions(quick=True))
    assert rows and all(r.case == 101 and set(r.ratio) == {"example_coo"} for r in rows)
    assert all(r.extra["max_abs_err"] < 1e-4 for r in rows)
