"""A registry written by the release of schema v6 opens, migrates, and answers as that release did.

``data/registry-v6.db`` was recorded by that release (``data/make_registry_v6.py``)
and ``data/registry-v6-expected.json`` holds its answers about it: each run's
final point, ``compare --format json``, ``show``, and the scaling-law fit of
its sweep. Runs recorded before evaluations were (``RunRecord.schema`` None)
go through the fallback of ``registry.evaluation_points``/``final_evaluation``/
``metric_info_for``; new runs recorded next to them go through the records.

On PostgreSQL the same history is replayed: the migration chain builds the
v6 schema on the server, the fixture's rows are copied into it as they are,
and opening it with this release migrates it from there. That is the path a
team's v6 registry server takes (the file itself is SQLite).
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from sqlalchemy import MetaData, create_engine, func, inspect, select, text

from sparsify_core import report
from sparsify_core.metric import MetricInfo, MetricValue
from sparsify_core.registry import (SCHEMA_VERSION, Registry, final_evaluation, make_engine, metric_info_for, migrate,
                                    reference_evaluation, schema_version, stage_values)
from sparsify_core.scaling_law import ScalingLaw, fit_runs

DATA = Path(__file__).parent / "data"
EXPECTED = json.loads((DATA / "registry-v6-expected.json").read_text())
FIT = dict(data="recipe:stages.1.params.train.steps", d_unit=1e5, restarts=2, seed=0)


@pytest.fixture(params=["sqlite", "postgresql"])
def old(request, tmp_path):
    """The v6 registry (a copy: opening migrates it), opened with this release, on SQLite and on PostgreSQL."""
    shutil.copy(DATA / "registry-v6.db", tmp_path / "registry.db")
    url = str(tmp_path / "registry.db")
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        _copy_v6(f"sqlite:///{tmp_path / 'registry.db'}", url)
    with Registry(url) as reg:
        yield reg


def _copy_v6(source: str, url: str) -> None:
    """The v6 schema built on ``url`` by the migration chain, then every row of ``source`` copied in."""
    engine = make_engine(url)
    assert migrate(engine, target=6) == 6
    src_engine = create_engine(source)
    src, dst = MetaData(), MetaData()
    src.reflect(bind=src_engine)
    dst.reflect(bind=engine)
    with src_engine.connect() as read, engine.begin() as write:
        assert read.execute(text("SELECT version FROM schema_info")).scalar() == 6
        for table in src.sorted_tables:  # parents before children
            if table.name == "schema_info":
                continue
            rows = [dict(r._mapping) for r in read.execute(select(table))]
            if rows:
                write.execute(dst.tables[table.name].insert(), rows)
            if "id" in table.c and table.c.id.type.python_type is int and rows:
                # rows keep their ids: move the serial past them, as SQLite's autoincrement is
                top = write.execute(select(func.max(dst.tables[table.name].c.id))).scalar()
                write.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), {top})"))
    src_engine.dispose()
    engine.dispose()


def test_it_migrates_to_the_latest_schema(old):
    with old.engine.connect() as conn:
        assert schema_version(conn) == SCHEMA_VERSION >= 7
        tables = set(inspect(conn).get_table_names())
    assert {"evaluations", "metric_info", "bench_machines", "sweeps"} <= tables
    records = old.find_runs()
    assert len(records) == len(EXPECTED["final_point"]) and all(r.schema is None for r in records)
    assert all(r.evaluations == [] and r.metric_info == {} for r in records)
    (bench,) = [r for r in records if r.kind == "bench"]
    assert bench.machine is not None and bench.machine.cpu_model == "Test CPU"


def test_final_points_compare_and_show_answer_as_before(old):
    records = old.find_runs()
    for r in records:
        final = final_evaluation(r)
        assert (final.stage_idx if final else None) == EXPECTED["final_point"][r.id], r.id
        assert stage_values(r) == {}  # before v7 stage numbers sit in the points, as they were shown
    recipe_runs = [r for r in records if r.kind == "recipe"]
    assert json.loads(report.format_compare(recipe_runs, "json")) == EXPECTED["compare_json"]
    for r in records:
        console = Console(file=io.StringIO(), width=200, color_system=None)
        report.show_run(r, console)
        assert console.file.getvalue() == EXPECTED["show"][r.id], r.id
    # the names' old meanings still hold for them: fractions as percents, lower perplexity better
    assert metric_info_for(recipe_runs, "weight_sparsity") == MetricInfo(higher_is_better=True, fraction=True)
    assert metric_info_for(recipe_runs, "perplexity").higher_is_better is False


def test_fit_and_the_tradeoff_plot_answer_as_before(old, tmp_path):
    law = old.find_runs(sweep_id=old.get_sweep(EXPECTED["sweep"]).id)
    result = fit_runs(law, **FIT)
    want = EXPECTED["fit"]
    assert result.points.labels == want["labels"] and result.skipped == want["skipped"]
    for axis in "SNDL":
        np.testing.assert_allclose(getattr(result.points, axis), want[axis], rtol=1e-12)
    got = result.fit.law.as_dict()
    # The same optimisation from the same starts, but these points lie on a family of laws (standard errors
    # NaN for all but b_N): where the float summation order differs (an AVX-512 CPU against the AVX2 one that
    # wrote the file) L-BFGS ends on another member (a_D 0.1570 vs 0.1545). What the fit answers must agree:
    # its predictions at the points, and every coefficient the points determine.
    p, want_law = result.points, ScalingLaw(**want["coefficients"])
    np.testing.assert_allclose(result.fit.law(p.S, p.N, p.D), want_law(p.S, p.N, p.D), rtol=1e-6)
    determined = [k for k in want["coefficients"] if np.isfinite(result.fit.stderr[k])]
    assert determined  # b_N: the test keeps comparing coefficients
    for k in determined:
        assert got[k] == pytest.approx(want["coefficients"][k], rel=1e-3), k
    path = report.plot_tradeoff([r for r in old.find_runs() if r.kind == "recipe"], tmp_path / "t.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_new_runs_are_recorded_next_to_old_ones(old):
    run = old.create_run(recipe_name="new", recipe_hash=None, recipe_text=None, recipe_json={}, overrides=[],
                         model="tiny", data="pydoc", seed=0, output_dir=None, workdir=None)
    old.record_evaluation(run, "dense", -1, [MetricValue("perplexity", 20.0)],
                          info={"perplexity": MetricInfo(higher_is_better=False)}, split="eval", sequences=4,
                          tokens=64)
    old.log_metrics(run, "prune", 0, {"sparsity": 0.5, "perplexity": 99.0},
                    info={"sparsity": MetricInfo(fraction=True)})  # a stage's own numbers, not an evaluation
    old.set_run_status(run, "finished")
    new = old.get_run(run)
    assert new.schema == SCHEMA_VERSION
    assert reference_evaluation(new).values == {"perplexity": 20.0} and final_evaluation(new) is None
    assert stage_values(new) == {0: {"sparsity": 0.5, "perplexity": 99.0}}
    assert new.evaluations[0].tokens == 64 and new.metric_info["sparsity"].fraction
    assert metric_info_for(new, "stage_seconds") == MetricInfo()  # undeclared in a new run: no guess
    before = {r.id: r for r in old.find_runs() if r.id != run}
    assert {i: (final_evaluation(r).stage_idx if final_evaluation(r) else None) for i, r in before.items()} \
        == EXPECTED["final_point"]
