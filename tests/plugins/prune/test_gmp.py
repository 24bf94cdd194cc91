"""Gradual magnitude pruning: the schedule math alone, then the gmp stage training with the shared loop."""
from __future__ import annotations

import pytest
import torch
from helpers import make_ctx, tiny_model, tiny_recipe
from pydantic import ValidationError

from sparsify_core.training import TrainConfig, train
from sparsify_plugins.prune import GMP, GMPSchedule, cubic_sparsity, is_pruning_step, nm_keep, pruning_progress, \
    pruning_window
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


TRAIN = {"steps": 20, "batch_size": 2, "lr": 3e-3, "checkpoint_every": 0, "log_every": 1}


def test_params_validate():
    GMPParams(sparsity=0.0, train=TRAIN)  # a dense control run in a sweep
    with pytest.raises(ValidationError, match="before end"):
        GMPParams(sparsity=0.5, start=0.8, end=0.5, train=TRAIN)
    with pytest.raises(ValidationError, match="fixes the sparsity"):
        GMPParams(sparsity=0.3, pattern="2:4", train=TRAIN)
    with pytest.raises(ValidationError, match="scope global"):
        GMPParams(pattern="2:4", scope="global", train=TRAIN)
    with pytest.raises(ValidationError, match="gmp trains itself now and needs a train: block"):
        GMPParams(sparsity=0.5)  # the old way: a schedule for the training stage after it


def _gmp(ctx, train=None, **params):
    """Run the gmp stage on ``ctx``: it trains, pruning as it goes."""
    return GMP().apply(ctx, GMPParams(**{"every": 2, "train": {**TRAIN, **(train or {})}, **params}))


def _sparsity(model, name):
    w = dict(model.named_parameters())[name]
    return float((w == 0).float().mean())


def test_gmp_follows_the_schedule_during_training(tmp_path):
    model = tiny_model()
    ctx = make_ctx(tmp_path, model)
    logged = []
    ctx.log_callback = lambda stage, step, values: logged.append((step, values))
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    result = _gmp(ctx, sparsity=0.75)
    m = result.metrics
    assert m["modules_pruned"] == 14 and m["target_sparsity"] == pytest.approx(0.75)
    assert m["sparsity"] == pytest.approx(0.75, abs=1e-3) and "final_loss" in m
    curve = {step: values["weight_sparsity"] for step, values in logged if step is not None}
    assert sorted(curve) == list(range(1, 21))
    first, last = pruning_window(20, 0.25, 0.75)
    for t, s in curve.items():  # between pruning steps the sparsity holds; at them it follows the cubic law
        at = max([u for u in range(first + 1, t + 1) if is_pruning_step(u, first, last, 2)], default=None)
        want = 0.0 if at is None else cubic_sparsity(0.75, pruning_progress(at, first, last))
        assert s == pytest.approx(want, abs=0.01), t
    zeros = 0
    for name, share in result.info["module_sparsity"].items():
        assert _sparsity(model, f"{name}.weight") == pytest.approx(0.75, abs=1e-3) == share, name
        assert f"{name}.weight" in ctx.masks
        zeros += int((dict(model.named_parameters())[f"{name}.weight"] == 0).sum())
    assert m["weights_pruned"] == zeros
    assert _sparsity(model, "lm_head.weight") == 0  # never targeted unless asked
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)  # it trained


def test_gmp_nm_and_global(tmp_path):
    model = tiny_model()
    ctx = make_ctx(tmp_path, model)
    _gmp(ctx, {"steps": 8}, pattern="2:4", end=0.5)
    w = model.model.layers[1].mlp.down_proj.weight
    assert torch.all((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2)

    model = tiny_model()
    ctx = make_ctx(tmp_path, model)
    result = _gmp(ctx, {"steps": 8}, sparsity=0.6, scope="global", targets=[r"mlp\."])
    ws = [dict(model.named_parameters())[f"{n}.weight"] for n in result.info["module_sparsity"]]
    assert len(ws) == 6
    zeros = sum(int((w == 0).sum()) for w in ws)
    assert zeros == round(0.6 * sum(w.numel() for w in ws)) == result.metrics["weights_pruned"]
    assert len({round(float((w == 0).float().mean()), 3) for w in ws}) > 1  # one threshold, not per matrix


def test_masks_stay_zero_in_a_later_training_stage(tmp_path):
    model = tiny_model()
    ctx = make_ctx(tmp_path, model)
    _gmp(ctx, {"steps": 8}, sparsity=0.5)
    pruned = {n: (p == 0).clone() for n, p in model.named_parameters() if n in ctx.masks}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(ctx, TrainConfig(**{**TRAIN, "steps": 6, "lr": 1e-2}))  # a later stage: masks kept
    for n, p in model.named_parameters():
        if n in pruned:
            assert torch.all(p[pruned[n]] == 0) and torch.all(p[~pruned[n]] != 0)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight)


class _Stop(Exception):
    pass


def _crash_at(monkeypatch, at: int) -> list[int]:
    """Make the schedule raise after step ``at`` once; returns the steps the schedule sees from then on."""
    original, seen, crashed = GMPSchedule.after_step, [], []

    def after_step(self, step):
        seen.append(step)
        if step == at and not crashed:
            crashed.append(step)
            raise _Stop()
        return original(self, step)

    monkeypatch.setattr(GMPSchedule, "after_step", after_step)
    return seen


@pytest.mark.parametrize("profile", ["uniform", "owl"])
def test_mid_stage_resume_rebuilds_the_schedule_from_params(tmp_path, monkeypatch, profile):
    """A new process resumes inside the gmp stage: the schedule comes from the params and the model the stage
    started from (owl measured again), its state and the masks from the checkpoint; the result is the
    uninterrupted run's."""
    kw = dict(sparsity=0.5, profile=profile, owl_threshold=2.0, owl_lambda=0.15)
    full = tiny_model()
    expected = _gmp(make_ctx(tmp_path / "a", full), {"steps": 16, "checkpoint_every": 4}, **kw)

    seen = _crash_at(monkeypatch, 9)
    with pytest.raises(_Stop):
        _gmp(make_ctx(tmp_path / "b", tiny_model()), {"steps": 16, "checkpoint_every": 4}, **kw)
    seen.clear()
    resumed = tiny_model()  # a new process: fresh model, empty masks, nothing but the params
    ctx = make_ctx(tmp_path / "b", resumed)
    ctx.resume_stage = ctx.stage_index
    got = _gmp(ctx, {"steps": 16, "checkpoint_every": 4}, **kw)
    assert seen == list(range(8, 16))  # continued after the checkpoint at step 8
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, msg=n)
    assert len(ctx.masks) == 14 and got.metrics["sparsity"] == expected.metrics["sparsity"]
    assert got.info == expected.info


GMP_RECIPE = tiny_recipe("""\
  - kind: prune
    method: gmp
    params: {sparsity: 0.5, every: 2, train: {steps: 8, batch_size: 4, lr: 3.0e-3, checkpoint_every: 4}}
  - kind: train
    method: finetune
    name: again
    params: {train: {steps: 2, batch_size: 4, lr: 1.0e-2}}
""", name="gmp-tiny", seed=None, splits={"train": {"samples": 16}, "eval": {"samples": 4}},
    evaluate={"after": "last", "metrics": ["perplexity", "weight_sparsity"], "batch_size": 4},
    output={"dir": "OUT/{run_id}"})

OLD_STYLE = tiny_recipe("""\
  - kind: prune
    method: gmp
    params: {sparsity: 0.5, every: 2}
  - kind: train
    method: finetune
    params: {train: {steps: 8}}
""", splits={"train": {"samples": 16}, "eval": {"samples": 4}})


@pytest.mark.parametrize("stages", ["gmp then finetune", "gmp alone"])
def test_an_old_style_gmp_recipe_is_refused_saying_how_to_write_it(workdir, stages):
    from helpers import write

    from sparsify_core.errors import RecipeError
    from sparsify_core.recipe import load_recipe

    text = OLD_STYLE if stages == "gmp then finetune" else OLD_STYLE.split("  - kind: train")[0] + "evaluate: {}\n"
    with pytest.raises(RecipeError) as err:
        load_recipe(write(workdir / "old.yaml", text))
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "params: {sparsity: 0.5, every: 2}" in ln)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{workdir / 'old.yaml'}:{line}: stages.0.params: ")
    assert "prune/gmp trains itself now and needs a train: block in its params" in message
    assert "move the train: block of the training stage after gmp here" in message


def test_gmp_recipe_resumes_mid_stage_and_saves_exact_zeros(workdir, monkeypatch):
    """The run stops inside gmp, its first stage (so before any stage checkpoint): --resume continues from
    the loop's mid-stage checkpoint and ends where the uninterrupted run does."""
    from sparsify_core import load_output
    from sparsify_core.recipe import load_recipe
    from sparsify_core.registry import Registry
    from sparsify_core.runner import Runner

    text = GMP_RECIPE.replace("OUT", str(workdir / "out"))
    reg = Registry(str(workdir / "r.db"))
    (workdir / "gmp.yaml").write_text(text)
    straight = Runner(load_recipe(workdir / "gmp.yaml"), reg, runs_dir=workdir / "runs").run()

    original = GMPSchedule.after_step
    seen = []

    def crash_once(self, step):  # the process dies at step 7 of the gmp stage
        seen.append(step)
        if step == 6 and not getattr(GMPSchedule, "crashed", False):
            GMPSchedule.crashed = True
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(GMPSchedule, "after_step", crash_once)
    with pytest.raises(Exception, match="interrupted"):
        Runner(load_recipe(workdir / "gmp.yaml"), reg, runs_dir=workdir / "runs").run()
    (stopped,) = reg.find_runs(status="interrupted")
    assert [s.status for s in stopped.stages] == ["interrupted"]
    seen.clear()
    Runner(load_recipe(workdir / "gmp.yaml"), reg, resume_id=stopped.id, runs_dir=workdir / "runs").run()
    assert seen == [4, 5, 6, 7]  # from the mid-stage checkpoint at step 4, not from the start

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
    gmp = {m.name: m.value for m in run.metrics if m.stage == "gmp" and m.layer is None and m.step is None}
    assert gmp["sparsity"] == pytest.approx(0.5, abs=1e-3)
    final = {m.name: m.value for m in run.metrics if m.stage == "again" and m.layer is None and m.step is None}
    assert final["weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
