"""Every metric says what it is (direction, unit, fraction), and show/compare/plots format it by that.

Sweeps every registered metric: the built-in ones (the catalog) and the
example third-party plugin's, and every name each records values under
(``Metric.value_info``). Also the evaluations of runs recorded since v7:
numbers a stage reports itself never make it an evaluation point.
"""
from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
from rich.console import Console

from sparsify_core import Metric
from sparsify_core.method import STAGE_METRICS, StageResult
from sparsify_core.metric import MetricInfo, MetricValue
from sparsify_core.plugin_manager import catalog
from sparsify_core import report
from sparsify_core.registry import Registry, evaluation_points, final_evaluation, metric_info_for, stage_values

EXAMPLE = Path(__file__).parents[1] / "example_plugin"


def _example_metrics() -> list[type[Metric]]:
    sys.path.insert(0, str(EXAMPLE))
    try:
        import sparsify_example_plugin as example
    finally:
        sys.path.remove(str(EXAMPLE))
    return list(example.sparsify_metrics())


METRICS = sorted({*catalog().metrics.values(), *_example_metrics()}, key=lambda cls: cls.name)
ATTRIBUTES = ("higher_is_better", "unit", "fraction")


@pytest.mark.parametrize("cls", METRICS, ids=lambda cls: cls.name)
def test_every_metric_declares_what_it_is(cls):
    # declared by the metric (or a base of its own), not inherited from Metric's neutral defaults
    for attr in ATTRIBUTES:
        assert any(attr in vars(c) for c in cls.__mro__ if c is not Metric and issubclass(c, Metric)), attr
    assert cls.higher_is_better in (True, False, None) and isinstance(cls.unit, str)
    assert isinstance(cls.fraction, bool)
    infos = cls.value_info()
    assert infos[cls.name] == cls.info() and all(isinstance(i, MetricInfo) for i in infos.values())


def test_the_engine_declares_its_stage_metrics():
    assert STAGE_METRICS["stage_seconds"] == MetricInfo(higher_is_better=False, unit="s")
    assert STAGE_METRICS["peak_memory_mb"].unit == "MiB"
    result = StageResult(metrics={"sparsity": 0.5, "other": 1.0},
                         metric_info={"sparsity": MetricInfo(fraction=True), "absent": MetricInfo(unit="s")})
    # only declarations of reported names are recorded; an undeclared name is recorded without one
    assert result.recorded_info() == {"sparsity": MetricInfo(fraction=True)}
    assert result.undeclared() == ["other"]


def _declared_run(reg: Registry, infos: dict[str, MetricInfo]) -> str:
    """A run evaluated dense (every value 0.25) and after one stage (0.5), with ``infos`` declared."""
    run = reg.create_run(recipe_name="all", recipe_hash=None, recipe_text=None, recipe_json={}, overrides=[],
                         model="tiny", data="pydoc", seed=0, output_dir=None, workdir=None)
    reg.record_evaluation(run, "dense", -1, {n: 0.25 for n in infos}, info=infos)
    reg.log_metrics(run, "prune", 0, {"stage_seconds": 3.0}, info=STAGE_METRICS)
    reg.record_evaluation(run, "prune", 0, {n: 0.5 for n in infos}, info=infos)
    reg.set_run_status(run, "finished")
    return run


def test_show_and_compare_format_every_metric_by_its_declaration(tmp_path):
    infos = {name: info for cls in METRICS for name, info in cls.value_info().items()}
    with Registry(str(tmp_path / "r.db")) as reg:
        record = reg.get_run(_declared_run(reg, infos))
    console = Console(file=io.StringIO(), width=250, color_system=None)
    report.show_run(record, console)
    shown = console.file.getvalue()
    compared = report.format_compare([record], "table")
    header = next(line for line in compared.splitlines() if " run " in f" {line} ")
    for name, info in infos.items():
        assert metric_info_for(record, name) == info, name
        label = f"{name} ({info.unit})" if info.unit else name
        row = re.search(rf"^\s*{re.escape(label)}\s{{2,}}(.*)$", shown, re.M)
        assert row is not None, label
        if info.fraction:  # percents, and the change in percentage points
            assert row.group(1).split()[:3] == ["25.0%", "50.0%", "+25.0"], label
            assert "50.0% (+25.0 pp)" in compared, label
        else:
            assert row.group(1).split()[:3] == ["0.25", "0.5", "+100%"], label
            assert "0.5 (+100%)" in compared, label
        assert label in header, label
        direction = report._axis_label(name, info)
        assert ("higher is better" in direction) == (info.higher_is_better is True), name
        assert ("lower is better" in direction) == (info.higher_is_better is False), name
    # the stage's own time is shown apart, as a stage metric, with its unit
    assert "stage metrics" in shown and re.search(r"^\s*stage_seconds \(s\)\s+3\s*$", shown, re.M)


def test_a_stage_reporting_evaluation_names_is_not_an_evaluation(tmp_path):
    with Registry(str(tmp_path / "r.db")) as reg:
        run = reg.create_run(recipe_name="r", recipe_hash=None, recipe_text=None, recipe_json={}, overrides=[],
                             model="tiny", data="pydoc", seed=0, output_dir=None, workdir=None)
        reg.record_evaluation(run, "dense", -1, {"perplexity": 20.0, "weight_sparsity": 0.0})
        reg.log_metrics(run, "prune", 0, {"perplexity": 21.0, "stage_seconds": 1.0})
        reg.record_evaluation(run, "prune", 0, {"perplexity": 22.0, "weight_sparsity": 0.5})
        # stage 1 reports every name the dense point has, but was never evaluated
        reg.log_metrics(run, "tune", 1, {"perplexity": 5.0, "weight_sparsity": 0.9})
        reg.start_evaluation(run, 2, stage="late", kind="stage")  # cut short: not a point
        reg.log_metrics(run, "late", 2, [MetricValue("perplexity", 1.0)], origin="evaluation")
        reg.set_run_status(run, "interrupted", "stopped by SIGTERM")
        record = reg.get_run(run)
    final = final_evaluation(record)
    assert (final.stage_idx, final.values) == (0, {"perplexity": 22.0, "weight_sparsity": 0.5})
    assert [e.stage_idx for e in evaluation_points(record)] == [-1, 0]
    assert [(e.stage_idx, e.status, e.reason) for e in record.evaluations][-1] == (2, "interrupted",
                                                                                  "stopped by SIGTERM")
    assert stage_values(record) == {0: {"perplexity": 21.0, "stage_seconds": 1.0},
                                    1: {"perplexity": 5.0, "weight_sparsity": 0.9}}
    (_, row) = report.compare_table([record])[1]
    assert row["evaluated_at"] == "prune" and row["perplexity"] == 22.0


@pytest.mark.parametrize("replicas", [False, True])
@pytest.mark.parametrize("extra", [None, {"sparsity": MetricInfo(higher_is_better=True, fraction=True)}])
def test_a_training_methods_final_numbers_are_declared(extra, replicas):
    """``final_metrics``: each reported number is declared, losses by the shared loop (TRAIN_METRICS)."""
    from sparsify_core.training import FINAL_LOSSES, TRAIN_METRICS, final_metrics

    final = {"loss": 2.0, "lm_loss": 1.5, "kd_loss": 0.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 9.0,
             "sparsity": 0.25, **({"replica_max_abs_diff": 0.0} if replicas else {})}
    metrics, declared = final_metrics(final, extra)
    want = {f"final_{k}" for k in FINAL_LOSSES} | ({"final_sparsity"} if extra else set())
    assert set(metrics) == set(declared) == want | ({"replica_max_abs_diff"} if replicas else set())
    assert metrics["final_loss"] == 2.0 and metrics["final_kd_loss"] == 0.5
    assert declared["final_loss"] == TRAIN_METRICS["loss"] == MetricInfo(higher_is_better=False, unit="nats")
    if extra:
        assert metrics["final_sparsity"] == 0.25 and declared["final_sparsity"] == extra["sparsity"]
    # a loop without KD reports no final_kd_loss, and declares nothing it does not report
    metrics, declared = final_metrics({"loss": 1.0, "lm_loss": 1.0})
    assert set(metrics) == set(declared) == {"final_loss", "final_lm_loss"}


def test_an_undeclared_stage_number_is_recorded_without_a_declaration(tmp_path):
    """A third-party method that does not declare keeps working: its number shows as ``MetricInfo()``."""
    result = StageResult(metrics={"mine": 0.5, "sparsity": 0.5}, metric_info={"sparsity": MetricInfo(fraction=True)})
    with Registry(str(tmp_path / "r.db")) as reg:
        run = reg.create_run(recipe_name="r", recipe_hash=None, recipe_text=None, recipe_json={}, overrides=[],
                             model="tiny", data="pydoc", seed=0, output_dir=None, workdir=None)
        reg.log_metrics(run, "x", 0, result.metrics, origin="stage", info={**result.recorded_info(), **STAGE_METRICS})
        record = reg.get_run(run)
    assert "mine" not in record.metric_info and metric_info_for(record, "mine") == MetricInfo()
    assert record.metric_info["sparsity"] == MetricInfo(fraction=True)
