"""``train/finetune``: the shared training loop with nothing added.

Next-token loss on the ``train`` split and/or distillation from the frozen
dense model (``lm_weight`` / ``kd_weight`` of the ``train:`` block). Use it
to fine-tune after one-shot pruning or to train a small model from scratch.
Masks recorded by earlier stages keep pruned weights at zero.
"""
from __future__ import annotations

from sparsify_core import Method, Params, StageResult
from sparsify_core.training import TrainConfig, train

_REPORTED = ("loss", "lm_loss", "kd_loss")  # averages over the last logging window


class FinetuneParams(Params):
    train: TrainConfig


class Finetune(Method):
    """Train with the shared loop (LM and/or KD loss, no penalty)."""

    kind = "train"
    name = "finetune"
    Params = FinetuneParams

    def apply(self, ctx, params: FinetuneParams) -> StageResult:
        final = train(ctx, params.train)
        metrics = {f"final_{k}": v for k, v in final.items() if k in _REPORTED}
        if "replica_max_abs_diff" in final:
            metrics["replica_max_abs_diff"] = final["replica_max_abs_diff"]
        return StageResult(metrics=metrics)
