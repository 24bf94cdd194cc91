"""sparsify: declarative recipes that make large language models sparse.

The public API for plugin authors and users:

- ``hookimpl``: decorator for plugin hook implementations (see ``hookspecs``).
- ``Method``, ``StageResult``, ``Params``: stage methods.
- ``ModelSource``, ``LoadedModel``, ``DataSource``: sources.
- ``Metric``, ``MetricInfo``, ``MetricValue``: evaluation metrics and what their numbers are.
- ``Layout``: sparse storage layouts.
- ``RunContext``: what methods and metrics receive.
- ``find_ffn_blocks``: the one way to find FFN blocks in a model.
- ``load_output``: load any sparsify output folder back, with its fast modules (``fast=False``: as saved).

The classes are imported on first use (PEP 562 ``__getattr__``), so that importing a light submodule
(``sparsify_core.registry``, ``sparsify_core.cli``) does not pay for torch: ``sparsify runs``, ``show`` and
``compare`` and every process that only records start in a fraction of a second.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("sparsify")

# public name -> the submodule that defines it
_EXPORTS = {
    "RunContext": "context", "RecipeError": "errors", "SparsifyError": "errors", "Layout": "layout",
    "MaskSet": "masks", "Method": "method", "Params": "method", "StageResult": "method", "Metric": "metric",
    "MetricInfo": "metric", "MetricValue": "metric", "DataSource": "sources", "LoadedModel": "sources",
    "ModelSource": "sources", "TokenSplit": "sources",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from .context import RunContext
    from .errors import RecipeError, SparsifyError
    from .layout import Layout
    from .masks import MaskSet
    from .method import Method, Params, StageResult
    from .metric import Metric, MetricInfo, MetricValue
    from .sources import DataSource, LoadedModel, ModelSource, TokenSplit


def __getattr__(name: str):
    """``sparsify_core.X`` for an exported class ``X``: imports its submodule once. Raises ``AttributeError``
    for any other name."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
