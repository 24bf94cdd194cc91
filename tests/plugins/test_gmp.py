"""Gradual magnitude pruning: the schedule math alone, then the schedule inside the shared training loop."""
from __future__ import annotations

import pytest
import torch
from helpers import make_ctx, tiny_model, tiny_recipe
from pydantic import ValidationError

from sparsify_core.training import TrainCallback, TrainConfig, train
from sparsify_plugins.prune import GMP, cubic_sparsity, is_pruning_step, nm_keep, pruning_progress, pruning_window
from sparsify_plugins.prune.gmp import GMPParams
from sparsify_plugins.prune.schedule import schedule_table


def test_cubic_schedule_values():
    assert cubic_sparsity(0.8, 0.0) == 0.0 and cubic_sparsity(0.8, 1.0) == pytest.approx(0.8)
    assert cubic_sparsity(0.8, 0.5) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert cubic_sparsity(0.8, 2.0) == pytest.approx(0.8) and cubic_sparsity(0.8, -1) == 0.0
    values = [cubic_sparsity(0.5, p / 20) for p in range(21)]
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(d > 0 for d in steps) and all(b < a for a, b in zip(steps, steps[1:]))  # fast first, then slower


def test_window_and_pruning_steps():
    assert pruning_window(100, 0.25, 0.75) == (25, 75)
    assert pruning_window(3, 0.9, 1.0) == (2, 3)  # always at least one step
    assert pruning_window(10, 0.0, 0.01) == (0, 1)
    with pytest.raises(ValueError):
        pruning_window(10, 0.5, 0.5)
    first, last = pruning_window(100, 0.25, 0.75)
    ts = [t for t in range(1, 101) if is_pruning_step(t, first, last, 10)]
    assert ts == [35, 45, 55, 65, 75]
    ts = [t for t in range(1, 101) if is_pruning_step(t, first, last, 20)]
    assert ts == [45, 65, 75]  # the end of the window is always a pruning step
    assert pruning_progress(25, first, last) == 0 and pruning_progress(50, first, last) == 0.5
    table = schedule_table(100, 0.25, 0.75, 10, 0.6)
    assert table[-1] == (75, pytest.approx(0.6)) and [s for _, s in table] == sorted(s for _, s in table)


def test_nm_ramp_reaches_the_pattern():
    assert nm_keep(2, 4, 0.0) == 4 and nm_keep(2, 4, 1.0) == 2
    assert [nm_keep(1, 8, p / 4) for p in range(5)] == [8, 4, 2, 1, 1]  # zeros 7 x (1 - (1 - p)^3), rounded
    assert all(nm_keep(2, 4, p / 10) >= nm_keep(2, 4, (p + 1) / 10) for p in range(10))


def test_params_validate():
    GMPParams(sparsity=0.0)  # a dense control run in a sweep
    with pytest.raises(ValidationError, match="before end"):
        GMPParams(sparsity=0.5, start=0.8, end=0.5)
    with pytest.raises(ValidationError, match="fixes the sparsity"):
        GMPParams(sparsity=0.3, pattern="2:4")
    with pytest.raises(ValidationError, match="scope global"):
        GMPParams(pattern="2:4", scope="global")


def _cfg(**kw):
    return TrainConfig(**{"steps": 20, "batch_size": 2, "lr": 3e-3, "checkpoint_every": 0, "log_every": 1, **kw})


def _schedule(ctx, **params):
    """Run the gmp stage on ``ctx`` and queue its schedule, as the engine does."""
    p = GMPParams(**{"every": 2, **params})
    result = GMP().apply(ctx, p)
    ctx.train_callbacks.append(GMP().training_callback(ctx, p, result))
    return result


def _sparsity(model, name):
    w = dict(model.named_parameters())[name]
    return float((w == 0).float().mean())


def test_gmp_follows_the_schedule_during_training(tmp_path):
    model = tiny_model()
    ctx = make_ctx(tmp_path, model)
    result = _schedule(ctx, sparsity=0.75)
    assert result.metrics["modules_scheduled"] == 14 and not ctx.masks  # nothing pruned before training
    logged = []
    ctx.log_callback = lambda stage, step, values: logged.append((step, values))
    train(ctx, _cfg())
    assert not ctx.train_callbacks  # taken by the training stage
    curve = {step: values["weight_sparsity"] for step, values in logged if step is not None}
    # the final sparsity is also a stage metric of the training stage, logged once the window ends
    assert [values for step, values in logged if step is None] == [{"gmp_sparsity": pytest.approx(0.75, abs=1e-3)}]
    first, last = pruning_window(20, 0.25, 0.75)
    for t, s in curve.items():  # between pruning steps the sparsity holds; at them it follows the cubic law
        at = max([u for u in range(first + 1, t + 1) if is_pruning_step(u, first, last, 2)], default=None)
        want = 0.0 if at is None else cubic_sparsity(0.75, pruning_progress(at, first, last))
        assert s == pytest.approx(want, abs=0.01), t
    for name in result.info["module_sparsity"]:
        assert _sparsity(model, f"{name}.weight") == pytest.approx(0.75, abs=1e-3), name
        assert f"{name}.weight" in ctx.masks
    assert _sparsity(model, "lm_head.weight") == 0  # never targeted unless asked


def test_gmp_nm_and_global(tmp_path):
    model = tiny_model()
    ctx = make_ctx(tmp_path, model)
    _schedule(ctx, pattern="2:4", end=0.5)
    train(ctx, _cfg(steps=8))
    w = model.model.layers[1].mlp.down_proj.weight
    assert torch.all((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2)

    model = tiny_model()
    ctx = make_ctx(tmp_path, model)
    result = _schedule(ctx, sparsity=0.6, scope="global", targets=[r"mlp\."])
    train(ctx, _cfg(steps=8))
    ws = [dict(model.named_parameters())[f"{n}.weight"] for n in result.info["module_sparsity"]]
    assert len(ws) == 6
    zeros = sum(int((w == 0).sum()) for w in ws)
    assert zeros == round(0.6 * sum(w.numel() for w in ws))
    assert len({round(float((w == 0).float().mean()), 3) for w in ws}) > 1  # one threshold, not per matrix


def test_masks_stay_zero_in_a_later_training_stage(tmp_path):
    model = tiny_model()
    ctx = make_ctx(tmp_path, model)
    _schedule(ctx, sparsity=0.5)
    train(ctx, _cfg(steps=8))
    pruned = {n: (p == 0).clone() for n, p in model.named_parameters() if n in ctx.masks}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(ctx, _cfg(steps=6, lr=1e-2))  # a second stage: no schedule left, masks kept
    for n, p in model.named_parameters():
        if n in pruned:
            assert torch.all(p[pruned[n]] == 0) and torch.all(p[~pruned[n]] != 0)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight)


class _Stop(Exception):
    pass


def test_mid_stage_resume_keeps_schedule_and_masks(tmp_path):
    full = tiny_model()
    ctx = make_ctx(tmp_path / "a", full)
    _schedule(ctx, sparsity=0.5)
    train(ctx, _cfg(steps=16, checkpoint_every=4))

    class Crash(TrainCallback):
        def __init__(self, at):
            self.at = at

        def after_step(self, step):
            if step == self.at:
                raise _Stop()
            return {}

    ctx = make_ctx(tmp_path / "b", tiny_model())
    _schedule(ctx, sparsity=0.5)
    with pytest.raises(_Stop):
        train(ctx, _cfg(steps=16, checkpoint_every=4), [Crash(9)])
    resumed = tiny_model()  # a new process: fresh model, empty masks, the schedule handed over again
    ctx = make_ctx(tmp_path / "b", resumed)
    _schedule(ctx, sparsity=0.5)
    ctx.resume_stage = ctx.stage_index
    train(ctx, _cfg(steps=16, checkpoint_every=4), [Crash(None)])  # the same callbacks as before the crash
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, msg=n)
    assert len(ctx.masks) == 14


GMP_RECIPE = tiny_recipe("""\
  - kind: prune
    method: gmp
    params: {sparsity: 0.5, every: 2}
  - kind: train
    method: finetune
    params: {train: {steps: 8, batch_size: 4, lr: 3.0e-3, checkpoint_every: 4}}
  - kind: train
    method: finetune
    name: again
    params: {train: {steps: 2, batch_size: 4, lr: 1.0e-2}}
""", name="gmp-tiny", seed=None, splits={"train": {"samples": 16}, "eval": {"samples": 4}},
    evaluate={"after": "last", "metrics": ["perplexity", "weight_sparsity"], "batch_size": 4},
    output={"dir": "OUT/{run_id}"})


def test_recipe_needs_a_training_stage_after_gmp(workdir):
    from helpers import sparsify, write

    text = GMP_RECIPE.split("  - kind: train")[0] + "evaluate: {after: all}\n"
    path = write(workdir / "bad.yaml", text)
    proc = sparsify("validate", path, cwd=workdir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "method: gmp" in ln)
    assert f"bad.yaml:{line}: stages.0.method: prune/gmp acts during training" in proc.stderr
    assert "train, method: finetune" in proc.stderr


def test_gmp_recipe_resumes_mid_stage_and_saves_exact_zeros(workdir, monkeypatch):
    from sparsify_core import load_output
    from sparsify_core.recipe import load_recipe
    from sparsify_core.registry import Registry
    from sparsify_core.runner import Runner
    from sparsify_plugins.prune.gmp import GMPSchedule

    text = GMP_RECIPE.replace("OUT", str(workdir / "out"))
    reg = Registry(str(workdir / "r.db"))
    (workdir / "gmp.yaml").write_text(text)
    straight = Runner(load_recipe(workdir / "gmp.yaml"), reg, runs_dir=workdir / "runs").run()

    original = GMPSchedule.after_step

    def crash_once(self, step):  # the process dies at step 7 of the first finetune stage
        if step == 6 and not getattr(GMPSchedule, "crashed", False):
            GMPSchedule.crashed = True
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(GMPSchedule, "after_step", crash_once)
    with pytest.raises(Exception, match="interrupted"):
        Runner(load_recipe(workdir / "gmp.yaml"), reg, runs_dir=workdir / "runs").run()
    (stopped,) = reg.find_runs(status="interrupted")
    assert [s.status for s in stopped.stages] == ["completed", "interrupted"]
    Runner(load_recipe(workdir / "gmp.yaml"), reg, resume_id=stopped.id, runs_dir=workdir / "runs").run()

    outs = [load_output(workdir / "out" / run_id) for run_id in (straight, stopped.id)]
    for (name, a), b in zip(outs[0].model.named_parameters(), outs[1].model.parameters()):
        torch.testing.assert_close(a, b, msg=name)  # the resumed run is the uninterrupted one
    out = outs[1]
    assert len(out.masks) == 14
    params = dict(out.model.named_parameters())
    for name, keep in out.masks.items():
        assert (params[name][~keep] == 0).all() and (params[name][keep] != 0).all(), name
        assert float((~keep).float().mean()) == pytest.approx(0.5, abs=1e-3)
    run = reg.get_run(stopped.id)
    final = {m.name: m.value for m in run.metrics if m.stage == "again" and m.layer is None and m.step is None}
    assert final["weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
