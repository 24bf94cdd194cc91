"""A third-party plugin distribution, pip-installed, is listed and usable in a recipe."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, TINY_RECIPE, sparsify, write

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
    assert any("weight_l2" in line for line in proc.stdout.splitlines())
    # Built-ins come through the same entry-point group, from the sparsify distribution.
    assert any("prune/magnitude" in line and "sparsify 0.1.0" in line for line in proc.stdout.splitlines())


def test_usable_in_a_recipe(example_plugin, workdir):
    recipe = write(workdir / "r.yaml", TINY_RECIPE.replace("method: magnitude", "method: random").replace(
        "  after: all", "  after: all\n  metrics: [perplexity, weight_sparsity, weight_l2]"))
    log = workdir / "tracker.jsonl"
    proc = sparsify("run", recipe, cwd=workdir, env={"SPARSIFY_EXAMPLE_LOG": str(log)})
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    stages = [e["stage"] for e in events]
    assert stages[0] == "dense" and "random" in stages
    last = [e for e in events if e["stage"] == "random" and "weight_sparsity" in e["metrics"]][-1]
    assert 0.45 < last["metrics"]["weight_sparsity"] < 0.55
    assert "weight_l2" in last["metrics"]
