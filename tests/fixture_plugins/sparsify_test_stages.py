"""Stage methods that only tests use: a stage that waits for a file (to kill or
interrupt a run mid-stage) and a stage that fails. Made visible to subprocesses
through a generated ``.dist-info`` entry point (see ``helpers.plugin_env``)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from sparsify_core import Method, Params, StageResult, hookimpl


class WaitForFile(Method):
    """Touch ``started``, wait until ``release`` exists, then scale every weight by ``factor``."""

    kind = "test"
    name = "wait_for_file"

    class Params(Params):
        started: str
        release: str
        factor: float = 1.0

    def apply(self, ctx, params):
        Path(params.started).write_text(str(os.getpid()))
        with ctx.progress("waiting for the release file") as task:
            while not Path(params.release).exists():
                time.sleep(0.05)
                task.advance(0)
        with torch.no_grad():
            for p in ctx.model.parameters():
                p.mul_(params.factor)
        return StageResult(metrics={"waited": 1.0})


class Fail(Method):
    """Raise an error (to test failure records)."""

    kind = "test"
    name = "fail"

    class Params(Params):
        message: str = "boom"

    def apply(self, ctx, params):
        raise RuntimeError(params.message)


@hookimpl
def sparsify_methods():
    return [WaitForFile, Fail]
