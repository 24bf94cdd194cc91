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
weights are zeroed, as in the reference code.
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

from sparsify_core import Method, StageResult
from sparsify_core.calibration import CalibrationLayer, calibrate
from sparsify_core.errors import SparsifyError

from .masks import prune_count
from .selection import PruneParams, assign_sparsities, by_layer, record_mask, select_targets, summary
from .selection import check_targets


def hessian_factor(hessian: torch.Tensor, dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of the dampened ``H^-1`` (float32) and the dead inputs.

    ``dead`` marks inputs with ``H_jj == 0``; their diagonal is set to 1
    before dampening so that ``H`` is invertible. Computed in float64 with
    one Cholesky and one triangular inverse: with ``J`` the order-reversing
    permutation and ``J H J = L L^T``, ``U = J L^-1 J`` is upper triangular
    and ``U^T U = H^-1``.
    """
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += dampening * torch.diagonal(h).mean()
    low = torch.linalg.cholesky(h.flip(0, 1))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    u = torch.linalg.solve_triangular(low, eye, upper=False).flip(0, 1)
    return u.to(torch.float32), dead


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


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor | None = None, *, sparsity: float | None = None,
                    nm: tuple[int, int] | None = None, block_size: int = 128, dampening: float = 0.01,
                    factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one ``[out, in]`` weight; returns ``(new_weight, keep)``, ``new_weight`` in float32.

    Give ``hessian`` (``[in, in]``, any positive multiple of ``X^T X``) or a
    precomputed ``factor = hessian_factor(H, dampening)`` (shared by matrices
    with the same input). Exactly ``round(sparsity * out * in)`` weights are
    pruned when unstructured (each block of ``block_size`` columns takes its
    share, chosen at the block's start); with ``nm = (n, m)`` every group of m
    consecutive inputs of a row keeps n. ``block_size`` must be a multiple of m.

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
    wt[dead] = 0
    inv_diag = 1.0 / torch.diagonal(u)
    prune = torch.zeros_like(wt, dtype=torch.bool)
    scale = torch.zeros_like(wt)  # prune / U_ii: turns a column into its OBS error
    step = nm[1] * -(-16 // nm[1]) if nm is not None else 16
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        if nm is None:
            # this block's share of the matrix's round(sparsity * numel), so the total is exact
            k = prune_count(rows * b1, sparsity) - prune_count(rows * b0, sparsity)
            saliency = (wt[b0:b1] * inv_diag[b0:b1, None]).square()
            prune[b0:b1] = _lowest(saliency.flatten(), k).view(b1 - b0, rows)
            scale[b0:b1] = prune[b0:b1] * inv_diag[b0:b1, None]
        errors = torch.empty(b1 - b0, rows, dtype=wt.dtype, device=wt.device)
        for s0 in range(b0, b1, step):
            s1 = min(s0 + step, b1)
            for i in range(s0, s1):
                if nm is not None and (i - b0) % nm[1] == 0:
                    n, m = nm
                    saliency = (wt[i:i + m] * inv_diag[i:i + m, None]).square()
                    low = saliency.topk(m - n, dim=0, largest=False).indices
                    prune[i:i + m].scatter_(0, low, True)
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
    dampening: float = Field(0.01, ge=0, description="added to the Hessian diagonal, as a fraction of its mean")

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
    distinct input.
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
                    factors[key] = hessian_factor(hessians[key], params.dampening)
                w = t.weight()
                new, keep = sparsegpt_prune(w, sparsity=None if nm else t.sparsity, nm=nm,
                                            block_size=params.block_size, factor=factors[key])
                w.copy_(new.to(w.dtype))
                record_mask(ctx, t, keep)
            hessians.clear()

        tokens = calibrate(ctx, visit, split=params.calibration_split, batch_size=params.batch_size,
                           description=f"sparsegpt {params.pattern if nm else 'unstructured'}")
        return summary(ctx, targets, per_layer if params.profile != "uniform" else None,
                       calibration_tokens=float(tokens))
