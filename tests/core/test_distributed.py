"""The same recipe under torchrun: two gloo processes on loopback, one registry run, equal replicas (DDP, which
``parallel: auto`` picks for a tiny model; FSDP is tests/core/test_fsdp.py), and a third-party plugin's lifecycle
hooks called by rank 0 only (one torchrun launch for both: each costs ~10 s of imports)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import TINY_RECIPE, plugin_env, write

from sparsify_core.registry import Registry

TRAIN_STAGE = """\
  - kind: regularize
    method: progressive_l1
    params:
      schedule: [{lambda: 0.0, steps: 3}, {lambda: 0.5, steps: 5}]
      train: {steps: 8, batch_size: 2, lr: 1.0e-3, kd_weight: 1.0, lm_weight: 0.5, checkpoint_every: 4, log_every: 2}
"""


def test_two_processes_with_gloo(workdir):
    recipe = write(workdir / "r.yaml", TINY_RECIPE.replace("evaluate:", TRAIN_STAGE + "evaluate:"))
    log = workdir / "tracker.jsonl"  # the example plugin's tracker (tests/example_plugin) writes its calls here
    env = dict(os.environ, **plugin_env(workdir, example=True), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               SPARSIFY_EXAMPLE_LOG=str(log))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sparsify_core.cli", "run", str(recipe)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = Registry(f"sqlite:///{workdir}/registry.db").find_runs()
    assert len(runs) == 1, "rank 1 must not record a run of its own"
    (run,) = runs
    assert run.status == "finished" and "2 processes" in proc.stderr
    assert "data parallel over 2 processes: ddp (auto: " in proc.stderr  # a tiny model: auto keeps DDP
    assert [s.status for s in run.stages] == ["completed"] * 3
    stage = {m.name: m.value for m in run.metrics if m.stage == "progressive_l1" and m.step is None}
    assert stage["replica_max_abs_diff"] == 0.0  # DDP kept both ranks' weights identical
    curve = [m for m in run.metrics if m.stage == "progressive_l1" and m.step is not None and m.name == "loss"]
    assert [m.step for m in curve] == [2, 4, 6, 8]  # logged once, by rank 0
    assert len([a for a in run.artifacts if a.kind == "output"]) == 1
    # The plugin's lifecycle hooks are called once, by rank 0 (the run it records), not once per rank.
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert {e["run"] for e in events} == {run.id}
    expected = [("run_started", None), ("metrics_logged", "dense")]
    for stage in ("relu", "magnitude", "progressive_l1"):
        # a training stage also reports its curve while it runs: one metrics_logged per log step (2, 4, 6, 8)
        during = [("metrics_logged", stage)] * 4 if stage == "progressive_l1" else []
        expected += [("stage_started", stage), *during, ("stage_finished", stage), ("metrics_logged", stage)]
    assert [(e["event"], e.get("stage")) for e in events] == expected + [("run_finished", None)]
