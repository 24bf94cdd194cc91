"""The ``sparsify`` command line: run, validate, schema, plugins, runs, sweeps, show, compare, fit, bench,
generate, export.

Errors reach users as one line and a non-zero exit status (2 for bad input,
1 for a failed run, 130 for an interrupted one); ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import RecipeError, SparsifyError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make large language models sparse with declarative recipes.")
# Piped output is not squeezed to 80 columns: ids and numbers must stay whole.
# markup=False: recorded names, overrides, prompts and error text may contain "[...]" that rich would
# otherwise eat as a style tag; styling is applied with Text objects instead.
out = Console(width=None if sys.stdout.isatty() else 240, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)
_state = {"registry": None, "debug": False}


@app.callback()
def _global(registry: Optional[str] = typer.Option(None, "--registry", envvar="SPARSIFY_REGISTRY",
                                                    help="the run registry: a SQLite file path or a SQLAlchemy URL [default: registry.db]"),
            debug: bool = typer.Option(False, "--debug", help="show tracebacks")):
    _state["registry"], _state["debug"] = registry, debug


def _registry():
    from .registry import Registry
    return Registry(_state["registry"])


@app.command()
def run(recipe: Optional[Path] = typer.Argument(None, help="recipe YAML (not needed with --resume)"),
        set_: list[str] = typer.Option([], "--set", help="override a recipe value: stages.1.params.lr=3e-4"),
        resume: Optional[str] = typer.Option(None, "--resume", help="continue run RUN_ID from its last completed "
                                             "stage, or sweep SWEEP_ID from its unfinished runs"),
        runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="where run checkpoints live [default: ./runs]"),
        worker: bool = typer.Option(False, "--worker", help="work on the sweep together with other processes sharing "
                                    "the registry: claim points one at a time until every point is done"),
        heartbeat_timeout: float = typer.Option(300.0, "--heartbeat-timeout", envvar="SPARSIFY_HEARTBEAT_TIMEOUT",
                                                help="seconds without a heartbeat after which another worker takes "
                                                "a sweep point over", min=0.1),
        dry_run: bool = typer.Option(False, "--dry-run", help="run nothing: print the memory plan per stage and rank "
                                     "(from the model's config, no weights) and fail if it does not fit"),
        nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="with --dry-run: plan for this many ranks "
                                            "[default: the GPUs this machine sees, else 1]"),
        device_memory: Optional[str] = typer.Option(None, "--device-memory", help="with --dry-run: memory of each "
                                                    "device, e.g. 80GB (binary units) [default: the smallest "
                                                    "visible GPU's, else the machine's RAM]")):
    """Validate a recipe, run its stages, evaluate, save the model and record the run (every run of a sweep)."""
    from .recipe import load_recipe, load_sweep
    from .runner import Runner, default_runs_dir

    if dry_run or nproc is not None or device_memory is not None:
        if not dry_run:
            raise SparsifyError("--nproc and --device-memory plan a run: add --dry-run")
        if recipe is None or resume:
            raise SparsifyError("--dry-run plans a RECIPE file (not --resume)")
        _dry_run(recipe, set_, nproc, device_memory)
        return
    reg = _registry()
    if resume:
        if recipe is not None or set_:
            raise SparsifyError("--resume takes the recipe and overrides recorded with the run; give no RECIPE or --set")
        if resume.startswith("sweep-"):
            from .sweep import plan_from_record
            _run_sweep(plan_from_record(reg.get_sweep(resume)), reg, runs_dir or default_runs_dir(), resume,
                       worker=worker, stale_after=heartbeat_timeout)
            return
        if worker:
            raise SparsifyError(f"--worker works on a sweep: {resume} is a run id, not a sweep id (sweep-...)")
        prev = reg.get_run(resume)
        if prev.kind != "recipe":
            raise SparsifyError(f"run {prev.id} is a {prev.kind} record, not a recipe run: nothing to resume")
        loaded = load_recipe(prev.recipe_path or f"<run {prev.id}>", list(prev.overrides or []),
                             text=prev.recipe_text)
        resume = prev.id
    else:
        if recipe is None:
            raise SparsifyError("give a RECIPE file, or --resume RUN_ID")
        plan = load_sweep(recipe, set_)
        if plan is not None:
            _run_sweep(plan, reg, runs_dir or default_runs_dir(), None, worker=worker, stale_after=heartbeat_timeout)
            return
        if worker:
            raise SparsifyError(f"--worker works on a sweep: {recipe} has no `sweep:`")
        loaded = load_recipe(recipe, set_)
    run_id = Runner(loaded, reg, resume_id=resume, runs_dir=runs_dir or default_runs_dir()).run()
    err.print(f"run {run_id} finished; see `sparsify show {run_id}` and `sparsify compare {run_id}`", highlight=False)


@app.command()
def search(recipe: Path = typer.Argument(..., help="recipe YAML"),
           vary: str = typer.Option(..., "--vary", help="the parameter to maximise: stages.N.params.NAME"),
           budget: str = typer.Option(..., "--budget", help="what every answer must meet: kl_divergence<=0.1, "
                                                            "perplexity<=1.05*dense (also >=, <, >)"),
           lo: float = typer.Option(0.0, "--lo", help="smallest value tried"),
           hi: float = typer.Option(1.0, "--hi", help="largest value tried"),
           tol: float = typer.Option(0.01, "--tol", help="stop when the bracket is this narrow"),
           max_runs: int = typer.Option(8, "--max-runs", help="at most this many runs (the reused first stages "
                                                              "not counted)"),
           set_: list[str] = typer.Option([], "--set", help="override a recipe value: stages.0.params.lr=3e-4"),
           runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="where run checkpoints live [default: ./runs]")):
    """Find the largest value of one parameter whose run meets a quality budget (bisection over real runs, one sweep)."""
    from .runner import default_runs_dir
    from .search import parse_budget, search as run_search

    parsed = parse_budget(budget)
    outcome = run_search(recipe, vary, parsed, _registry(), lo=lo, hi=hi, tol=tol, max_runs=max_runs,
                         overrides=set_, runs_dir=runs_dir or default_runs_dir())
    sys.stdout.write(outcome.report() + "\n")
    if outcome.answer is None:
        raise typer.Exit(1)


def _dry_run(recipe: Path, set_: list[str], nproc: Optional[int], device_memory: Optional[str]) -> None:
    """Print the memory plan of a recipe (each run of a sweep); ``SparsifyError`` naming the stage when one does not fit."""
    from .plan import Devices, format_plan, parse_memory, plan_recipe, visible_devices
    from .recipe import load_recipe, load_sweep

    seen = visible_devices()
    try:
        memory = parse_memory(device_memory) if device_memory is not None else seen.memory
    except ValueError as exc:
        raise SparsifyError(f"--device-memory: {exc}") from None
    kind = "cuda" if device_memory is not None or nproc is not None else seen.kind
    devices = Devices(nproc or (seen.count if kind == seen.kind else 1), memory, kind)
    sweep = load_sweep(recipe, set_)
    runs = [p.loaded for p in sweep.points] if sweep is not None else [load_recipe(recipe, set_)]
    problems = []
    for loaded in runs:
        plan = plan_recipe(loaded, devices)
        for line in format_plan(plan):
            out.print(line, highlight=False, markup=False)
        if plan.problem:
            problems.append(f"{loaded.recipe.name}: {plan.problem}" if sweep is not None else plan.problem)
    if problems:
        raise SparsifyError(f"{recipe}: the plan does not fit: {problems[0]}"
                            + (f" (+{len(problems) - 1} more runs)" if len(problems) > 1 else ""))


def _run_sweep(plan, reg, runs_dir: Path, resume: Optional[str], *, worker: bool = False,
               stale_after: float = 300.0) -> None:
    from .sweep import run_sweep

    done = run_sweep(plan, reg, runs_dir=runs_dir, resume_id=resume, worker=worker, stale_after=stale_after)
    summary = (f"sweep {done.sweep_id}: {len(done.finished)} runs finished now, {len(done.skipped)} already done, "
               f"{len(done.failed)} failed")
    if done.failed:
        raise SparsifyError(summary + ": " + "; ".join(f"{name}: {why}" for name, why in done.failed[:3])
                            + f"; retry them with `sparsify run --resume {done.sweep_id}`")
    err.print(summary + f"; see `sparsify compare --sweep {done.sweep_id}` and `sparsify fit {done.sweep_id}`",
              highlight=False)


@app.command()
def validate(recipe: Path, set_: list[str] = typer.Option([], "--set", help="override a recipe value")):
    """Check a recipe (keys, types, plugins, params, data splits, model shapes) without loading weights; each sweep run."""
    from .recipe import check_model, check_sweep, load_recipe, load_sweep

    plan = load_sweep(recipe, set_)
    if plan is not None:
        check_sweep(plan)
        names = [p.loaded.recipe.name for p in plan.points]
        out.print(f"{recipe}: ok: sweep {plan.name} of {len(names)} runs over "
                  + ", ".join(f"{k} ({len(v)})" for k, v in plan.spec.grid.items()) + ": "
                  + ", ".join(names[:4]) + (", ..." if len(names) > 4 else ""), highlight=False)
        return
    loaded = load_recipe(recipe, set_)
    check_model(loaded)
    r = loaded.recipe
    out.print(f"{recipe}: ok: {r.name}, model {r.model.source}, data {r.data.source}, "
              f"{len(r.stages)} stages: " + ", ".join(f"{s.name} ({s.kind}/{s.method})" for s in r.stages),
              highlight=False)


@app.command()
def schema(output: Optional[Path] = typer.Option(None, "--output", "-o", help="write to a file instead of stdout")):
    """Print the JSON Schema of a recipe, with every installed method's parameters."""
    from .recipe import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output:
        output.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")


@app.command()
def plugins():
    """List every method, source, metric, layout (with its kernels) and bench case, and who provides it."""
    from .bench import provided_cases
    from .plugin_manager import catalog

    cat = catalog()
    table = Table(title="sparsify plugins")
    for col in ("category", "name", "description", "provided by"):
        table.add_column(col)
    order = ["method", "model_source", "data_source", "metric", "layout"]
    rows = []
    for e in sorted(cat.entries, key=lambda e: (order.index(e.category), e.key)):
        text = e.cls.describe()
        if e.category == "layout":
            text += f" Kernels: {e.cls.describe_kernels()}"
        rows.append((e.category.replace("_", " "), e.key, text, f"{e.distribution} ({e.plugin})"))
    warnings = list(cat.load_errors)
    try:
        cases = provided_cases()
    except Exception as exc:  # noqa: BLE001 - a broken bench case must not hide the rest of the listing
        cases = []
        warnings.append(f"bench cases not listed: {type(exc).__name__}: {exc}")
    for p in cases:
        rows.append(("bench case", f"{p.case.number} ({p.case.name})",
                     p.case.description + ("" if p.case.default else f" [only with --case {p.case.number}]"),
                     f"{p.distribution} ({p.plugin})"))
    for row in rows:  # plain text: no rich markup or emoji codes (an "n:m:g" is not ":m:")
        table.add_row(*(Text(cell) for cell in row))
    out.print(table)
    if not cat.layouts:
        out.print("layouts: none installed", highlight=False)
    for msg in warnings:
        err.print(f"warning: {msg}", highlight=False)


@app.command()
def runs(limit: int = typer.Option(20, help="how many, newest first"),
         recipe: Optional[str] = typer.Option(None, help="only runs of this recipe name"),
         status: Optional[str] = typer.Option(None, help="running, finished, failed or interrupted"),
         sweep: Optional[str] = typer.Option(None, "--sweep", help="only the runs of this sweep (id or prefix)")):
    """List recorded runs."""
    reg = _registry()
    reg.reconcile()
    table = Table()
    for col in ("id", "recipe", "model", "status", "started", "reason"):
        table.add_column(col, no_wrap=col != "reason")
    sweep_id = reg.get_sweep(sweep).id if sweep else None
    for r in reg.find_runs(recipe_names=[recipe] if recipe else None, status=status, limit=limit, sweep_id=sweep_id):
        where = r.machine.summary if r.machine is not None else r.model  # bench records: the machine
        table.add_row(r.id, r.recipe_name, where, r.status, str(r.started_at)[:19], (r.reason or "")[:60])
    out.print(table)


@app.command()
def sweeps(limit: int = typer.Option(20, help="how many, newest first")):
    """List recorded sweeps with how many of their runs finished."""
    reg = _registry()
    reg.reconcile()
    table = Table()
    for col in ("id", "name", "runs", "finished", "failed", "created", "grid"):
        table.add_column(col, no_wrap=col != "grid")
    for s in reg.find_sweeps(limit=limit):
        recs = reg.find_runs(sweep_id=s.id, details=False)
        done = {json.dumps(r.sweep_point, sort_keys=True) for r in recs if r.status == "finished"}
        failed = {json.dumps(r.sweep_point, sort_keys=True) for r in recs if r.status in ("failed", "interrupted")}
        table.add_row(s.id, s.name, str(s.points), str(len(done)), str(len(failed - done)), str(s.created_at)[:19],
                      ", ".join(f"{k} x{len(v)}" for k, v in s.grid.items()))
    out.print(table)


@app.command()
def show(run_id: str, plot: Optional[Path] = typer.Option(None, "--plot", help="draw training curves to this PNG")):
    """Show one run stage by stage, with its metrics."""
    from .report import plot_curves, show_run

    reg = _registry()
    reg.reconcile()
    rec = reg.get_run(run_id)
    show_run(rec, out)
    if plot:
        plot_curves(rec, plot)
        err.print(f"wrote {plot}", highlight=False)


@app.command()
def compare(run_ids: list[str] = typer.Argument(None, help="run ids (or unique prefixes)"),
            recipe: list[str] = typer.Option([], "--recipe", help="select runs of these recipe names"),
            model: list[str] = typer.Option([], "--model", help="select runs of these models"),
            sweep: Optional[str] = typer.Option(None, "--sweep", help="select the runs of this sweep (all of them)"),
            fmt: str = typer.Option("table", "--format", help="table, json or csv"),
            limit: int = typer.Option(10, help="at most this many runs when none are named"),
            plot: Optional[Path] = typer.Option(None, "--plot", help="draw the sparsity / quality trade-off to this PNG"),
            x: Optional[str] = typer.Option(None, "--x", help="metric on the plot's x axis (default: activation or "
                                                              "weight sparsity), e.g. bytes_per_token: one cost axis "
                                                              "for every family"),
            y: Optional[str] = typer.Option(None, "--y", help="metric on the plot's y axis (default: perplexity, "
                                                              "else kl_divergence), e.g. lm_eval/sparsify_pydoc_next/acc")):
    """Put runs side by side against their dense baselines."""
    from .report import format_compare, plot_tradeoff

    if fmt not in ("table", "json", "csv"):
        raise SparsifyError(f"--format must be table, json or csv, got {fmt!r}")
    reg = _registry()
    reg.reconcile()
    if run_ids:
        records = [reg.get_run(r) for r in run_ids]
    elif sweep:
        records = reg.find_runs(sweep_id=reg.get_sweep(sweep).id, recipe_names=recipe or None,
                                models=model or None, kinds=["recipe"])
    else:
        records = reg.find_runs(recipe_names=recipe or None, models=model or None, limit=limit, kinds=["recipe"])
    if not records:
        raise SparsifyError("no runs match")
    sys.stdout.write(format_compare(records, fmt).rstrip("\n") + "\n")
    if plot:
        plot_tradeoff(records, plot, x=x, y=y)
        err.print(f"wrote {plot}", highlight=False)



@app.command()
def fit(sweep: str = typer.Argument(..., help="sweep id (or unique prefix)"),
        data: Optional[str] = typer.Option(None, "--data", help="D: 'recipe:<dotted path>' or a metric name "
                                           "[default: the train.steps path the sweep varies]"),
        loss: str = typer.Option("perplexity", "--loss", help="metric for L (perplexity becomes log perplexity)"),
        sparsity: str = typer.Option("weight_sparsity", "--sparsity", help="metric for S"),
        nonzeros: str = typer.Option("nonzero_parameters", "--nonzeros", help="metric for N"),
        n_unit: float = typer.Option(1e6, "--n-unit", help="N is counted in these units (the paper: millions)"),
        d_unit: float = typer.Option(1.0, "--d-unit", help="D is counted in these units"),
        delta: float = typer.Option(1e-3, "--delta", help="Huber delta on log L (the paper's for language)"),
        restarts: int = typer.Option(16, "--restarts", min=1, help="random starts of the fit"),
        bootstrap: int = typer.Option(50, "--bootstrap", min=0, help="resampled refits for 95% intervals"),
        folds: int = typer.Option(5, "--folds", min=0, help="leave-some-runs-out folds for the held-out error (0: off)"),
        budget_nonzeros: Optional[float] = typer.Option(None, "--budget-nonzeros", help="non-zero parameters for the "
                                                        "optimal sparsity [default: the sweep's largest N]"),
        budget_data: list[float] = typer.Option([], "--budget-data", help="data budgets D, repeatable [default: the "
                                                "sweep's D values and 10x and 100x the largest]"),
        plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of fit against points [default: fit-SWEEP.png]"),
        json_path: Optional[Path] = typer.Option(None, "--json", help="also write everything to this JSON file"),
        seed: int = typer.Option(0, "--seed")):
    """Fit the sparse scaling law L(S, N, D) to a sweep's runs: coefficients, errors, optimal sparsity, plot."""
    import math

    from .scaling_law import COEFFICIENTS, fit_runs, plot_fit
    from .sweep import data_path

    reg = _registry()
    reg.reconcile()
    sw = reg.get_sweep(sweep)
    if data is None:
        path = data_path(sw.grid)
        if path is None:
            raise SparsifyError(f"sweep {sw.id} varies no single '...train.steps': say what D is with --data "
                                "recipe:<dotted path> or --data <metric>")
        data = f"recipe:{path}"
    try:
        result = fit_runs(reg.find_runs(sweep_id=sw.id), data=data, loss=loss, sparsity=sparsity,
                          nonzeros=nonzeros, n_unit=n_unit, d_unit=d_unit, folds=folds,
                          budget_nonzeros=budget_nonzeros, budget_data=budget_data, seed=seed, delta=delta,
                          restarts=restarts, bootstrap=bootstrap)
    except ValueError as exc:
        raise SparsifyError(f"sweep {sw.id}: {exc}") from None
    law, points, train_err, cv = result.fit.law, result.points, result.train_error, result.heldout_error
    if result.heldout_note:
        err.print(f"no held-out error: {result.heldout_note}", highlight=False)

    table = Table(title=f"L(S, N, D) = (a_S (1-S)^b_S + c_S) N^-b_N + (a_D / D)^b_D + c  |  sweep {sw.id}, "
                        f"{len(points)} runs, N in {n_unit:g}, D in {d_unit:g} x {data}")
    for col in ("coefficient", "value", "std. error", "bootstrap 95%"):
        table.add_column(col, justify="right" if col != "coefficient" else "left")
    for k in COEFFICIENTS:
        se = result.fit.stderr[k]
        ci = result.fit.bootstrap.get(k) if result.fit.bootstrap else None
        table.add_row(k, f"{getattr(law, k):.4g}", "n/a" if math.isnan(se) else f"{se:.2g}",
                      f"{ci[0]:.3g} .. {ci[1]:.3g}" if ci else "")
    out.print(table)
    out.print(f"fit error (all runs): RMSE of log L {train_err['rmse_log']:.4f}, mean |rel. error| of L "
              f"{train_err['mean_abs_rel']:.2%}", highlight=False)
    if cv is not None:
        out.print(f"held-out error ({int(cv['folds'])}-fold leave-some-runs-out): RMSE of log L {cv['rmse_log']:.4f}, "
                  f"mean |rel. error| {cv['mean_abs_rel']:.2%}, max {cv['max_abs_rel']:.2%}", highlight=False)

    best = Table(title=f"optimal sparsity at N = {result.budget_nonzeros:.4g} non-zeros, equal training cost")
    for col in ("D", "S_opt", "L dense", "L at S_opt"):
        best.add_column(col, justify="right")
    for row in result.optimal:
        best.add_row(f"{row['D']:.4g}", f"{row['S_opt']:.1%}", f"{row['L_dense']:.4f}", f"{row['L_opt']:.4f}")
    out.print(best)
    out.print("equal cost: the sparse model (N / (1 - S) parameters, trained densely by gmp) trains on D (1 - S) for "
              "the cost of the dense N-parameter model on D", highlight=False)
    skipped = result.skipped
    if skipped:
        err.print(f"skipped {len(skipped)} runs (unfinished or a value missing): {', '.join(skipped[:5])}"
                  + (" ..." if len(skipped) > 5 else ""), highlight=False)
    plot = plot or Path(f"fit-{sw.id}.png")
    plot_fit(law, points, plot, title=f"sweep {sw.id} ({sw.name}), {len(points)} runs")
    err.print(f"wrote {plot}", highlight=False)
    if json_path:
        json_path.write_text(json.dumps({"sweep": sw.id, **result.summary()}, indent=1, default=float))
        err.print(f"wrote {json_path}", highlight=False)


@app.command()
def bench(case: Optional[list[int]] = typer.Option(None, "--case", help="cases to run (repeat the option) "
                                                   "[default: the plugins' default cases, 1-3 built in]"),
          json_path: Optional[Path] = typer.Option(None, "--json", help="also write the results to this JSON file"),
          threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for dense torch and "
                                                "our kernels alike [default: torch's]"),
          quick: bool = typer.Option(False, "--quick", help="tiny sizes and few repeats: a smoke test, not a measurement"),
          record: bool = typer.Option(False, "--record", help="store the results in the registry as a bench record "
                                      "(`sparsify runs` lists them, `sparsify show ID` shows them)"),
          model: Optional[Path] = typer.Option(None, "--model", help="for the cases that run a whole model (case 4): "
                                               "a sparsify output folder with ReLU/FATReLU FFNs (e.g. from "
                                               "recipes/prosparse.yaml) [default: SmolLM2-135M with ReLU, untrained]"),
          compare: Optional[list[Path]] = typer.Option(None, "--compare", help="put results saved with --json side "
                                                       "by side (repeat the option; runs nothing)"),
          isa: Optional[str] = typer.Option(None, "--isa", help="run as a machine with this ISA would: our kernels' "
                                            "build (avx512, avx2, portable; sets SPARSIFY_ISA) and dense torch capped "
                                            "to it (ATen, MKL, oneDNN) [default: the CPU's widest for both]")):
    """Time sparse kernels against dense compute, interleaved in one process.

    The cases come from plugins (the ``sparsify_bench_cases`` hook); the
    harness is sparsify_core/bench.py. ``--compare A.json --compare B.json``
    shows saved results side by side (e.g. one build on two machines), each
    with the CPU, ISA, threads and torch it ran with. ``--isa avx2`` on an
    AVX-512 CPU times the AVX2 kernels against AVX2 dense torch: the table an
    AVX2 machine would give, up to its memory system.
    """
    if isa is not None:
        from .dense_isa import DENSE_ENV_NAMES, DENSE_ISA_ENV, cpu_isa, runnable
        isa = isa.strip().lower()
        if isa not in DENSE_ISA_ENV:  # one entry per kernel build (sparsify_kernels.native.ISAS)
            raise SparsifyError(f"--isa {isa}: choose one of {', '.join(DENSE_ISA_ENV)}")
        if compare:
            raise SparsifyError("--compare shows saved results and runs nothing: leave out --isa")
        if not runnable(isa):
            raise SparsifyError(f"--isa {isa}: this CPU cannot run it (its widest vector ISA is "
                                f"{cpu_isa()})")
        # Before torch is imported here: ATen reads its capability once, MKL and oneDNN at first use.
        os.environ["SPARSIFY_ISA"] = isa
        for name in DENSE_ENV_NAMES:  # --isa avx512 lifts an inherited cap
            os.environ.pop(name, None)
        os.environ.update(DENSE_ISA_ENV[isa])
    from . import bench as _bench
    if isa is not None:
        _bench.check_dense_isa(isa)

    if compare:
        if case or json_path or record or model or quick or threads:
            raise SparsifyError("--compare shows saved results and runs nothing: leave out --case, --json, "
                                "--record, --model, --quick and --threads")
        results = [_bench.read_result(p) for p in compare]
        table = Table(title="sparsify bench: best ratio dense / ours (dense ms), side by side")
        table.add_column("case")
        table.add_column("config")
        for i, (path, res) in enumerate(zip(compare, results)):
            quick_note = ", --quick" if res.get("quick") else ""
            table.add_column(f"[{i + 1}] {path.name}\n{_bench.describe_machine(res['environment'])}{quick_note}")
        for row in _bench.compare_results(results):
            table.add_row(*row)
        out.print(table)
        return
    available = _bench.cases()
    numbers = case or [n for n, c in available.items() if c.default]
    bad = [c for c in numbers if c not in available]
    if bad:
        raise SparsifyError(f"unknown case(s) {bad}: choose among {sorted(available)}")
    if model is not None and not (model / "sparsify.json").is_file():
        raise SparsifyError(f"--model {model}: not a sparsify output folder (no sparsify.json)")
    result = _bench.run(numbers, quick=quick, threads=threads, progress=lambda s: err.print(s, highlight=False),
                        model_dir=model, available=available)
    env = result["environment"]
    load = "" if env["load_average_1m"] is None else f", load {env['load_average_1m']:.1f}"
    isa_text = env["isa"] + (f", dense torch {env['dense_isa']}" if env.get("dense_env") else "")
    table = Table(title=f"sparsify bench: dense time / ours (medians, {_bench.threads_text(env['threads'])}, "
                        f"{isa_text}{load})")
    for col in ("case", "config", "dense ms", "ratios (dense / candidate)", "bound", "target"):
        table.add_column(col)
    for row in _bench.format_table(result):
        table.add_row(*row)
    out.print(table)
    if json_path:
        json_path.write_text(json.dumps(result, indent=1))
        err.print(f"wrote {json_path}", highlight=False)
    if record:
        run_id = _bench.record(_registry(), result, json_path)
        err.print(f"recorded as {run_id}; see `sparsify show {run_id}`", highlight=False)


@app.command()
def export(output: Path = typer.Argument(..., help="a sparsify output folder"),
           dest: Path = typer.Argument(..., help="the new folder (replaced atomically if it exists), or the .gguf "
                                       "file with --format gguf"),
           storage: Optional[str] = typer.Option(None, "--storage", help="dense (plain transformers loads it: layouts "
                                                 "densified; refused where the architecture changed, e.g. experts) or "
                                                 "compressed (sparse weights as bitmask plus values; sparsify only)"),
           format_: str = typer.Option("sparsify", "--format", help="sparsify (an output folder, with --storage) or "
                                       "gguf (one file llama.cpp loads; llama-architecture models)"),
           gguf_type: str = typer.Option("f32", "--gguf-type", help="with --format gguf: f32, q8_0 or q4_1"),
           allow_silu: bool = typer.Option(False, "--allow-silu", help="with --format gguf: write a model whose FFN "
                                           "activation is not SiLU anyway (llama.cpp then computes SiLU: for speed "
                                           "comparisons only)")):
    """Copy an output with its weights stored dense or compressed (every weight and mask bit-identical),
    or write it as a GGUF file for llama.cpp (``--format gguf``)."""
    from .output import export_output
    from .storage import folder_bytes

    if format_ == "gguf":
        from .gguf_export import export_gguf

        if storage is not None:
            raise SparsifyError("--storage is for --format sparsify; a GGUF file has its own (--gguf-type)")
        export_gguf(output, dest, gguf_type, allow_silu)
        err.print(f"exported {output} -> {dest} (GGUF {gguf_type}, {dest.stat().st_size / 1e6:.1f} MB)",
                  highlight=False, markup=False)
        return
    if format_ != "sparsify":
        raise SparsifyError(f"--format {format_}: choose sparsify or gguf")
    if storage is None:
        raise SparsifyError("--storage dense or --storage compressed is needed with --format sparsify")
    before = folder_bytes(output) if (output / "sparsify.json").is_file() else 0
    export_output(output, dest, storage)
    err.print(f"exported {output} -> {dest} ({storage}): weights {before / 1e6:.1f} MB -> "
              f"{folder_bytes(dest) / 1e6:.1f} MB", highlight=False, markup=False)


def _pick_device(device: str) -> str:
    if device == "auto":
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@app.command()
def generate(output: Path = typer.Argument(..., help="a sparsify output folder (causal LM)"),
             prompt: Optional[str] = typer.Option(None, "--prompt", help="the prompt text"),
             prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="read the prompt from this file"),
             max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="stop after this many tokens"),
             chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat template"),
             compare_dense: bool = typer.Option(False, "--compare-dense", help="also run the prompt without the fast "
                                                "modules; print the speed-up and whether the tokens match"),
             device: str = typer.Option("auto", "--device", help="cpu, cuda or auto [default: cuda if available]"),
             decode_path: str = typer.Option("auto", "--decode-path", help="auto (the lean path where it covers the "
                                             "model, else HF generate), lean, lean-torch (the lean path without "
                                             "its native step) or hf; --compare-dense uses the same"),
             layouts: str = typer.Option("auto", "--layouts", help="auto (pruned weights in the layout measured "
                                         "fastest here for decoding, dense where none wins), measure (auto "
                                         "after measuring the layout-table entries this machine lacks: about 1.5 s "
                                         "each, kept for next time) or none (as saved)")):
    """Stream greedy text from an output with its fast modules; tokens/s of prefill and decode on the last line.

    The fast modules are those ``load_output(fast=True, layouts=...)`` picks
    (activation-sparse FFNs, MoE FFNs; layouts a recipe converted to; with
    ``--layouts auto``, pruned weights in the layout the measured table rates
    fastest, or dense, which stderr says). Decoding runs on
    the lean path (``sparsify_core.lean``: static KV cache, one native call per
    token where the kernels cover the model, else one plain step per layer)
    for llama-style models, as ``sparsify bench`` case 4 does, and
    through HF ``generate`` otherwise; stderr names the path. Text streams to
    stdout; the numbers are the last line of stdout.
    """
    import torch

    from .generation import PATHS, timed_generate
    from .output import LAYOUT_CHOICES, load_output

    if (prompt is None) == (prompt_file is None):
        raise SparsifyError("give the prompt as --prompt TEXT or --prompt-file FILE (one of them)")
    if decode_path not in PATHS:
        raise SparsifyError(f"--decode-path {decode_path}: choose {', '.join(PATHS)}")
    if layouts not in LAYOUT_CHOICES:
        raise SparsifyError(f"--layouts {layouts}: choose {', '.join(LAYOUT_CHOICES[:-1])} or {LAYOUT_CHOICES[-1]}")
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_text()
        except OSError as exc:
            raise SparsifyError(f"--prompt-file {prompt_file}: {exc.strerror or exc}") from None
    dev = _pick_device(device)
    loaded = load_output(output, device=dev, fast=True, layouts=layouts)
    tok = loaded.tokenizer
    if loaded.manifest.get("task", "causal_lm") != "causal_lm" or not hasattr(loaded.model, "generate"):
        raise SparsifyError(f"{output}: an encoder model; generate needs a causal LM output")
    if tok is None:
        raise SparsifyError(f"{output}: no tokenizer in the output folder")
    if chat:
        if not getattr(tok, "chat_template", None):
            raise SparsifyError(f"{output}: --chat, but the tokenizer has no chat template")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    ids = ids.to(dev)
    tty = sys.stdout.isatty()
    for line in loaded.manifest.get("fast_modules") or ["no fast modules: computing as saved"]:
        err.print(Text(line, style="dim" if tty else ""), highlight=False)
    if tty:
        out.print(Text(prompt, style="bold"), end="" if not chat else "\n", highlight=False)
    else:
        sys.stdout.write(prompt + ("\n" if chat else ""))

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        stats = timed_generate(loaded.model, ids, max_new_tokens, tok, write=write, path=decode_path)
    except ValueError as exc:  # --decode-path lean on a model the lean path does not cover
        raise SparsifyError(f"{output}: {exc}") from None
    err.print(f"decode path: {stats.path}", highlight=False, markup=False)
    line = stats.summary()
    if compare_dense:
        del loaded
        dense = load_output(output, device=dev, fast=False)
        ref = timed_generate(dense.model, ids, max_new_tokens, tok, path=decode_path)
        same = torch.equal(ref.ids, stats.ids)
        line += (f"; without fast modules: prefill {ref.prefill_tokens_per_s:.1f} tok/s, decode "
                 f"{ref.decode_tokens_per_s:.1f} tok/s; decode speed-up "
                 f"{stats.decode_tokens_per_s / ref.decode_tokens_per_s:.2f}x; tokens "
                 + ("identical" if same else "DIFFER"))
    if tty:
        out.print(Text(line, style="green"), highlight=False)
    else:
        print(line, flush=True)


def main() -> None:
    """Console entry point: one-line errors, meaningful exit codes."""
    from .errors import RunInterrupted

    debug = "--debug" in sys.argv or os.environ.get("SPARSIFY_DEBUG") == "1"
    try:
        app(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err.print("aborted", highlight=False)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except RecipeError as exc:
        if debug:
            raise
        err.print(f"error: {exc}", highlight=False, markup=False)
        sys.exit(2)
    except RunInterrupted as exc:
        hint = "" if "--resume" in str(exc) else "; continue with `sparsify run --resume <run id>`"
        err.print(f"interrupted: {exc}{hint}", highlight=False, markup=False)
        sys.exit(130)
    except SparsifyError as exc:
        if debug:
            raise
        err.print(f"error: {exc}", highlight=False, markup=False)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - users get one line; --debug shows the rest
        if debug:
            raise
        text = (str(exc).strip().splitlines() or [""])[0]
        err.print(f"error: {type(exc).__name__}: {text} (run with --debug for the traceback)",
                  highlight=False, markup=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
