"""``prune/nmg``: prune straight into the n:m:g structure (STen's grouped n:m)."""
from __future__ import annotations

from sparsify_core import Method, MetricInfo, StageResult
from sparsify_core.errors import ParamsError, SparsifyError
from sparsify_core.ffn import is_conv1d, prunable_modules, weight_out_in

from . import formats as F
from .convert import WeightLayoutParams
from .weight import NMGParams


class NMGPruneParams(NMGParams):
    targets: list[str] | None = WeightLayoutParams.model_fields["targets"]
    exclude: list[str] = WeightLayoutParams.model_fields["exclude"]


class NMGPrune(Method):
    """Grouped n-of-m magnitude pruning (STen): n of every m inputs, each pattern used g times per chunk (greedy).

    Scores every (row block, pattern) pair by the ``|w|`` it keeps and assigns
    greedily (``docs/methods.md#nmg``), so the result converts exactly with
    ``layout_convert/nmg`` (and ``nm``). Masks are recorded like any pruning.
    Weights pruned by an earlier stage stay pruned: the rigid pattern usage
    cannot in general absorb them, so the stage's ``sparsity`` (the measured
    fraction of targeted weights that are zero) is then above ``1 - n/m``, and
    a status line says so.
    """

    kind = "prune"
    name = "nmg"
    Params = NMGPruneParams

    def check(self, model, params) -> None:
        """Something to prune. (Widths need not be multiples of m: the format pads, exactly.)"""
        if not prunable_modules(model, params.targets, params.exclude):
            raise ParamsError(f"no Linear/Conv1D module matches targets={params.targets}", field="targets")

    def apply(self, ctx, params) -> StageResult:
        modules = prunable_modules(ctx.model, params.targets, params.exclude)
        if not modules:
            raise SparsifyError(f"no Linear/Conv1D module matches targets={params.targets}")
        pruned = total = 0
        earlier = [name for name, _ in modules if f"{name}.weight" in ctx.masks]
        with ctx.progress(f"grouped {params.n}-of-{params.m}, g={params.g}", total=len(modules)) as task:
            for name, module in modules:
                w = weight_out_in(module).detach()
                val, row = F.nmg_from_dense(w, params.n, params.m, params.g, exact=False)
                keep = F.nmg_to_dense(val.new_ones(val.shape), row, params.n, params.m, params.g, w.shape) != 0
                if is_conv1d(module):  # Conv1D stores [in, out]
                    keep = keep.t()
                ctx.masks.set(f"{name}.weight", keep)
                pruned += int((~ctx.masks.get(f"{name}.weight")).sum())
                total += keep.numel()
                task.advance(1)
        ctx.masks.apply(ctx.model)
        asked = 1 - params.n / params.m
        if earlier and pruned / total > asked + 1e-12:
            # Each pattern must be used g times per chunk, so earlier zeros cannot in general be placed
            # among the pruned positions; they stay pruned (never regrown), and the count says so.
            ctx.info(f"{len(earlier)} targets had weights pruned by earlier stages ({', '.join(earlier[:3])}"
                     f"{' ...' if len(earlier) > 3 else ''}); they stay pruned, so the grouped "
                     f"{params.n}:{params.m} leaves {pruned / total:.4g} of the targeted weights zero, not {asked:g}")
        return StageResult(metrics={"sparsity": pruned / total, "modules_pruned": float(len(modules))},
                           metric_info={"sparsity": MetricInfo(fraction=True), "modules_pruned": MetricInfo(unit="modules")})
