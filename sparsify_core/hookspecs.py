"""Every extension point of sparsify, one documented hook each.

A plugin is a plain module (or object) with functions of these names decorated
with ``sparsify_core.hookimpl``, registered through the ``sparsify.plugins``
entry-point group. The built-in methods, sources and metrics are registered the
same way, so anything they do a third-party package can do too.

Provider hooks (``sparsify_methods``, ``sparsify_model_sources``, ...) return a
list of classes; the engine collects them from every plugin. Lifecycle hooks are
called with keyword arguments at fixed points of a run; they observe, they do
not change the run (use them to log to an experiment tracker).

The lifecycle of one attempt at a run (a fresh run, or one ``--resume``)::

    run_started
      metrics_logged*                      (dense baseline, unless already recorded)
      ( stage_started
          metrics_logged*                  (training logs)
        stage_finished                     (completed | failed | interrupted)
        metrics_logged* )*                 (evaluation after the stage)
    run_finished                           (finished | failed | interrupted)

Every ``run_started`` is followed by exactly one ``run_finished``, and every
``stage_started`` by exactly one ``stage_finished``, before the run's error (if
any) reaches the caller; nothing is called after ``run_finished``. Under
torchrun only rank 0 calls them. Lifecycle hooks are called one implementation
at a time: one that raises an ``Exception`` is reported as a warning line on
stderr and the run goes on, calling the other implementations as usual (hook
wrappers are not supported for lifecycle hooks and are skipped with the same
warning).
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
    split per evaluation point; static metrics read the model only. Each
    declares what its values are (``higher_is_better``, ``unit``,
    ``fraction``; ``value_info`` for extra names), recorded with the run for
    ``show``, ``compare`` and the plots."""


@hookspec
def sparsify_layouts():
    """Return sparse storage layouts: subclasses of ``sparsify_core.Layout``.

    A layout converts a dense weight to its storage and back exactly, and
    computes with it (a plain-torch reference ``matmul`` plus an optional fast
    ``kernel(device, dtype)``). ``layout_convert/weight`` with ``layout: NAME``
    and ``SparseLinear`` find it by its ``name`` in the catalog."""


@hookspec
def sparsify_fast_modules(model, masks, device, layouts):
    """Swap modules of a loaded ``model`` for the ones that compute fastest on ``device``, exactly.

    Called by ``load_output`` (unless ``fast=False``) (and so by ``sparsify
    generate``) on a model in eval mode on ``device``; ``masks`` is its
    ``MaskSet``, to be kept in step with any weight a swap moves.
    ``layouts`` is ``"auto"`` (a pruned Linear may move into the weight
    layout measured fastest for its shape and density, or stay dense when
    none wins), ``"measure"`` (the same, after measuring the entries this
    machine's table lacks) or ``"none"`` (weights stay as saved); an implementation may
    leave the parameter out. An
    implementation changes only modules it owns the fast form of, leaves the
    model computing the same function (to float tolerance), and returns a
    list of one-line descriptions of what it changed (empty or ``None``: nothing)."""


@hookspec
def sparsify_lean_step(model):
    """Return a native decode step for the lean decode path of a loaded ``model``, a reason it cannot, or ``None``.

    Called once per ``sparsify_core.lean.LeanDecoder`` (so by ``sparsify
    generate`` and ``sparsify bench`` case 4) on a model the lean path covers
    (llama-shaped, ``lean.supports``). ``None``: not this plugin's concern; a
    string: one phrase saying why it cannot compute this model (said in the
    decode path, e.g. ``lean torch (layer 3: a hooked FFN)``); else a step, an
    object with ``name`` (a short label, e.g. the ISA: ``lean native (avx2)``),
    ``max_batch`` (the most sequences one call takes), ``seconds(reset=False)``
    (a dict of the seconds spent in ``attention``, ``ffn`` and ``head``) and
    ``__call__(x, pos, k_cache, v_cache, cos, sin, banned) -> next ids [B]``:
    one greedy step of every layer, the final norm, the LM head and the argmax
    for the new tokens' embeddings ``x`` ``[B, d]`` at position ``pos``, over
    the lean path's static caches ``[layers, B, kv heads, length, head dim]``
    (positions ``< pos`` filled; it writes ``pos``) and rotary tables ``cos``,
    ``sin`` ``[length, head dim]``, never choosing an id in ``banned`` (int64
    tensor or ``None``). It must give the lean torch step's tokens (to fp32
    rounding) and compute the model's modules as they are at the call (their
    weights borrowed, not copied). The first step returned is used.
    """


@hookspec
def sparsify_bench_cases():
    """Return benchmark cases for ``sparsify bench``: ``sparsify_core.bench.BenchCase`` objects.

    A case has a ``number`` (what ``--case`` selects; unique across plugins), a
    ``name``, a one-line ``description``, and ``run(options) -> rows``: given
    the user's ``BenchOptions`` (``quick`` smoke sizes, a ``model_dir``), it
    times its candidates against dense compute (``sparsify_core.bench.interleaved``)
    and returns ``Row`` s. The engine runs the chosen cases, prints them, and
    with ``--record`` stores them as a ``bench`` record with the machine's
    fields; the plugin that owns the modules a case times contributes it."""


@hookspec
def sparsify_run_started(run_id: str, recipe, resumed: bool):
    """Called once per attempt, after the run is recorded in the registry and before the model loads.

    ``recipe`` is the validated ``Recipe``; ``resumed`` is true for
    ``--resume`` (``Runner(resume_id=...)``), where ``run_id`` is the resumed
    run's id. Not called when nothing is recorded: a recipe the model cannot
    take, or a resume the registry refuses (run finished, still running,
    unknown)."""


@hookspec
def sparsify_stage_started(run_id: str, index: int, stage):
    """Called before stage ``index`` (0-based) of the recipe runs; ``stage`` is its recipe ``Stage``.

    A resumed run starts at the first stage that did not complete: stages
    completed in an earlier attempt are not announced again, and the stage
    that failed or was interrupted is started again."""


@hookspec
def sparsify_metrics_logged(run_id: str, stage: str, step, metrics: dict):
    """Called whenever evaluation or training metrics are recorded.

    ``stage`` is the stage name (``dense`` for the baseline, evaluated once
    per run: a resumed run whose baseline is recorded does not repeat it),
    ``step`` the training step, or ``None`` for an evaluation; ``metrics``
    maps metric name to value (an evaluation's whole-model values, without
    metrics that failed). A stage's own result metrics come with
    ``sparsify_stage_finished`` instead."""


@hookspec
def sparsify_stage_finished(run_id: str, index: int, stage, status: str, metrics: dict):
    """Called once for every ``sparsify_stage_started``, when stage ``index`` ends.

    ``status`` is ``completed``, ``failed`` (an exception in the method, or
    while the engine records its result, hands on its schedule or writes its
    checkpoint) or ``interrupted`` (Ctrl-C, SIGTERM, SIGHUP). Completed:
    ``metrics`` holds the method's result metrics plus ``stage_seconds`` and
    ``peak_memory_mb``, and the call comes after the stage's
    checkpoint is written. Failed or interrupted: ``metrics`` is
    ``{"stage_seconds": <seconds from the stage's start to the failure>}``,
    and ``sparsify_run_finished`` follows with the same status and the
    reason. An error after the stage completed (in the evaluation after it)
    fails the run, not the stage."""


@hookspec
def sparsify_run_finished(run_id: str, status: str, reason):
    """Called once for every ``sparsify_run_started``, as the last lifecycle call of the attempt.

    ``status`` is ``finished`` (``reason`` is ``None``), ``failed`` or
    ``interrupted`` (``reason`` is the one-line message the registry records,
    e.g. ``stopped by SIGTERM``). It is called whatever ended the run: a stage,
    or something outside the stages (loading the model or data, the dense
    evaluation, an evaluation after a stage, saving the output), and before
    the run's error reaches the caller."""
