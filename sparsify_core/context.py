"""The run context: everything a stage method or metric may use, and nothing else.

Methods never see the CLI or the registry: they read the model, data and
device from here, report progress through ``ctx.progress``, and log training
curves through ``ctx.log``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import progress as _progress
from .calibration import DevicePeak
from .masks import MaskSet
from .sources import TokenSplit


@dataclass
class RunContext:
    """State shared by the stages of one run.

    Attributes:
        run_id: the registry id of this run.
        model: the model being sparsified (modified in place by stages).
        tokenizer: its tokenizer.
        task: ``causal_lm`` or ``encoder``.
        data: packed token splits by name (``calibration``, ``train``, ``eval``...).
        device, dtype: where and in what precision the model runs.
        seed: the recipe's seed.
        masks: weight masks kept across stages (see ``MaskSet``).
        workdir: a scratch folder of this run (kept with its checkpoints).
        stage_name, stage_index: the stage being run (``dense`` / -1 outside stages).
        resume_stage: when resuming, the index of the stage the run restarts in.
        offload: the ``offload.Offload`` keeping the layers off the device (``model.offload``), or ``None``.
        device_peak: the most bytes layer-wise calibration held on the device in this stage (reset per stage).
    """

    run_id: str
    model: torch.nn.Module
    tokenizer: Any
    task: str
    data: dict[str, TokenSplit]
    device: torch.device
    dtype: torch.dtype
    seed: int
    workdir: Path
    masks: MaskSet = field(default_factory=MaskSet)
    stage_name: str = "dense"
    stage_index: int = -1
    resume_stage: int | None = None  # the stage a resumed run restarts in (mid-stage checkpoints apply)
    reference_loader: Callable[[], torch.nn.Module] | None = None
    log_callback: Callable[[str, int | None, dict[str, float]], None] | None = None
    offload: Any = None
    device_peak: DevicePeak = field(default_factory=DevicePeak)
    _reference: torch.nn.Module | None = field(default=None, repr=False)

    def split(self, name: str) -> TokenSplit:
        """A data split by name, with a clear error when the recipe has none."""
        if name not in self.data:
            from .errors import SparsifyError
            have = ", ".join(sorted(self.data)) or "none"
            raise SparsifyError(f"stage {self.stage_name!r} needs the data split {name!r}; "
                                f"the recipe's data has: {have}")
        return self.data[name]

    def reference_model(self) -> torch.nn.Module:
        """The frozen dense model (before any stage), loaded once on first use."""
        if self._reference is None:
            if self.reference_loader is None:
                raise RuntimeError("no dense reference model is available in this context")
            ref = self.reference_loader()
            ref.eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            self._reference = ref
        return self._reference

    def snapshot_reference(self) -> None:
        """Keep a frozen copy of the current model as the dense reference."""
        model = self.model
        self.reference_loader = lambda: copy.deepcopy(model)
        self._reference = None
        self.reference_model()

    def ffn_blocks(self):
        """The model's FFN blocks (see ``sparsify_core.ffn.find_ffn_blocks``)."""
        from .ffn import find_ffn_blocks
        return find_ffn_blocks(self.model)

    def progress(self, description: str, total: float | None = None):
        """Context manager showing progress; yields a task with ``advance(n, **fields)``."""
        return _progress.task(f"[{self.stage_name}] {description}", total)

    def info(self, message: str) -> None:
        """A status line for the user."""
        _progress.info(f"[{self.stage_name}] {message}")

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record metrics (e.g. training curves) under the current stage."""
        if self.log_callback is not None:
            self.log_callback(self.stage_name, step, {k: float(v) for k, v in metrics.items()})
