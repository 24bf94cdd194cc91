"""``prune/nmg``: prune straight into the n:m:g structure (STen's grouped n:m), on the pruning template."""
from __future__ import annotations

import torch

from sparsify_core.errors import ParamsError
from sparsify_core.ffn import prunable_modules
from sparsify_plugins.layouts import formats as F
from sparsify_plugins.layouts.convert import WeightLayoutParams
from sparsify_plugins.layouts.weight import NMGParams

from .pruner import ScorePruner
from .selection import PruneParams, Target, select_targets


class NMGPruneParams(NMGParams):
    targets: list[str] | None = WeightLayoutParams.model_fields["targets"]
    exclude: list[str] = WeightLayoutParams.model_fields["exclude"]


def nmg_keep_mask(scores: torch.Tensor, n: int, m: int, g: int) -> torch.Tensor:
    """Keep-mask ``[out, in]`` of the n:m:g structure keeping the most ``|score|`` (greedy, ``formats.nmg_assign``).

    Every chunk of ``C(m, n) * g`` rows uses each n-of-m pattern exactly g
    times per block of m inputs; widths that are not multiples pad, exactly.
    """
    val, row = F.nmg_from_dense(scores.detach(), n, m, g, exact=False)
    return F.nmg_to_dense(val.new_ones(val.shape), row, n, m, g, scores.shape) != 0


class NMGPrune(ScorePruner):
    """Grouped n-of-m magnitude pruning (STen): n of every m inputs, each pattern used g times per chunk (greedy).

    Scores every (row block, pattern) pair by the ``|w|`` it keeps and assigns
    greedily (``docs/methods.md#nmg``), so the result converts exactly with
    ``layout_convert/nmg`` (and ``nm``). Masks are recorded like any pruning.
    Weights pruned by an earlier stage stay pruned: the rigid pattern usage
    cannot in general absorb them, so the stage's ``sparsity`` (the measured
    fraction of targeted weights that are zero) is then above ``1 - n/m``, and
    a status line says so. The template's targets, masks and summary, its own
    structure (``masks``) and parameters (n, m, g; no profile).
    """

    name = "nmg"
    Params = NMGPruneParams

    def data_splits(self, params):
        """None: the weights alone decide."""
        return []

    def check(self, model, params) -> None:
        """Something to prune. (Widths need not be multiples of m: the format pads, exactly.)"""
        if not prunable_modules(model, params.targets, params.exclude):
            raise ParamsError(f"no Linear/Conv1D module matches targets={params.targets}", field="targets")

    def targets(self, model, params) -> list[Target]:
        """Selected like any pruning's targets, at the pattern's sparsity ``1 - n/m``."""
        as_prune = PruneParams(sparsity=1 - params.n / params.m, targets=params.targets, exclude=params.exclude)
        return select_targets(model, as_prune)

    def assign(self, ctx, params, targets):
        """The pattern fixes every target's sparsity; no profile. Notes the targets earlier stages pruned."""
        for t in targets:
            t.sparsity = 1 - params.n / params.m
        self._earlier = [t.name for t in targets if t.param in ctx.masks]  # for summarize's status line
        return None

    def scores(self, ctx, params, targets, layer=None):
        """The weights themselves: the greedy assignment keeps the most ``|w|``."""
        return {t.name: t.weight() for t in targets}

    def masks(self, ctx, params, targets, scores):
        """The grouped n:m:g structure (``nmg_keep_mask``) instead of the template's."""
        return [nmg_keep_mask(scores[t.name], params.n, params.m, params.g) for t in targets]

    def label(self, params) -> str:
        return f"grouped {params.n}-of-{params.m}, g={params.g}"

    def summarize(self, ctx, params, targets, per_layer, **metrics):
        result = super().summarize(ctx, params, targets, per_layer, **metrics)
        asked, got = 1 - params.n / params.m, result.metrics["sparsity"]
        earlier = self._earlier
        if earlier and got > asked + 1e-12:
            # Each pattern must be used g times per chunk, so earlier zeros cannot in general be placed
            # among the pruned positions; they stay pruned (never regrown), and the count says so.
            ctx.info(f"{len(earlier)} targets had weights pruned by earlier stages ({', '.join(earlier[:3])}"
                     f"{' ...' if len(earlier) > 3 else ''}); they stay pruned, so the grouped "
                     f"{params.n}:{params.m} leaves {got:.4g} of the targeted weights zero, not {asked:g}")
        return result
