"""The shared training loop: schedule, data order, masks, NaN guard, mid-stage resume."""
from __future__ import annotations

import pytest
import torch
from helpers import make_ctx, tiny_model
from pydantic import ValidationError

from sparsify_core.errors import SparsifyError
from sparsify_core.training import TrainCallback, TrainConfig, batch_indices, lr_at, train


def test_lr_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))


def test_batches_are_seeded_epoch_permutations_sharded_by_rank():
    cfg = TrainConfig(steps=10, batch_size=2, grad_accum=2)
    one = torch.cat([batch_indices(10, s, m, cfg, seed=3, rank=0, world=1) for s in range(5) for m in range(2)])
    assert sorted(one[:10].tolist()) == list(range(10))  # an epoch covers every row once
    assert torch.equal(one, torch.cat([batch_indices(10, s, m, cfg, 3, 0, 1) for s in range(5) for m in range(2)]))
    other_seed = torch.cat([batch_indices(10, s, m, cfg, 4, 0, 1) for s in range(5) for m in range(2)])
    assert not torch.equal(one, other_seed)
    r0 = batch_indices(10, 1, 0, cfg, 3, rank=0, world=2)
    r1 = batch_indices(10, 1, 0, cfg, 3, rank=1, world=2)
    assert len(r0) == len(r1) == 2 and not set(r0.tolist()) & set(r1.tolist())


def _cfg(**kw):
    return TrainConfig(**{"steps": 12, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 0, "log_every": 4, **kw})


def test_training_lowers_the_loss_and_logs(tmp_path):
    ctx = make_ctx(tmp_path, tiny_model())
    logged = []
    ctx.log_callback = lambda stage, step, values: logged.append((step, values))
    final = train(ctx, _cfg(steps=30, lr=3e-3))
    assert [s for s, _ in logged] == [4, 8, 12, 16, 20, 24, 28, 30]
    assert logged[-1][1]["loss"] < logged[0][1]["loss"]
    assert {"loss", "lm_loss", "lr", "grad_norm", "tokens_per_s"} <= set(final)


def test_masks_stay_zero_while_training(tmp_path):
    model = tiny_model()
    ctx = make_ctx(tmp_path, model)
    name = "model.layers.0.mlp.up_proj.weight"
    w = dict(model.named_parameters())[name]
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    ctx.masks.set(name, keep)
    ctx.masks.apply(model)
    train(ctx, _cfg(lr=1e-2))
    assert torch.all(w[~keep] == 0) and torch.all(w[keep] != 0)


def test_frozen_parameters_do_not_move_and_are_released_after(tmp_path):
    model = tiny_model()
    ctx = make_ctx(tmp_path, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(ctx, _cfg(lr=1e-2, freeze=["embed_tokens", r"layers\.0\.self_attn"]))
    after = dict(model.named_parameters())
    frozen = [n for n in before if "embed_tokens" in n or "layers.0.self_attn" in n]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(SparsifyError, match="no trainable parameters"):
        train(ctx, _cfg(freeze=["."]))
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValidationError) as info:
        _cfg(freeze=["embed", "("])
    (error,) = info.value.errors()
    assert error["loc"] == ("freeze",) and "invalid regex '(': missing )" in error["msg"]


def test_kd_loss_is_zero_against_itself_at_start(tmp_path):
    ctx = make_ctx(tmp_path, tiny_model())
    final = train(ctx, _cfg(steps=1, lm_weight=0.0, kd_weight=1.0, lr=1e-9))
    assert final["kd_loss"] == pytest.approx(0.0, abs=1e-6)


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    ctx = make_ctx(tmp_path, tiny_model())

    class Explode(TrainCallback):
        def penalty(self, step):
            return (torch.tensor(float("nan")) if step == 7 else None), {}

    with pytest.raises(SparsifyError, match="the loss became nan at step 7.*last good checkpoint"):
        train(ctx, _cfg(checkpoint_every=5), [Explode()])
    assert (tmp_path / "train-stage--1" / "loop.json").exists()


class _Stop(Exception):
    pass


def test_mid_stage_resume_matches_an_uninterrupted_run(tmp_path):
    full = tiny_model()
    train(make_ctx(tmp_path / "a", full), _cfg(checkpoint_every=4))

    class Crash(TrainCallback):
        def after_step(self, step):
            if step == 9:
                raise _Stop()
            return {}

    model = tiny_model()
    ctx = make_ctx(tmp_path / "b", model)
    with pytest.raises(_Stop):
        train(ctx, _cfg(checkpoint_every=4), [Crash()])
    resumed = tiny_model()  # a fresh process would load the model anew
    ctx = make_ctx(tmp_path / "b", resumed)
    ctx.resume_stage = ctx.stage_index
    steps = []
    ctx.log_callback = lambda stage, step, values: steps.append(step)
    train(ctx, _cfg(checkpoint_every=4))
    assert steps == [12]  # continued from the step-8 checkpoint: only steps 9-12 ran
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, msg=n)


def test_a_checkpoint_of_the_first_format_still_resumes(tmp_path):
    """Mid-stage checkpoints written before sharded ones (model.safetensors, optimizer.pt, loop.json without
    "format") resume a run in one process to the uninterrupted result."""
    import json

    from safetensors.torch import save_model

    full = tiny_model()
    train(make_ctx(tmp_path / "a", full), _cfg())

    class OldWriter(TrainCallback):  # what _save wrote in format 1, at step 8, then the process dies
        def start(self, loop):
            self.loop = loop

        def after_step(self, step):
            if step == 7:
                folder = tmp_path / "b" / "train-stage--1"
                folder.mkdir(parents=True)
                save_model(self.loop.model, str(folder / "model.safetensors"))
                torch.save(self.loop.optimizer.state_dict(), folder / "optimizer.pt")
                (folder / "loop.json").write_text(json.dumps({"step": 8, "callbacks": []}))
                raise _Stop()
            return {}

    with pytest.raises(_Stop):
        train(make_ctx(tmp_path / "b", tiny_model()), _cfg(checkpoint_every=0), [OldWriter()])
    resumed = tiny_model()
    ctx = make_ctx(tmp_path / "b", resumed)
    ctx.resume_stage = ctx.stage_index
    train(ctx, _cfg(checkpoint_every=0))
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, msg=n)
