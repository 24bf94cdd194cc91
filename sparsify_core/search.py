"""Budget search: the largest value of one recipe parameter whose run stays within a quality budget.

``sparsify search RECIPE --vary stages.N.params.X --budget "kl_divergence<=0.1"``
bisects ``X`` over ``[lo, hi]`` with real runs, each recorded and grouped as
one sweep. It assumes quality worsens as ``X`` grows (sparsity, a threshold):
``hi`` is run first (within budget: the answer), then ``lo`` (over budget:
no answer), then midpoints until the bracket is narrower than ``tol`` or
``max_runs`` runs were made. The stages before stage ``N`` do not depend on
``X``: they run once, in a first run of the recipe cut after them (recorded
in the sweep too), and every search run starts from its checkpoint
(``Runner(reuse=...)``). A run's RNG then starts stage ``N`` where the
reused run left it, not where a fresh run would.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import progress
from .errors import SparsifyError

_BUDGET = re.compile(r"^\s*([A-Za-z0-9_./@\-]+)\s*(<=|>=|<|>)\s*(?:([0-9.eE+\-]+)\s*\*\s*dense|dense\s*\*\s*"
                     r"([0-9.eE+\-]+)|([0-9.eE+\-]+))\s*$")
_VARY = re.compile(r"^stages\.(\d+)\.params\.([A-Za-z_][A-Za-z0-9_.]*)$")


@dataclass(frozen=True)
class Budget:
    """``metric op bound``, the bound either absolute or ``factor`` times the run's dense baseline."""

    metric: str
    op: str
    value: float
    relative: bool = False

    def bound(self, dense: float | None) -> float:
        """The bound for a run whose dense baseline is ``dense`` (needed when ``relative``)."""
        if not self.relative:
            return self.value
        if dense is None or not math.isfinite(dense):
            raise SparsifyError(f"--budget: {self.metric} of the dense baseline is not recorded; a relative "
                                f"budget needs it")
        return self.value * dense

    def met(self, value: float, dense: float | None = None) -> bool:
        """Whether ``value`` is within the budget (NaN never is)."""
        if not math.isfinite(value):
            return False
        b = self.bound(dense)
        return {"<=": value <= b, "<": value < b, ">=": value >= b, ">": value > b}[self.op]

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}" + ("*dense" if self.relative else "")


def parse_budget(text: str) -> Budget:
    """``"kl_divergence<=0.1"``, ``"perplexity<=1.05*dense"``, ``"lm_eval/t/acc>=0.95*dense"``: a ``Budget``.

    Raises ``SparsifyError`` (one line, naming ``--budget``) for anything else."""
    m = _BUDGET.match(text or "")
    if m is None:
        raise SparsifyError(f"--budget {text!r}: expected METRIC<=NUMBER or METRIC<=FACTOR*dense (also >=, <, >), "
                            f"e.g. kl_divergence<=0.1 or perplexity<=1.05*dense")
    metric, op, factor, factor2, absolute = m.groups()
    number = factor or factor2 or absolute
    try:
        value = float(number)
    except ValueError:
        raise SparsifyError(f"--budget {text!r}: {number!r} is not a number") from None
    return Budget(metric, op, value, relative=absolute is None)


@dataclass
class Point:
    """One search run: the value tried, the run, the metric it recorded and whether that met the budget."""

    value: float
    run_id: str
    metric: float
    dense: float | None
    ok: bool


@dataclass
class SearchOutcome:
    """The sweep, every point in the order run, and the answer (``None``: no value met the budget)."""

    sweep_id: str
    vary: str
    budget: Budget
    points: list[Point] = field(default_factory=list)
    prefix_run: str | None = None
    answer: Point | None = None
    above: Point | None = None  # the smallest value tried that failed the budget

    def report(self) -> str:
        """The runs (sorted by value) and the answer with its bracketing runs, as printed by the CLI."""
        lines = [f"sweep {self.sweep_id}: {self.vary} for {self.budget}"
                 + (f" (stages before it reused from run {self.prefix_run})" if self.prefix_run else "")]
        for p in sorted(self.points, key=lambda p: p.value):
            lines.append(f"  {self.vary}={p.value:<10g} {self.budget.metric} {p.metric:<10.4g} "
                         f"{'within' if p.ok else 'over'} budget  run {p.run_id}")
        if self.answer is None:
            lines.append(f"no value in the range meets {self.budget}")
        else:
            tail = (f" and {self.above.value:g} (run {self.above.run_id}, {self.budget.metric} "
                    f"{self.above.metric:.4g})" if self.above is not None else " (the top of the range)")
            lines.append(f"answer: {self.vary}={self.answer.value:g} ({self.budget.metric} {self.answer.metric:.4g}); "
                         f"bracketed by {self.answer.value:g} (run {self.answer.run_id}){tail}")
        return "\n".join(lines)


def _stage_index(vary: str, loaded) -> tuple[int, str]:
    m = _VARY.match(vary)
    if m is None:
        raise SparsifyError(f"--vary {vary!r}: expected stages.N.params.NAME (a parameter of stage N)")
    index, name = int(m.group(1)), m.group(2)
    if index >= len(loaded.recipe.stages):
        raise SparsifyError(f"--vary {vary!r}: the recipe has {len(loaded.recipe.stages)} stages (0 to "
                            f"{len(loaded.recipe.stages) - 1})")
    return index, name


def _check_measured(base, budget: Budget) -> None:
    """The budget's metric is among what the recipe evaluates after its last stage (else one-line ``SparsifyError``)."""
    from .plugin_manager import catalog

    table = catalog().metrics
    chosen = ([table[n] for n, _ in base.metrics] if base.metrics is not None
              else [c for c in table.values() if c.in_all])
    names = {c.name for c in chosen} | {n for c in chosen for n in c.value_info()}
    if budget.metric not in names and budget.metric.split("/")[0] not in names:
        raise SparsifyError(f"--budget: {budget.metric!r} is not among the recipe's evaluate.metrics "
                            f"({', '.join(sorted(names))})")
    if base.recipe.evaluate.after == "none":
        raise SparsifyError("--budget: the recipe's evaluate.after is none; search reads the evaluation after the "
                            "last stage")


def _metric_of(run_id: str, registry, metric: str) -> tuple[float, float | None]:
    from .registry import final_evaluation, reference_evaluation

    rec = registry.get_run(run_id)
    final, dense = final_evaluation(rec), reference_evaluation(rec)
    if final is None or metric not in final.values:
        recorded = ", ".join(sorted(final.values)) if final is not None else "nothing"
        raise SparsifyError(f"--budget: run {run_id} recorded no {metric!r} after its last stage (recorded: "
                            f"{recorded}); add the metric to evaluate.metrics")
    return final.values[metric], (dense.values.get(metric) if dense is not None else None)


def search(path: str | Path, vary: str, budget: Budget, registry, *, lo: float = 0.0, hi: float = 1.0,
           tol: float = 0.01, max_runs: int = 8, overrides: list[str] | None = None,
           runs_dir: str | Path = "runs") -> SearchOutcome:
    """Bisect ``vary`` over ``[lo, hi]`` for the largest value within ``budget``; see the module docstring.

    Every value is validated (``load_recipe`` with the override) before any
    run, so a bad path or value is a one-line ``RecipeError`` naming the
    field. An integer parameter is bisected over integers. Raises
    ``SparsifyError`` for ``lo >= hi``, ``tol <= 0``, ``max_runs < 2`` or a
    recipe with a ``sweep``.
    """
    from .recipe import load_recipe
    from .runner import Runner

    overrides = list(overrides or [])
    if not lo < hi:
        raise SparsifyError(f"--lo {lo:g} must be below --hi {hi:g}")
    if tol <= 0 or max_runs < 2:
        raise SparsifyError("--tol must be positive and --max-runs at least 2")
    base = load_recipe(path, overrides)
    if base.recipe.sweep is not None:
        raise SparsifyError(f"{path}: the recipe has a sweep; search varies one parameter itself (remove sweep:)")
    index, name = _stage_index(vary, base)
    _check_measured(base, budget)

    def loaded_at(value):
        return load_recipe(path, [*overrides, f"{vary}={value}"])

    integer = isinstance(getattr(loaded_at(lo).stages[index].params, name.split(".")[0], None), int)
    if integer:
        lo, hi, tol = int(math.floor(lo)), int(math.ceil(hi)), max(tol, 1)
    loaded_at(hi)  # both ends valid before anything runs

    sweep_id = registry.create_sweep(name=f"{base.recipe.name}-search", recipe_text=base.text, recipe_path=base.path,
                                     overrides=overrides, grid={vary: [lo, hi], "budget": [str(budget)]},
                                     points=max_runs)
    outcome = SearchOutcome(sweep_id, vary, budget)
    reuse = None
    if index > 0:  # the stages before the varied one, once
        raw = yaml.safe_load(base.text)
        raw["stages"] = raw["stages"][:index]
        raw["name"] = f"{base.recipe.name}-first-{index}"
        raw["output"] = {**(raw.get("output") or {}), "save": False}
        raw["evaluate"] = {**(raw.get("evaluate") or {}), "after": "none"}
        kept = [o for o in overrides if not (re.match(r"stages\.(\d+)", o) and int(o.split(".")[1]) >= index)]
        prefix = load_recipe(path, kept,
                             text=yaml.safe_dump(raw, sort_keys=False))
        progress.info(f"search: stages 1-{index} once, to start every run from")
        runner = Runner(prefix, registry, runs_dir=runs_dir, sweep_id=sweep_id,
                        sweep_point=json.dumps({"stages": index}))
        outcome.prefix_run = runner.run()
        reuse = (outcome.prefix_run, runner.workdir)

    def run(value) -> Point:
        progress.info(f"search: run {len(outcome.points) + 1}/{max_runs}: {vary}={value:g}")
        run_id = Runner(loaded_at(value), registry, runs_dir=runs_dir, sweep_id=sweep_id,
                        sweep_point=json.dumps({vary: value}), reuse=reuse).run()
        metric, dense = _metric_of(run_id, registry, budget.metric)
        point = Point(value, run_id, metric, dense, budget.met(metric, dense))
        outcome.points.append(point)
        progress.info(f"search: {vary}={value:g}: {budget.metric} {metric:.4g} "
                      f"({'within' if point.ok else 'over'} {budget})")
        return point

    top = run(hi)
    if top.ok:
        outcome.answer = top
        return outcome
    bottom = run(lo)
    if not bottom.ok:
        outcome.above = bottom
        return outcome
    good, bad = bottom, top
    while bad.value - good.value > tol * (1 + 1e-9) and len(outcome.points) < max_runs:  # 0.4 - 0.3 > 0.1 in floats
        mid = (good.value + bad.value) / 2
        if integer:
            mid = (good.value + bad.value) // 2
        p = run(mid)
        good, bad = (p, bad) if p.ok else (good, p)
    outcome.answer, outcome.above = good, bad
    return outcome
