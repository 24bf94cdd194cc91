"""Training stages: ``train/finetune`` (LM and/or distillation loss with the shared loop, no penalty) and
``train/ssd`` (switchable sparse-dense training, ``ssd/``)."""
from __future__ import annotations

from sparsify_core import hookimpl

from .finetune import Finetune
from .ssd import SSD

__all__ = ["SSD", "Finetune"]


@hookimpl
def sparsify_methods():
    """``train/finetune`` and ``train/ssd``."""
    return [Finetune, SSD]
