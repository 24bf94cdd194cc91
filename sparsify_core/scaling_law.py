"""The sparse scaling law of Frantar et al. (ICLR 2024), as pure functions: evaluate, fit, judge, plot.

    L(S, N, D) = (a_S (1 - S)^b_S + c_S) N^(-b_N) + (a_D / D)^b_D + c

S is the weight sparsity, N the number of non-zero parameters, D the amount
of training (steps, tokens, examples: the unit is the caller's), L the loss.
Units matter for the coefficients: the published fits take N in millions and
D in 1e5 steps (T5/C4) or 1e9 examples (ViT/JFT).

Fitting follows the paper and its code (jaxpruner/projects/bigsparse): Huber
loss on ``log L`` residuals (delta 1e-3 for language models), minimised from
several random starts, here with L-BFGS on the logarithms of the seven
coefficients (all positive, so the search is unconstrained). Uncertainty is
either the Gauss-Newton (Hessian) approximation around the optimum or a
bootstrap over points. ``fit_runs`` extracts (S, N, D, L) from registry runs
(their final evaluations), fits, measures held-out errors and the optimal
sparsity: the ``sparsify fit`` command only parses options and prints it.

Optimal sparsity (``optimal_sparsity``): the paper's "optimal sparsity" for a
fixed number of non-zeros N and a fixed training cost, counting the cost of
a sparse run as that of the dense model of the same total size ``N / (1 -
S)`` (gradual pruning trains densely first). Here the cost is given as the
data budget D of the *dense* model with N parameters: at sparsity S the same
cost buys ``D (1 - S)`` of training, so S_opt = argmin_S L(S, N, D (1 - S)).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

COEFFICIENTS = ("a_S", "b_S", "c_S", "b_N", "a_D", "b_D", "c")


@dataclass(frozen=True)
class ScalingLaw:
    """The seven coefficients of L(S, N, D); call it to predict losses."""

    a_S: float
    b_S: float
    c_S: float
    b_N: float
    a_D: float
    b_D: float
    c: float

    @classmethod
    def from_data_term(cls, *, a_S, b_S, c_S, b_N, data_coef, b_D, c) -> "ScalingLaw":
        """Build from a data term written ``data_coef * D^-b_D`` (as papers print it): ``a_D = data_coef^(1/b_D)``."""
        return cls(a_S, b_S, c_S, b_N, data_coef ** (1 / b_D), b_D, c)

    def __call__(self, S, N, D):
        """Predicted loss (numpy broadcasting over S, N, D)."""
        S, N, D = (np.asarray(v, dtype=np.float64) for v in (S, N, D))
        out = (self.a_S * (1 - S) ** self.b_S + self.c_S) * N ** -self.b_N + (self.a_D / D) ** self.b_D + self.c
        return float(out) if out.ndim == 0 else out

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def vector(self) -> np.ndarray:
        return np.array([getattr(self, k) for k in COEFFICIENTS], dtype=np.float64)


# Published fits (docs/methods.md#sparse-scaling-law).
PUBLISHED: dict[str, ScalingLaw] = {
    # N in millions of non-zeros, D in 1e5 training steps; fitted with Huber delta 1e-3 on log L.
    "t5-c4": ScalingLaw.from_data_term(a_S=0.5678, b_S=0.7216, c_S=1.5227, b_N=0.2451, data_coef=0.6336,
                                       b_D=0.2027, c=0.6507),
    # N in millions of non-zeros, D in 1e9 examples; fitted with Huber delta 1e-2 on L.
    "vit-jft": ScalingLaw.from_data_term(a_S=1.3049, b_S=0.8210, c_S=2.0751, b_N=0.3922, data_coef=0.2782,
                                         b_D=0.8898, c=4.5167),
}


@dataclass
class Points:
    """Measured points: sparsity ``S``, non-zeros ``N``, data ``D``, loss ``L`` (1-D float64 arrays), and labels."""

    S: np.ndarray
    N: np.ndarray
    D: np.ndarray
    L: np.ndarray
    labels: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.S, self.N, self.D, self.L = (np.asarray(v, dtype=np.float64).reshape(-1)
                                          for v in (self.S, self.N, self.D, self.L))
        if not len(self.S) == len(self.N) == len(self.D) == len(self.L):
            raise ValueError("S, N, D and L need one value per point")
        if np.any((self.S < 0) | (self.S >= 1)) or np.any(self.N <= 0) or np.any(self.D <= 0) or np.any(self.L <= 0):
            raise ValueError("needs 0 <= S < 1 and N, D, L > 0")
        if not self.labels:
            self.labels = [str(i) for i in range(len(self.S))]

    def __len__(self) -> int:
        return len(self.S)

    def subset(self, idx) -> "Points":
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return Points(self.S[idx], self.N[idx], self.D[idx], self.L[idx], [self.labels[i] for i in idx])


# -- fitting --------------------------------------------------------------------------------


def huber(residuals: torch.Tensor, delta: float) -> torch.Tensor:
    """Mean Huber loss: ``r^2 / 2`` within ``delta``, ``delta (|r| - delta / 2)`` beyond."""
    a = residuals.abs()
    return torch.where(a <= delta, 0.5 * a.square(), delta * (a - 0.5 * delta)).mean()


def _predict_log_params(theta: torch.Tensor, S, N, D) -> torch.Tensor:
    a_S, b_S, c_S, b_N, a_D, b_D, c = theta.exp().unbind()
    return (a_S * (1 - S) ** b_S + c_S) * N ** -b_N + (a_D / D) ** b_D + c


def _residuals(theta, S, N, D, L, log: bool) -> torch.Tensor:
    pred = _predict_log_params(theta, S, N, D)
    return pred.log() - L.log() if log else pred - L


def _tensors(points: Points):
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (points.S, points.N, points.D, points.L))


def _random_start(gen: np.random.Generator, points: Points) -> np.ndarray:
    """Log-coefficients drawn over plausible ranges, scaled to the data (losses, N and D units)."""
    lmin = float(points.L.min())
    start = [
        gen.uniform(math.log(0.05), math.log(10.0)),         # a_S
        gen.uniform(math.log(0.1), math.log(2.0)),           # b_S
        gen.uniform(math.log(0.05), math.log(10.0)),         # c_S
        gen.uniform(math.log(0.05), math.log(1.0)),          # b_N
        math.log(float(np.median(points.D))) + gen.uniform(-4.0, 1.0),  # a_D, near the data's scale
        gen.uniform(math.log(0.05), math.log(1.5)),          # b_D
        math.log(lmin) + gen.uniform(math.log(0.2), math.log(0.95)),   # c below every loss
    ]
    return np.array(start)


def _minimise(theta0: np.ndarray, S, N, D, L, delta: float, log: bool, max_iter: int) -> tuple[np.ndarray, float]:
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        # Dividing by delta keeps the objective O(residual) whatever delta: better-scaled tolerances.
        loss = huber(_residuals(theta, S, N, D, L, log), delta) / delta
        if not torch.isfinite(loss):
            loss = torch.tensor(1e30, dtype=torch.float64, requires_grad=True)  # pushes the line search back
        loss.backward()
        return loss

    with np.errstate(all="ignore"):
        for _ in range(3):  # L-BFGS restarts its memory: a few rounds reach a tighter optimum
            opt.step(closure)
    with torch.no_grad():
        final = float(huber(_residuals(theta, S, N, D, L, log), delta))
    return theta.detach().numpy().copy(), final if math.isfinite(final) else math.inf


@dataclass
class Fit:
    """A fitted law: coefficients, objective, standard errors, and how it was obtained."""

    law: ScalingLaw
    objective: float
    stderr: dict[str, float]
    n_points: int
    delta: float
    log: bool
    restarts: int
    bootstrap: dict[str, tuple[float, float]] | None = None  # coefficient -> (2.5%, 97.5%) when bootstrapped

    def summary(self) -> dict[str, Any]:
        """JSON-friendly view: coefficients with standard errors, objective and settings."""
        return {"coefficients": self.law.as_dict(), "stderr": self.stderr, "objective": self.objective,
                "points": self.n_points, "huber_delta": self.delta, "log_residuals": self.log,
                **({"bootstrap_95": self.bootstrap} if self.bootstrap else {})}


def fit(points: Points, *, delta: float = 1e-3, log: bool = True, restarts: int = 16, seed: int = 0,
        max_iter: int = 200, init: ScalingLaw | None = None, bootstrap: int = 0) -> Fit:
    """Fit the seven coefficients to ``points`` (Huber loss with ``delta`` on log-L residuals if ``log``).

    Runs L-BFGS from ``restarts`` random starts (plus ``init`` if given) and
    keeps the best. Standard errors come from the Gauss-Newton approximation
    of the Hessian of the squared residuals at the optimum (``stderr``; NaN
    where the points do not determine a coefficient); ``bootstrap > 0`` also
    refits that many resamples of the points (started from the optimum) and
    reports 95% percentile intervals. Needs at least 7 points.
    """
    if len(points) < len(COEFFICIENTS):
        raise ValueError(f"fitting 7 coefficients needs at least 7 points, got {len(points)}")
    S, N, D, L = _tensors(points)
    gen = np.random.default_rng(seed)
    starts = [np.log(init.vector())] if init is not None else []
    starts += [_random_start(gen, points) for _ in range(restarts)]
    best_theta, best = None, math.inf
    for theta0 in starts:
        theta, value = _minimise(theta0, S, N, D, L, delta, log, max_iter)
        if value < best and np.all(np.isfinite(theta)):
            best_theta, best = theta, value
    if best_theta is None:
        raise RuntimeError("the fit failed from every start")
    law = ScalingLaw(*np.exp(best_theta).tolist())
    result = Fit(law, best, standard_errors(law, points, log=log), len(points), delta, log, len(starts))
    if bootstrap:
        draws = []
        for _ in range(bootstrap):
            idx = gen.integers(0, len(points), len(points))
            sub = points.subset(idx)
            theta, value = _minimise(best_theta, *_tensors(sub), delta, log, max_iter)
            if math.isfinite(value):
                draws.append(np.exp(theta))
        if draws:
            arr = np.array(draws)
            lo, hi = np.percentile(arr, [2.5, 97.5], axis=0)
            result.bootstrap = {k: (float(a), float(b)) for k, a, b in zip(COEFFICIENTS, lo, hi)}
    return result


def standard_errors(law: ScalingLaw, points: Points, *, log: bool = True) -> dict[str, float]:
    """Standard error of each coefficient from the Gauss-Newton Hessian ``J^T J`` at ``law``.

    ``J`` is the Jacobian of the residuals with respect to the log-coefficients;
    ``cov = s^2 (J^T J)^+`` with ``s^2`` the residual variance (n - 7 degrees
    of freedom), mapped to the coefficients by the delta method. NaN when
    there are no spare degrees of freedom or a direction is not determined.
    """
    S, N, D, L = _tensors(points)
    theta = torch.tensor(np.log(law.vector()), dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: _residuals(t, S, N, D, L, log), theta)
    r = _residuals(theta, S, N, D, L, log)
    dof = len(points) - len(COEFFICIENTS)
    if dof <= 0:
        return {k: math.nan for k in COEFFICIENTS}
    s2 = float(r.square().sum()) / dof
    jtj = (J.T @ J).numpy()
    eig, vec = np.linalg.eigh(jtj)
    null = vec[:, eig <= 1e-10 * max(float(eig.max()), 1e-300)]  # directions the points do not determine
    cov = np.linalg.pinv(jtj, rcond=1e-10) * s2
    values = law.vector()
    out = {}
    for i, k in enumerate(COEFFICIENTS):
        undetermined = null.shape[1] > 0 and float(np.linalg.norm(null[i])) > 1e-3
        out[k] = math.nan if undetermined or cov[i, i] < 0 else float(values[i] * math.sqrt(cov[i, i]))
    return out


def prediction_errors(law: ScalingLaw, points: Points) -> dict[str, float]:
    """How well ``law`` predicts ``points``: RMSE of log L, mean and max absolute relative error of L."""
    pred = np.asarray(law(points.S, points.N, points.D), dtype=np.float64).reshape(-1)
    rel = np.abs(pred - points.L) / points.L
    return {"rmse_log": float(np.sqrt(np.mean((np.log(pred) - np.log(points.L)) ** 2))),
            "mean_abs_rel": float(rel.mean()), "max_abs_rel": float(rel.max()), "points": float(len(points))}


def heldout_split(points: Points, holdout: float | str | Sequence[str] | None, seed: int = 0) -> np.ndarray:
    """Boolean mask of held-out points.

    ``None``: none; a float in (0, 1): that fraction at random (seeded);
    ``"largest"``: the points at the largest N (extrapolation in model size,
    as the paper's check); a list: the points with those labels (run ids).
    """
    n = len(points)
    mask = np.zeros(n, dtype=bool)
    if holdout is None:
        return mask
    if isinstance(holdout, str):
        if holdout != "largest":
            raise ValueError(f"holdout {holdout!r}: use a fraction, 'largest', or a list of labels")
        return points.N >= points.N.max() * (1 - 1e-9)
    if isinstance(holdout, float):
        if not 0 < holdout < 1:
            raise ValueError("a holdout fraction lies in (0, 1)")
        k = max(1, round(holdout * n))
        mask[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
        return mask
    wanted = set(holdout)
    unknown = wanted - set(points.labels)
    if unknown:
        raise ValueError(f"holdout labels not among the points: {sorted(unknown)}")
    return np.array([label in wanted for label in points.labels])


def heldout_error(points: Points, holdout: float | str | Sequence[str], *, seed: int = 0, **fit_kwargs) -> dict:
    """Fit on the points not held out and measure the prediction error on the held-out ones."""
    mask = heldout_split(points, holdout, seed)
    if not mask.any() or mask.all():
        raise ValueError("the holdout must keep some points on each side")
    result = fit(points.subset(~mask), seed=seed, **fit_kwargs)
    return {"fit": result, "train": prediction_errors(result.law, points.subset(~mask)),
            "heldout": prediction_errors(result.law, points.subset(mask)), "heldout_mask": mask}


def cross_validate(points: Points, folds: int = 5, *, seed: int = 0, **fit_kwargs) -> dict:
    """Leave-some-runs-out error: split the points into ``folds`` seeded groups, fit without each, predict it.

    Every point is predicted once by a fit that never saw it. Returns
    ``prediction_errors`` over those predictions, the predictions themselves
    (``predicted``, in point order) and ``folds``. Each fit needs 7 points, so
    ``folds`` is capped to keep that many outside every group.
    """
    n = len(points)
    folds = min(folds, n)
    if folds < 2 or n - math.ceil(n / folds) < len(COEFFICIENTS):
        raise ValueError(f"{n} points are too few for {folds}-fold cross-validation of 7 coefficients")
    order = np.random.default_rng(seed).permutation(n)
    predicted = np.empty(n, dtype=np.float64)
    for k in range(folds):
        held = np.zeros(n, dtype=bool)
        held[order[k::folds]] = True
        law = fit(points.subset(~held), seed=seed + k, **fit_kwargs).law
        predicted[held] = np.asarray(law(points.S[held], points.N[held], points.D[held]), dtype=np.float64)
    rel = np.abs(predicted - points.L) / points.L
    return {"rmse_log": float(np.sqrt(np.mean((np.log(predicted) - np.log(points.L)) ** 2))),
            "mean_abs_rel": float(rel.mean()), "max_abs_rel": float(rel.max()), "points": float(n),
            "folds": float(folds), "predicted": predicted}


# -- using a law ----------------------------------------------------------------------------


def optimal_sparsity(law: ScalingLaw, N: float, D: float) -> float:
    """The loss-minimising sparsity for N non-zeros at the training cost of a dense N-parameter model trained on D.

    At sparsity S the model has ``N / (1 - S)`` total parameters, so the same
    cost trains it on ``D (1 - S)``; minimising ``L(S, N, D (1 - S))`` over S
    gives ``(1 - S)^(b_S + b_D) = b_D (a_D / D)^b_D N^b_N / (a_S b_S)``, and
    0 (dense) when that exceeds 1. Rises with D: more data favours sparsity.
    """
    u = (law.b_D * (law.a_D / D) ** law.b_D * N ** law.b_N / (law.a_S * law.b_S)) ** (1 / (law.b_S + law.b_D))
    return float(max(0.0, 1.0 - u))


# -- registry runs ----------------------------------------------------------------------------


Extractor = str | Callable[[Any], float | None]


def _final_metric(record, name: str) -> float | None:
    """The value of metric ``name`` at the run's final evaluation (``registry.final_evaluation``); None if absent."""
    from .registry import final_evaluation

    final = final_evaluation(record)
    value = None if final is None or name in final.failures else final.values.get(name)
    return None if value is None or not math.isfinite(value) else value


def _recipe_value(record, dotted: str) -> float | None:
    obj: Any = record.recipe
    for part in dotted.split("."):
        if isinstance(obj, list):
            try:
                obj = obj[int(part)]
            except (ValueError, IndexError):
                return None
        elif isinstance(obj, dict):
            if part not in obj:
                return None
            obj = obj[part]
        else:
            return None
    try:
        return float(obj)
    except (TypeError, ValueError):
        return None


def _extract(record, how: Extractor) -> float | None:
    if callable(how):
        return how(record)
    if how.startswith("recipe:"):
        return _recipe_value(record, how[len("recipe:"):])
    return _final_metric(record, how)


def points_from_runs(records: Iterable, *, data: Extractor, loss: Extractor = "perplexity",
                     sparsity: Extractor = "weight_sparsity", nonzeros: Extractor = "nonzero_parameters",
                     n_unit: float = 1e6, d_unit: float = 1.0) -> tuple[Points, list[str]]:
    """(S, N, D, L) of each finished run, and the ids of the runs skipped (a value missing).

    Each of ``data``, ``loss``, ``sparsity``, ``nonzeros`` names a metric (its
    value at the run's final evaluation, ``registry.final_evaluation``), or ``"recipe:<dotted path>"``
    into the run's effective recipe (``recipe:stages.0.params.train.steps``),
    or is a function of the ``RunRecord``. A loss metric named ``perplexity``
    is turned into the loss ``log(perplexity)``. N is divided by ``n_unit``
    and D by ``d_unit`` (the fit is better conditioned near 1).
    """
    rows, labels, skipped = [], [], []
    for rec in records:
        if getattr(rec, "status", "finished") != "finished":
            skipped.append(rec.id)
            continue
        values = [_extract(rec, how) for how in (sparsity, nonzeros, data, loss)]
        if any(v is None for v in values):
            skipped.append(rec.id)
            continue
        s, n, d, l = values
        if loss == "perplexity":
            l = math.log(l)
        rows.append((s, n / n_unit, d / d_unit, l))
        labels.append(rec.id)
    if not rows:
        return Points([], [], [], [], []), skipped
    arr = np.array(rows, dtype=np.float64)
    return Points(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], labels), skipped


@dataclass
class RunsFit:
    """The fit of a set of runs: the points, the fit, its errors, the optimal sparsity, and the runs skipped.

    ``train_error``: ``prediction_errors`` on the points fitted.
    ``heldout_error``: the error on points the fit never saw, measured by
    ``heldout_method`` (``holdout``: one fit without the held-out runs,
    ``heldout_mask``; ``cross-validation``: ``cross_validate`` over
    ``folds``), else None (``heldout_note`` says why when it was asked for
    but could not be measured). ``optimal``: for the budget of
    ``budget_nonzeros`` non-zeros (in the caller's units, not ``n_unit``),
    one row per data budget ``D`` (caller's units): ``S_opt``, and the law's
    loss dense (``L_dense``) and at ``S_opt`` for the same cost (``L_opt``).
    """

    points: Points
    fit: Fit
    train_error: dict[str, float]
    heldout_error: dict[str, float] | None
    heldout_mask: np.ndarray
    skipped: list[str]
    heldout_method: str | None = None
    heldout_note: str | None = None
    data: str = ""
    n_unit: float = 1.0
    d_unit: float = 1.0
    budget_nonzeros: float | None = None
    optimal: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything as JSON-friendly values: coefficients, errors, optimum, points (in fit units), skipped runs."""
        return {"data": self.data, "n_unit": self.n_unit, "d_unit": self.d_unit, **self.fit.summary(),
                "train_error": self.train_error, "heldout_error": self.heldout_error,
                "heldout_method": self.heldout_method,
                "heldout_runs": [l for l, m in zip(self.points.labels, self.heldout_mask) if m],
                "budget_nonzeros": self.budget_nonzeros, "optimal_sparsity": self.optimal,
                "skipped_runs": self.skipped,
                "points": [{"run": lab, "S": s, "N": n, "D": d, "L": l} for lab, s, n, d, l in
                           zip(self.points.labels, *(v.tolist() for v in (self.points.S, self.points.N,
                                                                            self.points.D, self.points.L)))]}


def fit_runs(records: Iterable, *, data: Extractor, loss: Extractor = "perplexity",
             sparsity: Extractor = "weight_sparsity", nonzeros: Extractor = "nonzero_parameters",
             n_unit: float = 1e6, d_unit: float = 1.0, holdout: float | str | Sequence[str] | None = None,
             folds: int = 0, budget_nonzeros: float | None = None, budget_data: Sequence[float] = (),
             seed: int = 0, **fit_kwargs) -> RunsFit:
    """Fit the law to registry runs (``RunRecord``s with metrics); see ``points_from_runs`` for the extractors.

    With ``holdout`` (see ``heldout_split``) the fit uses the other runs and
    the held-out error is theirs; else with ``folds`` >= 2 the held-out error
    is ``folds``-fold cross-validation (``cross_validate``; skipped, with
    ``heldout_note``, when the points are too few). ``fit_kwargs`` go to
    ``fit`` (``delta``, ``log``, ``restarts``, ``bootstrap``...; the
    cross-validation fits share them but never bootstrap).

    The optimal sparsity is computed at ``budget_nonzeros`` (default: the
    largest N measured) for each of ``budget_data`` (default: the D values
    measured, and 10x and 100x the largest), all in the caller's units.
    Raises ``ValueError`` when fewer than 7 runs have every value.
    """
    points, skipped = points_from_runs(records, data=data, loss=loss, sparsity=sparsity, nonzeros=nonzeros,
                                       n_unit=n_unit, d_unit=d_unit)
    if len(points) < len(COEFFICIENTS):
        raise ValueError(f"{len(points)} finished runs with {loss}, {sparsity}, {nonzeros} and {data}; "
                         "fitting 7 coefficients needs at least 7")
    mask = heldout_split(points, holdout, seed)
    result = fit(points.subset(~mask), seed=seed, **fit_kwargs)
    law = result.law
    heldout, method, note = None, None, None
    if mask.any():
        heldout, method = prediction_errors(law, points.subset(mask)), "holdout"
    elif folds:
        try:
            cv = cross_validate(points, folds, seed=seed, **{k: v for k, v in fit_kwargs.items() if k != "bootstrap"})
            heldout, method = {k: v for k, v in cv.items() if k != "predicted"}, "cross-validation"
        except ValueError as exc:
            note = str(exc)
    n_budget = budget_nonzeros / n_unit if budget_nonzeros else float(points.N.max())
    d_values = [d / d_unit for d in budget_data] or sorted(set(points.D.tolist()) | {points.D.max() * 10,
                                                                                    points.D.max() * 100})
    optimal = []
    for d in d_values:
        s_opt = optimal_sparsity(law, n_budget, d)
        optimal.append({"D": d * d_unit, "S_opt": s_opt, "L_dense": law(0.0, n_budget, d),
                        "L_opt": law(s_opt, n_budget, d * (1 - s_opt))})
    return RunsFit(points, result, prediction_errors(law, points.subset(~mask)), heldout, mask, skipped,
                   heldout_method=method, heldout_note=note, data=data if isinstance(data, str) else "",
                   n_unit=n_unit, d_unit=d_unit, budget_nonzeros=n_budget * n_unit, optimal=optimal)


# -- plotting ----------------------------------------------------------------------------------


def plot_fit(law: ScalingLaw, points: Points, path, *, heldout: np.ndarray | None = None,
             title: str = "L(S, N, D) fit") -> Path:
    """Draw the fit against the measured points as a PNG at ``path``.

    Left: predicted against measured loss (the diagonal is a perfect fit),
    held-out points as stars. Right: loss against non-zeros N, one colour per
    sparsity, the law's curves for each D (up to three; else the most common).
    Returns the path written.
    """
    from . import plots

    heldout = np.zeros(len(points), dtype=bool) if heldout is None else np.asarray(heldout, dtype=bool)
    pred = np.asarray(law(points.S, points.N, points.D), dtype=np.float64).reshape(-1)
    sparsities = sorted(set(np.round(points.S, 4).tolist()))
    color_of = dict(zip(sparsities, plots.ramp(len(sparsities))))

    fig, (ax1, ax2) = plots.figure(figsize=(12, 5), ncols=2)
    for s in sparsities:
        sel = np.isclose(points.S, s, atol=5e-5)
        for mask, marker, suffix in ((sel & ~heldout, "o", ""), (sel & heldout, "*", " (held out)")):
            if mask.any():
                ax1.scatter(pred[mask], points.L[mask], color=color_of[s], marker=marker,
                            s=120 if marker == "*" else 40, label=f"S={s:.3g}{suffix}", edgecolors="k",
                            linewidths=0.5)
    lo, hi = min(pred.min(), points.L.min()) * 0.98, max(pred.max(), points.L.max()) * 1.02
    ax1.plot([lo, hi], [lo, hi], "--", color="gray", lw=1)
    ax1.set(xlabel="predicted L", ylabel="measured L", title="quality of fit", xlim=(lo, hi), ylim=(lo, hi))
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)

    # Right: one curve per (S, D) for up to three D values (line style = D), else at the most common D only.
    values, counts = np.unique(points.D, return_counts=True)
    shown = values if len(values) <= 3 else values[[np.argmax(counts)]]
    styles = dict(zip(shown.tolist(), ["-", "--", ":"]))
    grid = np.geomspace(points.N.min() * 0.7, points.N.max() * 1.4, 100)
    for s in sparsities:
        for d, style in styles.items():
            ax2.plot(grid, law(np.full_like(grid, s), grid, np.full_like(grid, d)), color=color_of[s], lw=1.3,
                     ls=style, label=f"S={s:.3g}" if style == "-" else None)
        sel = np.isclose(points.S, s, atol=5e-5)
        at_d = sel & np.isin(points.D, shown)
        for mask, marker in ((at_d & ~heldout, "o"), (at_d & heldout, "*")):
            if mask.any():
                ax2.scatter(points.N[mask], points.L[mask], color=color_of[s], marker=marker,
                            s=120 if marker == "*" else 30, edgecolors="k", linewidths=0.5, zorder=3)
    for d, style in styles.items():
        ax2.plot([], [], color="gray", ls=style, label=f"D={d:g}")
    plots.log_axis(ax2.xaxis, float(grid.min()), float(grid.max()))
    hidden = "" if len(shown) == len(values) else f" (D = {shown[0]:g} only)"
    ax2.set(xlabel="non-zero parameters N", ylabel="loss L", title=f"law and points against N{hidden}; * held out")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=8)
    coef = ", ".join(f"{k} {v:.3g}" for k, v in law.as_dict().items())
    fig.suptitle(f"{title}\n{coef}", fontsize=10)
    plots.save(fig, path)
