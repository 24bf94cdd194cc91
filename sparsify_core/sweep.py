"""Running a sweep: every point of a recipe's grid as one run, recorded under one sweep id.

``recipe.load_sweep`` expands and validates the grid (nothing is loaded);
``run_sweep`` records the sweep and runs its points one after the other
through the ordinary ``Runner``. Resuming a sweep (``sparsify run --resume
SWEEP_ID``) re-expands the recipe recorded with it and, point by point, skips
finished runs, resumes the interrupted or failed ones from their last
checkpoint, and starts the points that never ran. A failed point does not stop
the sweep; an interrupted one does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import progress
from .errors import SparsifyError
from .recipe import SweepPlan, check_sweep, load_sweep


@dataclass
class SweepOutcome:
    """What one invocation did: the sweep id and the run ids by what happened to them."""

    sweep_id: str
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run id or point name, reason)


def plan_from_record(sweep) -> SweepPlan:
    """The plan of a recorded sweep, from the recipe text and overrides recorded with it."""
    plan = load_sweep(sweep.recipe_path or f"<sweep {sweep.id}>", list(sweep.overrides or []),
                      text=sweep.recipe_text)
    if plan is None:
        raise SparsifyError(f"sweep {sweep.id}: its recorded recipe has no sweep")
    return plan


def run_sweep(plan: SweepPlan, registry, *, runs_dir: str | Path, resume_id: str | None = None) -> SweepOutcome:
    """Run every point of ``plan`` (a new sweep, or continue the recorded sweep ``resume_id``)."""
    from .runner import Runner, RunInterrupted

    check_sweep(plan)  # a point the model cannot take stops the sweep before anything is recorded
    if resume_id is None:
        sweep_id = registry.create_sweep(name=plan.name, recipe_text=plan.text, recipe_path=plan.path,
                                         overrides=plan.overrides, grid=plan.spec.grid, points=len(plan.points))
        runs: dict[str, object] = {}
    else:
        sweep_id = registry.get_sweep(resume_id).id
        runs = {}
        for rec in sorted(registry.find_runs(sweep_id=sweep_id, details=False), key=lambda r: r.started_at):
            key = _key(rec.sweep_point)
            # a finished run wins; otherwise the latest attempt at the point
            if key not in runs or runs[key].status != "finished":
                runs[key] = rec
    outcome = SweepOutcome(sweep_id)
    progress.info(f"sweep {sweep_id}: {plan.name}, {len(plan.points)} runs"
                  + (f" ({sum(r.status == 'finished' for r in runs.values())} finished before)" if runs else ""))
    for point in plan.points:
        name = point.loaded.recipe.name
        prev = runs.get(point.key)
        if prev is not None and prev.status == "finished":
            outcome.skipped.append(prev.id)
            continue
        if prev is not None and prev.status == "running":
            progress.info(f"sweep {sweep_id}: {name}: run {prev.id} is running elsewhere; skipped")
            outcome.skipped.append(prev.id)
            continue
        progress.info(f"sweep {sweep_id}: point {point.index + 1}/{len(plan.points)}: {name}")
        try:
            if prev is not None:
                run_id = Runner(point.loaded, registry, resume_id=prev.id, runs_dir=runs_dir).run()
            else:
                run_id = Runner(point.loaded, registry, runs_dir=runs_dir, sweep_id=sweep_id,
                              sweep_point=point.key).run()
        except RunInterrupted as exc:
            raise RunInterrupted(f"{exc} (sweep {sweep_id} stopped at {name}; resume the whole sweep with "
                                 f"`sparsify run --resume {sweep_id}`)") from None
        except SparsifyError as exc:
            progress.info(f"sweep {sweep_id}: {name} failed: {exc}")
            outcome.failed.append((name, str(exc)))
            continue
        outcome.finished.append(run_id)
    return outcome


def _key(point) -> str | None:
    import json
    return None if point is None else json.dumps(point, sort_keys=True, default=str)


def data_path(grid: dict) -> str | None:
    """The grid path that sets the amount of training (``...train.steps``), for ``sparsify fit``'s D; None if none."""
    found = [key for key in grid if key.endswith("train.steps")]
    return found[0] if len(found) == 1 else None
