"""The pruning template (``ScorePruner``, ``score_masks``): the selection alone on small tensors, then every
calibration mode x comparison group x pattern on the tiny model."""
from __future__ import annotations

import pytest
import torch
from helpers import make_ctx, tiny_model

from sparsify_core.errors import SparsifyError
from sparsify_plugins.prune import PruneParams, ScopedPruneParams, ScorePruner, score_masks
from sparsify_plugins.prune.masks import global_magnitude_masks, magnitude_mask, nm_mask, prune_count, row_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def test_score_masks_is_the_mask_functions_on_abs_scores():
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g)]
    prior = [torch.rand(6, 8, generator=g) < 0.2, None]
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    assert same(score_masks(scores, [0.5, 0.25], prior),
                [magnitude_mask(s, sp, p) for s, sp, p in zip(scores, [0.5, 0.25], prior)])
    assert same(score_masks(scores, [0.5, 0.25], prior, group="row"),
                [row_mask(s.abs(), sp, p) for s, sp, p in zip(scores, [0.5, 0.25], prior)])
    assert same(score_masks(scores, [0.0, 0.0], prior, nm=(2, 4)), [nm_mask(s.abs(), 2, 4, p)
                                                                   for s, p in zip(scores, prior)])
    assert same(score_masks(scores, [0.0, 0.0], prior, global_sparsity=0.4),
                global_magnitude_masks(scores, 0.4, prior))
    # the sign does not matter: |score| ranks
    assert same(score_masks([-s for s in scores], [0.5, 0.25], prior), score_masks(scores, [0.5, 0.25], prior))
    for keep, n, s in zip(score_masks(scores, [0.5, 0.25], prior), (48, 32), (0.5, 0.25)):
        assert int((~keep).sum()) == prune_count(n, s)
    with pytest.raises(ValueError, match="2 scores, 1 sparsities"):
        score_masks(scores, [0.5], prior)


class Probe(ScorePruner):
    """Scores from a fixed hash of positions; records how ``scores`` was called."""

    name = "probe"
    calls: list = []

    def scores(self, ctx, params, targets, layer=None):
        self.calls.append((layer, [t.name for t in targets]))
        out = {}
        for t in targets:
            rows, cols = t.weight().shape
            out[t.name] = (torch.arange(rows * cols).reshape(rows, cols) * 2654435761 % 1000003).float()
        return out


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("group", ["matrix", "row"])
@pytest.mark.parametrize("calibration", ["none", "model", "layerwise"])
def test_every_mode_delivers_exactly_and_calls_scores_as_documented(tmp_path, calibration, group, pattern):
    cls = type("P", (Probe,), {"calibration": calibration, "group": group, "calls": []})
    params = PruneParams(**({"sparsity": 0.6} if pattern == "unstructured" else {"pattern": pattern}))
    model = tiny_model()
    ctx = make_ctx(tmp_path, model, samples=4, seq_len=16)
    reads = [s for _, s in cls().data_splits(params)]
    assert reads == ([] if calibration == "none" else ["calibration"])
    result = cls().apply(ctx, params)
    if calibration == "layerwise":  # one call per transformer layer, with that layer and its targets
        assert [layer.index for layer, _ in cls.calls] == [0, 1]
        assert all(all(n.startswith(f"model.layers.{layer.index}.") for n in names) for layer, names in cls.calls)
        assert result.metrics["calibration_tokens"] == 4 * 16
    else:
        assert [(layer, len(names)) for layer, names in cls.calls] == [(None, 14)]
    params_of = dict(model.named_parameters())
    zeros = 0
    for name, keep in ctx.masks.items():
        w = params_of[name]
        assert int((w == 0).sum()) == int((~keep).sum()) == prune_count(w.numel(), 0.6 if pattern != "2:4" else 0.5)
        if group == "row" and pattern == "unstructured":  # each row its share, rows within one weight
            per_row = (~keep).sum(-1)
            assert int(per_row.max() - per_row.min()) <= 1
        if pattern == "2:4":
            assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
        zeros += int((~keep).sum())
    assert len(ctx.masks) == 14 and result.metrics["weights_pruned"] == zeros


def test_refusals(tmp_path):
    ctx = make_ctx(tmp_path, tiny_model(), samples=4, seq_len=16)

    class Partial(Probe):
        name = "partial"

        def scores(self, ctx, params, targets, layer=None):
            return dict(list(super().scores(ctx, params, targets).items())[1:])

    with pytest.raises(SparsifyError, match="prune/partial: no scores for model.layers.0.self_attn.q_proj"):
        Partial().apply(ctx, PruneParams(sparsity=0.5))

    class Layerwise(Probe):
        name = "layerwise"
        calibration = "layerwise"
        Params = ScopedPruneParams

    with pytest.raises(SparsifyError, match="prunes layer by layer: scope global cannot apply"):
        Layerwise().apply(ctx, ScopedPruneParams(sparsity=0.5, scope="global"))
    with pytest.raises(SparsifyError, match="outside the transformer layers"):
        Layerwise().apply(ctx, ScopedPruneParams(sparsity=0.5, targets=["lm_head"], exclude=[]))
    assert not ctx.masks  # refused before anything was pruned
