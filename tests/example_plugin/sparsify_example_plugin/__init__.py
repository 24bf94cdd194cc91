"""An example third-party sparsify plugin: one ``@hookimpl`` function per hook of ``sparsify_core/hookspecs.py``.

- ``sparsify_methods``: ``prune/random`` (a method of a built-in kind) and
  ``quantize/round_to_grid`` (a kind of its own) (``methods.py``);
- ``sparsify_model_sources``: ``arithmetic_gpt2``, a tiny GPT-2 over the
  characters of written-out sums (``sources.py``);
- ``sparsify_data_sources``: ``arithmetic``, written-out sums (``sources.py``);
- ``sparsify_metrics``: ``weight_l2`` (``metrics.py``);
- ``sparsify_layouts``: ``example_coo``, a coordinate-list weight layout in
  plain torch that ``layout_convert/weight`` with ``layout: example_coo``
  uses (``layout.py``);
- ``sparsify_bench_cases``: case 101, that layout's kernel against dense
  (``bench.py``);
- ``sparsify_fast_modules``: a Linear whose weight is entirely zero becomes a
  ``ZeroLinear`` that computes only its bias (``fast.py``);
- ``sparsify_lean_step``: a lean-path decode step in plain torch through the
  model's own modules, offered when ``SPARSIFY_EXAMPLE_LEAN_STEP=1``
  (``decode_step.py``);
- the lifecycle hooks: a tracker that appends one JSON line per call to the
  file named by ``SPARSIFY_EXAMPLE_LOG`` (nothing without it), the way a
  plugin would forward a run to an experiment tracker.

Installed, it is found through the ``sparsify.plugins`` entry point in its
pyproject.toml.
"""
from __future__ import annotations

import json
import os

from sparsify_core import hookimpl

from .layout import COO
from .methods import RandomPrune, RoundToGrid
from .metrics import WeightL2
from .sources import Arithmetic, ArithmeticGPT2


@hookimpl
def sparsify_methods():
    """``prune/random`` and ``quantize/round_to_grid``."""
    return [RandomPrune, RoundToGrid]


@hookimpl
def sparsify_model_sources():
    """``arithmetic_gpt2``."""
    return [ArithmeticGPT2]


@hookimpl
def sparsify_data_sources():
    """``arithmetic``."""
    return [Arithmetic]


@hookimpl
def sparsify_metrics():
    """``weight_l2``."""
    return [WeightL2]


@hookimpl
def sparsify_layouts():
    """``example_coo``."""
    return [COO]


@hookimpl
def sparsify_fast_modules(model, masks, device):
    """All-zero Linear weights compute only their bias (``ZeroLinear``)."""
    from .fast import zero_linears

    return zero_linears(model, masks)


@hookimpl
def sparsify_lean_step(model):
    """A decode step in plain torch (``decode_step.TorchStep``) when ``SPARSIFY_EXAMPLE_LEAN_STEP=1``."""
    if os.environ.get("SPARSIFY_EXAMPLE_LEAN_STEP") != "1":
        return None
    from .decode_step import TorchStep

    return TorchStep(model)


@hookimpl
def sparsify_bench_cases():
    """Case 101 (not a default case)."""
    from .bench import CASES  # imported when benchmarking (or listing) only

    return list(CASES)


# -- the tracker: one JSON line per lifecycle call --------------------------------


def _track(event: str, **fields) -> None:
    path = os.environ.get("SPARSIFY_EXAMPLE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, **fields}) + "\n")


@hookimpl
def sparsify_run_started(run_id, recipe, resumed):
    _track("run_started", run=run_id, recipe=recipe.name, resumed=resumed)


@hookimpl
def sparsify_stage_started(run_id, index, stage):
    _track("stage_started", run=run_id, index=index, stage=stage.name, kind=stage.kind, method=stage.method)


@hookimpl
def sparsify_metrics_logged(run_id, stage, step, metrics):
    _track("metrics_logged", run=run_id, stage=stage, step=step, metrics=metrics)


@hookimpl
def sparsify_stage_finished(run_id, index, stage, status, metrics):
    _track("stage_finished", run=run_id, index=index, stage=stage.name, status=status, metrics=metrics)


@hookimpl
def sparsify_run_finished(run_id, status, reason):
    _track("run_finished", run=run_id, status=status, reason=reason)
