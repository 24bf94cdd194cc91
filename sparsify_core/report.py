"""Presenting recorded runs: ``show`` one run, ``compare`` several, and plot them.

Pure presentation over ``registry`` records: nothing here runs or changes a
run. Works for any metric name; how a value is shown (a percent for
fractions, its unit) and which way is better (the Pareto front, the axis
labels) come from what the run recorded about the metric
(``registry.metric_info_for``), never from its name.

Vocabulary: an *evaluation point* is a recorded evaluation of the run
(``registry.evaluation_points``): the ``dense`` reference (stage index -1)
and each stage evaluated after it. A run's *final point* is
``registry.final_evaluation``, the one ``compare``, ``plot_tradeoff`` and
``fit`` use. Numbers the stages reported themselves (``stage_seconds``...)
are shown apart, as stage metrics.
"""
from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from . import plots
from .errors import SparsifyError
from .metric import MetricInfo
from .registry import (DENSE_INDEX, MetricRecord, RunRecord, evaluation_points, final_evaluation, metric_info_for,
                       reference_evaluation, stage_values)

# Well-known metrics first, in this order; any other name follows in order of appearance.
KNOWN_METRICS = ("perplexity", "kl_divergence", "activation_sparsity", "weight_sparsity", "parameters",
                 "nonzero_parameters", "ffn_flops_per_token", "stage_seconds", "peak_memory_mb")
RUN_COLUMNS = ("run", "recipe", "model", "status", "evaluated_at")
_STATUS_STYLE = {"finished": "green", "completed": "green", "running": "cyan", "pending": "dim",
                 "failed": "red", "interrupted": "yellow"}


# -- evaluation points -------------------------------------------------------------------------


def _add_row(table: Table, *cells, **kw) -> None:
    """``table.add_row`` with every ``str`` cell as plain ``Text``: names, paths, overrides and reasons are
    recorded user text, and rich would otherwise parse ``[...]`` in them as markup and drop it."""
    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kw)

def relative_change(value: float | None, baseline: float | None) -> float | None:
    """``(value - baseline) / |baseline|``; None when undefined (no baseline, zero, not finite)."""
    if value is None or baseline is None or not _finite(value) or not _finite(baseline) or baseline == 0:
        return None
    return (value - baseline) / abs(baseline)


# -- show --------------------------------------------------------------------------------------

def show_run(record: RunRecord, console: Console | None = None) -> RenderableType:
    """One run as a rich renderable: header, stages, metrics, per-layer values, curves, artifacts.

    Also prints it to ``console`` when one is given.
    """
    parts: list[RenderableType] = [_header(record), _stage_table(record)]
    for part in (_metric_table(record), _stage_metric_table(record), _failure_table(record), _layer_table(record),
                 _curve_table(record), _artifact_table(record)):
        if part is not None:
            parts.append(part)
    shown = Group(*parts)
    if console is not None:
        console.print(shown)
    return shown


def _header(r: RunRecord) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    status = Text(r.status, style=_STATUS_STYLE.get(r.status, ""))
    if r.reason:
        status.append(f": {r.reason}")
    recipe = r.recipe_name + (f"  (hash {r.recipe_hash})" if r.recipe_hash else "")
    if r.overrides:
        recipe += "  overrides: " + " ".join(r.overrides)
    if r.recipe_path:
        recipe += f"  from {r.recipe_path}"
    times = _fmt_time(r.started_at)
    if r.ended_at:
        times += f" -> {_fmt_time(r.ended_at)}"
    if r.duration_s is not None:
        times += f"  ({_fmt_duration(r.duration_s)}{', so far' if r.status == 'running' else ''})"
    if r.attempts > 1:
        times += f"  attempts {r.attempts}"
    v = r.versions or {}
    versions = "  ".join(f"{k} {v[k]}" for k in ("python", "torch", "transformers", "sparsify") if v.get(k))
    rows = [("run", Text(r.id, style="bold")), ("recipe", recipe), ("model", r.model), ("data", r.data),
            ("seed", r.seed), ("status", status), ("time", times), ("sweep", r.sweep_id),
            ("host", f"{r.host} (pid {r.pid})" if r.host else None), ("versions", versions or None),
            ("platform", v.get("platform")), ("git commit", r.git_commit), ("output", r.output_dir),
            ("workdir", r.workdir)]
    mc = r.machine
    if mc is not None:  # a bench record: where it was measured
        load = None if mc.load_before is None else f"{mc.load_before:.1f}" + (
            "" if mc.load_after is None else f" -> {mc.load_after:.1f}")
        rows[2:4] = [("machine", mc.summary), ("cpu", " ".join(x for x in (
            f"{mc.cpus} cpus" if mc.cpus else "", " ".join(mc.isa_flags)) if x) or None),
            ("torch", mc.torch_version), ("load", load)]
    for key, value in rows:
        if value is not None and value != "":
            _add_row(grid, key, value if isinstance(value, Text) else str(value))
    return grid


def _stage_table(r: RunRecord) -> RenderableType:
    table = Table(title="stages", title_justify="left", box=box.SIMPLE_HEAD)
    for name, justify in (("#", "right"), ("stage", "left"), ("kind/method", "left"), ("status", "left"),
                          ("duration", "right"), ("peak memory", "right"), ("note", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    recorded = {s.idx: s for s in r.stages}
    planned = [s for s in r.recipe.get("stages", []) if isinstance(s, dict)]
    for idx in sorted(set(recorded) | set(range(len(planned)))):
        s = recorded.get(idx)
        if s is None:  # in the recipe but never started
            p = planned[idx]
            _add_row(table, str(idx), str(p.get("name", "")), _kind_method(p.get("kind"), p.get("method")),
                          Text("not started", style="dim"), "", "", "")
            continue
        _add_row(table, str(idx), s.name, _kind_method(s.kind, s.method),
                      Text(s.status, style=_STATUS_STYLE.get(s.status, "")),
                      _fmt_duration(s.duration_s), _fmt_memory(s.peak_memory_mb), s.reason or "")
    if not table.rows:
        _add_row(table, "", Text("no stages recorded", style="dim"), "", "", "", "", "")
    return table


def _metric_table(r: RunRecord) -> RenderableType | None:
    points = evaluation_points(r)
    if not points:
        return None
    final, dense = final_evaluation(r), reference_evaluation(r)
    show_change = final is not None and dense is not None and bool(dense.values)
    sizes = {(e.record.split, e.record.sequences, e.record.tokens) for e in points if e.record is not None}
    title = "metrics by evaluation point"
    if len(sizes) == 1 and None not in next(iter(sizes)):  # recorded evaluations say what they measured on
        split, sequences, tokens = sizes.pop()
        title += f" (split {split}: {sequences} sequences, {_fmt_value(MetricInfo(), tokens)} tokens)"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("metric")
    for e in points:
        table.add_column(e.stage + ("" if e.stage_idx == DENSE_INDEX else f" [{e.stage_idx}]"), justify="right")
    if show_change:
        table.add_column(f"change at {final.stage}", justify="right")
    for name in _ordered_names(n for e in points for n in e.values):
        info = metric_info_for(r, name)
        cells = ["failed" if name in e.failures else _fmt_value(info, e.values.get(name)) for e in points]
        if show_change:
            row = {"run": r.id, "evaluated_at": "final", name: final.values.get(name),
                   f"{name}_change": relative_change(final.values.get(name), dense.values.get(name))}
            baseline = {"run": r.id, "evaluated_at": "dense", name: dense.values.get(name)}
            cells.append(_change_note(name, info, row, [baseline]).strip(" ()"))
        _add_row(table, _label(name, info), *cells)
    return table


def _stage_metric_table(r: RunRecord) -> RenderableType | None:
    """The numbers stages reported themselves (time, memory, a method's own), apart from evaluations."""
    values = stage_values(r)
    if not values:
        return None
    names = {s.idx: s.name for s in r.stages}
    table = Table(title="stage metrics", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("metric")
    for idx in values:
        table.add_column(f"{names.get(idx, f'stage {idx}')} [{idx}]", justify="right")
    for name in _ordered_names(n for v in values.values() for n in v):
        info = metric_info_for(r, name)
        _add_row(table, _label(name, info), *(_fmt_value(info, v.get(name)) for v in values.values()))
    return table


def _failure_table(r: RunRecord) -> RenderableType | None:
    failed = [e for e in evaluation_points(r) if e.failures]
    if not failed:
        return None
    table = Table(title="failed metrics", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("at")
    table.add_column("metric")
    table.add_column("reason", overflow="fold")
    for e in failed:
        for name, reason in e.failures.items():
            _add_row(table, e.stage, name, Text(reason, style="red"))
    return table


def _layer_table(r: RunRecord) -> RenderableType | None:
    layered = [m for m in r.metrics if m.layer is not None and m.step is None]
    if not layered:
        return None
    idx = max(m.stage_idx for m in layered)  # the last point with per-layer values
    by_name: dict[str, dict[str, float]] = defaultdict(dict)
    for m in layered:
        if m.stage_idx == idx:
            by_name[m.name][m.layer] = m.value
    table = Table(title=Text(f"per-layer values at {_stage_name(r, idx)}"), title_justify="left", box=box.SIMPLE_HEAD)
    for name, justify in (("metric", "left"), ("layers", "right"), ("min", "right"), ("mean", "right"),
                          ("max", "right"), ("lowest at", "left"), ("highest at", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for name in _ordered_names(by_name):
        values = {k: v for k, v in by_name[name].items() if _finite(v)}
        info = metric_info_for(r, name)
        if not values:
            _add_row(table, _label(name, info), str(len(by_name[name])), "nan", "", "", "", "")
            continue
        low, high = min(values, key=values.get), max(values, key=values.get)
        mean = sum(values.values()) / len(values)
        _add_row(table, _label(name, info), str(len(by_name[name])), _fmt_value(info, values[low]),
                      _fmt_value(info, mean), _fmt_value(info, values[high]), low, high)
    return table


def _curve_table(r: RunRecord) -> RenderableType | None:
    curves = _curves(r.metrics)
    if not curves:
        return None
    table = Table(title="training curves", title_justify="left", box=box.SIMPLE_HEAD)
    for name, justify in (("stage", "left"), ("metric", "left"), ("points", "right"), ("steps", "right"),
                          ("first", "right"), ("last", "right"), ("min", "right"), ("max", "right")):
        table.add_column(name, justify=justify)
    for (stage, name), pts in curves.items():
        values = [v for _, v in pts if _finite(v)]
        info = metric_info_for(r, name.split("[", 1)[0])  # a per-layer curve is labelled name[layer]
        _add_row(table, stage, _label(name, info), str(len(pts)), f"{pts[0][0]}-{pts[-1][0]}",
                      _fmt_value(info, pts[0][1]), _fmt_value(info, pts[-1][1]),
                      _fmt_value(info, min(values) if values else None),
                      _fmt_value(info, max(values) if values else None))
    return table


def _artifact_table(r: RunRecord) -> RenderableType | None:
    if not r.artifacts:
        return None
    table = Table(title="artifacts", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("kind")
    table.add_column("stage")
    table.add_column("path", overflow="fold")
    for a in r.artifacts:
        _add_row(table, a.kind, "" if a.stage_idx is None else _stage_name(r, a.stage_idx), a.path)
    return table


def _curves(metrics: Iterable[MetricRecord]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """Training curves ((stage, name, incl. [layer]) -> sorted (step, value) points)."""
    curves: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for m in metrics:
        if m.step is not None:
            label = m.name if m.layer is None else f"{m.name}[{m.layer}]"
            curves[(m.stage, label)].append((m.step, m.value))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in curves.items()}


# -- compare -----------------------------------------------------------------------------------

def compare_table(records: Sequence[RunRecord]) -> tuple[list[str], list[dict]]:
    """Rows for comparing runs: per run, its ``dense`` baseline and its final evaluation point.

    Columns: ``run, recipe, model, status, evaluated_at``, then each metric
    name followed by ``<name>_change``, the relative change of the final point
    against the same run's dense baseline (None on dense rows and where
    undefined). Values are raw floats (None when not recorded, or failed).
    When a row's metric failed, a last column ``failed`` lists
    ``name: reason`` for each, joined by ``; `` (the column is there only
    when some row has one). Each row also holds ``_failed``, the set of its
    failed names (not a column: what the table marks failed).
    """
    names: list[str] = []
    raw_rows: list[tuple[RunRecord, str, dict[str, float], dict[str, float] | None, dict[str, str]]] = []
    for r in records:
        dense, final = reference_evaluation(r), final_evaluation(r)
        if dense is not None or final is None:
            raw_rows.append((r, "dense" if dense is not None else "", dense.values if dense else {}, None,
                             dense.failures if dense else {}))
        if final is not None:
            raw_rows.append((r, final.stage, final.values, dense.values if dense else {}, final.failures))
        for e in (dense, final):
            names.extend(e.values if e is not None else {})
    names = _ordered_names(names)
    columns = list(RUN_COLUMNS) + [c for n in names for c in (n, f"{n}_change")]
    if any(failed for *_, failed in raw_rows):
        columns.append("failed")
    rows = []
    for r, at, values, baseline, failed in raw_rows:
        row = {"run": r.id, "recipe": r.recipe_name, "model": r.model, "status": r.status, "evaluated_at": at}
        values = {n: v for n, v in values.items() if n not in failed}
        for n in names:
            row[n] = values.get(n)
            row[f"{n}_change"] = None if baseline is None else relative_change(values.get(n), baseline.get(n))
        if "failed" in columns:
            row["failed"] = "; ".join(f"{n}: {reason}" for n, reason in failed.items()) or None
        row["_failed"] = set(failed)  # not a column: which cells the table marks failed
        rows.append(row)
    return columns, rows


def compare_renderable(records: Sequence[RunRecord], *, narrow: bool = False) -> Table:
    """``compare_table`` as a rich Table, for people.

    Final-point cells read ``35.2 (+58%)``; fractions (sparsities) show their
    change in percentage points instead (``62.0% (+60.0 pp)``), as a relative
    change from a near-zero dense sparsity means nothing. Metrics with the
    same value in every row move to the caption to keep the table narrow;
    ``narrow`` also lets metric headers wrap at their underscores.
    """
    columns, rows = compare_table(records)
    names = [c for c in columns if c not in RUN_COLUMNS and not c.endswith("_change") and c != "failed"]
    infos = {n: metric_info_for(records, n) for n in names}
    same = [n for n in names if len(rows) > 1 and rows[0][n] is not None and all(r[n] == rows[0][n] for r in rows)]
    names = [n for n in names if n not in same]
    caption = "same in every row: " + ", ".join(f"{_label(n, infos[n])} {_fmt_value(infos[n], rows[0][n])}"
                                                for n in same) if same else None
    table = Table(box=box.SIMPLE_HEAD, caption=Text(caption) if caption else None, caption_justify="left")
    for label in ("run", "recipe", "model", "status", "at"):
        table.add_column(label, no_wrap=label == "run")  # ids stay whole, to be copied
    for n in names:  # short of space, a value wraps before its change: "26" over "(+30%)"
        label = _label(n, infos[n])
        table.add_column(label.replace("_", " ") if narrow else label, justify="right", no_wrap=not narrow)
    for i, row in enumerate(rows):
        first_of_run = i == 0 or rows[i - 1]["run"] != row["run"]
        last_of_run = i + 1 == len(rows) or rows[i + 1]["run"] != row["run"]
        cells = [Text(str(row[c] or "") if first_of_run or c == "evaluated_at" else "",
                      style=_STATUS_STYLE.get(row[c], "") if c == "status" else "") for c in RUN_COLUMNS]
        for n in names:
            cells.append(Text("failed", style="red") if n in row["_failed"]
                         else Text(_fmt_value(infos[n], row[n]) + _change_note(n, infos[n], row, rows)))
        _add_row(table, *cells, end_section=last_of_run)
    return table


def _change_note(name: str, info: MetricInfo, row: dict, rows: list[dict]) -> str:
    """`` (+58%)`` after a final-point value (percentage points for fractions)."""
    if row["evaluated_at"] == "dense" or row[name] is None:
        return ""
    if info.fraction:
        dense = next((r[name] for r in rows if r["run"] == row["run"] and r["evaluated_at"] == "dense"), None)
        if _finite(dense) and _finite(row[name]) and 0 <= dense <= 1 and 0 <= row[name] <= 1:
            return f" ({(row[name] - dense) * 100:+.1f} pp)"
    change = row[f"{name}_change"]
    return "" if change is None else f" ({_fmt_change(change)})"


def format_compare(records: Sequence[RunRecord], fmt: str = "table", *, width: int | None = None) -> str:
    """The comparison as text: ``table`` (aligned, for people), ``json`` (a list of rows) or ``csv``.

    The table fits ``width`` columns (default: the terminal's, when stdout is
    one), wrapping headers and changes if needed; when even that cannot fit,
    and for files and pipes, lines keep their natural length.
    """
    if fmt == "table":
        if width is None and sys.stdout.isatty():
            width = shutil.get_terminal_size().columns
        unbounded = 100_000
        console = Console(file=io.StringIO(), width=unbounded, color_system=None, soft_wrap=False, markup=False)
        table = compare_renderable(records)
        if width is not None and console.measure(table).maximum > width:
            narrow = compare_renderable(records, narrow=True)
            if console.measure(narrow).minimum <= width:
                table = narrow
            else:  # cannot fit without cutting values: keep lines whole rather
                width = None
        console.width = width or unbounded
        console.print(table)
        return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"
    columns, rows = compare_table(records)
    if fmt == "json":
        clean = [{c: _json_value(row[c]) for c in columns} for row in rows]
        return json.dumps(clean, indent=2, allow_nan=False) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row[c] is None else (repr(row[c]) if isinstance(row[c], float) else row[c])
                             for c in columns})
        return out.getvalue()
    raise SparsifyError(f"unknown compare format {fmt!r} (one of table, json, csv)")


# -- plots -------------------------------------------------------------------------------------

def plot_curves(record: RunRecord, path: str | Path) -> Path:
    """Draw the run's training curves (metrics with a step) against step, one panel per metric, to a PNG."""
    curves = _curves(record.metrics)
    if not curves:
        raise SparsifyError(f"run {record.id} has no training curves (metrics recorded with a step)")
    by_name: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(dict)
    for (stage, name), pts in curves.items():
        by_name[name][stage] = pts
    names = _ordered_names(by_name)
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plots.figure(figsize=(4.8 * ncols, 3.4 * nrows), nrows=nrows, ncols=ncols)
    for ax, name in zip(axes, names):
        for stage, pts in by_name[name].items():
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=stage, linewidth=1.4,
                    marker="o" if len(pts) < 30 else None, markersize=3)
        values = [v for pts in by_name[name].values() for _, v in pts if _finite(v)]
        if values and min(values) > 0 and max(values) / min(values) > 50:
            ax.set_yscale("log")
        ax.set_title(_label(name, metric_info_for(record, name.split("[", 1)[0])), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if len(by_name[name]) > 1:
            ax.legend(fontsize=8)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"{record.recipe_name} - run {record.id}", fontsize=11)
    return plots.save(fig, path)


def plot_tradeoff(records: Sequence[RunRecord], path: str | Path, x: str | None = None,
                  y: str | None = None) -> Path:
    """Scatter the sparsity/quality trade-off of ``records`` to a PNG, with the Pareto front.

    Each run contributes its final point (``final_evaluation``, labelled
    with recipe and id) and its dense baseline (a distinct marker, one per
    model). ``x`` defaults to ``activation_sparsity`` if recorded, else
    ``weight_sparsity``; ``y`` to ``perplexity``, else ``kl_divergence`` (log
    scale for perplexity). Which way is better on each axis is what the runs
    recorded about the metric; the Pareto front is drawn only when both
    axes have a direction. Raises ``SparsifyError`` when no run has both.
    """
    finals, denses = [], {}
    for r in records:
        final, dense = final_evaluation(r), reference_evaluation(r)
        if final is not None:
            finals.append((r, final.values))
        if dense is not None:
            denses.setdefault(r.model, dense.values)
    available = {n for _, v in finals for n in v} | {n for v in denses.values() for n in v}
    x = x or _pick(available, ("activation_sparsity", "weight_sparsity"), "x")
    y = y or _pick(available, ("perplexity", "kl_divergence"), "y")
    run_pts = [(r, v[x], v[y]) for r, v in finals if _finite(v.get(x)) and _finite(v.get(y))]
    dense_pts = [(m, v[x], v[y]) for m, v in denses.items() if _finite(v.get(x)) and _finite(v.get(y))]
    if not run_pts and not dense_pts:
        raise SparsifyError(f"none of the selected runs recorded both {x!r} and {y!r} "
                            f"(recorded: {', '.join(_ordered_names(available)) or 'nothing'})")
    x_info, y_info = metric_info_for(records, x), metric_info_for(records, y)
    fig, (ax,) = plots.figure(figsize=(8, 5.5))
    labels: list[tuple[str, float, float, str]] = []  # placed last, once scales and limits are final
    for (r, px, py), color in zip(run_pts, plots.colors(len(run_pts))):
        ok = r.status == "finished"  # unfinished runs: hollow markers, status in the label
        ax.scatter(px, py, s=55, color=color if ok else "white", edgecolor=color if not ok else "black",
                   linewidth=0.6 if ok else 1.8, zorder=3)
        # the label takes its point's colour, so the pairing reads even where points crowd
        labels.append((f"{r.recipe_name}\n{r.id}" + ("" if ok else f" ({r.status})"), px, py, color))
    for i, (model, px, py) in enumerate(dense_pts):
        ax.scatter(px, py, s=120, marker="*", color="0.25", zorder=3, label="dense baseline" if i == 0 else None)
        labels.append((f"dense\n{model}", px, py, "0.35"))
    directed = x_info.higher_is_better is not None and y_info.higher_is_better is not None
    front = pareto_front([(px, py) for _, px, py in run_pts] + [(px, py) for _, px, py in dense_pts],
                         x_higher_better=bool(x_info.higher_is_better),
                         y_higher_better=bool(y_info.higher_is_better)) if directed else []
    if len(front) > 1:
        # between two front points, the best reachable y is that of the point further along x
        ax.plot([p[0] for p in front], [p[1] for p in front],
                drawstyle="steps-pre" if x_info.higher_is_better else "steps-post",
                color="tab:red", alpha=0.6, linewidth=1.5, zorder=2, label="Pareto front")
    xs = [p[1] for p in run_pts + dense_pts]
    ys = [p[2] for p in run_pts + dense_pts]
    if "perplexity" in y and min(ys) > 0:
        plots.log_axis(ax.yaxis, min(ys), max(ys))
    for axis, info, values in ((ax.xaxis, x_info, xs), (ax.yaxis, y_info, ys)):
        plots.value_axis(axis, values, fraction=info.fraction)
    ax.set_xlabel(_axis_label(x, x_info))
    ax.set_ylabel(_axis_label(y, y_info))
    ax.grid(True, which="both", alpha=0.25)
    ax.margins(x=0.12, y=0.12)
    skipped = len(records) - len(run_pts)
    title = f"{y} vs {x}: {len(run_pts)} run{'s' if len(run_pts) != 1 else ''}"
    if skipped:
        title += f" ({skipped} without both metrics not shown)"
    ax.set_title(title, fontsize=11)
    plots.place_labels(fig, ax, labels)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    return plots.save(fig, path)


def _axis_label(name: str, info: MetricInfo) -> str:
    """``perplexity (lower is better)``, with the unit: ``kl_divergence (nats, lower is better)``."""
    notes = [info.unit] if info.unit else []
    if info.higher_is_better is not None:
        notes.append(f"{'higher' if info.higher_is_better else 'lower'} is better")
    return f"{name} ({', '.join(notes)})" if notes else name


def pareto_front(points: Sequence[tuple[float, float]], *, x_higher_better: bool = True,
                 y_higher_better: bool = False) -> list[tuple[float, float]]:
    """The points no other point beats on both axes, sorted by x."""
    sx = 1 if x_higher_better else -1
    sy = 1 if y_higher_better else -1
    best = None
    front = []
    for px, py in sorted(set(points), key=lambda p: (-sx * p[0], -sy * p[1])):  # best x first
        if best is None or sy * py > best:
            front.append((px, py))
            best = sy * py
    return sorted(front)


def _pick(available: set[str], choices: Sequence[str], axis: str) -> str:
    for c in choices:
        if c in available:
            return c
    raise SparsifyError(f"cannot choose the {axis} axis: none of {', '.join(choices)} was recorded "
                        f"(recorded: {', '.join(_ordered_names(available)) or 'nothing'}); pass {axis}= explicitly")


# -- formatting --------------------------------------------------------------------------------

def _ordered_names(names: Iterable[str]) -> list[str]:
    seen = list(dict.fromkeys(names))
    known = [n for n in KNOWN_METRICS if n in seen]
    return known + [n for n in seen if n not in KNOWN_METRICS]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _label(name: str, info: MetricInfo) -> str:
    """The metric's name with its unit: ``kl_divergence (nats)``."""
    return f"{name} ({info.unit})" if info.unit else name


def _stage_name(r: RunRecord, stage_idx: int) -> str:
    if stage_idx == DENSE_INDEX:
        return "dense"
    return next((s.name for s in r.stages if s.idx == stage_idx),
                next((m.stage for m in r.metrics if m.stage_idx == stage_idx), f"stage {stage_idx}"))


def _fmt_value(info: MetricInfo, value: float | None) -> str:
    """A value for people: fractions as percents, counts whole, large numbers with a k/M/G/T-style suffix."""
    if value is None:
        return ""
    if not _finite(value):
        return str(value)
    if info.fraction and 0 <= value <= 1:
        return f"{value:.1%}"
    magnitude = abs(value)
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if magnitude >= factor:
            return f"{value / factor:.4g}{suffix}"
    if value == int(value) or magnitude >= 1e4:  # counts, and no 6.513e+04
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _fmt_change(change: float | None) -> str:
    if change is None:
        return ""
    return f"{change:+.1%}" if abs(change) < 0.1 else f"{change:+.0%}"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"


def _fmt_memory(mb: float | None) -> str:
    if mb is None:
        return ""
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def _fmt_time(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _kind_method(kind, method) -> str:
    return "/".join(str(p) for p in (kind, method) if p)


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/Infinity
    return value
