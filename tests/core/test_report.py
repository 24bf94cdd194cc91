"""Presenting runs: show, compare (table/json/csv), and the PNG plots."""
from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone

import pytest
from rich.console import Console

from sparsify_core import report
from sparsify_core.errors import SparsifyError
from sparsify_core.metric import MetricValue
from sparsify_core.registry import (MetricRecord, Registry, RunRecord, StageRecord, final_evaluation, metric_info_for,
                                    reference_evaluation)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(run_id="20260101-0000-aaaaaa", recipe="relu-ffn", status="finished", metrics=(), stages=(), **kw) -> RunRecord:
    fields = dict(id=run_id, recipe_name=recipe, recipe_hash="h", recipe_text="", recipe_json=None, overrides=[],
                  model="tiny", data="pydoc", seed=0, status=status, reason=None,
                  started_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
                  ended_at=datetime(2026, 1, 1, 0, 5, tzinfo=timezone.utc),
                  versions={"python": "3.11"}, git_commit=None, host="h", pid=1, output_dir=None, workdir=None,
                  attempts=1, sweep_id=None)
    fields.update(kw)
    return RunRecord(**fields, stages=list(stages),
                     metrics=[MetricRecord(stage=s, stage_idx=i, name=n, value=v, layer=layer, step=step)
                              for s, i, n, v, layer, step in (m + (None,) * (6 - len(m)) for m in metrics)])


def _sparsified(run_id="20260101-0000-aaaaaa", recipe="relu-ffn", ppl=25.0, sparsity=0.6, **kw) -> RunRecord:
    return _run(run_id, recipe, metrics=[
        ("dense", -1, "perplexity", 20.0), ("dense", -1, "activation_sparsity", 0.02),
        ("relufy", 0, "loss", 3.0, None, 0), ("relufy", 0, "loss", 2.0, None, 10),
        ("relufy", 0, "stage_seconds", 4.0),
        ("relufy", 0, "perplexity", 30.0), ("relufy", 0, "activation_sparsity", 0.5),
        ("finetune", 1, "perplexity", ppl), ("finetune", 1, "activation_sparsity", sparsity),
        ("finetune", 1, "activation_sparsity", 0.4, "layers.0.mlp"),
        ("finetune", 1, "activation_sparsity", 0.8, "layers.1.mlp"),
        ("save", 2, "stage_seconds", 1.0),  # a later stage that was not evaluated
    ], stages=[StageRecord(0, "relufy", "activation", "relu", {}, "completed", duration_s=4.0),
               StageRecord(1, "finetune", "train", "distill", {}, "completed", duration_s=9.0, peak_memory_mb=2048),
               StageRecord(2, "save", "output", "noop", {}, "completed", duration_s=1.0)], **kw)


def _text(renderable, width=160) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_final_point_of_a_run_recorded_before_evaluations_were():
    # RunRecord(schema=None): recorded before v7, so the evaluated stages are inferred
    r = _sparsified()
    final = final_evaluation(r)
    assert (final.stage_idx, final.stage) == (1, "finetune")  # not stage 2, which only timed itself
    assert reference_evaluation(r).stage == "dense"
    assert final_evaluation(_run(metrics=[("dense", -1, "perplexity", 20.0)])) is None
    assert final_evaluation(_run(metrics=[("a", 0, "x", 1.0), ("b", 1, "y", 2.0)])).stage_idx == 1  # no dense


def test_relative_change():
    assert report.relative_change(25.0, 20.0) == pytest.approx(0.25)
    assert report.relative_change(-3.0, -2.0) == pytest.approx(-0.5)
    assert report.relative_change(1.0, 0.0) is None
    assert report.relative_change(None, 2.0) is None and report.relative_change(float("nan"), 2.0) is None


def test_compare_table_has_dense_and_final_rows_with_changes():
    runs = [_sparsified(), _sparsified("20260101-0001-bbbbbb", "topk", ppl=40.0, sparsity=0.9)]
    columns, rows = report.compare_table(runs)
    assert columns[:5] == ["run", "recipe", "model", "status", "evaluated_at"]
    assert columns[5:9] == ["perplexity", "perplexity_change", "activation_sparsity", "activation_sparsity_change"]
    assert "loss" not in columns  # curves are not evaluation metrics
    assert [(r["run"][-6:], r["evaluated_at"]) for r in rows] == [
        ("aaaaaa", "dense"), ("aaaaaa", "finetune"), ("bbbbbb", "dense"), ("bbbbbb", "finetune")]
    dense, final = rows[2], rows[3]
    assert dense["perplexity"] == 20.0 and dense["perplexity_change"] is None
    assert final["perplexity"] == 40.0 and final["perplexity_change"] == pytest.approx(1.0)
    assert final["activation_sparsity"] == 0.9 and final["activation_sparsity_change"] == pytest.approx(44.0)
    assert "stage_seconds" not in columns  # only stages 0 and 2 timed themselves: not dense, not final


def test_compare_formats_parse_back():
    runs = [_sparsified(), _sparsified("20260101-0001-bbbbbb", "topk", ppl=float("nan"))]
    data = json.loads(report.format_compare(runs, "json"))
    assert len(data) == 4 and data[1]["perplexity"] == 25.0 and data[1]["perplexity_change"] == pytest.approx(0.25)
    assert data[3]["perplexity"] is None  # NaN is not JSON
    rows = list(csv.DictReader(io.StringIO(report.format_compare(runs, "csv"))))
    assert [r["evaluated_at"] for r in rows] == ["dense", "finetune", "dense", "finetune"]
    assert float(rows[1]["perplexity"]) == 25.0 and float(rows[1]["perplexity_change"]) == pytest.approx(0.25)
    assert rows[0]["perplexity_change"] == ""
    with pytest.raises(SparsifyError, match="unknown compare format"):
        report.format_compare(runs, "xml")


def test_compare_table_text():
    runs = [_sparsified(), _sparsified("20260101-0001-bbbbbb", "topk", ppl=40.0)]
    text = report.format_compare(runs, "table")
    assert "20260101-0000-aaaaaa" in text and "20260101-0001-bbbbbb" in text
    assert "25 (+25%)" in text and "40 (+100%)" in text
    assert "60.0% (+58.0 pp)" in text  # fractions change in points, not relative to ~0
    narrow = report.format_compare(runs, "table", width=60)
    assert "20260101-0000-aaaaaa" in narrow  # never cut into ellipses


def test_show_run_renders_everything():
    r = _sparsified(status="failed", reason="CUDA out of memory",
                    recipe_json=json.dumps({"stages": [{"name": n} for n in ("relufy", "finetune", "save", "export")]}))
    text = _text(report.show_run(r))
    for expected in ("20260101-0000-aaaaaa", "relu-ffn", "failed: CUDA out of memory", "activation/relu",
                     "train/distill", "not started", "export", "2.0 GB", "perplexity", "+25%", "+58.0 pp",
                     "per-layer values at finetune", "layers.0.mlp", "layers.1.mlp", "training curves", "0-10"):
        assert expected in text, expected
    minimal = _text(report.show_run(_run(status="running", ended_at=None)))
    assert "no stages recorded" in minimal and "running" in minimal


def test_show_run_from_the_registry(tmp_path):
    with Registry(f"sqlite:///{tmp_path}/r.db") as reg:
        run_id = reg.create_run(recipe_name="r", recipe_hash="h", recipe_text="", recipe_json="{}", overrides=[],
                                model="tiny", data="pydoc", seed=0, output_dir=None, workdir=None)
        reg.record_evaluation(run_id, "dense", -1, [MetricValue("perplexity", 20.0), MetricValue("x", 1.0, layer="l0")])
        reg.add_artifact(run_id, "output", tmp_path / "out")
        text = _text(report.show_run(reg.get_run(run_id)))
    assert run_id in text and "artifacts" in text and str(tmp_path / "out") in text


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_plot_curves(tmp_path):
    out = report.plot_curves(_sparsified(), tmp_path / "plots" / "curves.png")
    _assert_png(out)
    with pytest.raises(SparsifyError, match="no training curves"):
        report.plot_curves(_run(metrics=[("dense", -1, "perplexity", 20.0)]), tmp_path / "none.png")


def test_plot_tradeoff(tmp_path):
    runs = [_sparsified(), _sparsified("20260101-0001-bbbbbb", "topk", ppl=40.0, sparsity=0.9, status="failed"),
            _sparsified("20260101-0002-cccccc", "cats", ppl=30.0, sparsity=0.5),  # dominated
            _run("20260101-0003-dddddd", "other", metrics=[("dense", -1, "loss", 1.0)])]  # nothing to plot
    _assert_png(report.plot_tradeoff(runs, tmp_path / "tradeoff.png"))
    pruned = _run(metrics=[("dense", -1, "kl_divergence", 0.0), ("dense", -1, "weight_sparsity", 0.0),
                           ("wanda", 0, "kl_divergence", 0.2), ("wanda", 0, "weight_sparsity", 0.5)])
    _assert_png(report.plot_tradeoff([pruned], tmp_path / "pruned.png"))  # falls back to weight_sparsity/kl
    with pytest.raises(SparsifyError, match="cannot choose the x axis"):
        report.plot_tradeoff([runs[3]], tmp_path / "x.png")


def test_plot_tradeoff_of_any_quality_metric_against_bytes_per_token(tmp_path):
    """One cost axis for every family: accuracy (higher is better) against bytes read (lower is better)."""
    acc = "lm_eval/sparsify_pydoc_next/acc"
    runs = [_run(f"20260101-000{i}-aaaaa{i}", name, metrics=[("dense", -1, acc, 0.40), ("dense", -1, "bytes_per_token", 1e6),
                                                             ("s", 0, acc, a), ("s", 0, "bytes_per_token", b)])
            for i, (name, a, b) in enumerate([("wanda", 0.38, 6e5), ("cats", 0.36, 4e5), ("lte", 0.30, 5e5)])]
    _assert_png(report.plot_tradeoff(runs, tmp_path / "cost.png", x="bytes_per_token", y=acc))
    with pytest.raises(SparsifyError, match="recorded both 'bytes_per_token' and 'nope'"):
        report.plot_tradeoff(runs, tmp_path / "x.png", x="bytes_per_token", y="nope")


def test_pareto_front():
    pts = [(0.0, 20.0), (0.5, 30.0), (0.6, 25.0), (0.9, 40.0), (0.7, 50.0)]
    assert report.pareto_front(pts) == [(0.0, 20.0), (0.6, 25.0), (0.9, 40.0)]
    assert report.pareto_front(pts, x_higher_better=False) == [(0.0, 20.0)]
    # runs recorded before metrics declared themselves: the old guess from the name, in one place
    old = _run()
    assert metric_info_for(old, "activation_sparsity").higher_is_better
    assert metric_info_for(old, "activation_sparsity").fraction
    assert metric_info_for(old, "perplexity").higher_is_better is False
    assert metric_info_for(old, "ffn_flops_per_token").higher_is_better is False


def test_show_run_prints_to_a_console():
    console = Console(file=io.StringIO(), width=120, color_system=None)
    report.show_run(_sparsified(), console)
    assert "finetune" in console.file.getvalue()


# Every place a recorded user string reaches the screen: rich must print "[...]" literally, not parse it as a tag
# (a `--set 'evaluate.metrics=[..., {lm_eval: {tasks: [task]}}]'` override once lost its task list in `show`).
BRACKETED = "[bold]x[/bold] [sparsify_pydoc_next]"


def test_show_and_compare_print_bracketed_user_text_literally(tmp_path):
    stages = [StageRecord(0, BRACKETED, "activation", "relu", {}, "completed", duration_s=1.0)]
    r = _run(status="failed", reason=BRACKETED, overrides=[f"evaluate.metrics={BRACKETED}"], recipe=BRACKETED,
             stages=stages, metrics=[("dense", -1, "perplexity", 20.0), (BRACKETED, 0, "perplexity", 30.0),
                                     (BRACKETED, 0, "activation_sparsity", 0.4, "layers.0.mlp")])
    for width in (160, 400):
        text = _text(report.show_run(r), width=width)  # a console with markup on, as a library user's would be
        assert text.count(BRACKETED) >= 4, text  # recipe, overrides, reason, stage row, per-layer title
    assert BRACKETED in _text(report.compare_renderable([r]), width=400)  # the recipe column


def test_cli_consoles_print_bracketed_text_literally(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sparsify_core.cli import app
    db = tmp_path / "r.db"
    with Registry(f"sqlite:///{db}") as reg:
        run_id = reg.create_run(recipe_name=BRACKETED, recipe_hash="h", recipe_text="", recipe_json="{}",
                                overrides=[f"x={BRACKETED}"], model="tiny", data="pydoc", seed=0, output_dir=None,
                                workdir=None)
        reg.record_evaluation(run_id, "dense", -1, [MetricValue("perplexity", 20.0)])
    for args in (["runs"], ["show", run_id], ["compare", run_id]):
        res = CliRunner().invoke(app, ["--registry", str(db), *args])
        assert res.exit_code == 0, res.output
        assert "[bold]x" in res.output and "[sparsify_pydoc_next]" in res.output, (args, res.output)
