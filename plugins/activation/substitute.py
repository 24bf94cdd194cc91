"""Activation substitution (ProSparse step 1, docs/methods.md#relu-substitution; dReLU, docs/methods.md#drelu):
swap each FFN's activation."""
from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from sparsify_core import Method, MetricInfo, Params, StageResult
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import find_ffn_blocks
from sparsify_core.method import LayerIndices

# Config fields transformers architectures read the FFN activation from.
CONFIG_ACTIVATION_FIELDS = ("hidden_act", "activation_function", "hidden_activation")


class SubstituteParams(Params):
    layers: LayerIndices = Field(
        None, description="FFN layer indices (0-based) to change; default: all of them")


def update_config_activation(config, value: str) -> list[str]:
    """Set every FFN-activation field ``config`` has to ``value``; returns the fields set."""
    changed = []
    for field in CONFIG_ACTIVATION_FIELDS:
        if isinstance(getattr(config, field, None), str):
            setattr(config, field, value)
            changed.append(field)
    return changed


class SubstituteActivation(Method):
    """Base of activation substitutions: replace the activation of chosen FFN layers.

    Subclasses set ``name`` and implement ``make_activation``; those whose
    activation transformers knows by a config string set ``config_value`` so
    that, when every layer is changed, the saved config alone rebuilds the
    model with a plain ``from_pretrained``. ``rebuild`` redoes the swap on a
    fresh model (activations have no weights, so nothing is recomputed).
    """

    kind = "substitute_activation"
    Params = SubstituteParams
    config_value: ClassVar[str | None] = None

    @abstractmethod
    def make_activation(self, params: SubstituteParams) -> nn.Module:
        """The new activation module for one FFN layer."""

    def _substitute(self, model: nn.Module, params: SubstituteParams) -> StageResult:
        blocks = find_ffn_blocks(model)
        wanted = sorted(set(params.layers)) if params.layers is not None else list(range(len(blocks)))
        bad = [i for i in wanted if i >= len(blocks)]
        if bad:
            raise SparsifyError(f"layers {bad} out of range: the model has {len(blocks)} FFN layers "
                                f"(0-{len(blocks) - 1})")
        previous = sorted({type(blocks[i].activation).__name__ for i in wanted})
        for i in wanted:
            blocks[i].set_activation(self.make_activation(params))
        config_fields: list[str] = []
        config = getattr(model, "config", None)
        if len(wanted) == len(blocks) and self.config_value is not None and config is not None:
            config_fields = update_config_activation(config, self.config_value)
        return StageResult(
            metrics={"layers_replaced": float(len(wanted))}, metric_info={"layers_replaced": MetricInfo(unit="layers")},
            info={"layers": [blocks[i].name for i in wanted], "replaced": previous,
                  "config_fields_updated": config_fields})

    def apply(self, ctx, params: SubstituteParams) -> StageResult:
        result = self._substitute(ctx.model, params)
        ctx.info(f"{self.name} in {len(result.info['layers'])} FFN layers (was {', '.join(result.info['replaced'])})")
        return result

    @classmethod
    def keeps_layers(cls) -> bool:
        """True: only activation modules are swapped; every Linear layer stays as it was."""
        return True

    def plain_form(self, params: SubstituteParams) -> str | None:
        """None only for an activation transformers knows by name (``config_value``) set in every layer."""
        if self.config_value is None:
            return f"a {self.name} FFN activation"
        if params.layers is not None:  # the config names one activation for every layer
            return (f"{self.name} in the listed FFN layers only (leave layers out to change every layer, which "
                    "the config can say)")
        return None

    def rebuild(self, ctx, params: SubstituteParams, result: StageResult) -> None:
        self._substitute(ctx.model, params)


class ReLU(SubstituteActivation):
    """Replace the FFN activation (SiLU, GELU...) with ReLU, so FFN activations become exactly sparse.

    Only the activation changes: continue training to let the model adapt.
    For a gated FFN ``x1 = relu(x W_gate^T) * (x W_up^T)``; for a plain one
    ``x1 = relu(x W_fc1^T + b1)``. When every layer is replaced, the model
    config's activation field(s) (``hidden_act`` / ``activation_function`` /
    ``hidden_activation``) become ``"relu"``. Caveat: a few architectures read
    that field elsewhere too (BERT's masked-LM head transform); a plain
    ``from_pretrained`` of such a head model would change that as well, while
    ``sparsify_core.load_output`` rebuilds exactly.
    """

    name = "relu"
    config_value = "relu"

    def make_activation(self, params):
        return nn.ReLU()


class RectifiedLinear(nn.Linear):
    """``relu(x W^T + b)``: an ``nn.Linear`` whose output goes through ReLU (dReLU's up projection).

    Made from an existing ``nn.Linear`` in place (``rectify``), so the module
    keeps its path, parameters and state-dict keys; ``output_relu`` tells the
    fast modules and kernels, which read the weight directly, to apply the ReLU.
    """

    output_relu = True

    def forward(self, x):
        return torch.relu(super().forward(x))


def rectify(module: nn.Module, where: str) -> None:
    """Make the ``nn.Linear`` ``module`` a ``RectifiedLinear`` in place (nothing if it is one already)."""
    if isinstance(module, RectifiedLinear):
        return
    if type(module) is not nn.Linear:
        raise SparsifyError(f"{where}: dReLU needs an nn.Linear up projection, not {type(module).__name__}")
    module.__class__ = RectifiedLinear  # same parameters and path; only the forward gains the ReLU


class DReLU(SubstituteActivation):
    """dReLU (Turbo Sparse): ReLU on both the gate and the up projection of a gated FFN.

    ``x1 = relu(x W_gate^T) * relu(x W_up^T)``: a neuron is zero unless both
    are positive, so the FFN is sparser than with ReLU on the gate alone
    (Song et al. 2024 report ~90% after continued pre-training). Gated FFNs
    only (``SparsifyError`` on a plain one). Continue training afterwards, as
    for ``relu``. The config's activation field is left alone: transformers
    has no dReLU, so only ``sparsify_core.load_output`` rebuilds the model.
    """

    name = "drelu"

    def make_activation(self, params):
        return nn.ReLU()

    def _substitute(self, model, params):
        blocks = find_ffn_blocks(model)
        wanted = sorted(set(params.layers)) if params.layers is not None else list(range(len(blocks)))
        for i in wanted:
            if i < len(blocks) and blocks[i].gate is None:
                raise SparsifyError(f"{blocks[i].name}: dReLU needs a gated FFN (gate/up/down); this one is plain")
        result = super()._substitute(model, params)
        for i in wanted:
            rectify(blocks[i].up, blocks[i].module_names["up"])
        return result
