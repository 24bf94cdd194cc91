"""``prune/width``: structured width pruning that physically shrinks the model (Minitron).

Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation" (Minitron), section 2: the importance of a width unit is the
magnitude of the activation it produces on a small calibration set, from
forward passes only, all axes scored on the unpruned model:

- FFN neuron ``i``: ``x1[b, s, i]``, the intermediate activation (the input
  of the down projection: ``act(x W_gate^T) * (x W_up^T)`` for a gated FFN),
  taken in absolute value;
- attention head ``h``: ``||o[b, s, h, :]||_2``, the L2 norm of the head's
  attention output (the head's slice of the input of ``o_proj``).

Per calibration sequence the values are averaged over its tokens, then the
per-sequence means are combined over the sequences by their L2 norm (the
paper's best (batch, sequence) aggregation, "(L2, mean)") or their mean
(``batch_agg``). Within each layer the most important units are kept;
every layer keeps the same number (Minitron's choice, and what a plain
transformers config can describe: one ``intermediate_size``, one
``num_attention_heads`` for all layers).

GQA (``num_key_value_heads`` < ``num_attention_heads``): ``head_unit``
``kv_group`` removes whole groups (a KV head and the query heads that share
it; a group's importance is the sum of its query heads'), ``query`` keeps
every KV head and the same number of query heads in every group (the most
important of each group). Multi-head attention is groups of one: only
``kv_group`` applies. ``head_dim`` is kept and written into the config.

The pruned model is a smaller dense model: the Linear modules' weights are
cut to the kept rows/columns (same module objects, so any state a stage
before left on them stays), the model's config gets the new widths, and the
saved output loads with plain ``AutoModelForCausalLM.from_pretrained``.
Masks of earlier pruning stages are cut with their weights
(``MaskSet.select``). Not kept from the paper: its search over several
candidate architectures with a short distillation each, and pruning of the
embedding (hidden) width and of depth; the distillation is the recipe's
next stage (``train/finetune`` with ``kd_weight``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from sparsify_core import Method, MetricInfo, Params, StageResult
from sparsify_core.errors import ParamsError, SparsifyError
from sparsify_core.ffn import (FFNBlock, capture_intermediates, find_ffn_blocks, is_conv1d, linear_shape,
                               transformer_layers)

HeadUnit = Literal["kv_group", "query"]


# -- importance: pure functions on tensors ------------------------------------------------------------

def token_means(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``[batch, d]``: the mean over each sequence's tokens of ``x`` (``[batch, seq, d]`` or ``[batch*seq, d]``,
    batch-major), in float32. Raises ``ValueError`` when ``x`` does not split into ``batch`` sequences."""
    d = x.shape[-1]
    if x.numel() % (batch * d):
        raise ValueError(f"activations of shape {tuple(x.shape)} do not split into {batch} sequences")
    return x.detach().float().reshape(batch, -1, d).mean(dim=1)


def head_output_norms(o_input: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[..., heads]``: the L2 norm of each head's slice of ``o_input`` (``[..., heads * head_dim]``, the input
    of the attention output projection, heads in order), in float32."""
    *lead, width = o_input.shape
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}")
    return o_input.detach().float().reshape(*lead, width // head_dim, head_dim).norm(dim=-1)


@dataclass
class Importance:
    """Running (batch, sequence) aggregation of per-sequence scores ``[batch, d]`` into one score per unit ``[d]``.

    ``add`` takes each batch's per-sequence token means (``token_means``);
    ``value("l2")`` is ``sqrt(sum_b m_b^2)``, ``value("mean")`` is
    ``sum_b m_b / n`` (Minitron's batch aggregations; the sequence
    aggregation is the mean).
    """

    sum_sq: torch.Tensor | None = None
    total: torch.Tensor | None = None
    sequences: int = 0

    def add(self, per_sequence: torch.Tensor) -> None:
        """Add ``[batch, d]`` per-sequence means."""
        m = per_sequence.detach().double().cpu()
        if self.sum_sq is None:
            self.sum_sq, self.total = torch.zeros(m.shape[1], dtype=torch.float64), torch.zeros(m.shape[1],
                                                                                                  dtype=torch.float64)
        self.sum_sq += (m * m).sum(dim=0)
        self.total += m.sum(dim=0)
        self.sequences += m.shape[0]

    def value(self, how: Literal["l2", "mean"]) -> torch.Tensor:
        """``[d]`` importance scores (float64). Raises ``ValueError`` before any ``add``."""
        if self.sum_sq is None:
            raise ValueError("no activations were seen")
        return self.sum_sq.sqrt() if how == "l2" else self.total / self.sequences


# -- selection: pure functions -------------------------------------------------------------------------

def top_units(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (int64, ascending) of the ``keep`` highest ``scores`` (``[d]``); ties go to the lower index."""
    if not 0 < keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()} units")
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return order.sort().values


def head_counts(heads: int, kv_heads: int, unit: HeadUnit) -> list[int]:
    """The numbers of query heads a layer of ``heads`` query heads sharing ``kv_heads`` KV heads can keep.

    ``kv_group``: whole groups of ``heads // kv_heads``; ``query``: the same
    number in each of the ``kv_heads`` groups. Raises ``ValueError`` when
    ``kv_heads`` does not divide ``heads``.
    """
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"{heads} query heads do not split into {kv_heads} KV groups")
    group = heads // kv_heads
    return [group * n for n in range(1, kv_heads + 1)] if unit == "kv_group" else [kv_heads * n
                                                                                   for n in range(1, group + 1)]


def select_heads(scores: torch.Tensor, keep: int, kv_heads: int, unit: HeadUnit
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(query heads, kv heads)`` kept (int64, ascending) from per-query-head ``scores`` ``[heads]``.

    Query head ``h`` belongs to KV group ``h // (heads // kv_heads)`` (the
    layout of transformers' ``repeat_kv``). ``kv_group``: the ``keep //
    group`` groups with the highest summed scores, with all their query
    heads; ``query``: in every group, its ``keep // kv_heads`` highest. Raises
    ``ValueError`` when ``keep`` is not in ``head_counts``.
    """
    heads = scores.numel()
    if keep not in head_counts(heads, kv_heads, unit):
        raise ValueError(f"cannot keep {keep} of {heads} heads by {unit} with {kv_heads} KV heads")
    group = heads // kv_heads
    by_group = scores.reshape(kv_heads, group)
    if unit == "kv_group":
        groups = top_units(by_group.sum(dim=1), keep // group)
        query = (groups[:, None] * group + torch.arange(group)).flatten()
        return query, groups
    per = keep // kv_heads
    query = torch.cat([g * group + top_units(by_group[g], per) for g in range(kv_heads)])
    return query, torch.arange(kv_heads)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows (int64) of a ``[heads * head_dim, ...]`` projection that belong to ``heads``, in order."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


# -- the model's width structure ----------------------------------------------------------------------

@dataclass
class Attention:
    """The llama-style attention of one layer: ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and its head counts."""

    path: str
    module: nn.Module
    head_dim: int

    def proj(self, name: str) -> nn.Module:
        return getattr(self.module, name)

    @property
    def heads(self) -> int:
        return linear_shape(self.proj("q_proj"))[0] // self.head_dim

    @property
    def kv_heads(self) -> int:
        return linear_shape(self.proj("k_proj"))[0] // self.head_dim


@dataclass
class WidthStructure:
    """What ``prune/width`` can shrink in a model: its FFN blocks, its attentions (``[]``: none it knows) and
    the config field holding the FFN width."""

    blocks: list[FFNBlock]
    attentions: list[Attention]
    ffn_field: str | None
    model_type: str
    problems: dict[str, str] = field(default_factory=dict)  # axis -> why it cannot be pruned

    @property
    def d_ff(self) -> int:
        return self.blocks[0].d_ff


_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_FFN_FIELDS = ("intermediate_size", "ffn_dim", "n_inner")


def _plain(module: nn.Module) -> bool:
    """A Linear or Conv1D holding its own dense weight (a Linear subclass that swapped only its forward counts)."""
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and isinstance(getattr(module, "weight", None),
                                                                                nn.Parameter)


def _attention(path: str, layer: nn.Module) -> Attention | None:
    for name, module in layer.named_modules():
        if all(_plain(getattr(module, p, None) or nn.Identity()) for p in _PROJ) and isinstance(
                getattr(module, "head_dim", None), int):
            return Attention(f"{path}.{name}" if name else path, module, module.head_dim)
    return None


def width_structure(model: nn.Module) -> WidthStructure:
    """The FFN blocks and llama-style attentions of ``model``, and what stands in the way of shrinking them.

    Works on a meta-device skeleton. Raises ``SparsifyError`` when the model
    has no FFN blocks."""
    blocks = find_ffn_blocks(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    problems: dict[str, str] = {}
    widths = sorted({b.d_ff for b in blocks})
    odd = [f"{b.name} ({type(m).__name__})" for b in blocks for m in b.projections().values() if not _plain(m)]
    ffn_field = next((f for f in _FFN_FIELDS if getattr(config, f, None) == widths[0]), None)
    if ffn_field is None and model_type == "gpt2" and getattr(config, "n_inner", 0) is None:
        ffn_field = "n_inner"  # GPT-2 leaves it None for 4 * n_embd: written explicitly once pruned
    if odd:
        problems["ffn"] = (f"its FFN projections are not plain Linear/Conv1D modules ({odd[0]}): run prune/width "
                           "before stages that swap them (layouts, experts)")
    elif len(widths) > 1:
        problems["ffn"] = f"its FFN blocks differ in width ({widths}): a config holds one intermediate size"
    elif ffn_field is None:
        problems["ffn"] = f"its config ({model_type}) names its FFN width in none of {', '.join(_FFN_FIELDS)}"
    layers = transformer_layers(model)
    if "ffn" not in problems:
        layer_paths = {p for p, _ in layers}
        for b in blocks:
            if b.name in layer_paths:  # OPT/BERT: the FFN parts sit on the layer, beside its attention
                continue
            parts = {p.removeprefix(b.name).lstrip(".") for p in b.module_names.values()}
            extra = [n for n, _ in b.module.named_parameters() if n.rpartition(".")[0] not in parts]
            if extra:  # a router, per-neuron thresholds...: indexed by neuron, they would no longer match
                problems["ffn"] = (f"{b.name} holds parameters besides its projections ({extra[0]}): a stage before "
                                   "added them; run prune/width first")
                break
    attentions = [a for a in (_attention(p, m) for p, m in layers) if a is not None]
    if not attentions:
        problems["heads"] = (f"{model_type} has no llama-style attention (q/k/v/o_proj with an explicit head_dim in "
                             "the config; e.g. gpt2 and opt derive it from hidden_size / heads): prune its FFN only")
    elif len(attentions) < len(layers):
        problems["heads"] = f"only {len(attentions)} of its {len(layers)} layers have llama-style attention"
    elif len({(a.heads, a.kv_heads, a.head_dim) for a in attentions}) > 1:
        problems["heads"] = "its layers differ in head counts: a config holds one"
    elif getattr(config, "num_attention_heads", None) != attentions[0].heads:
        problems["heads"] = f"its config's num_attention_heads is not the {attentions[0].heads} heads its layers have"
    return WidthStructure(blocks, attentions, ffn_field, model_type, problems)


# -- params and the plan --------------------------------------------------------------------------------

class WidthParams(Params):
    """What to keep of each layer's width (the same in every layer), and how to score it."""

    ffn_keep: float | None = Field(None, gt=0, le=1, description="fraction of the FFN neurons kept in every layer")
    intermediate_size: int | None = Field(None, ge=1, description="FFN neurons kept in every layer (absolute)")
    heads_keep: float | None = Field(None, gt=0, le=1, description=(
        "fraction of the attention (query) heads kept in every layer; must give a count head_unit allows"))
    num_attention_heads: int | None = Field(None, ge=1, description="query heads kept in every layer (absolute)")
    head_unit: HeadUnit = Field("kv_group", description=(
        "kv_group: remove whole KV groups (a KV head with its query heads; multi-head attention: single heads); "
        "query: keep every KV head and the same number of query heads in each group (GQA only)"))
    batch_agg: Literal["l2", "mean"] = Field("l2", description=(
        "how per-sequence mean activations combine over the calibration sequences (Minitron's best: l2)"))
    calibration_split: str = "calibration"
    batch_size: int = Field(4, gt=0, description="calibration sequences per forward pass")

    @model_validator(mode="after")
    def _one_of_each(self):
        if self.ffn_keep is not None and self.intermediate_size is not None:
            raise ValueError("give ffn_keep or intermediate_size, not both")
        if self.heads_keep is not None and self.num_attention_heads is not None:
            raise ValueError("give heads_keep or num_attention_heads, not both")
        if self.ffn_keep is self.intermediate_size is self.heads_keep is self.num_attention_heads is None:
            raise ValueError("nothing to prune: give ffn_keep / intermediate_size and/or heads_keep / "
                             "num_attention_heads")
        return self


@dataclass(frozen=True)
class WidthPlan:
    """The widths every layer keeps: ``d_ff`` neurons, ``heads`` query heads on ``kv_heads`` KV heads (``None``:
    that axis unchanged)."""

    d_ff: int | None
    heads: int | None
    kv_heads: int | None


def plan_widths(structure: WidthStructure, params: WidthParams) -> WidthPlan:
    """The widths ``params`` ask of a model of this ``structure``; ``ParamsError`` naming the field when they
    cannot be kept (an axis the model cannot shrink, a count out of range or not allowed by ``head_unit``)."""
    d_ff = None
    ffn_field = "ffn_keep" if params.ffn_keep is not None else "intermediate_size"
    if params.ffn_keep is not None or params.intermediate_size is not None:
        if "ffn" in structure.problems:
            raise ParamsError(f"cannot prune the FFN width of this model: {structure.problems['ffn']}", field=ffn_field)
        full = structure.d_ff
        d_ff = round(params.ffn_keep * full) if params.ffn_keep is not None else params.intermediate_size
        if not 1 <= d_ff <= full:
            what = (f"ffn_keep {params.ffn_keep} keeps {d_ff} of {full} neurons" if params.ffn_keep is not None
                    else f"intermediate_size {d_ff} is larger than the model's {full}")
            raise ParamsError(f"{what}: keep 1 to {full}", field=ffn_field)
    heads = kv = None
    head_field = "heads_keep" if params.heads_keep is not None else "num_attention_heads"
    if params.heads_keep is not None or params.num_attention_heads is not None:
        if "heads" in structure.problems:
            raise ParamsError(f"cannot prune attention heads: {structure.problems['heads']}", field=head_field)
        a = structure.attentions[0]
        full, full_kv = a.heads, a.kv_heads
        heads = round(params.heads_keep * full) if params.heads_keep is not None else params.num_attention_heads
        try:
            allowed = head_counts(full, full_kv, params.head_unit)
        except ValueError as exc:
            raise ParamsError(str(exc), field=head_field) from None
        if heads not in allowed:
            shape = f"{full} heads on {full_kv} KV heads"
            fractions = ", ".join(f"{n} ({n / full:.3g})" for n in allowed)
            hint = " (multi-head attention: use head_unit kv_group)" if full == full_kv and \
                params.head_unit == "query" else ""
            raise ParamsError(f"{heads} heads cannot be kept by head_unit {params.head_unit} with {shape}: keep one "
                              f"of {fractions}{hint}", field=head_field)
        kv = heads // (full // full_kv) if params.head_unit == "kv_group" else full_kv
    return WidthPlan(d_ff, heads, kv)


# -- surgery --------------------------------------------------------------------------------------------

@torch.no_grad()
def cut_linear(module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep only ``rows`` (outputs) and ``cols`` (inputs) of a Linear or Conv1D, in place (bias rows too).

    The module object stays (its class, hooks and other attributes: what a
    stage before it set); its weight and bias become new, smaller parameters
    holding copies of the kept entries, and ``out_features``/``in_features``
    (``nf``/``nx``) follow. Works on the meta device.
    """
    conv = is_conv1d(module)
    w = module.weight
    out_dim, in_dim = (1, 0) if conv else (0, 1)  # Conv1D stores [in, out]
    if rows is not None:
        w = w.index_select(out_dim, rows.to(w.device))
    if cols is not None:
        w = w.index_select(in_dim, cols.to(w.device))
    module.weight = nn.Parameter(w.contiguous(), requires_grad=module.weight.requires_grad)
    bias = getattr(module, "bias", None)
    if rows is not None and isinstance(bias, torch.Tensor):
        module.bias = nn.Parameter(bias.index_select(0, rows.to(bias.device)).contiguous(),
                                   requires_grad=bias.requires_grad)
    if conv:
        module.nx, module.nf = int(module.weight.shape[0]), int(module.weight.shape[1])
    else:
        module.out_features, module.in_features = int(module.weight.shape[0]), int(module.weight.shape[1])


def _set_attention(a: Attention, heads: int, kv_heads: int) -> None:
    """Head counts an attention module reads in its forward (transformers' names, across versions)."""
    m = a.module
    m.num_key_value_groups = heads // kv_heads
    for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if hasattr(m, name):
            setattr(m, name, value)


def _set_config(model: nn.Module, structure: WidthStructure) -> None:
    """Write the model's current widths into its config (read back from the modules)."""
    config = model.config
    if structure.ffn_field is not None and "ffn" not in structure.problems:
        setattr(config, structure.ffn_field, structure.blocks[0].d_ff)
    if "heads" not in structure.problems:
        a = structure.attentions[0]
        config.head_dim = a.head_dim  # explicit: hidden_size / heads no longer gives it
        config.num_attention_heads, config.num_key_value_heads = a.heads, a.kv_heads
        for att in structure.attentions:
            _set_attention(att, att.heads, att.kv_heads)


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def cut(model: nn.Module, structure: WidthStructure, cuts: dict[str, torch.Tensor], masks=None) -> None:
    """Apply ``cuts`` (``rows.<module path>`` / ``cols.<module path>`` -> kept indices) to ``model``, cut the
    masks of those weights the same way (``masks``: a ``MaskSet``), and write the new widths into the config."""
    modules = _modules(model)
    for path in sorted({k.split(".", 1)[1] for k in cuts}):
        rows, cols = cuts.get(f"rows.{path}"), cuts.get(f"cols.{path}")
        cut_linear(modules[path], rows, cols)
        if masks is not None:
            if is_conv1d(modules[path]):  # masks are laid out like the parameter: a Conv1D's is [in, out]
                rows, cols = cols, rows
            masks.select(f"{path}.weight", rows, cols)
    _set_config(model, structure)


# -- the method -----------------------------------------------------------------------------------------

WIDTH_METRICS = {
    "intermediate_size": MetricInfo(unit="neurons"),
    "attention_heads": MetricInfo(unit="heads"),
    "kv_heads": MetricInfo(unit="heads"),
    "weights_removed": MetricInfo(unit="params"),
    "projection_weights_kept": MetricInfo(fraction=True),
    "calibration_tokens": MetricInfo(unit="tokens"),
}


class Width(Method):
    """Structured width pruning (Minitron): remove FFN neurons and attention heads by activation importance.

    One forward pass over the calibration split scores every neuron (mean
    ``|x1|`` over a sequence's tokens, combined over sequences by
    ``batch_agg``) and every query head (mean L2 norm of its attention
    output); each layer keeps its most important ones, the same number in
    every layer, and its Linear modules shrink to them: a smaller dense
    model with an updated config. Follow it with ``train/finetune``
    (``kd_weight``) to distil from the dense model. Refuses ``model.offload``.
    """

    kind = "prune"
    name = "width"
    Params = WidthParams

    def needs_rebuild(self, params: WidthParams, result: StageResult) -> bool:
        """False: the saved config holds the new widths; plain transformers builds the smaller model."""
        return False

    @classmethod
    def supports_offload(cls) -> bool:
        """False: the layers' parameters are replaced by smaller tensors that offload does not track."""
        return False

    def check(self, model, params: WidthParams) -> None:
        """The widths asked for, against the model's skeleton (``plan_widths``)."""
        plan_widths(width_structure(model), params)

    def apply(self, ctx, params: WidthParams) -> StageResult:
        if ctx.offload is not None:
            raise SparsifyError("prune/width replaces the layers' weights with smaller ones: use model.offload none")
        structure = width_structure(ctx.model)
        try:
            plan = plan_widths(structure, params)
        except ParamsError as exc:
            raise SparsifyError(f"{exc.field}: {exc}") from None
        before = self._projection_numel(structure)
        ffn, heads, tokens = self._importance(ctx, params, structure, plan)
        cuts: dict[str, torch.Tensor] = {}
        for i, block in enumerate(structure.blocks):
            if plan.d_ff is not None and plan.d_ff < block.d_ff:
                keep = top_units(ffn[i], plan.d_ff)
                for role, path in block.module_names.items():
                    cuts[f"{'cols' if role == 'down' else 'rows'}.{path}"] = keep
        if plan.heads is not None and plan.heads < structure.attentions[0].heads:
            for i, a in enumerate(structure.attentions):
                query, kv = select_heads(heads[i], plan.heads, a.kv_heads, params.head_unit)
                q_rows, kv_rows = head_rows(query, a.head_dim), head_rows(kv, a.head_dim)
                cuts[f"rows.{a.path}.q_proj"], cuts[f"cols.{a.path}.o_proj"] = q_rows, q_rows
                if plan.kv_heads < a.kv_heads:
                    cuts[f"rows.{a.path}.k_proj"], cuts[f"rows.{a.path}.v_proj"] = kv_rows, kv_rows
        cuts = {k: v.clone() for k, v in cuts.items()}  # one tensor per key: safetensors refuses shared storage
        cut(ctx.model, structure, cuts, ctx.masks)
        after = self._projection_numel(structure)
        a = structure.attentions[0] if "heads" not in structure.problems else None
        metrics = {"intermediate_size": float(structure.d_ff), "weights_removed": float(before - after),
                   "projection_weights_kept": after / before, "calibration_tokens": float(tokens)}
        if a is not None:
            metrics.update(attention_heads=float(a.heads), kv_heads=float(a.kv_heads))
        ctx.info(f"width: FFN {structure.d_ff} neurons" + (f", {a.heads} heads on {a.kv_heads} KV heads" if a else "")
                 + f" per layer; {after / before:.1%} of the projection weights kept")
        info = {"intermediate_size": structure.d_ff, "head_unit": params.head_unit}
        if a is not None:
            info.update(num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim)
        return StageResult(metrics=metrics, state=cuts, info=info,
                           metric_info={k: WIDTH_METRICS[k] for k in metrics})

    def rebuild(self, ctx, params: WidthParams, result: StageResult) -> None:
        """Cut a freshly loaded model to the rows/columns ``apply`` kept (``state``); weights load afterwards."""
        cut(ctx.model, width_structure(ctx.model), dict(result.state))

    @staticmethod
    def _projection_numel(structure: WidthStructure) -> int:
        mods = [m for b in structure.blocks for m in b.projections().values()]
        mods += [a.proj(p) for a in structure.attentions for p in _PROJ]
        return sum(out * inp for out, inp in (linear_shape(m) for m in mods))

    @torch.no_grad()
    def _importance(self, ctx, params: WidthParams, structure: WidthStructure, plan: WidthPlan
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """Per layer, the neuron scores ``[d_ff]`` and query-head scores ``[heads]`` (for the axes ``plan``
        prunes), and the number of calibration tokens seen: one forward pass of the unpruned model."""
        want_ffn, want_heads = plan.d_ff is not None, plan.heads is not None
        ffn = [Importance() for _ in structure.blocks]
        heads = [Importance() for _ in structure.attentions]
        batch = {"n": 0}
        index = {id(b): i for i, b in enumerate(structure.blocks)}

        def on_ffn(block, x1):
            ffn[index[id(block)]].add(token_means(x1.abs(), batch["n"]))

        handles = []
        if want_heads:
            for i, a in enumerate(structure.attentions):
                def hook(_module, args, i=i, hd=a.head_dim):
                    heads[i].add(token_means(head_output_norms(args[0], hd), batch["n"]))
                handles.append(a.proj("o_proj").register_forward_pre_hook(hook))
        split = ctx.split(params.calibration_split)
        was = ctx.model.training
        ctx.model.eval()
        try:
            with capture_intermediates(structure.blocks if want_ffn else [], on_ffn), \
                    ctx.progress("width: activation importance", total=len(split)) as bar:
                for ids in split.batches(params.batch_size):
                    batch["n"] = ids.shape[0]
                    ctx.model(input_ids=ids.to(ctx.device))
                    bar.advance(ids.shape[0])
        finally:
            for h in handles:
                h.remove()
            ctx.model.train(was)
        return ([s.value(params.batch_agg) for s in ffn] if want_ffn else [],
                [s.value(params.batch_agg) for s in heads] if want_heads else [], split.tokens)
