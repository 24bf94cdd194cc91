"""A metric that only tests use: it always fails, to check that a failing metric costs a run nothing.
Made visible to subprocesses like ``sparsify_test_stages`` (``helpers.plugin_env(tmp, "sparsify_test_metrics")``)."""
from __future__ import annotations

from sparsify_core import Metric, hookimpl


class Broken(Metric):
    """Raise in every eval batch; the message has a second line, which the record must leave out."""

    name = "broken"
    uses_forward = True

    def update(self, batch, logits, reference_logits):
        raise RuntimeError("deliberately broken\nsecond line")

    def finish(self, ctx):
        return []


@hookimpl
def sparsify_metrics():
    return [Broken]
