"""Block-wise L1: each FFN learns, on its own, to reproduce the dense FFN with sparse activations.

A faster route to ProSparse-level sparsity on small compute (a variant the
ProSparse issue suggests; the paper's global scheme stays available as
``progressive_l1``). The dense model's FFN inputs and outputs are cached once
from the ``train`` split; then, FFN by FFN, the (ReLU) FFN is trained to
minimise ``||FFN(h) - FFN_dense(h)||^2 / ||FFN_dense(h)||^2 + lambda * mean|x1| / m0``
with lambda ramped by ProSparse's sine schedule, where ``m0`` is the layer's
mean |x1| at its first step: both terms are relative, so one lambda means the
same trade-off in every layer and every model, whatever its activation scale. Each FFN's problem is tiny
(three matrices, cached inputs), so many more steps fit in the budget than in
full-model training. Follow it with a short global KD stage to repair the
drift that local fits accumulate across layers.

This is a local reconstruction (like SparseGPT's), not model training, so it
does not go through the shared training loop: there is no loss over the
model's outputs here.
"""
from __future__ import annotations

import torch
from pydantic import Field

from sparsify_core import Method, MetricInfo, Params, StageResult
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import find_ffn_blocks

from .schedules import progressive_lambda


class BlockwiseL1Params(Params):
    l1: float = Field(gt=0, description="final lambda of the per-FFN L1 term (on mean |x1| relative to its start)")
    steps: int = Field(200, gt=0, description="optimizer steps per FFN")
    warmup_fraction: float = Field(0.2, ge=0, lt=1, description="share of steps at lambda 0 before the sine ramp")
    lr: float = Field(1e-4, gt=0)
    tokens_per_step: int = Field(1024, gt=0)
    sequences: int | None = Field(None, gt=0, description="train sequences to cache (default: the whole split)")
    split: str = "train"


@torch.no_grad()
def cache_ffn_io(model, blocks, ids: torch.Tensor, batch_size: int, device, bar=None):
    """FFN inputs (of the up projection) and outputs (of the down projection) of every block, per token.

    Returned on the CPU in float32, flattened to ``[tokens, width]``.
    """
    inputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    outputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = []
    for i, b in enumerate(blocks):
        def pre(_m, args, i=i):
            inputs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())

        def post(_m, _args, out, i=i):
            outputs[i].append(out.detach().reshape(-1, out.shape[-1]).float().cpu())
        handles += [b.up.register_forward_pre_hook(pre), b.down.register_forward_hook(post)]
    try:
        for j in range(0, len(ids), batch_size):
            model(input_ids=ids[j:j + batch_size].to(device), use_cache=False)
            if bar is not None:
                bar.advance(1)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in inputs], [torch.cat(y) for y in outputs]


# Means over the FFN layers, on the batches of each layer's fit: zero fraction of x1, and the relative
# squared error of the block's output against the dense block's.
BLOCKWISE_METRICS = {
    "fit_sparsity_before": MetricInfo(fraction=True),  # at the first step: where the layer started
    "fit_sparsity_after": MetricInfo(higher_is_better=True, fraction=True),  # the aim of the stage
    "fit_rel_err_mean": MetricInfo(higher_is_better=False),
    "fit_rel_err_max": MetricInfo(higher_is_better=False),
}


class BlockwiseL1(Method):
    """Block-wise L1: fit each FFN to the dense FFN's outputs under an L1 penalty on x1 (fast ProSparse variant)."""

    kind = "regularize"
    name = "blockwise_l1"
    Params = BlockwiseL1Params

    @classmethod
    def uses_optimizer(cls) -> bool:
        """True: each FFN is fitted with its own AdamW (not the shared loop)."""
        return True

    def apply(self, ctx, params):
        blocks = find_ffn_blocks(ctx.model)
        ref_blocks = find_ffn_blocks(ctx.reference_model())
        ids = ctx.split(params.split).input_ids
        if params.sequences is not None:
            ids = ids[:params.sequences]
        with ctx.progress("cache dense FFN inputs/outputs", total=(len(ids) + 3) // 4) as bar:
            xs, ys = cache_ffn_io(ctx.reference_model(), ref_blocks, ids, 4, ctx.device, bar)
        warm = int(params.steps * params.warmup_fraction)
        schedule = [(0.0, max(warm, 1)), (params.l1, max(params.steps - warm, 1))]
        gen = torch.Generator().manual_seed(ctx.seed)
        zeros_before, zeros_after, errors = [], [], []
        with ctx.progress("fit FFNs", total=len(blocks) * params.steps) as bar:
            for i, block in enumerate(blocks):
                x, y = xs[i], ys[i]
                if x.shape[0] != y.shape[0]:
                    raise SparsifyError(f"{block.name}: cached inputs and outputs differ in token count")
                weights = [p for m in block.projections().values() for p in m.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(weights, lr=params.lr, weight_decay=0.0)
                stats: dict[str, float] = {}
                for step in range(params.steps):
                    lam = progressive_lambda(step, schedule)
                    idx = torch.randint(0, x.shape[0], (min(params.tokens_per_step, x.shape[0]),), generator=gen)
                    # cached in float32; the FFN computes in the model's dtype (bfloat16 models too)
                    h, target = x[idx].to(ctx.device, ctx.dtype), y[idx].to(ctx.device)
                    x1 = block.intermediate(h)
                    out = block.down(x1)
                    err = (out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
                    if step == 0:  # the L1 term is relative to the layer's own starting scale
                        scale = float(x1.detach().abs().mean()) or 1.0
                    loss = err + lam * x1.abs().mean() / scale
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    ctx.masks.apply(ctx.model)
                    stats = {"rel_err": float(err.detach()), "sparsity": float((x1 == 0).float().mean())}
                    if step == 0:
                        zeros_before.append(stats["sparsity"])
                    bar.advance(1, layer=i, **stats)
                zeros_after.append(stats["sparsity"])
                errors.append(stats["rel_err"])
                ctx.log({"layer_rel_err": stats["rel_err"], "layer_sparsity": stats["sparsity"]}, step=i)
        n = len(blocks)
        return StageResult(metrics={"fit_sparsity_before": sum(zeros_before) / n,
                                    "fit_sparsity_after": sum(zeros_after) / n,
                                    "fit_rel_err_mean": sum(errors) / n, "fit_rel_err_max": max(errors)},
                           metric_info=BLOCKWISE_METRICS)
