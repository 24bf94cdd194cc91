"""Evaluation: every metric of one evaluation point shares one forward pass over a split."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .errors import RunInterrupted, one_line
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


class _ForwardFailed(Exception):
    """The shared forward pass itself raised (the model, or a hook a metric put on it)."""


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

    A metric that raises (in ``applies_to``, ``start``, ``update`` or
    ``finish``) fails alone: it contributes one ``MetricValue`` with value
    NaN and ``error`` its one-line reason, and the others are measured as
    usual. When the shared forward itself raises, each metric is measured
    again on its own, so the one whose hooks broke the forward fails and the
    others do not (if the model fails without any hook, every metric that
    needs the forward fails with that reason). Interruptions (Ctrl-C,
    SIGTERM) are never caught.
    """
    failed: dict[str, str] = {}
    active = []
    for m in metrics:
        try:
            if m.applies_to(ctx):
                active.append(m)
        except RunInterrupted:
            raise
        except Exception as exc:
            failed[m.name] = one_line(exc)
    skipped = [m.name for m in metrics if m not in active and m.name not in failed]
    if skipped and _last_skipped.get(ctx.run_id) != skipped:  # say it once per run, and when it changes
        ctx.info(f"metrics not applying to this {ctx.task} model, skipped: {', '.join(skipped)}")
    _last_skipped[ctx.run_id] = skipped
    need_reference = any(m.uses_forward and m.uses_reference for m in active) and not is_reference
    # Load the reference before metrics register hooks on ctx.model: a reference
    # copied from it must not inherit them.
    reference = None
    if need_reference:
        try:
            reference = ctx.reference_model()
        except RunInterrupted:
            raise
        except Exception as exc:  # only the metrics comparing to the dense model are lost
            for m in active:
                if m.uses_forward and m.uses_reference:
                    failed[m.name] = f"cannot load the dense reference model: {one_line(exc)}"
            active = [m for m in active if m.name not in failed]

    values: dict[str, list[MetricValue]] = {}
    try:
        values = _measure(ctx, active, split, batch_size, reference, is_reference, failed)
    except _ForwardFailed:
        for m in active:  # find the culprit: each metric alone, with only its own hooks on the model
            if m.name in failed:
                continue
            try:
                values.update(_measure(ctx, [m], split, batch_size, reference, is_reference, failed))
            except _ForwardFailed as exc:
                failed[m.name] = str(exc)
    out: list[MetricValue] = []
    for m in metrics:
        if m.name in failed:
            out.append(MetricValue(m.name, math.nan, error=failed[m.name]))
        else:
            out.extend(values.get(m.name, []))
    return out


def _measure(ctx: "RunContext", metrics: list[Metric], split: TokenSplit, batch_size: int,
             reference: torch.nn.Module | None, is_reference: bool, failed: dict[str, str]
             ) -> dict[str, list[MetricValue]]:
    """One evaluation pass of ``metrics``: their values by name; a metric that raises goes to ``failed``.

    Raises ``_ForwardFailed`` (with the one-line reason) when the model's
    forward raises; every started metric is closed in any case.
    """
    model = ctx.model
    started: list[Metric] = []
    values: dict[str, list[MetricValue]] = {}
    modes = {m: m.training for m in model.modules()}

    def guard(m: Metric, fn, *args):
        try:
            return fn(*args)
        except RunInterrupted:
            raise
        except Exception as exc:
            failed[m.name] = one_line(exc)
            return None

    try:
        for m in metrics:
            started.append(m)  # closed even if start fails halfway
            guard(m, m.start, ctx)
        forward = [m for m in metrics if m.uses_forward and m.name not in failed]
        if forward:
            model.eval()
            device = ctx.device
            ref_device = _device_of(reference, device) if reference is not None else None
            n_batches = -(-len(split) // batch_size)
            with ctx.progress("evaluate", total=n_batches) as task, torch.no_grad():
                for batch in split.batches(batch_size):
                    batch = batch.to(device)
                    try:
                        logits = model_outputs(model, batch, ctx.task)
                        if is_reference:
                            ref_logits = logits
                        elif reference is not None:
                            ref_logits = model_outputs(reference, batch.to(ref_device), ctx.task).to(logits.device)
                        else:
                            ref_logits = None
                    except RunInterrupted:
                        raise
                    except Exception as exc:
                        raise _ForwardFailed(one_line(exc)) from exc
                    for m in forward:
                        if m.name not in failed:
                            guard(m, m.update, batch, logits, ref_logits if m.uses_reference else None)
                    del logits, ref_logits
                    task.advance(1)
        for m in metrics:
            if m.name not in failed:
                result = guard(m, m.finish, ctx)
                if result is not None:
                    values[m.name] = list(result)
    finally:
        for module, mode in modes.items():
            module.training = mode
        for m in started:
            try:
                m.close()
            except Exception as exc:  # one failing close must not keep the others' hooks alive
                ctx.info(f"metric {m.name} failed to close: {type(exc).__name__}: {exc}")
    return values
