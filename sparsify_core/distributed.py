"""torch.distributed plumbing: one run recorded by rank 0, every rank training.

``sparsify run`` under ``torchrun --nproc_per_node N`` (or accelerate launch)
finds ``WORLD_SIZE``/``RANK`` in its environment, joins the process group
(NCCL on GPUs, gloo on CPU), shards training batches by rank and, inside the
training loop, wraps the model in DDP or shards it with FSDP2
(``choose_parallel``, ``fully_shard_model``, ``unshard_model``). Only rank 0
writes the registry, stage checkpoints and outputs; every rank writes its
part of the sharded mid-stage checkpoints.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True when started by torchrun/accelerate with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> torch.device:
    """Join the process group if launched distributed; returns this rank's device."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return device


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(value: float, device: torch.device) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world_size()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- data parallelism of the training loop

# Bytes per trainable parameter that data parallelism must place: fp32 weights, gradients and AdamW's two moments.
TRAIN_BYTES_PER_PARAM = 16
# auto shards (fsdp) once that whole-model training state would take more than this fraction of one rank's memory.
FSDP_AUTO_FRACTION = 0.5


def device_memory(device: torch.device) -> int:
    """Bytes one rank may use: the CUDA device's total memory, or on CPU the available RAM split across
    this node's ranks (``LOCAL_WORLD_SIZE``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return psutil.virtual_memory().available // max(local, 1)


def choose_parallel(requested: str, world: int, n_params: int, memory: int) -> tuple[str, str]:
    """The data parallelism the training loop uses, and why (one line for the log).

    ``requested`` is ``train.parallel`` (``auto``, ``ddp`` or ``fsdp``),
    ``world`` the number of processes, ``n_params`` the model's parameter
    count and ``memory`` one rank's memory in bytes (``device_memory``).
    Returns ``("none", why)`` for one process (nothing to parallelise),
    ``requested`` as is when it is ``ddp`` or ``fsdp``, and for ``auto``:
    ``fsdp`` when ``n_params * 16`` bytes (fp32 weights, gradients and AdamW's
    two moments, ``TRAIN_BYTES_PER_PARAM``) exceed half of ``memory``
    (``FSDP_AUTO_FRACTION``), ``ddp`` otherwise.
    """
    if world <= 1:
        return "none", "one process"
    if requested != "auto":
        return requested, f"train.parallel is {requested}"
    need, limit = n_params * TRAIN_BYTES_PER_PARAM, memory * FSDP_AUTO_FRACTION
    gib = 2 ** 30
    verdict = ("fsdp", "exceeds") if need > limit else ("ddp", "fits in")
    count = f"{n_params / 1e9:.3g}B" if n_params >= 1e9 else f"{n_params / 1e6:.3g}M"
    return verdict[0], (f"auto: {count} params x {TRAIN_BYTES_PER_PARAM} bytes = {need / gib:.3g} GiB "
                        f"{verdict[1]} {FSDP_AUTO_FRACTION:.0%} of one rank's {memory / gib:.3g} GiB")


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the modules whose class the model names in ``_no_split_modules`` (HF's
    list of what must stay whole on one device), outermost first; ``[]`` when it names none."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    inside = {id(sub) for b in blocks for sub in b.modules() if sub is not b}
    return [b for b in blocks if id(b) not in inside]  # a block nested in another is sharded with it


def fully_shard_model(model: torch.nn.Module, *, bf16: bool) -> int:
    """Shard ``model`` in place with FSDP2: ``fully_shard`` on each transformer block, then the root.

    Parameters become DTensors sharded on dim 0 across all ranks (each holds
    its slice of weights, gradients and, once the optimizer is built over
    the sharded parameters, of AdamW's state). ``bf16`` gathers parameters
    and computes in bfloat16 while gradients reduce in float32
    (``MixedPrecisionPolicy``). Returns the number of blocks sharded apart.
    Undo with ``unshard_model``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return len(blocks)


def sharded_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_parameters(model: torch.nn.Module):
    """Every rank sees the whole (unsharded) parameters of a ``fully_shard``-ed model inside (read only:
    writes are lost when they are sharded again); a no-op for a model that is not sharded. Collective:
    every rank must enter it together."""
    shards = sharded_modules(model)
    for m in shards:
        m.unshard()
    try:
        yield model
    finally:
        for m in shards:
            m.reshard()


@torch.no_grad()
def unshard_model(model: torch.nn.Module) -> None:
    """Undo ``fully_shard_model`` in place: every rank holds the whole model again as a plain module.

    Each sharded parameter is gathered (collective, every rank in the same
    order) and registered back as an ordinary ``nn.Parameter`` (tied weights
    stay tied, ``requires_grad`` kept); FSDP's forward hooks, state and class
    wrapper are removed, so the model runs on one rank alone (evaluation,
    outputs) and can be sharded again by a later stage. The module objects
    are the same ones (hooks and references that methods hold stay valid).
    FSDP2 has no public inverse of ``fully_shard``, so this reaches into its
    composable-state bookkeeping; ``tests/core/test_fsdp.py`` checks it.
    """
    import importlib

    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    _contract = importlib.import_module("torch.distributed._composable.contract")  # the module, not its function
    shards = sharded_modules(model)
    for m in shards:
        m.reshard()
    new: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in new:
                    new[id(p)] = torch.nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
                module._parameters[name] = new[id(p)]
    for m in shards:
        state = fully_shard.state(m)
        for handle in {id(h): h for h in (state._pre_forward_hook_handle, state._post_forward_hook_handle)
                       if h is not None}.values():
            handle.remove()
        m.__class__ = next(c for c in type(m).__bases__ if not issubclass(c, FSDPModule))
        for key in (_contract.STATE_KEY, _contract.REGISTRY_KEY):
            m.__dict__.pop(key, None)
        _module_state_mapping.pop(m, None)
    for m in model.modules():
        for attr in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            m.__dict__.pop(attr, None)
