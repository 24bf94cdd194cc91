"""SparseGPT (Frantar & Alistarh 2023): prune with layer-wise OBS reconstruction.

For a Linear layer with calibration inputs ``X`` (``[tokens, in]``) the layer
output ``W X^T`` is kept close by pruning columns left to right and spreading
each pruned weight's error over the not yet processed columns of its row,
through the inverse Hessian ``H^-1`` of ``||W X^T - W' X^T||^2``, ``H = 2 X^T
X``. The pure functions here do this for one weight matrix:

- ``hessian_factor``: dampen ``H`` (``dampening`` x mean diagonal added to the
  diagonal) and return the upper Cholesky factor ``U`` of ``H^-1`` (computed
  in float64 from a Cholesky factor of ``H``); row ``i`` of ``U`` holds, scaled by
  ``U_ii``, the OBS update for eliminating column ``i`` once columns ``< i``
  are gone.
- ``sparsegpt_prune``: the column sweep in blocks of ``block_size`` columns
  (updates inside a block right away, to later blocks once per block). The
  mask is chosen as the sweep goes, on the already updated weights, by the
  OBS saliency ``w^2 / U_ii^2``: unstructured, the lowest fraction of each
  block (rows together: the paper's adaptive mask selection); n:m, the
  ``m - n`` lowest of every m consecutive columns of each row.

Input features that are never non-zero (``H_jj = 0``) carry no signal: their
weights are pruned first (saliency 0), as in the reference code, but only
within the sparsity asked for; the reference zeroes all of them, which can
prune more than asked, and of inputs that may well be live on other data.

Numerics: ``H = X^T X`` is singular when there are fewer calibration tokens
than inputs or collinear inputs, and float32 accumulation leaves it slightly
indefinite; only the dampening makes it positive definite. ``dampening``
must be > 0 (validation), and when the Cholesky factorisation still fails
``damped_factor`` retries at 10x the dampening up to ``MAX_DAMPENING``,
which the stage reports (status line, ``dampening_raised`` metric and info).
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator, model_validator

from sparsify_core import Method, MetricInfo, StageResult
from sparsify_core.calibration import CalibrationLayer, calibrate
from sparsify_core.errors import SparsifyError

from .masks import prune_count
from .selection import (PruneParams, assign_sparsities, by_layer, check_targets, prior_pruned, record_mask,
                        select_targets, summary)


MAX_DAMPENING = 1.0  # x mean diagonal: H + mean(diag) I is positive definite for any PSD H, in exact arithmetic


def _check_finite(hessian: torch.Tensor) -> None:
    # no dampening repairs an inf or a NaN: say where they come from instead
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("the Hessian of the calibration inputs is not finite: the layer's inputs overflowed "
                         "(calibrate in float32 or a wider dtype)")


def hessian_factor(hessian: torch.Tensor, dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of the dampened ``H^-1`` (float32) and the dead inputs.

    ``hessian`` is ``[in, in]``; ``dead`` (``[in]`` bool) marks inputs with
    ``H_jj == 0``; their diagonal is set to 1 before dampening so that ``H``
    is invertible. Dampening adds ``dampening * mean(diag H)`` to the
    diagonal (SparseGPT's ``percdamp``, Frantar & Alistarh 2023). Computed in
    float64 with one Cholesky and one triangular inverse: with ``J`` the
    order-reversing permutation and ``J H J = L L^T``, ``U = J L^-1 J`` is
    upper triangular and ``U^T U = H^-1``.

    Raises ``ValueError`` when ``H`` is not finite, or the dampened ``H`` is
    not positive definite or its factor not finite in float32 (the message
    says to raise ``dampening`` or calibrate on more tokens).
    """
    _check_finite(hessian)
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += dampening * torch.diagonal(h).mean()
    low, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info) != 0:
        raise ValueError(f"the Hessian is not positive definite at dampening {dampening:g} "
                         "(fewer calibration tokens than inputs, or collinear inputs): raise dampening or the "
                         "calibration samples")
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    u = torch.linalg.solve_triangular(low, eye, upper=False).flip(0, 1).to(torch.float32)
    if not bool(torch.isfinite(u).all()):
        raise ValueError(f"the inverse Hessian overflows float32 at dampening {dampening:g}: raise dampening or "
                         "the calibration samples")
    return u, dead


def damped_factor(hessian: torch.Tensor, dampening: float = 0.01, max_dampening: float = MAX_DAMPENING
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(U, dead, used)``: ``hessian_factor`` at ``dampening``, retried at 10x steps up to ``max_dampening``.

    ``used`` is the dampening that worked (``dampening`` itself unless a retry
    was needed). Raises the last attempt's ``ValueError`` when even
    ``max_dampening`` fails (a Hessian that is not finite is not retried).
    """
    _check_finite(hessian)
    d = float(dampening)
    while True:
        try:
            return (*hessian_factor(hessian, d), d)
        except ValueError as exc:
            if d >= max_dampening:
                tried = f" (retried from {dampening:g})" if d != dampening else ""
                raise ValueError(f"{exc}{tried}") from None
            d = min(max(d, 1e-12) * 10, max_dampening)


def _lowest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly the ``k`` lowest entries of a 1-D tensor (ties: lower index first)."""
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    threshold = values.kthvalue(k).values  # a selection, cheaper than sorting or topk
    mask = values <= threshold
    if int(mask.sum()) == k:  # no ties at the threshold: the usual case
        return mask
    mask = values < threshold
    ties = values == threshold
    return mask | (ties & (ties.cumsum(0) <= k - int(mask.sum())))


def _block_budget(share: int, forced: int, size: int, left: int, later_forced: int, later_size: int) -> int:
    """Weights a block prunes: its ``share``, but at least its ``forced`` ones, and never so many (or so
    few) that the ``left`` still to prune cannot be met by the later blocks, forced ones included."""
    k = min(max(share, forced, left - later_size), size, left - later_forced)
    return max(k, forced)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor | None = None, *, sparsity: float | None = None,
                    nm: tuple[int, int] | None = None, block_size: int = 128, dampening: float = 0.01,
                    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
                    pruned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one ``[out, in]`` weight; returns ``(new_weight, keep)``, ``new_weight`` in float32.

    Give ``hessian`` (``[in, in]``, any positive multiple of ``X^T X``) or a
    precomputed ``factor = hessian_factor(H, dampening)`` (shared by matrices
    with the same input). Exactly ``round(sparsity * out * in)`` weights are
    pruned when unstructured (each block of ``block_size`` columns takes its
    share, chosen at the block's start); with ``nm = (n, m)`` every group of m
    consecutive inputs of a row keeps n. ``block_size`` must be a multiple of m.
    ``pruned`` (``[out, in]`` bool): weights pruned before, which are pruned
    again here (their error compensated like any other) and count towards
    the sparsity; a block holding more than its share takes them all and the
    later blocks prune less. Raises ``ValueError`` on inconsistent arguments
    and, without ``factor``, as ``hessian_factor``.

    Implementation: the sweep runs on the transposed weight (a column is then
    contiguous), and inside a block the rank-1 updates only reach a sub-block
    of about 16 columns, the rest of the block getting each sub-block's
    errors in one matrix product: the same arithmetic as the per-block
    sweep, reordered, with far less memory traffic.
    """
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity and nm")
    if nm is not None and block_size % nm[1]:
        raise ValueError(f"block_size {block_size} is not a multiple of m={nm[1]}")
    u, dead = factor if factor is not None else hessian_factor(hessian, dampening)
    wt = weight.detach().to(torch.float32).t().contiguous()  # [in, out]: row i is input column i
    cols, rows = wt.shape
    if nm is not None and cols % nm[1]:
        raise ValueError(f"{cols} inputs are not a multiple of m={nm[1]}")
    u, dead = u.to(wt.device), dead.to(wt.device)
    forced = (pruned.t().to(wt.device) if pruned is not None else torch.zeros_like(wt, dtype=torch.bool))
    inv_diag = 1.0 / torch.diagonal(u)

    def saliency_of(c0: int, c1: int) -> torch.Tensor:
        # OBS saliency w^2 / U_ii^2; dead inputs carry no signal (0, pruned first), earlier pruning goes before all
        sal = (wt[c0:c1] * inv_diag[c0:c1, None]).square().masked_fill(dead[c0:c1, None], 0.0)
        return sal.masked_fill(forced[c0:c1], -torch.inf)

    prune = torch.zeros_like(wt, dtype=torch.bool)
    scale = torch.zeros_like(wt)  # prune / U_ii: turns a column into its OBS error
    step = nm[1] * -(-16 // nm[1]) if nm is not None else 16
    if nm is None:
        total = prune_count(rows * cols, sparsity)
        forced_cols = forced.sum(1).cumsum(0).tolist()  # forced entries in columns < i + 1
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        if nm is None:
            # this block's share of the matrix's round(sparsity * numel) (catching up with the blocks before),
            # bounded so that the forced entries of every block fit and the total stays exact
            done = int(prune[:b0].sum())
            f_before, f_upto = (forced_cols[b0 - 1] if b0 else 0), forced_cols[b1 - 1]
            k = _block_budget(prune_count(rows * b1, sparsity) - done, f_upto - f_before, rows * (b1 - b0),
                              total - done, forced_cols[-1] - f_upto, rows * (cols - b1))
            prune[b0:b1] = _lowest(saliency_of(b0, b1).flatten(), k).view(b1 - b0, rows)
            scale[b0:b1] = prune[b0:b1] * inv_diag[b0:b1, None]
        errors = torch.empty(b1 - b0, rows, dtype=wt.dtype, device=wt.device)
        for s0 in range(b0, b1, step):
            s1 = min(s0 + step, b1)
            for i in range(s0, s1):
                if nm is not None and (i - b0) % nm[1] == 0:
                    n, m = nm
                    low = saliency_of(i, i + m).topk(m - n, dim=0, largest=False).indices
                    prune[i:i + m].scatter_(0, low, True)
                    prune[i:i + m] |= forced[i:i + m]  # more than m - n pruned before: they stay pruned
                    scale[i:i + m] = prune[i:i + m] * inv_diag[i:i + m, None]
                err = errors[i - b0]
                torch.mul(wt[i], scale[i], out=err)
                if i + 1 < s1:
                    wt[i + 1:s1].addr_(u[i, i + 1:s1], err, alpha=-1.0)
            if s1 < b1:
                wt[s1:b1].addmm_(u[s0:s1, s1:b1].t(), errors[s0 - b0:s1 - b0], alpha=-1.0)
        if b1 < cols:
            wt[b1:].addmm_(u[b0:b1, b1:].t(), errors, alpha=-1.0)
    wt.masked_fill_(prune, 0)
    return wt.t().contiguous(), (~prune).t().contiguous()


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - W') H (W - W')^T)``: the squared output error ``||(W - W') X^T||^2`` when ``H = X^T X``."""
    d = (weight.double() - new_weight.double())
    return float((d @ hessian.double() * d).sum())


class SparseGPTParams(PruneParams):
    block_size: int = Field(128, gt=0, description="columns per lazy-update block")
    dampening: float = Field(0.01, description="added to the Hessian diagonal, as a fraction of its mean "
                                                "(> 0; raised x10 up to 1 where the Cholesky still fails)")

    @field_validator("dampening")
    @classmethod
    def _dampening(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"dampening must be > 0 (got {v}): the Hessian X^T X is "
                             "singular whenever there are fewer calibration tokens than inputs or collinear "
                             "inputs, and only the dampening makes it invertible (SparseGPT uses 0.01)")
        return v

    @model_validator(mode="after")
    def _blocks(self):
        nm = self.nm
        if nm is not None and self.block_size % nm[1]:
            raise ValueError(f"block_size {self.block_size} must be a multiple of m={nm[1]}")
        return self


class SparseGPT(Method):
    """SparseGPT: OBS reconstruction from the calibration inputs' Hessian, layer by layer (unstructured or n:m).

    Needs the calibration split. Each transformer layer is run once to
    accumulate ``X^T X`` of every targeted module's input (modules sharing an
    input, such as q/k/v, share it and its Cholesky factor), then every target
    is pruned and updated, then the pruned layer is run to feed the next.
    Memory: one layer's hidden states plus one ``[in, in]`` matrix per
    distinct input. A Hessian the dampening cannot factor is retried with 10x
    the dampening (up to 1; reported: a status line naming the modules, the
    ``dampening_raised`` metric, ``info["dampening_raised"]``); if that fails
    too, ``SparsifyError`` names the module and what to raise.
    """

    kind = "prune"
    name = "sparsegpt"
    Params = SparseGPTParams

    def check(self, model, params) -> None:
        """Targets, n:m input widths and a per-layer profile, on the model's skeleton."""
        check_targets(model, params, inside_layers=True)

    def apply(self, ctx, params: SparseGPTParams) -> StageResult:
        targets = select_targets(ctx.model, params, inside_layers=True)
        per_layer = assign_sparsities(ctx, params, targets)
        groups = by_layer(targets)
        nm = params.nm
        raised: dict[str, float] = {}  # module paths -> the dampening their Hessian needed

        def factor_for(names: list[str], hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            label = ", ".join(names)
            try:
                u, dead, used = damped_factor(hessian, params.dampening)
            except ValueError as exc:
                raise SparsifyError(f"sparsegpt: {label}: {exc}") from None
            if used != params.dampening:
                ctx.info(f"sparsegpt: {label}: the Hessian is not positive definite at dampening "
                         f"{params.dampening:g}; used {used:g}")
                raised.update({name: used for name in names})
            return u, dead

        def visit(layer: CalibrationLayer) -> None:
            mine = groups.get(layer.index)
            if not mine:
                return
            names = {t.name for t in mine}
            hessians: dict[tuple[str, ...], torch.Tensor] = {}

            def observe(group, x):
                key = tuple(n for n in group if n in names)
                x = x.float()
                h = hessians.get(key)
                if h is None:
                    h = hessians[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
                h.addmm_(x.t(), x)

            layer.observe(observe, modules=[t.name for t in mine])
            factors = {}
            for t in mine:
                keys = [k for k in hessians if t.name in k]
                if not keys:
                    raise SparsifyError(f"{t.name} never ran during calibration: no Hessian to prune it with")
                key = keys[0] if len(keys) == 1 else (t.name,)  # grouping changed between batches: add up
                if len(keys) > 1:
                    hessians[key] = sum(hessians[k] for k in keys)
                if key not in factors:  # H's scale does not matter: damping is relative
                    factors[key] = factor_for([n for n in key if n in names] or [t.name], hessians[key])
                w = t.weight()
                new, keep = sparsegpt_prune(w, sparsity=None if nm else t.sparsity, nm=nm,
                                            block_size=params.block_size, factor=factors[key],
                                            pruned=prior_pruned(ctx, t))
                w.copy_(new.to(w.dtype))
                record_mask(ctx, t, keep)
            hessians.clear()

        tokens = calibrate(ctx, visit, split=params.calibration_split, batch_size=params.batch_size,
                           description=f"sparsegpt {params.pattern if nm else 'unstructured'}")
        result = summary(ctx, targets, per_layer if params.profile != "uniform" else None,
                         calibration_tokens=float(tokens), dampening_raised=float(len(raised)),
                         metric_info={"dampening_raised": MetricInfo(unit="modules")})  # its Hessian needed more
        if raised:
            result.info["dampening_raised"] = raised
        return result
