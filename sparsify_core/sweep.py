"""Running a sweep: every point of a recipe's grid as one run, recorded under one sweep id.

``recipe.load_sweep`` expands and validates the grid (nothing is loaded);
``run_sweep`` records the sweep and its points, then claims the points one at
a time from the registry and runs each through the ordinary ``Runner``.
Resuming a sweep (``sparsify run --resume SWEEP_ID``) re-expands the recipe
recorded with it and, point by point, skips finished runs, resumes the
interrupted or failed ones from their last checkpoint, and starts the points
that never ran. A failed point does not stop the sweep; an interrupted one does.

Several processes, on one machine or many sharing a registry server, can work
on one sweep (``--worker``): each claims the next point nobody works on
(``Registry.claim_sweep_point``, atomic in the database) and keeps a heartbeat
while it runs it; a point whose claimant stops beating for ``stale_after``
seconds is reclaimed by another worker, and its run that was left ``running``
is marked ``interrupted``. Workers stay until every point is finished or
failed, so that they can take over the point of one that dies.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import progress
from .errors import SparsifyError
from .recipe import SweepPlan, check_sweep, load_sweep
from .registry import STALE_AFTER_S, Claim


@dataclass
class SweepOutcome:
    """What one invocation did: the sweep id and the run ids by what happened to them."""

    sweep_id: str
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # run ids finished before, or point names running elsewhere
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run id or point name, reason)


def plan_from_record(sweep) -> SweepPlan:
    """The plan of a recorded sweep, from the recipe text and overrides recorded with it."""
    plan = load_sweep(sweep.recipe_path or f"<sweep {sweep.id}>", list(sweep.overrides or []),
                      text=sweep.recipe_text)
    if plan is None:
        raise SparsifyError(f"sweep {sweep.id}: its recorded recipe has no sweep")
    return plan


def record_sweep(plan: SweepPlan, registry) -> str:
    """Record a new sweep and its points (all ``pending``); returns its id. Checks every point first."""
    check_sweep(plan)  # a point the model cannot take stops the sweep before anything is recorded
    sweep_id = registry.create_sweep(name=plan.name, recipe_text=plan.text, recipe_path=plan.path,
                                     overrides=plan.overrides, grid=plan.spec.grid, points=len(plan.points))
    registry.add_sweep_points(sweep_id, [p.key for p in plan.points])
    return sweep_id


def run_sweep(plan: SweepPlan, registry, *, runs_dir: str | Path, resume_id: str | None = None,
              worker: bool = False, stale_after: float = STALE_AFTER_S,
              poll_s: float | None = None) -> SweepOutcome:
    """Run the points of ``plan`` (a new sweep, or continue the recorded sweep ``resume_id``).

    Alone (``worker`` False) this process runs every point nobody else
    works on, in grid order; resuming retries the failed points too. As a
    ``worker`` it shares the sweep with other processes: it leaves failed
    points alone and, once no point is left to claim, waits (polling every
    ``poll_s`` seconds, default ``stale_after``/4 up to 10 s) until the points
    running elsewhere finish, taking over any whose claimant stopped for
    ``stale_after`` seconds. Raises ``RunInterrupted`` when a run is
    interrupted (its point is released for others first).
    """
    from .runner import RunInterrupted

    if stale_after <= 0:
        raise SparsifyError(f"the heartbeat timeout must be positive, not {stale_after}")
    if resume_id is None:
        sweep_id = record_sweep(plan, registry)
    else:
        check_sweep(plan)
        sweep_id = registry.get_sweep(resume_id).id
        registry.add_sweep_points(sweep_id, [p.key for p in plan.points])  # sweeps recorded before schema v8
        if not worker:
            registry.retry_failed_sweep_points(sweep_id)
    points = {p.index: p for p in plan.points}
    state = registry.sweep_points(sweep_id)
    outcome = SweepOutcome(sweep_id, skipped=[s.run_id for s in state if s.status == "finished"])
    progress.info(f"sweep {sweep_id}: {plan.name}, {len(plan.points)} runs"
                  + (f" ({len(outcome.skipped)} finished before)" if outcome.skipped else "")
                  + (f"; worker, heartbeat timeout {stale_after:g} s" if worker else ""))
    poll = poll_s if poll_s is not None else min(stale_after / 4, 10.0)
    while True:
        claim = registry.claim_sweep_point(sweep_id, stale_after=stale_after)
        if claim is None:
            running = [s for s in registry.sweep_points(sweep_id) if s.status == "running"]
            if worker and running:
                time.sleep(poll)
                continue
            for s in running:
                name = points[s.idx].loaded.recipe.name
                progress.info(f"sweep {sweep_id}: {name} is running elsewhere ({s.worker}); skipped")
                outcome.skipped.append(name)
            return outcome
        point = points[claim.idx]
        name = point.loaded.recipe.name
        progress.info(f"sweep {sweep_id}: point {point.index + 1}/{len(plan.points)}: {name}"
                      + (f" (taken over from {claim.reclaimed_from})" if claim.reclaimed_from else ""))
        try:
            with _Heartbeat(registry, claim):
                run_id = _run_point(point, claim, registry, runs_dir)
        except RunInterrupted as exc:
            registry.settle_sweep_point(claim, "pending", reason=str(exc))
            raise RunInterrupted(f"{exc} (sweep {sweep_id} stopped at {name}; resume the whole sweep with "
                                 f"`sparsify run --resume {sweep_id}`)") from None
        except _PointFailed as exc:
            progress.info(f"sweep {sweep_id}: {name} failed: {exc.reason}")
            outcome.failed.append((name, exc.reason))
            _settle(registry, claim, "failed", exc.run_id, exc.reason, name)
            continue
        outcome.finished.append(run_id)
        _settle(registry, claim, "finished", run_id, None, name)


class _PointFailed(Exception):
    def __init__(self, run_id: str | None, reason: str):
        super().__init__(reason)
        self.run_id, self.reason = run_id, reason


def _run_point(point, claim: Claim, registry, runs_dir) -> str:
    """Run (or resume) the claimed point; its run id. Raises ``_PointFailed`` with the run id on failure."""
    from .runner import Runner

    resume = None
    if claim.resume_run is not None:
        prev = registry.get_run(claim.resume_run)
        # its checkpoints are only usable where its folder is (this machine, or a shared file system)
        if prev.workdir and Path(prev.workdir).is_dir():
            resume = prev.id
        else:
            progress.info(f"run {prev.id}'s folder {prev.workdir} is not on this machine: the point starts afresh")
    runner = (Runner(point.loaded, registry, resume_id=resume, runs_dir=runs_dir) if resume else
              Runner(point.loaded, registry, runs_dir=runs_dir, sweep_id=claim.sweep_id, sweep_point=point.key))
    try:
        return runner.run()
    except SparsifyError as exc:
        raise _PointFailed(getattr(runner, "run_id", None), str(exc)) from None


def _settle(registry, claim: Claim, status: str, run_id: str | None, reason: str | None, name: str) -> None:
    if not registry.settle_sweep_point(claim, status, run_id=run_id, reason=reason):
        progress.info(f"sweep {claim.sweep_id}: {name}: this worker's heartbeat stalled and another worker "
                      f"took the point over; run {run_id} stays recorded as {status}")


class _Heartbeat:
    """Beats a claim from a background thread every ``stale_after``/5 seconds while the point runs."""

    def __init__(self, registry, claim: Claim):
        self.registry, self.claim = registry, claim
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat {claim.sweep_id}/{claim.idx}",
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _beat(self) -> None:
        interval = self.claim.stale_after / 5
        while not self.stop.wait(interval):
            try:
                if not self.registry.beat_sweep_point(self.claim):
                    progress.info(f"sweep {self.claim.sweep_id}: point {self.claim.idx} was taken over by another "
                                  "worker (this one stalled past the heartbeat timeout)")
                    return
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not end the run; the next beat retries
                progress.info(f"sweep {self.claim.sweep_id}: heartbeat failed: {str(exc).splitlines()[0]}")


def data_path(grid: dict) -> str | None:
    """The grid path that sets the amount of training (``...train.steps``), for ``sparsify fit``'s D; None if none."""
    found = [key for key in grid if key.endswith("train.steps")]
    return found[0] if len(found) == 1 else None
