"""train/finetune: the shared loop as a stage, with masks kept."""
from __future__ import annotations

import pytest
from helpers import make_ctx, tiny_model
from pydantic import ValidationError

from sparsify_plugins.prune import GMP, Magnitude
from sparsify_plugins.train import Finetune


def _params(**train):
    return Finetune.Params.model_validate({"train": {"steps": 12, "batch_size": 2, "lr": 3e-3,
                                                     "checkpoint_every": 0, **train}})


def test_finetune_trains_and_reports(tmp_path):
    ctx = make_ctx(tmp_path, tiny_model())
    logged = []
    ctx.log_callback = lambda stage, step, values: logged.append(values["loss"])
    result = Finetune().apply(ctx, _params(log_every=2))
    assert logged[-1] < logged[0]
    assert {"final_loss", "final_lm_loss"} <= set(result.metrics)
    with pytest.raises(ValidationError, match="steps"):
        Finetune.Params.model_validate({"train": {}})


def test_finetune_keeps_pruned_weights(tmp_path):
    model = tiny_model()
    ctx = make_ctx(tmp_path, model)
    Magnitude().apply(ctx, Magnitude.Params(sparsity=0.5))
    Finetune().apply(ctx, _params(kd_weight=1.0, lm_weight=0.5))
    for name, keep in ctx.masks.items():
        w = dict(model.named_parameters())[name]
        assert (w[~keep] == 0).all() and (w[keep] != 0).all()


def test_which_methods_train():
    assert Finetune.trains() and GMP.trains() and not Magnitude.trains()
    assert GMP.uses_optimizer() and not Magnitude.uses_optimizer()
