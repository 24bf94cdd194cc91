"""Every extension point of sparsify, one documented hook each.

A plugin is a plain module (or object) with functions of these names decorated
with ``sparsify_core.hookimpl``, registered through the ``sparsify.plugins``
entry-point group. The built-in methods, sources and metrics are registered the
same way, so anything they do a third-party package can do too.

Provider hooks (``sparsify_methods``, ``sparsify_model_sources``, ...) return a
list of classes; the engine collects them from every plugin. Lifecycle hooks are
called with keyword arguments at fixed points of a run; they observe, they do
not change the run (use them to log to an experiment tracker).
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("sparsify")


@hookspec
def sparsify_methods():
    """Return stage methods: subclasses of ``sparsify_core.Method``.

    Each declares ``kind`` (``substitute_activation``, ``regularize``,
    ``moeify``, ``prune``, ``layout_convert``, or a new kind of the plugin's
    own), ``name``, and a pydantic ``Params`` model that validates the stage's
    ``params`` in a recipe. ``(kind, name)`` must be unique across plugins.
    Optional, so that validation refuses what cannot work before weights
    load: ``data_splits`` (the splits a stage reads) and ``check`` (params
    against the model's weightless skeleton).
    """


@hookspec
def sparsify_model_sources():
    """Return model sources: subclasses of ``sparsify_core.ModelSource``.

    A source turns ``model: {source: NAME, params: {...}}`` into a loaded
    model and tokenizer (``hf``, ``smollm2-135m``, ``minilm-l6``, ``tiny``);
    its optional ``skeleton`` builds the model from its config alone, on the
    meta device, for the checks that run before any weights load."""


@hookspec
def sparsify_data_sources():
    """Return data sources: subclasses of ``sparsify_core.DataSource``.

    A source yields raw texts per partition (``train``, ``eval``, ...); the
    engine tokenizes and packs them into the recipe's splits."""


@hookspec
def sparsify_metrics():
    """Return evaluation metrics: subclasses of ``sparsify_core.Metric``.

    Metrics that need the model's outputs share one forward pass over the eval
    split per evaluation point; static metrics read the model only."""


@hookspec
def sparsify_layouts():
    """Return sparse storage layouts: subclasses of ``sparsify_core.Layout``.

    A layout converts a dense weight to its storage and back exactly, and
    computes with it (a plain-torch reference ``matmul`` plus an optional fast
    ``kernel(device, dtype)``). ``layout_convert/weight`` with ``layout: NAME``
    and ``SparseLinear`` find it by its ``name`` in the catalog."""


@hookspec
def sparsify_run_started(run_id: str, recipe, resumed: bool):
    """Called once the run is recorded and before the model is loaded."""


@hookspec
def sparsify_stage_started(run_id: str, index: int, stage):
    """Called before stage ``index`` (0-based) of the recipe runs."""


@hookspec
def sparsify_metrics_logged(run_id: str, stage: str, step, metrics: dict):
    """Called whenever metrics are recorded (evaluations and training logs).

    ``stage`` is the stage name (``dense`` for the baseline), ``step`` the
    training step or ``None``; ``metrics`` maps metric name to value."""


@hookspec
def sparsify_stage_finished(run_id: str, index: int, stage, status: str, metrics: dict):
    """Called after stage ``index`` completed or failed (``status``)."""


@hookspec
def sparsify_run_finished(run_id: str, status: str, reason):
    """Called when the run ends: ``finished``, ``failed`` or ``interrupted``."""
