"""The one training loop every training stage shares (fine-tuning, ProSparse, LTE, SSD, gradual pruning).

Read it top to bottom: ``train(ctx, config, callbacks)`` runs ``config.steps``
optimizer steps of AdamW with warm-up plus cosine LR, gradient accumulation
and clipping, on a seeded order of the ``train`` split. The loss is
``lm_weight * LM + kd_weight * KD`` (KD: KL of the frozen dense model's
next-token distribution to the model's, at a temperature) plus whatever the
callbacks add. Callbacks are how methods hook in: a penalty (the L1 of
ProSparse), a schedule (lambda, pruning), extra metrics. Pruned weights are
re-masked after every optimizer step. A checkpoint every
``checkpoint_every`` steps (weights, masks, optimizer, callback states, RNG;
sharded with ``torch.distributed.checkpoint``, each rank writing its part)
lets ``sparsify run --resume`` continue mid-stage.
Under torchrun batches are sharded by rank (``batch_size`` is per process) and
the model is wrapped in DDP or sharded with FSDP2 (``train.parallel``,
``distributed.choose_parallel``); after the loop a sharded model is whole
again on every rank, so the rest of the run sees a plain model.
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

    Under ``parallel: fsdp`` the model's parameters are shards (DTensors)
    while the loop runs: forward hooks (activation penalties, routers) work
    as usual; a callback that reads whole weights (a pruning schedule) does
    so inside ``loop.full_parameters()``, read only, and records masks in
    ``ctx.masks``, which the loop applies to the shards after ``after_step``.
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

    # False: the callback rebuilds modules or moves optimizer state mid-stage (SSD's switch), which FSDP's
    # sharded parameters cannot follow; ``parallel: auto`` then picks ddp and ``fsdp`` is refused.
    shardable: bool = True


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
    model: torch.nn.Module  # the model itself (not the DDP wrapper; sharded in place under fsdp)
    optimizer: torch.optim.Optimizer | None = None  # e.g. to re-order its state when neurons are permuted
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    parallel: str = "none"  # none (one process), ddp or fsdp

    def full_parameters(self):
        """Context manager: whole parameters on every rank inside, read only (under fsdp they are gathered;
        every rank must enter it at the same step); a no-op when the model is not sharded."""
        return dist.full_parameters(self.model)


def _checkpoint_dir(ctx: "RunContext") -> Path:
    return Path(ctx.workdir) / f"train-stage-{ctx.stage_index}"


CHECKPOINT_FORMAT = 2  # 2: torch.distributed.checkpoint (sharded); 1: model.safetensors + optimizer.pt


def _save(ctx, loop: TrainLoop, optimizer, callbacks) -> Path:
    """Write the mid-stage checkpoint; collective: every rank calls it at the same step.

    Layout of ``train-stage-<i>/``: ``state/`` (``torch.distributed.checkpoint``:
    model and optimizer state dicts keyed by parameter name, each rank writing
    its shards; replicated tensors once), ``masks.safetensors`` (whole masks,
    rank 0), ``rng-<rank>.safetensors`` (each rank's torch RNG) and ``loop.json``
    (format, step, callback states, world size). Built in a temporary folder
    and swapped in by rank 0, so a crash keeps the previous checkpoint; with
    several nodes the run folder must be on a filesystem they share.
    """
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    final = _checkpoint_dir(ctx)
    tmp = Path(dist.broadcast(str(tmp_for(final)) if dist.is_main() else None))
    state = {"model": get_model_state_dict(loop.model), "optimizer": get_optimizer_state_dict(loop.model, optimizer)}
    dcp.save(state, checkpoint_id=tmp / "state", no_dist=dist.world_size() == 1)
    save_file(_rng_state(), str(tmp / f"rng-{dist.rank()}.safetensors"))  # tensors only: no pickle
    dist.barrier()
    if dist.is_main():
        if len(ctx.masks):  # schedules (gradual pruning) change the masks mid-stage
            save_file(ctx.masks.state_dict(), str(tmp / "masks.safetensors"))
        meta = {"format": CHECKPOINT_FORMAT, "step": loop.step, "callbacks": [cb.state_dict() for cb in callbacks],
                "world_size": dist.world_size(), "parallel": loop.parallel}
        (tmp / "loop.json").write_text(json.dumps(meta))
        replace_dir(tmp, final)
    dist.barrier()
    return final


def _checkpoint_meta(ctx) -> dict | None:
    """``loop.json`` of this stage's mid-stage checkpoint, or ``None`` when there is none."""
    path = _checkpoint_dir(ctx) / "loop.json"
    return json.loads(path.read_text()) if path.exists() else None


def _load(ctx, loop: TrainLoop, optimizer, meta: dict) -> None:
    """Load weights, masks, optimizer state and RNG of the checkpoint ``meta`` describes into the (possibly
    sharded) model and its optimizer; the callbacks got their states before the model was wrapped.

    Format 1 (written before sharded checkpoints: ``model.safetensors`` + ``optimizer.pt``) still loads
    into an unsharded model (one process, ddp); into a sharded one it raises ``SparsifyError``.
    """
    from safetensors.torch import load_file

    path = _checkpoint_dir(ctx)
    if meta.get("format", 1) == 1:
        from safetensors.torch import load_model

        if loop.parallel == "fsdp":
            raise SparsifyError(f"stage {ctx.stage_name!r}: the checkpoint in {path} predates sharded checkpoints "
                                f"and cannot load into an fsdp model; resume in one process, or delete that folder "
                                f"to restart the stage")
        load_model(loop.model, str(path / "model.safetensors"), strict=True)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=ctx.device, weights_only=True))
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        model_state, optim_state = get_state_dict(loop.model, optimizer)  # the layout to load into
        # get_state_dict gives every trainable parameter AdamW state; keep only what the checkpoint has, so a
        # parameter that had none (no gradient yet, e.g. an unselected router) starts fresh as it would have
        saved = set(dcp.FileSystemReader(path / "state").read_metadata().state_dict_metadata)
        optim_state["state"] = {fqn: kept for fqn, entries in optim_state["state"].items()
                                if (kept := {k: v for k, v in entries.items()
                                             if f"optimizer.state.{fqn}.{k}" in saved})}
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=path / "state", no_dist=dist.world_size() == 1)
        set_model_state_dict(loop.model, state["model"])  # strict: every weight must be there
        set_optimizer_state_dict(loop.model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
        rng = path / f"rng-{dist.rank()}.safetensors"
        if rng.exists():  # absent when resumed on more ranks than wrote it: that rank keeps its seeded RNG
            _set_rng_state(load_file(str(rng)))
    if (path / "masks.safetensors").exists():
        ctx.masks.load_state_dict(load_file(str(path / "masks.safetensors")))
    loop.step = meta["step"]


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
    frozen = [name for name, p in model.named_parameters()
              if p.requires_grad and any(re.search(f, name) for f in cfg.freeze)]
    _set_requires_grad(model, frozen, False)  # restored in the finally below (by name: fsdp swaps the tensors)
    if not any(p.requires_grad for p in model.parameters()):
        _set_requires_grad(model, frozen, True)
        raise SparsifyError(f"stage {ctx.stage_name!r}: no trainable parameters")
    use_bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and ctx.device.type == "cuda"
                                          and torch.cuda.is_bf16_supported())
    world, rank = dist.world_size(), dist.rank()
    parallel = _choose_parallel(ctx, cfg, model, callbacks)
    meta = _checkpoint_meta(ctx) if ctx.resume_stage == ctx.stage_index else None
    if meta is not None:  # first: a callback may rebuild the structure the weights fit (before any sharding)
        for cb, state in zip(callbacks, meta["callbacks"]):
            cb.load_state_dict(state)
    if parallel == "fsdp":
        blocks = dist.fully_shard_model(model, bf16=use_bf16)
        if dist.is_main():
            ctx.info(f"fsdp: {blocks} blocks and the root sharded across {world} ranks"
                     + (", bf16 parameters, fp32 gradient reduction" if use_bf16 else ""))
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: the DTensors the optimizer owns
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    loop = TrainLoop(ctx=ctx, cfg=cfg, model=model, optimizer=optimizer, parallel=parallel)
    if meta is not None:
        _load(ctx, loop, optimizer, meta)
        ctx.info(f"resuming training at step {loop.step} of {cfg.steps}")
    elif dist.is_main():
        shutil.rmtree(_checkpoint_dir(ctx), ignore_errors=True)
    dist.barrier()

    wrapped = model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        # per transformer block; non-reentrant, the variant FSDP's re-gathering in backward supports
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)  # global norm, DTensors too
                    parts["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                optimizer.step()
                ctx.masks.apply(model)
                loop.step = step + 1
                for cb in callbacks:
                    parts.update(cb.after_step(step))
                if parallel == "fsdp":  # masks a callback just recorded: its writes to gathered weights were lost
                    ctx.masks.apply(model)
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
                    _save(ctx, loop, optimizer, callbacks)
    finally:
        for cb in callbacks:
            cb.stop()
        if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
        model.train(was_training)
        _set_requires_grad(model, frozen, True)
    if parallel == "fsdp":  # whole again on every rank: evaluation, checkpoints and outputs see a plain model
        optimizer.state.clear()
        dist.unshard_model(model)
    if world > 1:
        shown["replica_max_abs_diff"] = _replica_difference(model, ctx.device)
    loop.metrics = shown
    return shown


def _set_requires_grad(model: torch.nn.Module, names: list[str], flag: bool) -> None:
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(flag)


def _choose_parallel(ctx, cfg: TrainConfig, model: torch.nn.Module, callbacks: list[TrainCallback]) -> str:
    """``none``, ``ddp`` or ``fsdp`` for this stage (``distributed.choose_parallel``, rank 0's choice on every
    rank), logged with the reason; refuses (``SparsifyError``) fsdp for a callback that cannot run sharded."""
    world = dist.world_size()
    if world <= 1:
        return "none"
    unshardable = [type(cb).__name__ for cb in callbacks if not cb.shardable]
    if unshardable and cfg.parallel == "fsdp":
        raise SparsifyError(f"stage {ctx.stage_name!r}: train.parallel fsdp is not supported by "
                            f"{', '.join(unshardable)} (it changes the model's structure or optimizer state "
                            f"mid-stage); use parallel ddp or auto")
    if unshardable:
        choice, why = "ddp", f"{', '.join(unshardable)} cannot run sharded"
    else:
        n = sum(p.numel() for p in model.parameters())
        choice, why = dist.choose_parallel(cfg.parallel, world, n, dist.device_memory(ctx.device))
    choice, why = dist.broadcast((choice, why))  # every rank must wrap alike, whatever RAM each one measured
    if dist.is_main():
        ctx.info(f"data parallel over {world} processes: {choice} ({why})")
    return choice


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
