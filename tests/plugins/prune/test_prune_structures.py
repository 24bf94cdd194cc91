"""Mask structures and sparsity profiles shared by every pruning method: pure functions, and their params."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from sparsify_plugins.prune import (Magnitude, PruneParams, SparseGPT, Wanda, layer_sparsities, nm_mask,
                                    outlier_ratio, owl_sparsities, parse_pattern, row_mask, wanda_scores)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 7), (1, 2)])
def test_nm_mask_keeps_exactly_n_largest_of_every_m(n, m):
    scores = torch.randn(6, 5 * m, generator=torch.Generator().manual_seed(n * m)).abs()
    keep = nm_mask(scores, n, m)
    groups = keep.view(6, 5, m)
    assert (groups.sum(-1) == n).all()
    s = scores.view(6, 5, m)
    kept_min = torch.where(groups, s, torch.inf).min(-1).values
    pruned_max = torch.where(~groups, s, -torch.inf).max(-1).values
    assert (kept_min >= pruned_max).all()


def test_nm_mask_ties_and_shape_errors():
    assert nm_mask(torch.ones(1, 8), 2, 4).tolist() == [[True, True, False, False] * 2]
    with pytest.raises(ValueError, match="multiple of m=4"):
        nm_mask(torch.ones(2, 6), 2, 4)


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.9])
def test_row_mask_prunes_the_matrix_total_spread_over_rows(s):
    scores = torch.randn(7, 33, generator=torch.Generator().manual_seed(1))
    scores[0, :5] = 0.25  # ties
    keep = row_mask(scores, s)
    counts = (~keep).sum(1)
    assert int(counts.sum()) == int(s * 7 * 33 + 0.5)  # exact for the matrix, not rounded row by row
    assert int(counts.max() - counts.min()) <= 1
    for r in range(7):  # each row prunes its own lowest scores (ties: lower index first)
        k = int(counts[r])
        ref = torch.ones(33, dtype=torch.bool).scatter_(0, scores[r].sort(stable=True).indices[:k], False)
        assert torch.equal(keep[r], ref)


def test_row_quotas_respect_earlier_pruning():
    from sparsify_plugins.prune import row_quotas
    assert row_quotas(torch.tensor([0, 0, 0]), 10, 7).tolist() == [3, 2, 2]
    assert row_quotas(torch.tensor([6, 0, 0]), 10, 12).tolist() == [6, 3, 3]
    assert row_quotas(torch.tensor([6, 0, 1]), 10, 11).tolist() == [6, 3, 2]
    assert row_quotas(torch.tensor([6, 5, 1]), 10, 4).tolist() == [6, 5, 1]  # asked for less than is pruned
    assert row_quotas(torch.tensor([0, 0]), 10, 20).tolist() == [10, 10]
    # rows with earlier zeros prune them first and the matrix still ends at the request
    scores = torch.rand(4, 16, generator=torch.Generator().manual_seed(0))
    pruned = torch.zeros(4, 16, dtype=torch.bool)
    pruned[0, :12] = True
    keep = row_mask(scores, 0.5, pruned)
    assert not keep[pruned].any() and int((~keep).sum()) == 32
    assert (~keep).sum(1).tolist() == [12, 7, 7, 6]


def test_wanda_equals_magnitude_per_row_when_input_norms_are_equal():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    scores = wanda_scores(w, torch.full((32,), 3.0))
    assert torch.equal(row_mask(scores, 0.5), row_mask(w.abs(), 0.5))
    assert torch.equal(nm_mask(scores, 2, 4), nm_mask(w.abs(), 2, 4))
    # a large input norm protects that input's weights
    norms = torch.ones(32)
    norms[3] = 1e6
    assert row_mask(wanda_scores(w, norms), 0.9)[:, 3].all()


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("16:32") == (16, 32)
    for bad in ["4:2", "0:4", "2:2", "2-4", "two:four", "2:4:8"]:
        with pytest.raises(ValueError):
            parse_pattern(bad)


def test_owl_profile_keeps_the_mean_and_spares_outlier_layers():
    ratios = [0.01, 0.05, 0.02, 0.09]
    s = owl_sparsities(ratios, 0.7, 0.08)
    assert sum(s) / 4 == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)  # 2 lambda
    assert s.index(min(s)) == 3 and s.index(max(s)) == 0  # most outliers: pruned least
    assert owl_sparsities([0.3, 0.3], 0.5, 0.08) == [0.5, 0.5]


@pytest.mark.parametrize("sizes,sparsity,lam", [([100, 300, 50, 0], 0.7, 0.08), ([10, 1000, 10, 10], 0.5, 0.2),
                                                 ([1, 2, 3, 4], 0.95, 0.08), ([5, 5, 5, 5], 0.05, 0.2)])
def test_owl_profile_delivers_the_sparsity_over_the_targeted_weights(sizes, sparsity, lam):
    """The mean weighted by targeted weights is the request, also where clipping to [0, 1) bites
    (0.95 + lambda, 0.05 - 2 lambda); layers without targets take no part."""
    ratios = [0.01, 0.05, 0.02, 0.09]
    s = owl_sparsities(ratios, sparsity, lam, sizes)
    assert sum(v * n for v, n in zip(s, sizes)) / sum(sizes) == pytest.approx(sparsity, abs=1e-9)
    assert all(0 <= v < 1 for v in s)
    live = [i for i, n in enumerate(sizes) if n]
    order = sorted(live, key=lambda i: ratios[i])  # more outliers: pruned no more than a layer with fewer
    assert all(s[a] >= s[b] for a, b in zip(order, order[1:]))
    if sizes[3] == 0:
        assert s[3] == sparsity  # unused: nothing of layer 3 is pruned
        assert owl_sparsities(ratios[:3], sparsity, lam, sizes[:3]) == pytest.approx(s[:3])
    with pytest.raises(ValueError, match="some positive"):
        owl_sparsities(ratios, sparsity, lam, [0, 0, 0, 0])


def test_outlier_ratio():
    a = torch.ones(10, 10)
    a[0, 0] = 100.0  # mean 1.99; 100 > 5 x mean, the ones are not
    assert outlier_ratio([a], 5.0) == pytest.approx(0.01)
    assert outlier_ratio([a, torch.ones(100)], 5.0) == pytest.approx(0.005)  # the layer's matrices pooled


def test_layer_sparsities():
    assert layer_sparsities("uniform", 0.5, 3) == [0.5] * 3
    assert layer_sparsities([0.1, 0.2], None, 2) == [0.1, 0.2]
    with pytest.raises(ValueError, match="2 values but there are 3"):
        layer_sparsities([0.1, 0.2], None, 3)
    assert layer_sparsities("owl", 0.5, 2, [0.0, 1.0], 0.1) == pytest.approx([0.6, 0.4])


@pytest.mark.parametrize("method", [Magnitude, Wanda, SparseGPT])
def test_params_validation(method):
    P = method.Params
    assert P(pattern="2:4").target_sparsity == 0.5 and P(pattern="1:4").nm == (1, 4)
    assert P(sparsity=0.5, pattern="2:4").target_sparsity == 0.5
    assert P(profile=[0.2, 0.4]).target_sparsity is None
    for bad in [{}, {"sparsity": 0.5, "pattern": "3:4"}, {"pattern": "2:4", "profile": "owl"},
                {"sparsity": 1.0}, {"sparsity": 0.5, "pattern": "4:2"}, {"profile": [0.5, 1.0]},
                {"profile": "owl"}, {"sparsity": 0.5, "targets": ["("]}, {"sparsity": 0.5, "spars": 1}]:
        with pytest.raises(ValidationError):
            P(**bad)
    with pytest.raises(ValidationError, match="quote n:m"):
        P(pattern=124)  # what YAML makes of an unquoted 2:4
    assert issubclass(P, PruneParams)


def test_method_specific_params():
    with pytest.raises(ValidationError, match="scope global"):
        Magnitude.Params(pattern="2:4", scope="global")
    with pytest.raises(ValidationError, match="multiple of m"):
        SparseGPT.Params(pattern="2:3", block_size=128)
