"""sparsify: declarative recipes that make large language models sparse.

The public API for plugin authors and users:

- ``hookimpl``: decorator for plugin hook implementations (see ``hookspecs``).
- ``Method``, ``StageResult``, ``Params``: stage methods.
- ``ModelSource``, ``LoadedModel``, ``DataSource``: sources.
- ``Metric``, ``MetricValue``, ``MetricInfo``: evaluation metrics and what their numbers are.
- ``Layout``: sparse storage layouts.
- ``RunContext``: what methods and metrics receive.
- ``find_ffn_blocks``: the one way to find FFN blocks in a model.
- ``load_output``: load any sparsify output folder back, with its fast modules (``fast=False``: as saved).
"""
from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("sparsify")

from .context import RunContext  # noqa: E402
from .errors import RecipeError, SparsifyError  # noqa: E402
from .layout import Layout  # noqa: E402
from .masks import MaskSet  # noqa: E402
from .method import Method, Params, StageResult  # noqa: E402
from .metric import Metric, MetricInfo, MetricValue  # noqa: E402
from .sources import DataSource, LoadedModel, ModelSource, TokenSplit  # noqa: E402


def find_ffn_blocks(model):
    """The FFN blocks of ``model`` (see ``sparsify_core.ffn``)."""
    from .ffn import find_ffn_blocks as _find
    return _find(model)


def load_output(path, device="cpu", fast: bool = False):
    """Load a sparsify output folder (dense or compressed) back, modified modules included; with ``fast``,
    the plugins' fast modules swapped in (see ``sparsify_core.output.load_output``)."""
    from .output import load_output as _load
    return _load(path, device=device, fast=fast)


__all__ = [
    "hookimpl", "RunContext", "RecipeError", "SparsifyError", "Layout", "MaskSet", "Method", "Params",
    "StageResult", "Metric", "MetricInfo", "MetricValue", "DataSource", "LoadedModel", "ModelSource", "TokenSplit",
    "find_ffn_blocks", "load_output", "__version__",
]
