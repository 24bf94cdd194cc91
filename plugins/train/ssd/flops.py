"""FFN FLOPs spent in training, as pure functions.

The accounting SSD reports (per FFN layer, summed over layers and steps):

- forward: ``2 * d_model * n * m`` FLOPs for a token that computes ``n``
  neurons, with ``m = 3`` weight matrices for gated FFNs (gate, up, down) and
  ``m = 2`` for plain ones (fc1, fc2); biases, the activation and the
  element-wise product are O(n) and left out;
- backward: twice the forward (the gradients with respect to the inputs and
  to the weights), for exactly the neurons computed forward: training costs
  ``3x`` the forward;
- the router (sparse steps only): its forward, ``router_flops`` per token. It
  is frozen during sparse training and its selection is not differentiable,
  so nothing flows back through it.

Dense training of the same length computes every neuron for every token.
Work outside the optimizer steps (the monitor's probe forwards, the switch's
calibration forward and router fitting) is reported apart as overhead.
"""
from __future__ import annotations

from dataclasses import dataclass

TRAIN_FACTOR = 3.0  # forward + backward (input and weight gradients, 2x the forward)


@dataclass(frozen=True)
class FFNShape:
    """What the accounting needs of one FFN layer."""

    d_model: int
    d_ff: int
    matrices: int  # 3 gated, 2 plain


def ffn_forward_flops(shape: FFNShape, neuron_tokens: float) -> float:
    """Forward FLOPs of computing ``neuron_tokens`` (neurons computed, summed over tokens) of one FFN."""
    return 2.0 * shape.d_model * shape.matrices * neuron_tokens


def ffn_training_flops(shape: FFNShape, neuron_tokens: float, routed_tokens: float = 0.0,
                       router_flops: float = 0.0) -> float:
    """Forward + backward FLOPs of one FFN over a step, plus the forward of its router on ``routed_tokens``."""
    return TRAIN_FACTOR * ffn_forward_flops(shape, neuron_tokens) + routed_tokens * router_flops


def dense_training_flops(shapes: list[FFNShape], tokens: float) -> float:
    """Forward + backward FLOPs of every FFN computing every neuron for ``tokens`` tokens."""
    return sum(ffn_training_flops(s, s.d_ff * tokens) for s in shapes)
