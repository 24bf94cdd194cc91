"""Plain training stages: ``train/finetune`` (LM and/or distillation loss with the shared loop, no penalty)."""
from __future__ import annotations

from sparsify_core import hookimpl

from .finetune import Finetune


@hookimpl
def sparsify_methods():
    """Plain training methods."""
    return [Finetune]
