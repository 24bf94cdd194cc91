"""Built-in evaluation metrics: quality versus the dense model, sparsity, size and cost."""
from __future__ import annotations

from sparsify_core import hookimpl

from .cost import BytesPerToken
from .downstream import LMEval
from .language import EmbeddingSimilarity, KLDivergence, Perplexity
from .size import NonzeroParameters, Parameters
from .sparsity import ActivationSparsity, FFNFlops, WeightSparsity

__all__ = ["ActivationSparsity", "BytesPerToken", "EmbeddingSimilarity", "FFNFlops", "LMEval", "KLDivergence", "NonzeroParameters",
           "Parameters", "Perplexity", "WeightSparsity"]


@hookimpl
def sparsify_metrics():
    """The built-in metrics."""
    return [Perplexity, KLDivergence, EmbeddingSimilarity, ActivationSparsity, WeightSparsity, FFNFlops,
            Parameters, NonzeroParameters, BytesPerToken, LMEval]
