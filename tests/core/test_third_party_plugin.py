"""A third-party plugin distribution, pip-installed, is listed and usable in a recipe.

The example plugin (tests/example_plugin) provides a method of a built-in kind,
one of a kind of its own, a data source, a metric and a tracker on every
lifecycle hook; a recipe uses them all through the CLI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, plugin_env, sparsify, tiny_recipe, write

from sparsify_core import load_output
from sparsify_core.ffn import prunable_modules
from sparsify_core.registry import Registry

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
    for provided in ("quantize/round_to_grid", "arithmetic", "weight_l2"):
        assert any(provided in line and "sparsify-example-plugin 0.1.0" in line
                   for line in proc.stdout.splitlines()), provided
    # Built-ins come through the same entry-point group, from the sparsify distribution.
    assert any("prune/magnitude" in line and "sparsify 0.1.0" in line for line in proc.stdout.splitlines())


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


def test_under_torchrun_only_rank_0_reports(example_plugin, workdir):
    log = workdir / "tracker.jsonl"
    recipe = _recipe(workdir, STAGES.split("  - kind: prune")[0])
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", SPARSIFY_EXAMPLE_LOG=str(log))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sparsify_core.cli", "run", str(recipe)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stderr
    assert [(e["event"], e.get("stage")) for e in _events(log)] == [
        ("run_started", None), ("metrics_logged", "dense"), ("stage_started", "relu"),
        ("stage_finished", "relu"), ("metrics_logged", "relu"), ("run_finished", None)]
