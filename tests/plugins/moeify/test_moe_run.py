"""MoE recipes end to end through the CLI: validate, run, save, load back, resume."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import RECIPES, plugin_env, sparsify_here, tiny_recipe, write

from sparsify_core import load_output
from sparsify_core.ffn import find_ffn_blocks
from sparsify_core.registry import Registry

MOE_STAGES = """\
  - kind: moeify
    method: param_cluster
    params: {expert_size: 8, router: lte, fit: {epochs: 2}}
  - kind: regularize
    method: lte
    params:
      stage1_steps: 2
      train: {steps: 3, batch_size: 2, lr: 1.0e-3, kd_weight: 1.0, lm_weight: 0.0, checkpoint_every: 0}
"""


def _recipe(extra_stages: str = "") -> str:
    """moeify + LTE on the tiny model (then ``extra_stages``), evaluated after every stage and saved to out/."""
    return tiny_recipe(MOE_STAGES + extra_stages, name="tiny-lte",
                       splits={"calibration": {"samples": 8}, "train": {"samples": 8, "offset": 8},
                               "eval": {"samples": 4}},
                       evaluate={"metrics": ["kl_divergence", "expert_sparsity", "router_recall",
                                             "ffn_flops_per_token"], "after": "all"},
                       output={"dir": "out", "save": True})


@pytest.mark.parametrize("name", ["lte", "moefication", "moefication-smollm2"])
def test_recipes_validate(name):
    proc = sparsify_here("validate", RECIPES / f"{name}.yaml")
    assert proc.returncode == 0, proc.stderr


def test_bad_moe_params_are_one_line_errors(workdir):
    path = write(workdir / "r.yaml", _recipe().replace("router: lte,", "router: lte, top_k: 3,"))
    proc = sparsify_here("validate", path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "top_k" in proc.stderr and "r.yaml" in proc.stderr


def _metrics(run, stage):
    return {m.name: m.value for m in run.metrics if m.stage == stage and m.layer is None and m.step is None}


def test_run_killed_after_moe_stages_resumes_saves_and_loads_back(workdir, test_stages):
    started, release = workdir / "started", workdir / "release"
    wait = f"""  - kind: test
    method: wait_for_file
    params: {{started: {started}, release: {release}}}
"""
    path = write(workdir / "r.yaml", _recipe(wait))
    env = dict(os.environ, **plugin_env(workdir))
    proc = subprocess.Popen([sys.executable, "-m", "sparsify_core.cli", "run", str(path)], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not started.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=60)
    reg = Registry(f"sqlite:///{workdir}/registry.db")
    reg.reconcile()
    (run,) = reg.find_runs()
    release.write_text("go")
    done = sparsify_here("run", "--resume", run.id, cwd=workdir)  # the kill needed a process; the resume does not
    assert done.returncode == 0, done.stderr
    assert "resuming after stage 2" in done.stderr
    (run,) = reg.find_runs()
    # The rebuilt model (experts, routers, threshold routing, weights) evaluates as before the kill.
    before, after = _metrics(run, "lte"), _metrics(run, "wait_for_file")
    for name in ("kl_divergence", "expert_sparsity", "router_recall", "ffn_flops_per_token"):
        assert after[name] == pytest.approx(before[name], rel=1e-5), name
    assert 0 < before["expert_sparsity"] < 1

    out = load_output(workdir / "out")
    modules = [b.module for b in find_ffn_blocks(out.model)]
    assert all(type(m).__name__ == "RoutedFFN" and m.routing == "threshold" for m in modules)
    # Stored compressed (the default for swapped modules). Routed experts have no plain transformers form
    # (the dense FFN with every expert selected is another function): a dense export refuses, in one line.
    from sparsify_core.errors import SparsifyError
    from sparsify_core.output import export_output
    assert out.manifest["storage"]["form"] == "compressed"
    with pytest.raises(SparsifyError, match=r"mlp: a RoutedFFN where plain transformers has a LlamaMLP, "
                                            r"with no plain form \(the architecture changed\)"):
        export_output(workdir / "out", workdir / "dense", "dense")
    assert not (workdir / "dense").exists()
