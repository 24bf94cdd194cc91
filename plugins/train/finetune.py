"""``train/finetune``: the shared training loop with nothing added.

Next-token loss on the ``train`` split and/or distillation from the frozen
dense model (``lm_weight`` / ``kd_weight`` of the ``train:`` block). Use it
to fine-tune after one-shot pruning or to train a small model from scratch.
Masks recorded by earlier stages keep pruned weights at zero.
"""
from __future__ import annotations

from sparsify_core import Method, Params, StageResult
from sparsify_core.training import TrainConfig, final_metrics, train


class FinetuneParams(Params):
    train: TrainConfig


class Finetune(Method):
    """Train with the shared loop (LM and/or KD loss, no penalty)."""

    kind = "train"
    name = "finetune"
    Params = FinetuneParams

    def apply(self, ctx, params: FinetuneParams) -> StageResult:
        metrics, declared = final_metrics(train(ctx, params.train))
        return StageResult(metrics=metrics, metric_info=declared)
