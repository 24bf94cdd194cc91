"""Activation predictors (DejaVu / PowerInfer style) as pure functions on tensors.

A predictor guesses, from an FFN block's input ``x``, which neurons the
block's activation will leave non-zero, so that the decode kernel skips the
others' gate rows too: ``logits = p_out (p_in x) + p_bias`` with ``p_in [r, d]``
and ``p_out [d_ff, r]`` (a few MB where the FFN has hundreds), and neuron j
is computed iff ``logits[j] >= threshold``. It is approximate: an active
neuron it misses is dropped. Fitting, on calibration tokens:

1. ``fit_lowrank``: the rank-r map closest, in least squares over the
   tokens, to the gate's pre-activations ``W x + b`` (reduced-rank
   regression: project onto the top-r principal directions of ``W x``),
   each neuron's logit divided by its residual standard deviation, so one
   threshold misses every neuron's activations about equally often.
2. ``refine`` (optional): Adam steps on the binary cross-entropy of the
   logits against which neurons are active (the DejaVu objective), from
   that start.
3. ``threshold_for_recall``: the largest threshold that still covers a given
   fraction of the active (token, neuron) pairs, chosen on held-out tokens.

``coverage`` measures a choice: the fraction of active neurons and of
activation mass it covers, and the fraction of neurons it computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Predictor:
    """Predictor weights (float32): ``p_in [r, d]``, ``p_out [d_ff, r]``, ``p_bias [d_ff]``, and the threshold."""

    p_in: torch.Tensor
    p_out: torch.Tensor
    p_bias: torch.Tensor
    threshold: float = 0.0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_ff]`` neuron logits of inputs ``[..., d]``."""
        return F.linear(F.linear(x.to(self.p_in.dtype), self.p_in), self.p_out, self.p_bias)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean ``[..., d_ff]``: the neurons computed for each token."""
        return self.logits(x) >= self.threshold


def fit_lowrank(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rank: int,
                offset: float = 0.0, seed: int = 0) -> Predictor:
    """The rank-``rank`` predictor of ``x @ weight.T + bias - offset`` that is best in least squares over ``x``.

    ``x`` is ``[N, d]`` calibration inputs, ``weight`` the gate ``[d_ff, d]``.
    With ``Y = (x - mean) W^T`` and ``V`` its top right singular vectors
    ``[d_ff, r]``: ``p_in = V^T W``, ``p_out = V``, and the bias restores the
    mean exactly. ``offset`` (the activation's threshold) centres the
    logits on the active / inactive boundary; then each neuron's row of
    ``p_out`` and its bias are divided by the standard deviation of its
    residual ``Y - Y V V^T`` (logits in units of the predictor's own error).
    """
    x = x.float()
    w = weight.detach().float()
    x = x.to(w.device)
    b = bias.detach().float() if bias is not None else torch.zeros(w.shape[0], device=w.device)
    mu = x.mean(0)
    y = (x - mu) @ w.T  # [N, d_ff]
    r = max(1, min(rank, *y.shape))
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws its sketch from the global generator
        torch.manual_seed(seed)
        if r + 8 < min(y.shape):
            _, _, v = torch.svd_lowrank(y, q=r + 8, niter=4)
        else:
            v = torch.linalg.svd(y, full_matrices=False).Vh.T
    v = v[:, :r].contiguous()  # [d_ff, r]
    resid = (y - (y @ v) @ v.T).std(0) if y.shape[0] > 1 else torch.ones(y.shape[1], device=y.device)
    scale = 1.0 / torch.maximum(resid, 1e-3 * y.std(0).nan_to_num(1.0) + 1e-12)  # [d_ff]
    if r < rank:  # fewer tokens or neurons than the rank: pad with zero directions (same shapes on reload)
        v = torch.cat([v, v.new_zeros(v.shape[0], rank - r)], 1)
    p_in = v.T @ w  # [r, d]
    wm = w @ mu
    p_bias = (b + wm - v @ (v.T @ wm) - offset) * scale
    return Predictor(p_in.contiguous(), (v * scale[:, None]).contiguous(), p_bias.contiguous())


def refine(pred: Predictor, x: torch.Tensor, active: torch.Tensor, steps: int, lr: float = 1e-3,
           batch: int = 256, seed: int = 0) -> tuple[Predictor, float, float]:
    """``steps`` Adam steps on the BCE of ``pred.logits(x)`` against ``active`` (bool ``[N, d_ff]``).

    Returns the refined predictor and the mean BCE over all of ``x`` before and after.
    """
    x, target = x.float(), active.float()
    params = [t.detach().clone().requires_grad_(True) for t in (pred.p_in, pred.p_out, pred.p_bias)]

    def loss_of(xb, tb):
        return F.binary_cross_entropy_with_logits(F.linear(F.linear(xb, params[0]), params[1], params[2]), tb)

    with torch.no_grad():
        before = float(loss_of(x, target))
    # Adam written out (three small tensors): torch.optim's first step imports torch._dynamo, seconds here.
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen).to(x.device)
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_of(x[idx], target[idx]), params)
        with torch.no_grad():
            for p, g, m_, v_ in zip(params, grads, m, v):
                m_.mul_(beta1).add_(g, alpha=1 - beta1)
                v_.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                p -= lr * (m_ / (1 - beta1 ** step)) / ((v_ / (1 - beta2 ** step)).sqrt() + eps)
    with torch.no_grad():
        after = float(loss_of(x, target))
    p_in, p_out, p_bias = (p.detach().contiguous() for p in params)
    return Predictor(p_in, p_out, p_bias, pred.threshold), before, after


def threshold_for_recall(logits: torch.Tensor, active: torch.Tensor, recall: float) -> float:
    """The largest threshold with ``logits >= threshold`` on at least ``recall`` of the active pairs.

    With no active pair at all, a threshold above every logit (nothing is computed).
    """
    pos = logits[active].float()
    if pos.numel() == 0:
        return float(logits.max()) + 1.0 if logits.numel() else 0.0
    missable = int((1.0 - recall) * pos.numel())  # active pairs the threshold may leave out
    return float(pos.kthvalue(missable + 1).values) if missable > 0 else float(pos.min())


def coverage(selected: torch.Tensor, active: torch.Tensor, mass: torch.Tensor | None = None) -> dict[str, float]:
    """How well a choice of neurons covers the active ones (all ``[N, d_ff]``).

    ``recall``: active pairs selected / active pairs; ``mass_recall``: the same
    weighted by ``mass`` (e.g. ``|act(gate) * up|``); ``computed``: selected
    fraction of all pairs (what the kernel reads); ``active``: active fraction.
    """
    n_active = int(active.sum())
    hit = selected & active
    out = {"recall": float(hit.sum()) / n_active if n_active else 1.0,
           "computed": float(selected.float().mean()), "active": float(active.float().mean())}
    if mass is not None:
        total = float(mass.sum())
        out["mass_recall"] = float((mass * hit).sum()) / total if total > 0 else 1.0
    return out
