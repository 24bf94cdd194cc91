"""The run registry: recording runs, reading them back, migrations, concurrency, reconcile."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from sqlalchemy import inspect, text

from sparsify_core.errors import SparsifyError
from sparsify_core.metric import MetricInfo, MetricValue
from sparsify_core.registry import (
    DEAD_PROCESS_REASON, SCHEMA_VERSION, Registry, default_url, make_engine, metadata, migrate, new_run_id,
    schema_version,
)


def _create(reg: Registry, name: str = "relu-ffn", **kw) -> str:
    args = dict(recipe_name=name, recipe_hash="abc123", recipe_text="name: relu-ffn\nseed: 0\n",
                recipe_json={"name": name, "stages": [{"name": "relu", "kind": "activation", "method": "relu"}]},
                overrides=["seed=0"], model="tiny", data="pydoc", seed=0, output_dir=None, workdir=None)
    args.update(kw)
    return reg.create_run(**args)


@pytest.fixture
def url(registry_url):
    """Every test of a registry runs on a SQLite file and on a PostgreSQL server (``conftest.registry_url``)."""
    return registry_url


@pytest.fixture
def reg(url):
    with Registry(url) as r:
        yield r


def test_default_url_follows_the_environment(monkeypatch):
    monkeypatch.delenv("SPARSIFY_REGISTRY", raising=False)
    assert default_url() == "sqlite:///registry.db"
    monkeypatch.setenv("SPARSIFY_REGISTRY", "sqlite:////tmp/elsewhere.db")
    assert default_url() == "sqlite:////tmp/elsewhere.db"


def test_a_plain_path_names_a_sqlite_file(tmp_path):
    path = tmp_path / "sub.db"
    with Registry(str(path)) as r:
        assert r.url == f"sqlite:///{path}"
    assert path.exists()


def test_a_plain_postgresql_url_uses_psycopg(pg_url):
    """``postgresql://`` means psycopg2 to SQLAlchemy; the ``postgres`` extra installs psycopg 3, which is used."""
    plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with Registry(plain) as reg:
        assert reg.engine.dialect.driver == "psycopg"
        assert reg.get_run(_create(reg)).status == "running"


def test_run_id_is_short_and_sortable_by_start():
    from datetime import datetime, timezone

    early = new_run_id(datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc))
    late = new_run_id(datetime(2026, 1, 2, 3, 5, tzinfo=timezone.utc))
    assert early.startswith("20260102-0304-") and len(early) == 20
    assert early < late


def test_create_stage_metrics_finish_flow(reg, tmp_path):
    run_id = _create(reg, output_dir=tmp_path / "out", workdir=tmp_path / "w")
    reg.log_metrics(run_id, "dense", -1, {"perplexity": 20.0, "activation_sparsity": 0.0})
    reg.start_stage(run_id, 0, name="relu", kind="activation", method="relu", params={"lr": 1e-3})
    reg.log_metrics(run_id, "relu", 0, {"loss": 3.0}, step=1)
    reg.log_metrics(run_id, "relu", 0, {"loss": 2.5}, step=2)
    reg.finish_stage(run_id, 0, "completed", duration_s=1.5, peak_memory_mb=512.0)
    reg.log_metrics(run_id, "relu", 0, [MetricValue("perplexity", 25.0), MetricValue("activation_sparsity", 0.6),
                                         MetricValue("activation_sparsity", 0.5, layer="model.layers.0.mlp"),
                                         MetricValue("activation_sparsity", 0.7, layer="model.layers.1.mlp")])
    reg.add_artifact(run_id, "output", tmp_path / "out")
    reg.set_run_status(run_id, "finished")

    run = reg.get_run(run_id)
    assert (run.status, run.attempts, run.reason) == ("finished", 1, None)
    assert run.ended_at is not None and run.ended_at >= run.started_at
    assert run.recipe["stages"][0]["method"] == "relu" and run.overrides == ["seed=0"]
    assert run.recipe_text.startswith("name: relu-ffn") and run.output_dir == str(tmp_path / "out")
    assert run.recipe_path is None  # not read from a file
    assert run.host and run.pid == os.getpid()
    assert set(run.versions) == {"python", "torch", "transformers", "sparsify", "platform"}
    [stage] = run.stages
    assert (stage.idx, stage.name, stage.status, stage.params) == (0, "relu", "completed", {"lr": 1e-3})
    assert (stage.duration_s, stage.peak_memory_mb) == (1.5, 512.0)
    curve = [(m.step, m.value) for m in run.metrics if m.step is not None]
    assert curve == [(1, 3.0), (2, 2.5)]
    layered = {m.layer: m.value for m in run.metrics if m.layer is not None}
    assert layered == {"model.layers.0.mlp": 0.5, "model.layers.1.mlp": 0.7}
    dense = {m.name: m.value for m in run.metrics if m.stage_idx == -1}
    assert dense == {"perplexity": 20.0, "activation_sparsity": 0.0}
    assert {m.stage for m in run.metrics} == {"dense", "relu"}
    assert [(a.kind, a.path) for a in run.artifacts] == [("output", str(tmp_path / "out"))]


def test_failure_marks_running_stage_and_resume_resets_it(reg):
    run_id = _create(reg)
    reg.start_stage(run_id, 0, name="a", kind="k", method="m", params={})
    reg.finish_stage(run_id, 0, "completed")
    reg.start_stage(run_id, 1, name="b", kind="k", method="m", params={})
    reg.set_run_status(run_id, "failed", "out of memory")
    run = reg.get_run(run_id)
    assert (run.status, run.reason) == ("failed", "out of memory")
    assert [(s.status, s.reason) for s in run.stages] == [("completed", None), ("failed", "out of memory")]
    assert run.stages[0].duration_s is not None  # measured when not given

    reg.resume_run(run_id)
    run = reg.get_run(run_id)
    assert (run.status, run.reason, run.ended_at, run.attempts) == ("running", None, None, 2)
    assert [s.status for s in run.stages] == ["completed", "pending"]
    with pytest.raises(SparsifyError, match="already running"):
        reg.resume_run(run_id)
    reg.start_stage(run_id, 1, name="b", kind="k", method="m", params={"x": 1})  # upsert, no duplicate
    stages = reg.get_run(run_id).stages
    assert [(s.idx, s.status, s.params) for s in stages] == [(0, "completed", {}), (1, "running", {"x": 1})]


def test_prefix_ids_and_unknown_ids(reg):
    run_id = _create(reg)
    assert reg.get_run(run_id[:-2]).id == run_id
    with pytest.raises(SparsifyError) as err:
        reg.get_run(run_id[:-1] + ("0" if run_id[-1] != "0" else "1"))
    assert "no run" in str(err.value) and f"did you mean '{run_id}'" in str(err.value)
    other = _create(reg)
    common = os.path.commonprefix([run_id, other])
    with pytest.raises(SparsifyError, match="ambiguous"):
        reg.get_run(common)
    with pytest.raises(SparsifyError, match="no run"):
        reg.set_run_status("nope", "finished")
    with pytest.raises(SparsifyError, match="unknown run status"):
        reg.set_run_status(run_id, "done")


def test_find_runs_filters_newest_first(reg):
    a = _create(reg, name="a", model="tiny")
    time.sleep(0.002)
    b = _create(reg, name="b", model="smollm", sweep_id="sw1")
    time.sleep(0.002)
    c = _create(reg, name="a", model="smollm")
    reg.set_run_status(a, "finished")
    assert [r.id for r in reg.find_runs()] == [c, b, a]
    assert [r.id for r in reg.find_runs(recipe_names=["a"])] == [c, a]
    assert [r.id for r in reg.find_runs(models=["smollm"], limit=1)] == [c]
    assert [r.id for r in reg.find_runs(status="finished")] == [a]
    assert [r.id for r in reg.find_runs(ids=[a, b[:-1]])] == [b, a]
    assert [r.id for r in reg.find_runs(sweep_id="sw1")] == [b]
    assert reg.find_runs(details=False)[0].metrics == []


def test_nan_metric_round_trips_and_bad_values_are_refused(reg):
    run_id = _create(reg)
    reg.log_metrics(run_id, "dense", -1, {"perplexity": float("nan"), "big": float("inf")})
    values = {m.name: m.value for m in reg.get_run(run_id).metrics}
    assert values["perplexity"] != values["perplexity"] and values["big"] == float("inf")
    with pytest.raises(SparsifyError, match="not a number"):
        reg.log_metrics(run_id, "dense", -1, {"oops": "high"})


def test_git_commit_recorded_for_recipes_in_a_repository(reg, tmp_path):
    outside = tmp_path / "plain"
    outside.mkdir()
    (outside / "r.yaml").write_text("name: x\n")
    assert reg.get_run(_create(reg, recipe_path=outside / "r.yaml")).git_commit is None
    assert reg.get_run(_create(reg, recipe_path=None)).git_commit is None
    repo = tmp_path / "repo"
    repo.mkdir()
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    try:
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
        subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True, env=env)
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    (repo / "r.yaml").write_text("name: x\n")
    run = reg.get_run(_create(reg, recipe_path=repo / "r.yaml"))
    assert run.git_commit == head and run.recipe_path == str((repo / "r.yaml").resolve())


# -- schema and migrations -------------------------------------------------------------------

def test_fresh_schema_matches_the_latest_table_definitions(reg):
    assert SCHEMA_VERSION >= 2
    found = inspect(reg.engine)
    for table in metadata.sorted_tables:
        assert {c["name"] for c in found.get_columns(table.name)} == set(table.c.keys()), table.name


def test_v1_registry_is_migrated_and_old_runs_stay_readable(url):
    engine = make_engine(url)
    assert migrate(engine, target=1) == 1
    with engine.begin() as conn:
        assert schema_version(conn) == 1
        assert "attempts" not in {c["name"] for c in inspect(conn).get_columns("runs")}
        conn.execute(text("INSERT INTO runs (id, recipe_name, status, started_at, pid, host, overrides, versions) "
                          "VALUES ('20250101-0000-aaaaaa', 'old', 'finished', '2025-01-01T00:00:00+00:00', 1, 'h', "
                          "'[]', '{}')"))
        conn.execute(text("INSERT INTO metrics (run_id, stage, stage_idx, name, value, created_at) VALUES "
                          "('20250101-0000-aaaaaa', 'dense', -1, 'perplexity', 12.5, '2025-01-01T00:00:00+00:00')"))
    engine.dispose()

    with Registry(url) as reg:
        with reg.engine.connect() as conn:
            assert schema_version(conn) == SCHEMA_VERSION
        old = reg.get_run("20250101")
        assert (old.recipe_name, old.status, old.attempts, old.sweep_id) == ("old", "finished", 1, None)
        assert [(m.name, m.value, m.step) for m in old.metrics] == [("perplexity", 12.5, None)]
        new = _create(reg, sweep_id="s")  # the v2 columns work
        assert reg.get_run(new).sweep_id == "s"


def test_v5_bench_runs_get_their_machine_fields_in_v6(url):
    """A v5 database's bench runs (machine stuffed in model/data/stage params) migrate to bench_machines rows."""
    engine = make_engine(url)
    assert migrate(engine, target=5) == 5
    env = {"torch": "2.3.0", "threads": 4, "cpu_isa": "avx2", "native_kernels": True, "load_average_1m": 1.25,
           "cpus": 16}
    with engine.begin() as conn:
        assert not inspect(conn).has_table("bench_machines")
        for rid, kind, model, data in (("20250101-0000-bbbbbb", "bench", "cpu avx2, 4 threads (quick: not a "
                                        "measurement)", "load 1.2 -> 2.5"),
                                       ("20250101-0000-cccccc", "recipe", "tiny", "pydoc")):
            conn.execute(text("INSERT INTO runs (id, recipe_name, status, started_at, pid, host, overrides, versions,"
                              " kind, model, data) VALUES (:id, :name, 'finished', '2025-01-01T00:00:00+00:00', 1, "
                              "'h', '[]', '{}', :kind, :model, :data)"),
                         dict(id=rid, name="bench" if kind == "bench" else "old", kind=kind, model=model, data=data))
            conn.execute(text("INSERT INTO stages (run_id, idx, name, kind, method, params, status) VALUES "
                              "(:id, 0, 'case 1', :kind, 'case_activation_sparse', :params, 'completed')"),
                         dict(id=rid, kind=kind, params=json.dumps({"environment": env} if kind == "bench"
                                                                   else {"threshold": 0.1})))
            conn.execute(text("INSERT INTO metrics (run_id, stage, stage_idx, name, value, created_at) VALUES "
                              "(:id, 'case 1', 0, 's=50% ours speedup', 1.5, '2025-01-01T00:00:00+00:00')"),
                         dict(id=rid))
    engine.dispose()

    with Registry(url) as reg:
        with reg.engine.connect() as conn:
            assert schema_version(conn) == SCHEMA_VERSION >= 6
        bench = reg.get_run("20250101-0000-bbbbbb")
        assert (bench.kind, bench.model, bench.data) == ("bench", None, None)
        mc = bench.machine
        assert (mc.isa, mc.threads, mc.cpus, mc.torch_version, mc.quick) == ("avx2", 4, 16, "2.3.0", True)
        assert (mc.load_before, mc.load_after) == (1.25, 2.5)
        assert bench.stages[0].params == {} and [m.value for m in bench.metrics] == [1.5]
        assert "avx2, 4 threads" in mc.summary and "quick" in mc.summary
        recipe = reg.get_run("20250101-0000-cccccc")
        assert (recipe.machine, recipe.model, recipe.data) == (None, "tiny", "pydoc")
        assert recipe.stages[0].params == {"threshold": 0.1}
        assert [r.machine.isa for r in reg.find_runs(kinds=["bench"], details=False)] == ["avx2"]


@pytest.mark.parametrize("start", [7, None])  # a v7 registry migrated to v8, and a fresh one
def test_long_names_are_stored_whole(url, start):
    """SQLite never enforced VARCHAR lengths; on PostgreSQL v8 makes the free-text columns TEXT."""
    if start is not None:
        engine = make_engine(url)
        migrate(engine, target=start)
        engine.dispose()
    long = "x" * 700
    with Registry(url) as reg:
        run = _create(reg, name="sweep-" + long, model="/models/" + long, data=long)
        reg.start_stage(run, 0, name=long, kind=long, method=long, params={})
        reg.log_metrics(run, long, 0, [MetricValue(long, 1.0, layer=long)],
                        info={long: MetricInfo(unit=long)})
        reg.record_evaluation(run, long, 1, {"perplexity": 3.0}, split=long)
        reg.add_artifact(run, long, "/tmp/x")
        got = reg.get_run(run)
    assert (got.recipe_name, got.model, got.data) == ("sweep-" + long, "/models/" + long, long)
    assert (got.stages[0].name, got.stages[0].method, got.metrics[0].name, got.metrics[0].layer) == (long,) * 4
    assert got.metric_info[long].unit == long and got.evaluations[0].split == long
    assert got.artifacts[0].kind == long


def test_registry_from_a_newer_sparsify_is_refused(url):
    Registry(url).close()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE schema_info SET version = :v"), {"v": SCHEMA_VERSION + 5})
    engine.dispose()
    with pytest.raises(SparsifyError, match="newer than this sparsify"):
        Registry(url)


def test_sqlite_uses_wal(tmp_path):
    with Registry(f"sqlite:///{tmp_path}/wal.db") as reg, reg.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar().lower() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 30000


# -- reconcile -------------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_reconcile_interrupts_runs_whose_process_ended(reg):
    dead = _create(reg)
    reg.start_stage(dead, 0, name="a", kind="k", method="m", params={})
    reused = _create(reg)  # this pid, but recorded for a process started at another time
    alive = _create(reg)
    elsewhere = _create(reg)
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE runs SET pid = :p WHERE id = :i"), {"p": _dead_pid(), "i": dead})
        conn.execute(text("UPDATE runs SET pid_started_at = pid_started_at - 1000 WHERE id = :i"), {"i": reused})
        conn.execute(text("UPDATE runs SET host = 'another-host', pid = :p WHERE id = :i"),
                     {"p": _dead_pid(), "i": elsewhere})

    runs = {r.id: r for r in reg.find_runs()}  # listing reconciles
    assert (runs[dead].status, runs[dead].reason) == ("interrupted", DEAD_PROCESS_REASON)
    assert runs[dead].ended_at is not None
    assert [(s.status, s.reason) for s in runs[dead].stages] == [("interrupted", DEAD_PROCESS_REASON)]
    assert runs[reused].status == "interrupted"
    assert runs[alive].status == "running"
    assert runs[elsewhere].status == "running"  # cannot be checked from this host
    assert reg.reconcile() == []
    reg.resume_run(dead)  # an interrupted run can be resumed by a live process
    assert reg.get_run(dead).status == "running"


# -- concurrency -----------------------------------------------------------------------------

N_PROCESSES, N_METRIC_CALLS = 8, 40

# Each worker is a separate interpreter (as `sparsify run` would be). Once
# imported, it reports ready and waits for the go file, so that all of them
# open the brand-new registry and write at the same moment.
WORKER = """
import os, sys, time
url, index, go, n_calls = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
from sparsify_core.registry import Registry
open(f"{go}-ready-{index}", "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
reg = Registry(url)
run_id = reg.create_run(recipe_name=f"w{index}", recipe_hash="h", recipe_text="name: w",
                        recipe_json={"name": f"w{index}"}, overrides=[], model="tiny", data="pydoc", seed=index,
                        output_dir=None, workdir=None)
reg.log_metrics(run_id, "dense", -1, {"perplexity": 10.0 + index})
reg.start_stage(run_id, 0, name="train", kind="k", method="m", params={"i": index})
for step in range(n_calls):
    reg.log_metrics(run_id, "train", 0, {"loss": 1.0 / (step + 1), "lr": 1e-3}, step=step)
reg.finish_stage(run_id, 0, "completed", duration_s=0.1)
reg.set_run_status(run_id, "finished")
"""


@pytest.mark.timeout(400)  # 8 interpreters importing torch: minutes on a loaded 2-core machine
def test_eight_processes_record_concurrently(url, tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, str(i), str(go), str(N_METRIC_CALLS)],
                              stderr=subprocess.PIPE, text=True) for i in range(N_PROCESSES)]
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("go-ready-*"))) < N_PROCESSES and time.monotonic() < deadline:
        time.sleep(0.02)
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * N_PROCESSES, "\n".join(errors)

    with Registry(url) as reg:
        runs = reg.find_runs()
        assert sorted(r.recipe_name for r in runs) == sorted(f"w{i}" for i in range(N_PROCESSES))
        for r in runs:
            assert r.status == "finished" and [s.status for s in r.stages] == ["completed"]
            assert len(r.metrics) == 1 + 2 * N_METRIC_CALLS
        with reg.engine.connect() as conn:
            assert schema_version(conn) == SCHEMA_VERSION
            assert conn.execute(text("SELECT count(*) FROM schema_info")).scalar() == 1
        assert len({r.pid for r in runs}) == N_PROCESSES
        assert json.loads(runs[0].recipe_json)["name"] == runs[0].recipe_name


def test_evaluations_are_recorded_restarted_and_ended_with_the_run(reg):
    from sparsify_core.metric import MetricInfo
    from sparsify_core.registry import final_evaluation

    run_id = _create(reg)
    reg.start_evaluation(run_id, 0, stage="relu", kind="stage", split="eval", sequences=2, tokens=32)
    reg.log_metrics(run_id, "relu", 0, {"perplexity": 30.0}, origin="evaluation",
                    info={"perplexity": MetricInfo(higher_is_better=True)})
    # resumed: the evaluation runs again and its values replace the earlier ones; declarations are replaced
    reg.start_evaluation(run_id, 0, stage="relu", kind="stage", split="eval", sequences=2, tokens=32)
    reg.log_metrics(run_id, "relu", 0, {"perplexity": 25.0}, origin="evaluation",
                    info={"perplexity": MetricInfo(higher_is_better=False)})
    reg.finish_evaluation(run_id, 0)
    reg.start_evaluation(run_id, 1, stage="prune", kind="stage")
    reg.set_run_status(run_id, "failed", "boom")
    run = reg.get_run(run_id)
    assert [(e.stage_idx, e.status, e.reason) for e in run.evaluations] == [(0, "completed", None),
                                                                             (1, "failed", "boom")]
    assert [m.value for m in run.metrics] == [25.0] and run.metrics[0].origin == "evaluation"
    assert final_evaluation(run).values == {"perplexity": 25.0}
    assert run.metric_info == {"perplexity": MetricInfo(higher_is_better=False)}
    with pytest.raises(SparsifyError, match="no evaluation at stage 5"):
        reg.finish_evaluation(run_id, 5)
    with pytest.raises(SparsifyError, match="unknown evaluation kind"):
        reg.start_evaluation(run_id, 2, stage="x", kind="final")
    with pytest.raises(SparsifyError, match="unknown metric origin"):
        reg.log_metrics(run_id, "x", 2, {"a": 1.0}, origin="guess")
