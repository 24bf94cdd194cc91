"""Sweeps worked by several processes: atomic claims, heartbeats, reclaiming the points of dead workers.

Every test runs on a SQLite file and on a PostgreSQL server (``conftest.registry_url``), except the heavy
scenario of three `sparsify` workers, which runs once (``conftest.shared_registry_url``: PostgreSQL where the
tests have a server, else SQLite); the claim processes below keep SQLite's cross-process locking tested.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from helpers import plugin_env, write
from sqlalchemy import update

from sparsify_core.registry import Registry, sweep_points
from sparsify_core.errors import SparsifyError

POINTS = [json.dumps({"seed": i}) for i in range(5)]


def _sweep(reg: Registry, points=POINTS) -> str:
    sid = reg.create_sweep(name="sw", recipe_text=None, recipe_path=None, overrides=[], grid={"seed": [0]},
                           points=len(points))
    reg.add_sweep_points(sid, points)
    return sid


def _run_of(reg: Registry, sid: str, point: str) -> str:
    return reg.create_run(recipe_name="sw", recipe_hash=None, recipe_text=None, recipe_json=None, overrides=[],
                          model="tiny", data="pydoc", seed=0, output_dir=None, workdir=None, sweep_id=sid,
                          sweep_point=point)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def reg(registry_url):
    with Registry(registry_url) as r:
        yield r


def test_claims_go_in_grid_order_once_each_and_settle_once(reg):
    sid = _sweep(reg)
    reg.add_sweep_points(sid, POINTS)  # again: nothing changes
    claims = [reg.claim_sweep_point(sid) for _ in POINTS]
    assert [c.idx for c in claims] == list(range(len(POINTS))) and len({c.token for c in claims}) == len(POINTS)
    assert reg.claim_sweep_point(sid) is None  # every point is taken, none stale
    assert reg.beat_sweep_point(claims[0])
    run = _run_of(reg, sid, POINTS[0])
    assert reg.settle_sweep_point(claims[0], "finished", run_id=run)
    assert not reg.settle_sweep_point(claims[0], "failed") and not reg.beat_sweep_point(claims[0])
    assert reg.settle_sweep_point(claims[1], "failed", reason="boom")
    assert reg.settle_sweep_point(claims[2], "pending", reason="interrupted")  # released: claimable again
    assert reg.claim_sweep_point(sid).idx == 2
    state = reg.sweep_points(sid)
    assert [s.status for s in state] == ["finished", "failed", "running", "running", "running"]
    assert (state[0].run_id, state[1].reason, state[2].attempts) == (run, "boom", 2)
    assert reg.retry_failed_sweep_points(sid) == 1 and reg.claim_sweep_point(sid).idx == 1
    with pytest.raises(SparsifyError, match="point 0 is recorded as"):
        reg.add_sweep_points(sid, list(reversed(POINTS)))
    with pytest.raises(SparsifyError, match="unknown sweep point status"):
        reg.settle_sweep_point(claims[3], "done")


def test_concurrent_claimants_take_every_point_exactly_once(reg):
    points = [json.dumps({"seed": i}) for i in range(24)]
    sid = _sweep(reg, points)
    taken: list[int] = []
    lock = threading.Lock()

    def claimant():
        while (claim := reg.claim_sweep_point(sid)) is not None:
            with lock:
                taken.append(claim.idx)
            reg.settle_sweep_point(claim, "finished")

    threads = [threading.Thread(target=claimant) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(taken) == list(range(len(points)))
    assert {s.status for s in reg.sweep_points(sid)} == {"finished"}


# Each claimant is a separate interpreter, as a `sparsify run --worker` is, with only the registry imported.
CLAIMANT = """
import json, os, sys, time
url, sid, go, out = sys.argv[1:5]
from sparsify_core.registry import Registry
open(out + ".ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
taken = []
with Registry(url) as reg:
    while (claim := reg.claim_sweep_point(sid)) is not None:
        taken.append(claim.idx)
        time.sleep(0.02)  # the point's "work": the other claimants come in meanwhile
        reg.settle_sweep_point(claim, "finished")
with open(out, "w") as f:
    json.dump(taken, f)
"""


def test_claimant_processes_take_every_point_exactly_once(registry_url, reg, tmp_path):
    points = [json.dumps({"seed": i}) for i in range(24)]
    sid = _sweep(reg, points)
    go, outs = tmp_path / "go", [tmp_path / f"taken-{i}" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMANT, registry_url, sid, str(go), str(out)],
                              stderr=subprocess.PIPE, text=True) for out in outs]
    deadline = time.monotonic() + 120
    while not all(out.with_name(out.name + ".ready").exists() for out in outs):  # all imported: claim at once
        assert all(p.poll() is None for p in procs), [p.communicate()[1] for p in procs]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(errors)
    taken = [idx for out in outs for idx in json.loads(out.read_text())]
    assert sorted(taken) == list(range(len(points)))  # every point once, across processes
    state = reg.sweep_points(sid)
    assert {s.status for s in state} == {"finished"} and {s.attempts for s in state} == {1}
    assert len({s.worker for s in state}) > 1  # the claims really were spread over processes


def test_a_point_whose_heartbeat_stopped_is_reclaimed_and_its_run_marked(reg):
    sid = _sweep(reg)
    first = reg.claim_sweep_point(sid, stale_after=0.5)
    run = _run_of(reg, sid, first.point)
    with reg.engine.begin() as conn:  # the claimant and its run live on another machine: only the heartbeat tells
        conn.execute(update(sweep_points).where(sweep_points.c.sweep_id == sid).values(worker_host="elsewhere"))
        conn.exec_driver_sql(f"UPDATE runs SET host = 'elsewhere' WHERE id = '{run}'")
    reg.start_stage(run, 0, name="wait", kind="test", method="wait_for_file", params={})
    assert reg.claim_sweep_point(sid, stale_after=60).idx == 1  # point 0 is still fresh
    time.sleep(0.8)
    again = reg.claim_sweep_point(sid, stale_after=60)
    assert (again.idx, again.attempts, again.resume_run) == (0, 2, run)
    assert again.reclaimed_from.startswith("elsewhere:")
    old = reg.get_run(run)  # the partial run says what happened instead of "running" forever
    assert old.status == "interrupted" and "stopped (no heartbeat for" in old.reason and "reclaimed by" in old.reason
    assert [s.status for s in old.stages] == ["interrupted"]
    assert not reg.beat_sweep_point(first) and not reg.settle_sweep_point(first, "finished", run_id=run)
    assert "reclaimed from elsewhere:" in reg.sweep_points(sid)[0].reason


def test_a_dead_claimant_on_this_host_is_reclaimed_without_waiting(reg):
    sid = _sweep(reg)
    reg.claim_sweep_point(sid, stale_after=3600)
    with reg.engine.begin() as conn:
        conn.execute(update(sweep_points).where(sweep_points.c.idx == 0).values(worker_pid=_dead_pid()))
    assert reg.claim_sweep_point(sid).idx == 0


# -- several `sparsify run --resume SWEEP --worker` processes, one killed mid-point ------------------------

SWEEP = """\
name: wk
model:
  source: tiny
  params: {{arch: llama, hidden_size: 16, intermediate_size: 32, layers: 1, heads: 2}}
data:
  source: pydoc
  seq_len: 16
  splits:
    eval: {{samples: 2}}
stages:
  - kind: test
    method: wait_for_file
    params: {{started: {dir}/started, release: {dir}/release}}
evaluate: {{metrics: [weight_sparsity]}}
output: {{save: false}}
sweep:
  grid:
    stages.0.params.factor: [1.0, 0.5, 0.25, 0.125]
"""


@pytest.mark.timeout(900)  # three interpreters importing torch: minutes on a loaded 2-core machine
def test_three_workers_one_killed_finish_every_point_exactly_once(shared_registry_url, tmp_path, test_stages):
    from sparsify_core.recipe import load_sweep
    from sparsify_core.sweep import record_sweep

    plan = load_sweep(write(tmp_path / "sw.yaml", SWEEP.format(dir=tmp_path)))
    with Registry(shared_registry_url) as reg:
        sid = record_sweep(plan, reg)
    env = dict(os.environ, **plugin_env(tmp_path), SPARSIFY_REGISTRY=shared_registry_url, COLUMNS="200")
    workers = [subprocess.Popen([sys.executable, "-m", "sparsify_core.cli", "run", "--resume", sid, "--worker",
                                 "--heartbeat-timeout", "3", "--runs-dir", str(tmp_path / "runs")],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(3)]
    try:
        with Registry(shared_registry_url) as reg:
            deadline = time.monotonic() + 600
            while True:  # all three are inside a point's stage (waiting for the release file)
                waiting = [r for r in reg.find_runs(sweep_id=sid) if r.stages and r.stages[0].status == "running"]
                if len(waiting) == 3:
                    break
                assert all(w.poll() is None for w in workers), [w.communicate()[1] for w in workers]
                assert time.monotonic() < deadline, "the workers did not all start a point"
                time.sleep(0.2)
            victim = next(w for w in workers if w.pid == waiting[0].pid)
            killed_point = waiting[0].sweep_point
            with reg.engine.begin() as conn:
                # as if it ran on another machine: no process check can see it die, only its heartbeat stopping
                conn.execute(update(sweep_points).where(sweep_points.c.sweep_id == sid,
                                                        sweep_points.c.worker_pid == victim.pid)
                             .values(worker_host="another-machine"))
                conn.exec_driver_sql(f"UPDATE runs SET host = 'another-machine' WHERE id = '{waiting[0].id}'")
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=60)
            (tmp_path / "release").touch()
            survivors = [w for w in workers if w is not victim]
            outputs = [w.communicate(timeout=600) for w in survivors]
            assert [w.returncode for w in survivors] == [0, 0], "\n".join(e for _, e in outputs)
            assert victim.returncode == -signal.SIGKILL

            state = reg.sweep_points(sid)
            assert [s.status for s in state] == ["finished"] * 4
            taken_over = [s for s in state if json.loads(s.point) == killed_point]
            assert taken_over[0].attempts == 2 and "reclaimed from another-machine:" in taken_over[0].reason
            assert sorted(s.attempts for s in state) == [1, 1, 1, 2]
            runs = reg.find_runs(sweep_id=sid)
            finished = Counter(json.dumps(r.sweep_point, sort_keys=True) for r in runs if r.status == "finished")
            assert finished == Counter(p.key for p in plan.points)  # every point finished, exactly once
            assert len(runs) == 4  # the killed point's run was taken over (resumed from its folder), not redone
            again = next(r for r in runs if r.id == waiting[0].id)
            assert again.status == "finished" and again.attempts == 2 and again.pid != victim.pid
            assert {s.run_id for s in state} == {r.id for r in runs}
            assert any("taken over from another-machine:" in e for _, e in outputs)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()


def test_points_of_a_sweep_recorded_before_v8_take_their_state_from_its_runs(reg):
    sid = reg.create_sweep(name="sw", recipe_text=None, recipe_path=None, overrides=[], grid={"seed": [0]}, points=4)
    done, stopped, busy = (_run_of(reg, sid, p) for p in POINTS[:3])
    reg.set_run_status(done, "finished")
    reg.set_run_status(stopped, "interrupted", "Ctrl-C")
    reg.add_sweep_points(sid, POINTS[:4])  # what opening such a sweep with this release does
    state = reg.sweep_points(sid)
    assert [(s.status, s.run_id) for s in state] == [("finished", done), ("pending", None), ("running", None),
                                                      ("pending", None)]
    assert state[2].worker.endswith(f":{os.getpid()}")  # the process its run recorded
    claim = reg.claim_sweep_point(sid)
    assert (claim.idx, claim.resume_run) == (1, stopped)  # continues the interrupted run
    assert reg.claim_sweep_point(sid).idx == 3 and reg.claim_sweep_point(sid) is None  # `busy`'s process is alive


def test_worker_needs_a_sweep(tmp_path, monkeypatch):
    from helpers import TINY_RECIPE, sparsify_here

    monkeypatch.setenv("SPARSIFY_REGISTRY", f"sqlite:///{tmp_path}/r.db")
    plain = sparsify_here("run", write(tmp_path / "r.yaml", TINY_RECIPE), "--worker", cwd=tmp_path)
    assert plain.returncode != 0 and "--worker works on a sweep" in plain.stderr and "Traceback" not in plain.stderr
    run = sparsify_here("run", "--resume", "20260101-0000-abcdef", "--worker", cwd=tmp_path)
    assert run.returncode != 0 and "is a run id, not a sweep id" in run.stderr
