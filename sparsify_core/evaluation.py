"""Evaluation: every metric of one evaluation point shares one forward pass over a split."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .metric import Metric, MetricValue
from .sources import TokenSplit

if TYPE_CHECKING:  # pragma: no cover
    from .context import RunContext


def model_outputs(model: torch.nn.Module, input_ids: torch.Tensor, task: str) -> torch.Tensor:
    """What metrics receive as ``logits``: next-token logits ``[b, t, vocab]`` for
    ``causal_lm``; for ``encoder`` the final hidden states ``[b, t, hidden]``."""
    if task == "causal_lm":
        out = model(input_ids=input_ids, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]
    out = model(input_ids=input_ids)
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if hidden is not None else out[0]


_last_skipped: dict[str, list[str]] = {}


def _device_of(model: torch.nn.Module, default: torch.device) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else default


def evaluate(ctx: "RunContext", metrics: list[Metric], split: TokenSplit, *, batch_size: int,
             is_reference: bool = False) -> list[MetricValue]:
    """Evaluate ``ctx.model`` with ``metrics`` on ``split``; returns their values in order.

    Metrics that do not apply to the run (``applies_to``) are skipped, with a
    status line the first time a run skips a given set. If any applying
    metric ``uses_forward``, the split is run once, batch by batch, under
    ``torch.no_grad()`` with the model in eval mode (every module's
    train/eval flag is restored afterwards); metrics that ``uses_reference``
    also get the dense reference model's outputs for the same batch. Metrics
    receive the batch on ``ctx.device``. ``is_reference=True`` marks the
    baseline evaluation of the dense model itself: its own outputs are passed
    as the reference (no second forward). ``close`` runs on every started metric, even on error.
    """
    active = [m for m in metrics if m.applies_to(ctx)]
    skipped = [m.name for m in metrics if m not in active]
    if skipped and _last_skipped.get(ctx.run_id) != skipped:  # say it once per run, and when it changes
        ctx.info(f"metrics not applying to this {ctx.task} model, skipped: {', '.join(skipped)}")
    _last_skipped[ctx.run_id] = skipped
    forward = [m for m in active if m.uses_forward]
    need_reference = any(m.uses_reference for m in forward) and not is_reference
    # Load the reference before metrics register hooks on ctx.model: a reference
    # copied from it must not inherit them.
    reference = ctx.reference_model() if need_reference else None

    model = ctx.model
    started: list[Metric] = []
    values: list[MetricValue] = []
    modes = {m: m.training for m in model.modules()}
    try:
        for m in active:
            started.append(m)  # closed even if start fails halfway
            m.start(ctx)
        if forward:
            model.eval()
            device = ctx.device
            ref_device = _device_of(reference, device) if reference is not None else None
            n_batches = -(-len(split) // batch_size)
            with ctx.progress("evaluate", total=n_batches) as task, torch.no_grad():
                for batch in split.batches(batch_size):
                    batch = batch.to(device)
                    logits = model_outputs(model, batch, ctx.task)
                    if is_reference:
                        ref_logits = logits
                    elif reference is not None:
                        ref_logits = model_outputs(reference, batch.to(ref_device), ctx.task).to(logits.device)
                    else:
                        ref_logits = None
                    for m in forward:
                        m.update(batch, logits, ref_logits if m.uses_reference else None)
                    del logits, ref_logits
                    task.advance(1)
        for m in active:
            values.extend(m.finish(ctx))
    finally:
        for module, mode in modes.items():
            module.training = mode
        for m in started:
            try:
                m.close()
            except Exception as exc:  # one failing close must not keep the others' hooks alive
                ctx.info(f"metric {m.name} failed to close: {type(exc).__name__}: {exc}")
    return values
