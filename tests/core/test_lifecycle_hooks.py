"""The lifecycle hooks keep the contract of ``sparsify_core/hookspecs.py`` on every path.

A spy plugin registered in-process records every lifecycle call of an
in-process ``Runner`` on the tiny model: success, a stage that fails, an
interrupt, failures outside the stages, a failure then a resume, and hook
implementations that raise.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Literal

import pluggy
import pytest
from helpers import tiny_recipe, write

from sparsify_core import Method, Params, SparsifyError, StageResult, hookimpl
from sparsify_core.errors import RunInterrupted
from sparsify_core import hookspecs
from sparsify_core.plugin_manager import Lifecycle, catalog, register, unregister
from sparsify_core.recipe import load_recipe
from sparsify_core.registry import Registry
from sparsify_core.runner import Runner


class Flaky(Method):
    """Until the file ``until`` exists: fail (RuntimeError), or interrupt (Ctrl-C's KeyboardInterrupt, or SIGTERM)."""

    kind = "lifecycle_test"
    name = "flaky"

    class Params(Params):
        until: str
        interrupt: Literal["no", "ctrl-c", "sigterm"] = "no"

    def apply(self, ctx, params):
        if not Path(params.until).exists():
            if params.interrupt == "ctrl-c":
                raise KeyboardInterrupt
            if params.interrupt == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # the runner's handler raises RunInterrupted here
            raise RuntimeError("flaky stage says no")
        return StageResult(metrics={"passed": 1.0})


class Stages:
    @hookimpl
    def sparsify_methods(self):
        return [Flaky]


class Spy:
    """Records every lifecycle call as a tuple: the hook's short name and what identifies the call."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.stage_metrics: dict[tuple[int, str], dict] = {}

    @hookimpl
    def sparsify_run_started(self, run_id, recipe, resumed):
        self.calls.append(("run_started", resumed))

    @hookimpl
    def sparsify_stage_started(self, run_id, index, stage):
        self.calls.append(("stage_started", index, stage.name))

    @hookimpl
    def sparsify_metrics_logged(self, run_id, stage, step, metrics):
        self.calls.append(("metrics_logged", stage, step))

    @hookimpl
    def sparsify_stage_finished(self, run_id, index, stage, status, metrics):
        self.calls.append(("stage_finished", index, status))
        self.stage_metrics[(index, status)] = metrics

    @hookimpl
    def sparsify_run_finished(self, run_id, status, reason):
        self.calls.append(("run_finished", status, reason))


class Broken:
    """Every lifecycle hook raises: the run must neither end nor lose its own error because of it."""

    def __init__(self):
        self.raised = 0

    def _raise(self):
        self.raised += 1
        raise ValueError("tracker down")

    @hookimpl(tryfirst=True)  # called before the spy: the spy must still see every call
    def sparsify_run_started(self, run_id, recipe, resumed):
        self._raise()

    @hookimpl(tryfirst=True)
    def sparsify_stage_started(self, run_id, index, stage):
        self._raise()

    @hookimpl(tryfirst=True)
    def sparsify_metrics_logged(self, run_id, stage, step, metrics):
        self._raise()

    @hookimpl(tryfirst=True)
    def sparsify_stage_finished(self, run_id, index, stage, status, metrics):
        self._raise()

    @hookimpl(tryfirst=True)
    def sparsify_run_finished(self, run_id, status, reason):
        self._raise()


@pytest.fixture
def plugins():
    """Register plugin objects in-process; unregistered (and the catalog rebuilt) afterwards."""
    added = []

    def add(plugin):
        register(plugin)
        added.append(plugin)
        return plugin

    add(Stages())
    yield add
    for plugin in added:
        unregister(plugin)


@pytest.fixture
def spy(plugins):
    return plugins(Spy())


RELU = "  - kind: substitute_activation\n    method: relu\n"
PRUNE = "  - kind: prune\n    method: magnitude\n    params: {sparsity: 0.5}\n"


def flaky(until: Path, interrupt: str = "no") -> str:
    return (f"  - kind: lifecycle_test\n    method: flaky\n"
            f"    params: {{until: {until}, interrupt: {interrupt}}}\n")


def _runner(tmp_path, stages: str, *, resume_id=None, **recipe_kw) -> Runner:
    path = write(tmp_path / "r.yaml", tiny_recipe(stages, **recipe_kw))
    return Runner(load_recipe(path), Registry(f"sqlite:///{tmp_path}/registry.db"), resume_id=resume_id,
                  runs_dir=tmp_path / "runs")


def _stage(index: int, name: str, status: str = "completed", evaluated: bool = True) -> list[tuple]:
    return ([("stage_started", index, name), ("stage_finished", index, status)]
            + ([("metrics_logged", name, None)] if evaluated else []))


def test_success(tmp_path, spy, one_thread):
    run_id = _runner(tmp_path, RELU + PRUNE).run()
    assert spy.calls == [("run_started", False), ("metrics_logged", "dense", None),
                         *_stage(0, "relu"), *_stage(1, "magnitude"), ("run_finished", "finished", None)]
    assert {"stage_seconds", "peak_memory_mb"} <= set(spy.stage_metrics[(1, "completed")])
    assert Registry(f"sqlite:///{tmp_path}/registry.db").get_run(run_id).status == "finished"


def test_failing_stage(tmp_path, spy, one_thread):
    with pytest.raises(SparsifyError, match="flaky stage says no") as err:
        _runner(tmp_path, RELU + flaky(tmp_path / "never") + PRUNE).run()
    reason = spy.calls[-1][2]
    assert "flaky stage says no" in reason and reason in str(err.value)
    assert spy.calls == [("run_started", False), ("metrics_logged", "dense", None), *_stage(0, "relu"),
                         ("stage_started", 1, "flaky"), ("stage_finished", 1, "failed"),
                         ("run_finished", "failed", reason)]
    assert list(spy.stage_metrics[(1, "failed")]) == ["stage_seconds"]
    assert spy.stage_metrics[(1, "failed")]["stage_seconds"] >= 0


@pytest.mark.parametrize("how,reason", [("ctrl-c", "interrupted (Ctrl-C)"), ("sigterm", "stopped by SIGTERM")])
def test_interrupted_stage(tmp_path, spy, one_thread, how, reason):
    with pytest.raises(RunInterrupted, match=reason.replace("(", r"\(").replace(")", r"\)")) as excinfo:
        _runner(tmp_path, RELU + flaky(tmp_path / "never", interrupt=how) + PRUNE).run()
    assert spy.calls == [("run_started", False), ("metrics_logged", "dense", None), *_stage(0, "relu"),
                         ("stage_started", 1, "flaky"), ("stage_finished", 1, "interrupted"),
                         ("run_finished", "interrupted", reason)]
    (run,) = Registry(f"sqlite:///{tmp_path}/registry.db").find_runs()
    assert run.status == "interrupted" and [s.status for s in run.stages] == ["completed", "interrupted"]
    assert f"sparsify run --resume {run.id}" in str(excinfo.value)  # the user is told which run to resume


def test_failure_then_resume(tmp_path, spy, one_thread):
    release = tmp_path / "release"
    stages = RELU + flaky(release) + PRUNE
    with pytest.raises(SparsifyError):
        _runner(tmp_path, stages).run()
    (run,) = Registry(f"sqlite:///{tmp_path}/registry.db").find_runs()
    spy.calls.clear()
    release.write_text("go")
    assert _runner(tmp_path, stages, resume_id=run.id).run() == run.id
    # The dense baseline and the completed relu stage are not reported again; the failed stage starts again.
    assert spy.calls == [("run_started", True), *_stage(1, "flaky"), *_stage(2, "magnitude"),
                         ("run_finished", "finished", None)]


def test_resume_of_a_run_that_failed_in_its_first_stage(tmp_path, spy, one_thread):
    release = tmp_path / "release"
    stages = flaky(release) + RELU
    with pytest.raises(SparsifyError):
        _runner(tmp_path, stages).run()
    (run,) = Registry(f"sqlite:///{tmp_path}/registry.db").find_runs()
    spy.calls.clear()
    release.write_text("go")
    _runner(tmp_path, stages, resume_id=run.id).run()
    assert spy.calls == [("run_started", True), *_stage(0, "flaky"), *_stage(1, "relu"),
                         ("run_finished", "finished", None)]


def test_failure_before_the_first_stage(tmp_path, spy, one_thread):
    # The data source holds far fewer tokens than the eval split asks for: loading the data fails.
    splits = {"calibration": {"samples": 4}, "eval": {"samples": 10_000_000}}
    with pytest.raises(SparsifyError, match="eval"):
        _runner(tmp_path, RELU, splits=splits).run()
    assert [c[:2] for c in spy.calls] == [("run_started", False), ("run_finished", "failed")]


def test_failure_while_saving_the_output(tmp_path, spy, one_thread):
    blocker = write(tmp_path / "not-a-folder", "")  # the output folder would have to be inside a file
    with pytest.raises(SparsifyError):
        _runner(tmp_path, RELU, output={"save": True, "dir": str(blocker / "out")}).run()
    reason = spy.calls[-1][2]
    assert "Not a directory" in reason
    assert spy.calls == [("run_started", False), ("metrics_logged", "dense", None), *_stage(0, "relu"),
                         ("run_finished", "failed", reason)]
    (run,) = Registry(f"sqlite:///{tmp_path}/registry.db").find_runs()
    assert run.status == "failed" and [s.status for s in run.stages] == ["completed"]


def test_a_raising_hook_is_a_warning_and_hides_nothing(tmp_path, plugins, spy, one_thread, capsys):
    broken = plugins(Broken())
    with pytest.raises(SparsifyError, match="flaky stage says no"):
        _runner(tmp_path, RELU + flaky(tmp_path / "never")).run()
    # The spy, called after the broken tracker, saw the whole failed run.
    assert spy.calls == [("run_started", False), ("metrics_logged", "dense", None), *_stage(0, "relu"),
                         ("stage_started", 1, "flaky"), ("stage_finished", 1, "failed"),
                         ("run_finished", "failed", spy.calls[-1][2])]
    assert broken.raised == len(spy.calls)
    err = capsys.readouterr().err
    assert err.count("ValueError: tracker down") == len(spy.calls)
    assert "sparsify_stage_finished raised ValueError" in err


def test_lifecycle_calls_one_implementation_at_a_time():
    """pluggy's order (tryfirst first, then last registered first); a raise or a wrapper is a warning."""
    calls, warnings = [], []
    impl = pluggy.HookimplMarker("sparsify")

    class Plugin:
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        @impl
        def sparsify_run_finished(self, run_id, status):  # a subset of the arguments, as pluggy allows
            calls.append((self.name, run_id, status))
            if self.fail:
                raise OSError("disk full")

    class First(Plugin):
        @impl(tryfirst=True)
        def sparsify_run_finished(self, run_id, status):
            calls.append((self.name, run_id, status))

    class Wrapper:
        @impl(wrapper=True)
        def sparsify_run_finished(self):
            calls.append("wrapper")
            return (yield)

    pm = pluggy.PluginManager("sparsify")
    pm.add_hookspecs(hookspecs)
    for plugin, name in ((First("first"), "first"), (Plugin("a", fail=True), "a"), (Plugin("b"), "b"),
                         (Wrapper(), "wrap")):
        pm.register(plugin, name=name)
    Lifecycle(pm, warn=warnings.append).sparsify_run_finished(run_id="r", status="failed", reason="x")
    assert calls == [("first", "r", "failed"), ("b", "r", "failed"), ("a", "r", "failed")]
    assert warnings == ["warning: plugin 'wrap' sparsify_run_finished hook wrappers are not supported for "
                        "lifecycle hooks; skipped",
                        "warning: plugin 'a' sparsify_run_finished raised OSError: disk full"]

    class Interrupting(Plugin):
        @impl
        def sparsify_run_finished(self, run_id, status):
            raise KeyboardInterrupt

    pm.register(Interrupting("i"), name="i")
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in a hook still interrupts
        Lifecycle(pm, warn=warnings.append).sparsify_run_finished(run_id="r", status="failed", reason="x")
