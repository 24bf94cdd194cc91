"""The one training loop every training stage shares (fine-tuning, ProSparse, LTE, SSD, gradual pruning).

Read it top to bottom: ``train(ctx, config, callbacks)`` runs ``config.steps``
optimizer steps of AdamW with warm-up plus cosine LR, gradient accumulation
and clipping, on a seeded order of the ``train`` split. The loss is
``lm_weight * LM + kd_weight * KD`` (KD: KL of the frozen dense model's
next-token distribution to the model's, at a temperature) plus whatever the
callbacks add. Callbacks are how methods hook in: a penalty (the L1 of
ProSparse), a schedule (lambda, pruning), extra metrics. Pruned weights are
re-masked after every optimizer step. A checkpoint every
``checkpoint_every`` steps (weights, masks, optimizer, callback states) lets
``sparsify run --resume`` continue mid-stage.
Under torchrun the model is wrapped in DDP and batches are sharded by rank.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from . import distributed as dist
from .errors import SparsifyError
from .fsutil import replace_dir, tmp_for
from .metric import MetricInfo
from .params import Params, check_regexes

if TYPE_CHECKING:  # pragma: no cover
    from .context import RunContext


class TrainConfig(Params):
    """Settings of the shared training loop (embed as a ``train:`` field of a method's params)."""

    steps: int = Field(gt=0, description="optimizer steps")
    batch_size: int = Field(4, gt=0, description="sequences per micro-batch (per process under torchrun)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm; null: off")
    lm_weight: float = Field(1.0, ge=0, description="weight of the next-token loss on the train split")
    kd_weight: float = Field(0.0, ge=0, description="weight of the KL to the frozen dense model")
    kd_temperature: float = Field(1.0, gt=0)
    split: str = Field("train", description="data split to train on")
    log_every: int = Field(10, gt=0, description="record metrics in the registry every N steps")
    checkpoint_every: int = Field(50, ge=0, description="mid-stage checkpoint every N steps (0: never)")
    freeze: list[str] = Field(default_factory=list, description=(
        "regexes (re.search) of parameter names kept fixed during this stage, e.g. ['embed_tokens', 'lm_head']"))
    gradient_checkpointing: bool = False
    autocast: Literal["auto", "bf16", "off"] = Field("auto", description="auto: bf16 on CUDA, off on CPU")
    parallel: Literal["auto", "ddp", "fsdp"] = Field("auto", description=(
        "data parallelism under torchrun: ddp (every rank holds the whole model and optimizer state), "
        "fsdp (FSDP2 fully_shard: parameters, gradients and optimizer state sharded across ranks), "
        "auto (fsdp when launched with more than one process and the model is large, ddp otherwise)"))

    @field_validator("freeze")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        return check_regexes(v)

    @model_validator(mode="after")
    def _some_loss(self) -> "TrainConfig":
        if self.lm_weight == 0 and self.kd_weight == 0:
            raise ValueError("lm_weight and kd_weight are both 0: nothing to train on")
        return self


class TrainCallback:
    """Hooks a method plugs into the loop; every method is optional.

    ``penalty`` is called after each micro-batch's forward pass and returns a
    tensor added to the loss (or ``None``) plus numbers to show; ``after_step``
    runs after each optimizer step (schedules, pruning) and returns numbers to
    show and log. ``state_dict``/``load_state_dict`` (JSON-serialisable) carry
    the callback through mid-stage checkpoints; on resume ``load_state_dict``
    runs before the checkpoint's weights are loaded, so a callback that changed
    the model's structure mid-stage (SSD swaps FFNs for routed ones) rebuilds
    it first.
    """

    def start(self, loop: "TrainLoop") -> None: ...

    def before_step(self, step: int) -> None: ...

    def penalty(self, step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        return None, {}

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    def stop(self) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    p = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def batch_indices(n: int, step: int, micro: int, cfg: TrainConfig, seed: int, rank: int, world: int) -> torch.Tensor:
    """Rows of the train split for (step, micro-batch, rank): a seeded permutation per epoch.

    A pure function of its arguments, so resuming at any step sees exactly the
    batches an uninterrupted run would have seen.
    """
    per = cfg.batch_size * world
    start = ((step * cfg.grad_accum) + micro) * per
    idx = torch.arange(start, start + per)
    epochs = idx // n
    out = torch.empty_like(idx)
    for e in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + e))
        sel = epochs == e
        out[sel] = perm[idx[sel] % n]
    return out[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]


def kd_loss(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(P_dense || P_model) per predicted token, at ``temperature`` (scaled by T^2 as usual)."""
    t = temperature
    logp = F.log_softmax(logits.float() / t, dim=-1)
    ref = F.log_softmax(ref_logits.float() / t, dim=-1)
    return F.kl_div(logp.flatten(0, -2), ref.flatten(0, -2), log_target=True, reduction="batchmean") * t * t


@dataclass
class TrainLoop:
    """State of one training run inside a stage (what callbacks can see)."""

    ctx: "RunContext"
    cfg: TrainConfig
    model: torch.nn.Module  # the plain model (not the DDP wrapper)
    optimizer: torch.optim.Optimizer | None = None  # e.g. to re-order its state when neurons are permuted
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def _checkpoint_dir(ctx: "RunContext") -> Path:
    return Path(ctx.workdir) / f"train-stage-{ctx.stage_index}"


def _save(ctx, loop: TrainLoop, optimizer, callbacks) -> Path:
    from safetensors.torch import save_file, save_model

    final = _checkpoint_dir(ctx)
    tmp = tmp_for(final)
    save_model(loop.model, str(tmp / "model.safetensors"))
    if len(ctx.masks):  # schedules (gradual pruning) change the masks mid-stage
        save_file(ctx.masks.state_dict(), str(tmp / "masks.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    meta = {"step": loop.step, "callbacks": [cb.state_dict() for cb in callbacks]}
    (tmp / "loop.json").write_text(json.dumps(meta))
    replace_dir(tmp, final)
    return final


def _load(ctx, loop: TrainLoop, optimizer, callbacks) -> bool:
    from safetensors.torch import load_file, load_model

    path = _checkpoint_dir(ctx)
    if not (path / "loop.json").exists():
        return False
    meta = json.loads((path / "loop.json").read_text())
    for cb, state in zip(callbacks, meta["callbacks"]):  # first: it may rebuild the structure the weights fit
        cb.load_state_dict(state)
    load_model(loop.model, str(path / "model.safetensors"), strict=True)
    if (path / "masks.safetensors").exists():
        ctx.masks.load_state_dict(load_file(str(path / "masks.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=ctx.device, weights_only=True))
    loop.step = meta["step"]
    return True


def _forward_logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


_LOSS = MetricInfo(higher_is_better=False, unit="nats")

# What the numbers ``train`` returns are (averages over the last logging window; a callback adds its own).
TRAIN_METRICS: dict[str, MetricInfo] = {
    "loss": _LOSS,  # the whole objective: weighted LM and KD losses plus any callback's penalty
    "lm_loss": _LOSS,  # next-token cross-entropy
    "kd_loss": _LOSS,  # distillation loss against the frozen dense model (kd_loss)
    "grad_norm": MetricInfo(),  # before clipping
    "lr": MetricInfo(),
    "tokens_per_s": MetricInfo(higher_is_better=True, unit="tokens/s"),
    "replica_max_abs_diff": MetricInfo(higher_is_better=False),  # DDP only: 0 when every replica is equal
}
FINAL_LOSSES = ("loss", "lm_loss", "kd_loss")  # what a training method reports as final_<name>


def final_metrics(final: Mapping[str, float], extra: Mapping[str, MetricInfo] | None = None
                  ) -> tuple[dict[str, float], dict[str, MetricInfo]]:
    """What a method that trained with ``train`` reports of it, and what each number is.

    ``final`` is what ``train`` returned. Returns ``(metrics, metric_info)``
    for ``StageResult``: ``final_<name>`` for each of ``FINAL_LOSSES`` and of
    ``extra`` (the names the method's callbacks add, with what they are) that
    ``final`` holds, and ``replica_max_abs_diff`` when training ran on
    several processes; ``metric_info`` declares each of them.
    """
    wanted = {name: TRAIN_METRICS[name] for name in FINAL_LOSSES} | dict(extra or {})
    metrics = {f"final_{k}": v for k, v in final.items() if k in wanted}
    info = {f"final_{k}": wanted[k] for k in final if k in wanted}
    if "replica_max_abs_diff" in final:
        metrics["replica_max_abs_diff"] = final["replica_max_abs_diff"]
        info["replica_max_abs_diff"] = TRAIN_METRICS["replica_max_abs_diff"]
    return metrics, info


def train(ctx: "RunContext", cfg: TrainConfig, callbacks: list[TrainCallback] | None = None) -> dict[str, float]:
    """Train ``ctx.model`` in place with ``callbacks`` (in order); returns the final averaged metrics.

    A method that acts during training (a penalty, a pruning schedule such as
    ``prune/gmp``'s) passes its callbacks here; they must be rebuilt from the
    stage's params alone, since ``--resume`` inside the stage (``ctx.resume_stage``)
    calls the method again and hands them their checkpointed state.
    """
    callbacks = list(callbacks or [])
    model = ctx.model
    data = ctx.split(cfg.split)
    frozen = [p for name, p in model.named_parameters()
              if p.requires_grad and any(re.search(f, name) for f in cfg.freeze)]
    for p in frozen:  # restored in the finally below
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        for p in frozen:
            p.requires_grad_(True)
        raise SparsifyError(f"stage {ctx.stage_name!r}: no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    loop = TrainLoop(ctx=ctx, cfg=cfg, model=model, optimizer=optimizer)
    if ctx.resume_stage == ctx.stage_index and _load(ctx, loop, optimizer, callbacks):
        ctx.info(f"resuming training at step {loop.step} of {cfg.steps}")
    elif dist.is_main():
        shutil.rmtree(_checkpoint_dir(ctx), ignore_errors=True)
    dist.barrier()

    world, rank = dist.world_size(), dist.rank()
    wrapped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    use_bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and ctx.device.type == "cuda"
                                          and torch.cuda.is_bf16_supported())
    reference = ctx.reference_model() if cfg.kd_weight > 0 else None
    was_training = model.training
    model.train()
    for cb in callbacks:
        cb.start(loop)

    shown: dict[str, float] = {}
    window: dict[str, float] = {}
    window_n, tokens, t0 = 0, 0, time.perf_counter()
    try:
        with ctx.progress("train", total=cfg.steps) as bar:
            bar.advance(loop.step)
            while loop.step < cfg.steps:
                step = loop.step
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for cb in callbacks:
                    cb.before_step(step)
                optimizer.zero_grad(set_to_none=True)
                parts: dict[str, float] = {}
                for micro in range(cfg.grad_accum):
                    ids = data.input_ids[batch_indices(len(data), step, micro, cfg, ctx.seed, rank, world)].to(ctx.device)
                    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        logits = _forward_logits(wrapped, ids)
                    loss = torch.zeros((), device=ctx.device)
                    if cfg.lm_weight > 0:
                        lm = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                        loss = loss + cfg.lm_weight * lm
                        parts["lm_loss"] = parts.get("lm_loss", 0.0) + lm.item() / cfg.grad_accum
                    if reference is not None:
                        with torch.no_grad():
                            ref_logits = _forward_logits(reference, ids)
                        kd = kd_loss(logits, ref_logits, cfg.kd_temperature)
                        loss = loss + cfg.kd_weight * kd
                        parts["kd_loss"] = parts.get("kd_loss", 0.0) + kd.item() / cfg.grad_accum
                    for cb in callbacks:
                        pen, info = cb.penalty(step)
                        if pen is not None:
                            loss = loss + pen
                        for k, v in info.items():
                            parts[k] = parts.get(k, 0.0) + float(v) / cfg.grad_accum
                    parts["loss"] = parts.get("loss", 0.0) + loss.item() / cfg.grad_accum
                    (loss / cfg.grad_accum).backward()
                    tokens += ids.numel() * world
                bad = dist.all_reduce_mean(0.0 if math.isfinite(parts["loss"]) else 1.0, ctx.device)
                if bad > 0:
                    where = _checkpoint_dir(ctx)
                    keep = f"; the last good checkpoint is {where}" if (where / "loop.json").exists() else ""
                    # float16 weights overflow/underflow whatever the lr (AdamW's eps is below float16's range)
                    advice = ("the model is in float16, which AdamW cannot train: use dtype bfloat16 (or float32)"
                              if any(p.dtype == torch.float16 for p in params) else
                              "lower the learning rate or the penalty")
                    raise SparsifyError(f"stage {ctx.stage_name!r}: the loss became {parts['loss']} at step "
                                        f"{step}{keep}; {advice}")
                if cfg.max_grad_norm is not None:
                    parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                optimizer.step()
                ctx.masks.apply(model)
                loop.step = step + 1
                for cb in callbacks:
                    parts.update(cb.after_step(step))
                parts["lr"] = lr
                for k, v in parts.items():
                    window[k] = window.get(k, 0.0) + v
                window_n += 1
                elapsed = time.perf_counter() - t0
                shown = {k: v / window_n for k, v in window.items()}
                shown["tokens_per_s"] = tokens / max(elapsed, 1e-9)
                bar.advance(1, **{k: shown[k] for k in ("loss", "penalty", "sparsity", "weight_sparsity", "tokens_per_s")
                                   if k in shown})
                if loop.step % cfg.log_every == 0 or loop.step == cfg.steps:
                    ctx.log(shown, step=loop.step)
                    window, window_n = {}, 0
                if cfg.checkpoint_every and loop.step % cfg.checkpoint_every == 0 and loop.step < cfg.steps:
                    if dist.is_main():
                        _save(ctx, loop, optimizer, callbacks)
                    dist.barrier()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for cb in callbacks:
            cb.stop()
        if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
        model.train(was_training)
    if world > 1:
        shown["replica_max_abs_diff"] = _replica_difference(model, ctx.device)
    loop.metrics = shown
    return shown


def _replica_difference(model: torch.nn.Module, device: torch.device) -> float:
    """Max over ranks of |checksum - rank 0's checksum|: 0 when DDP kept every replica equal."""
    import torch.distributed as tdist

    s = torch.zeros(2, dtype=torch.float64, device=device)
    for p in model.parameters():
        s[0] += p.detach().double().sum()
        s[1] += p.detach().double().abs().sum()
    ref = s.clone()
    tdist.broadcast(ref, src=0)
    diff = (s - ref).abs().max()
    tdist.all_reduce(diff, op=tdist.ReduceOp.MAX)
    return float(diff)
