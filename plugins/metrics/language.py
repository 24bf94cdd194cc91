"""Quality metrics from the model's outputs: perplexity, KL to the dense model, embedding similarity."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparsify_core import Metric, MetricValue


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """``(sum of NLL, positions)`` of next-token prediction: position ``i`` predicts token ``i+1``.

    Every position but the last of each row is predicted. Computed in float32,
    one row at a time so only ``[seq, vocab]`` floats are extra memory.
    """
    total = 0.0
    for row_logits, row_ids in zip(logits, input_ids):
        total += float(F.cross_entropy(row_logits[:-1].float(), row_ids[1:].to(row_logits.device),
                                       reduction="sum"))
    return total, input_ids.shape[0] * (input_ids.shape[1] - 1)


def next_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, int]:
    """``(sum of KL(P_ref || P_model), positions)`` over the predicted positions (all but the last).

    ``KL = sum_v p_ref(v) (log p_ref(v) - log p_model(v))`` in float32 from
    ``log_softmax``; terms with ``p_ref = 0`` count 0 (no ``0 * inf`` NaN).
    """
    total = 0.0
    for ref_row, row in zip(reference_logits, logits):
        log_p = F.log_softmax(ref_row[:-1].float(), dim=-1)
        log_q = F.log_softmax(row[:-1].float(), dim=-1)
        p = log_p.exp()
        total += float(torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum())
    return total, logits.shape[0] * (logits.shape[1] - 1)


class Perplexity(Metric):
    """Perplexity on the eval split: exp of the mean next-token NLL over all predicted positions.

    Token-weighted: ``exp(sum NLL / positions)`` over the whole split, where
    each sequence predicts all its tokens but the first.
    """

    name = "perplexity"
    higher_is_better = False
    unit = ""
    fraction = False
    tasks = frozenset({"causal_lm"})
    uses_forward = True

    def start(self, ctx):
        self._nll, self._n = 0.0, 0

    def update(self, batch, logits, reference_logits):
        nll, n = next_token_nll(logits, batch)
        self._nll += nll
        self._n += n

    def finish(self, ctx):
        return [MetricValue(self.name, math.exp(self._nll / self._n))]


class KLDivergence(Metric):
    """Mean KL(P_dense || P_model) of the next-token distribution, in nats (0 for the dense model).

    Averaged over the same predicted positions as perplexity (all but the
    last of each sequence), in float32.
    """

    name = "kl_divergence"
    higher_is_better = False
    unit = "nats"
    fraction = False
    tasks = frozenset({"causal_lm"})
    uses_forward = True
    uses_reference = True

    def start(self, ctx):
        self._kl, self._n = 0.0, 0

    def update(self, batch, logits, reference_logits):
        kl, n = next_token_kl(reference_logits, logits)
        self._kl += kl
        self._n += n

    def finish(self, ctx):
        return [MetricValue(self.name, max(self._kl / self._n, 0.0))]  # clip float round-off below 0


class EmbeddingSimilarity(Metric):
    """Mean cosine similarity of mean-pooled final hidden states to the dense model's (1 at baseline).

    Per sequence: mean over its tokens of the last hidden state, cosine with
    the dense model's, in float64; averaged over sequences.
    """

    name = "embedding_similarity"
    higher_is_better = True
    unit = "cosine"
    fraction = False  # a cosine lies in [-1, 1]
    tasks = frozenset({"encoder"})
    uses_forward = True
    uses_reference = True

    def start(self, ctx):
        self._sum, self._n = 0.0, 0

    def update(self, batch, logits, reference_logits):
        a = logits.double().mean(dim=1)
        b = reference_logits.double().mean(dim=1)
        self._sum += float(F.cosine_similarity(a, b, dim=-1).sum())
        self._n += a.shape[0]

    def finish(self, ctx):
        return [MetricValue(self.name, self._sum / self._n)]
