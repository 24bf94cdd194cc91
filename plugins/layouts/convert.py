"""``layout_convert`` stage methods: swap model modules for layout-backed ones.

- ``activation_sparse_ffn``: gated FFN blocks with a sparse activation (ReLU,
  FATReLU, CATS) become ``ActivationSparseFFN``; plain FFN blocks keep their
  up projection and activation, and their down projection becomes a
  ``TransposedLinear`` that skips zero inputs. With ``predictor``, each gated
  block also gets an ``ActivationPredictor`` fitted on calibration data,
  layer by layer (``predictor.py``): approximate, its recall reported.
- ``moe_ffn``: FFN blocks split into experts by ``moeify`` (``RoutedFFN``,
  MoEfication / LTE) become ``MoEFFN``: the same router and routing
  (``top_k`` or ``threshold``), weights stored by neuron rows so each token
  reads only its selected experts' gate, up and down rows. Exact.
- ``weight`` (``layout: NAME`` plus that layout's params): Linear layers
  become ``SparseLinear`` in any layout of the plugin catalog, built-in or a
  plugin's. The conversion is exact: a weight that does not fit the format
  (e.g. ``nm`` on a weight that was not pruned n:m) is an error naming the
  module, never a silent pruning. ``csr``, ``bsr``, ``nm``, ``nmg`` are the
  same method with the layout fixed, kept for existing recipes. ``layout:
  auto`` picks, per module, the candidate layout that holds the weight
  exactly and beats dense by the most on this machine, from the measured
  table of ``table.py`` (measuring missing entries); none faster: the module
  stays dense, and the stage result says why.

Masks of converted weights follow them: transposed with the down projection,
dropped for weights held in a layout (the layout itself keeps the zeros).
``rebuild`` redoes the swap on a fresh model from the recorded shapes, so
outputs save with safetensors and load back through ``load_output``.
"""
from __future__ import annotations


import torch
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from sparsify_core.method import LayerIndices, check_regexes
from sparsify_core import Layout, Method, MetricInfo, Params, StageResult
from sparsify_core.errors import ParamsError, SparsifyError
from sparsify_core.layout import find_layout
from sparsify_core.ffn import find_ffn_blocks, is_conv1d, prunable_modules, weight_out_in

from . import predictor as P
from .modules import (ActivationPredictor, ActivationSparseFFN, MoEFFN, RoutedFFN, SparseLinear, TransposedLinear,
                      activation_spec, input_threshold, is_sparse_activation)

# What the conversions report (each stage reports the names of its own conversion).
CONVERT_METRICS: dict[str, MetricInfo] = {
    "blocks_converted": MetricInfo(unit="blocks"),
    "modules_converted": MetricInfo(unit="modules"),
    "weight_bytes_ratio": MetricInfo(higher_is_better=False),  # stored bytes / dense bytes: above 1 can happen
    # layout: auto: modules left dense (no layout beat dense), and the mean measured dense/ours ratio (dense: 1)
    "modules_kept_dense": MetricInfo(unit="modules"),
    "measured_speedup": MetricInfo(higher_is_better=True, unit="x"),
    # activation predictors, means over blocks on held-out calibration tokens (predictor.coverage)
    "predictor_recall": MetricInfo(higher_is_better=True, fraction=True),  # active neurons computed
    "predictor_mass_recall": MetricInfo(higher_is_better=True, fraction=True),  # activation mass computed
    "predictor_computed_fraction": MetricInfo(higher_is_better=False, fraction=True),  # neurons computed
    "predictor_active_fraction": MetricInfo(fraction=True),  # neurons truly active: the model, not the predictor
}


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _rewrite_masks(ctx, change: dict[str, str | None]) -> None:
    """Masks keyed by a converted weight: ``"t"`` transposes them, ``None`` drops them."""
    state = {}
    for name, keep in ctx.masks.items():
        how = change.get(name, "keep")
        if how is None:
            continue
        state[name] = keep.t().contiguous() if how == "t" else keep
    ctx.masks.load_state_dict(state)


class PredictorParams(Params):
    rank: int = Field(64, ge=1, description="rank of the predictor (x -> rank -> d_ff neuron logits)")
    recall: float = Field(0.99, gt=0, le=1, description="fraction of the active (token, neuron) pairs of held-out "
                                                        "calibration tokens the predictor must cover; sets the threshold")
    threshold: float | None = Field(None, description="logit threshold (in units of each neuron's prediction "
                                                      "error) instead of one set by recall")
    steps: int = Field(0, ge=0, description="Adam steps on the binary cross-entropy after the closed-form "
                                            "least-squares fit (0: the fit alone)")
    lr: float = Field(1e-3, gt=0, description="learning rate of those steps")
    split: str = Field("calibration", description="data split the predictors are fitted on")
    max_tokens: int = Field(4096, ge=16, description="calibration tokens per layer used (a random subset)")
    holdout: float = Field(0.2, gt=0, lt=1, description="fraction of them held out to set the threshold and "
                                                        "measure recall")
    batch_size: int = Field(8, ge=1, description="calibration sequences per forward")


class ActivationSparseParams(Params):
    layers: LayerIndices = Field(None, description="FFN layer indices (0-based) to convert; default: all")
    strict: bool = Field(False, description="error instead of a dense fallback where no fast kernel exists")
    predictor: PredictorParams | None = Field(
        None, description="also fit an activation predictor per gated FFN (DejaVu/PowerInfer): skips the gate "
                          "rows of neurons predicted inactive; approximate")
    gate_screen: bool = Field(False, description="one-token decoding of gated ReLU/FATReLU FFNs reads the gate's "
                                                 "16-bit upper halves and the rest of a gate row only where the "
                                                 "screen cannot rule its neuron out: exact; pays from about 60% "
                                                 "activation sparsity on wide rows (even at 50%); costs the gate's "
                                                 "bytes again in memory")


class ActivationSparseFFNConvert(Method):
    """Activation-sparse FFN (ProSparse): compute the gate, then only active neurons' up rows and down rows.

    Exact: outputs equal the dense FFN's to float tolerance. Needs an
    activation with exact zeros (ReLU, FATReLU, CATS); run
    ``substitute_activation`` (and training) first. Decoding (up to 16
    tokens) uses the fused CPU kernel or the Triton kernel; longer inputs
    compute densely. With ``predictor`` (gated FFNs only), a low-rank
    predictor fitted on the calibration split chooses the neurons to compute,
    gate included: approximate; recall on held-out tokens is reported
    (``predictor_recall``: active neurons covered, ``predictor_mass_recall``:
    activation mass covered, ``predictor_computed_fraction``: neurons read).
    """

    kind = "layout_convert"
    name = "activation_sparse_ffn"
    Params = ActivationSparseParams

    def _convert(self, model, params, masks_change=None) -> list[str]:
        blocks = find_ffn_blocks(model)
        wanted = sorted(set(params.layers)) if params.layers is not None else list(range(len(blocks)))
        bad = [i for i in wanted if i >= len(blocks)]
        if bad:
            raise SparsifyError(f"layers {bad} out of range: the model has {len(blocks)} FFN layers")
        done = []
        for i in wanted:
            b = blocks[i]
            if isinstance(b.down, TransposedLinear):
                continue  # already converted
            spec = activation_spec(b.activation)
            if any(input_threshold(m) is not None for m in b.projections().values()):
                raise SparsifyError(f"{b.name}: its projections threshold their inputs (TEAL), which the "
                                    "activation-sparse FFN kernels do not apply; load it with fast modules instead")
            if not is_sparse_activation(spec):
                raise SparsifyError(f"{b.name}: activation {type(b.activation).__name__} has no exact zeros; "
                                    "substitute ReLU/FATReLU (or CATS) before activation_sparse_ffn")
            down_path = b.module_names["down"]
            down = TransposedLinear.from_linear(b.down, params.strict)
            if masks_change is not None and not is_conv1d(b.down):
                masks_change[f"{down_path}.weight"] = "t"
            if b.kind == "gated":
                if b.gate is not getattr(b.module, "gate_proj", None) or b.activation_owner is not b.module:
                    raise SparsifyError(f"{b.name}: gated FFN layout not supported for conversion")
                _set_module(model, b.name, ActivationSparseFFN(b.gate, b.up, down, b.activation, params.strict,
                                                                 gate_screen=params.gate_screen))
            else:
                _set_module(model, down_path, down)
            done.append(b.name)
        return done

    @staticmethod
    def _gated(model, params) -> dict[str, ActivationSparseFFN]:
        """The converted gated blocks among the wanted layers, by module path."""
        blocks = find_ffn_blocks(model)
        wanted = sorted(set(params.layers)) if params.layers is not None else range(len(blocks))
        plain = [blocks[i].name for i in wanted if not isinstance(blocks[i].module, ActivationSparseFFN)]
        if plain:
            raise SparsifyError(f"predictor: only gated FFN blocks (gate/up/down) take one; {plain[0]} is plain")
        return {blocks[i].name: blocks[i].module for i in wanted}

    def _fit_predictors(self, ctx, params) -> dict[str, dict]:
        """Fit every wanted block's predictor, layer by layer, on the calibration split; stats per block."""
        from sparsify_core.calibration import calibrate

        pp = params.predictor
        targets = self._gated(ctx.model, params)
        ids = ctx.split(pp.split).input_ids
        keep = min(1.0, pp.max_tokens / max(1, ids.numel()))
        gen = torch.Generator().manual_seed(ctx.seed)
        stats: dict[str, dict] = {}

        def visit(layer):
            for name, ffn in targets.items():
                if not (name == layer.name or name.startswith(layer.name + ".")):
                    continue
                xs = []

                def grab(_names, x):
                    pick = torch.rand(x.shape[0], generator=gen) < keep
                    xs.append(x[pick.to(x.device)].detach())

                ffn.predictor = None  # fit on the exact block's inputs and outputs
                layer.observe(grab, [f"{name}.gate_proj"])
                ffn.predictor, stats[name] = _fit_predictor(ffn, torch.cat(xs), pp, ctx.seed)

        calibrate(ctx, visit, split=pp.split, batch_size=pp.batch_size, description="fit activation predictors")
        missing = [n for n in targets if n not in stats]
        if missing:
            raise SparsifyError(f"predictor: no calibration inputs reached {missing[0]}")
        return stats

    def apply(self, ctx, params) -> StageResult:
        change: dict = {}
        done = self._convert(ctx.model, params, change)
        _rewrite_masks(ctx, change)
        ctx.info(f"activation-sparse FFN in {len(done)} blocks")
        metrics, info = {"blocks_converted": float(len(done))}, {"blocks": done}
        if params.predictor is not None:
            stats = self._fit_predictors(ctx, params)
            for key in ("recall", "mass_recall", "computed", "active"):
                mean = sum(s[key] for s in stats.values()) / len(stats)
                metrics["predictor_" + key + ("_fraction" if key in ("computed", "active") else "")] = mean
            info["predictors"] = stats
            ctx.info(f"activation predictors in {len(stats)} blocks: recall {metrics['predictor_recall']:.3f}, "
                     f"computing {metrics['predictor_computed_fraction']:.1%} of neurons "
                     f"({metrics['predictor_active_fraction']:.1%} active)")
        return StageResult(metrics=metrics, info=info, metric_info=CONVERT_METRICS)

    def plain_form(self, params) -> str | None:
        return "an activation predictor" if params.predictor is not None else None

    def rebuild(self, ctx, params, result) -> None:
        self._convert(ctx.model, params)
        for name, s in result.info.get("predictors", {}).items():
            ffn = ctx.model.get_submodule(name)
            w = ffn.gate_proj.weight
            ffn.predictor = ActivationPredictor.empty(w.shape[1], w.shape[0], int(s["rank"]), w.dtype).to(w.device)


@torch.no_grad()
def _fit_predictor(ffn: ActivationSparseFFN, x: torch.Tensor, pp: PredictorParams, seed: int
                   ) -> tuple[ActivationPredictor, dict]:
    """One block's predictor from its inputs ``x [N, d]``: fit, threshold and recall on held-out tokens."""
    if x.shape[0] < 2:
        raise SparsifyError("predictor: fewer than 2 calibration tokens; give the calibration split more samples")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=gen).to(x.device)
    n_hold = min(x.shape[0] - 1, max(1, int(round(pp.holdout * x.shape[0]))))
    held, fit = x[order[:n_hold]], x[order[n_hold:]]
    gate = ffn.gate_proj.weight

    def truth(xs):  # which neurons are active, and their activation mass |act(gate) * up|
        h = ffn.act_fn(ffn.gate_proj(xs)).float()
        return h != 0, (h * ffn.up_proj(xs).float()).abs()

    spec = activation_spec(ffn.act_fn)
    offset = spec[1] if spec is not None and spec[0] == "relu" else 0.0  # FATReLU's threshold is the boundary
    pred = P.fit_lowrank(fit, gate, ffn.gate_proj.bias, pp.rank, offset=offset, seed=seed)
    if pp.steps:
        pred, _, _ = P.refine(pred, fit, truth(fit)[0], pp.steps, pp.lr, seed=seed)
    active, mass = truth(held)
    logits = pred.logits(held)
    threshold = pp.threshold if pp.threshold is not None else P.threshold_for_recall(logits, active, pp.recall)
    stats = P.coverage(logits >= threshold, active, mass) | {"rank": pp.rank, "threshold": threshold,
                                                              "tokens": int(x.shape[0]), "held_out": n_hold}
    module = ActivationPredictor(pred.p_in.to(gate.dtype), pred.p_out.to(gate.dtype), pred.p_bias.to(gate.dtype),
                                 threshold)
    return module.to(gate.device), stats


class MoEFFNParams(Params):
    layers: LayerIndices = Field(None, description="FFN layer indices (0-based) to convert; default: every "
                                                   "FFN split into experts")
    strict: bool = Field(False, description="error instead of a dense fallback where no fast kernel exists")


class MoEFFNConvert(Method):
    """MoE FFN (MoEfication / LTE outputs): each token reads only its selected experts' rows and columns.

    Converts every FFN that ``moeify`` split into experts (``RoutedFFN``) into
    a ``MoEFFN``: the same router and routing (``top_k`` or ``threshold``,
    so any number of experts per token), W_gate/W_up (W_fc1) rows and W_down
    transposed rows stored contiguously per expert. Exact: outputs equal the
    unconverted model's to float tolerance. Decoding (up to 16 tokens) uses the
    CPU kernel or the Triton kernel; longer inputs compute the selected
    experts with torch (gather per expert).
    """

    kind = "layout_convert"
    name = "moe_ffn"
    Params = MoEFFNParams

    def _convert(self, model, params, masks_change=None, routing=None) -> dict[str, dict]:
        """Swap the wanted routed blocks; ``routing`` (by block) restores a recorded routing first."""
        blocks = find_ffn_blocks(model)
        bad = [i for i in params.layers or [] if i >= len(blocks)]
        if bad:
            raise SparsifyError(f"layers {bad} out of range: the model has {len(blocks)} FFN layers")
        wanted = sorted(set(params.layers)) if params.layers is not None else \
            [i for i, b in enumerate(blocks) if isinstance(b.module, RoutedFFN)]
        if not wanted:
            raise SparsifyError("moe_ffn: no FFN is split into experts; run a moeify stage "
                                "(param_cluster or coactivation) first")
        done = {}
        for i in wanted:
            b = blocks[i]
            m = b.module
            if not isinstance(m, RoutedFFN):
                raise SparsifyError(f"moe_ffn: {b.name} is not split into experts; run a moeify stage on it first")
            if routing is not None and b.name in routing:
                r = routing[b.name]
                m.set_routing(r["routing"], top_k=r["top_k"], tau=r["tau"])
            if m.routing not in ("top_k", "threshold"):
                raise SparsifyError(f"moe_ffn: {b.name} routes {m.routing!r}, which computes every expert; the MoE "
                                    "layout needs top_k or threshold routing (LTE's stage 2 sets threshold)")
            if not isinstance(m, MoEFFN):
                if masks_change is not None:
                    for role, path in b.module_names.items():
                        # Linear W_down and Conv1D W_fc1 change orientation; the other weights keep theirs
                        if (role == "down") != is_conv1d(b.projections()[role]):
                            masks_change[f"{path}.weight"] = "t"
                _set_module(model, b.name, MoEFFN.from_routed(m, params.strict))
            done[b.name] = {"routing": m.routing, "top_k": m.top_k, "tau": m.tau}
        return done

    def apply(self, ctx, params) -> StageResult:
        change: dict = {}
        done = self._convert(ctx.model, params, change)
        _rewrite_masks(ctx, change)
        rules = sorted({f"top_k={c['top_k']}" if c["routing"] == "top_k" else f"tau={c['tau']:g}"
                        for c in done.values()})
        ctx.info(f"MoE FFN layout in {len(done)} blocks (routing {', '.join(rules)})")
        return StageResult(metrics={"blocks_converted": float(len(done))}, info={"blocks": done},
                           metric_info=CONVERT_METRICS)

    def plain_form(self, params) -> str | None:
        return "experts and a router"

    def rebuild(self, ctx, params, result) -> None:
        self._convert(ctx.model, params, routing=result.info["blocks"])


class WeightLayoutParams(Params):
    targets: list[str] | None = Field(
        None, description="regexes (re.search) on module paths of Linear/Conv1D modules to convert; "
                          "default: every Linear/Conv1D inside the transformer layers")
    exclude: list[str] = Field(["lm_head"], description="regexes of module paths never converted")
    strict: bool = Field(False, description="error instead of a dense fallback where no fast kernel exists")

    @field_validator("targets", "exclude")
    @classmethod
    def _regexes(cls, v):
        return check_regexes(v)


AUTO = "auto"


class AutoLayoutParams(Params):
    """``layout: auto``: the candidates, and the token count the model will be run with."""

    candidates: list[str] = Field(["csr", "bsr", "nm", "nmg"], min_length=1,
                                  description="layouts to consider, each with its default params unless `params` "
                                              "gives them; one that cannot hold a weight exactly is skipped for it")
    params: dict[str, dict] = Field({}, description="params of candidate layouts by name, e.g. {bsr: {block: [8, 8]}}")
    tokens: int = Field(1, ge=1, description="tokens per call to optimise for (1: decoding one sequence)")
    measure: bool = Field(True, description="measure missing table entries on this machine (float32, CPU, about a "
                                            "second each); false: a missing entry is an error")
    margin: float = Field(1.0, ge=0, description="measured dense/layout ratio a layout must exceed to replace dense")

    @model_validator(mode="after")
    def _known(self):
        for name in self.candidates:
            try:
                layout = find_layout(name)
            except SparsifyError as exc:
                raise ValueError(str(exc)) from None
            try:
                layout.Params.model_validate(self.params.get(name, {}))
            except ValidationError as exc:
                raise ValueError(f"params of the {name} layout: " + "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors())) from None
        extra = sorted(set(self.params) - set(self.candidates))
        if extra:
            raise ValueError(f"params given for {extra}, which are not among the candidates {self.candidates}")
        return self

    def layouts(self) -> list[tuple[type[Layout], Params]]:
        """The candidate layout classes with their validated params."""
        return [(find_layout(n), find_layout(n).Params.model_validate(self.params.get(n, {})))
                for n in self.candidates]


class WeightConvertParams(WeightLayoutParams):
    """``layout`` names a layout of the plugin catalog; the other keys not listed here are its params.

    (So a layout's own params cannot be called ``layout``, ``targets``,
    ``exclude`` or ``strict``: those keys belong to the stage.)"""

    model_config = ConfigDict(extra="allow", frozen=True)
    layout: str = Field(description="name of the layout (`sparsify plugins` lists them): csr, bsr, nm, nmg or "
                                    "a plugin's; its own params (e.g. n, m for nm) go next to it; or `auto`: the "
                                    "fastest on this machine from the measured layout table (its params: "
                                    "AutoLayoutParams)")

    @model_validator(mode="after")
    def _layout_params(self):
        if self.layout == AUTO:
            try:
                AutoLayoutParams.model_validate(self.model_extra or {})
            except ValidationError as exc:
                raise ValueError("params of layout auto: " + "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors())) from None
            return self
        try:
            layout = find_layout(self.layout)
        except SparsifyError as exc:
            raise ValueError(str(exc)) from None
        try:
            layout.Params.model_validate(self.model_extra or {})
        except ValidationError as exc:
            raise ValueError(f"params of the {self.layout} layout: "
                             + "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}"
                                         for e in exc.errors())) from None
        return self


class WeightConvert(Method):
    """Hold Linear weights in a layout (``layout: NAME`` plus its params; exact, so prune first).

    Any layout of the plugin catalog works, built-in (``csr``, ``bsr``,
    ``nm``, ``nmg``) or a plugin's: the layout's own ``Params`` validates its
    params, its ``from_dense`` stores each targeted weight (a weight that does
    not fit is an error naming the module) and its kernels compute.
    """

    kind = "layout_convert"
    name = "weight"
    Params = WeightConvertParams

    def resolve(self, params) -> tuple[type[Layout], Params]:
        """The layout class and its validated params."""
        layout = find_layout(params.layout)
        return layout, layout.Params.model_validate(params.model_extra or {})

    def check(self, model, params) -> None:
        """Something to convert. (Widths need not be multiples of a block: the formats pad, exactly.)"""
        if not prunable_modules(model, params.targets, params.exclude):
            raise ParamsError(f"no Linear/Conv1D module matches targets={params.targets} "
                              f"outside exclude={params.exclude}", field="targets")

    def apply(self, ctx, params) -> StageResult:
        modules = prunable_modules(ctx.model, params.targets, params.exclude)
        if not modules:
            raise SparsifyError(f"no Linear/Conv1D module matches targets={params.targets} "
                                f"outside exclude={params.exclude}")
        if getattr(params, "layout", None) == AUTO:  # the fixed-layout aliases have no `layout`
            return self._apply_auto(ctx, params, modules)
        layout_cls, lp = self.resolve(params)
        specs, change, dense_bytes, sparse_bytes = {}, {}, 0, 0
        with ctx.progress(f"{layout_cls.name} conversion", total=len(modules)) as task:
            for name, module in modules:
                if input_threshold(module) is not None:  # a layout's kernel would skip the threshold
                    raise SparsifyError(f"{name}: thresholds its input (TEAL), which a weight layout's kernel "
                                        "would skip; weight layouts and teal do not combine")
                w = weight_out_in(module).detach()
                try:
                    layout = layout_cls.from_dense(w, lp)
                except ValueError as exc:
                    raise SparsifyError(f"{name}: {exc}") from None
                specs[name] = self._swap(ctx, name, module, layout, params.strict)
                change[f"{name}.weight"] = None
                dense_bytes += w.numel() * w.element_size()
                sparse_bytes += layout.nbytes()
                task.advance(1)
        _rewrite_masks(ctx, change)
        return StageResult(metrics={"modules_converted": float(len(modules)),
                                    "weight_bytes_ratio": sparse_bytes / max(dense_bytes, 1)},
                           info={"modules": specs}, metric_info=CONVERT_METRICS)

    @staticmethod
    def _swap(ctx, name, module, layout, strict) -> dict:
        """Put ``SparseLinear(layout)`` in place of ``module``; its spec for ``rebuild``."""
        w = weight_out_in(module)
        new = SparseLinear(layout, getattr(module, "bias", None), strict)
        _set_module(ctx.model, name, new)
        return {"shape": list(layout.shape), "storage": new.storage_spec(),
                "bias": module.bias is not None if hasattr(module, "bias") else False,
                "dtype": str(w.dtype).removeprefix("torch.")}

    def _apply_auto(self, ctx, params, modules) -> StageResult:
        """``layout: auto``: per module, the candidate the measured table rates fastest, or dense if none wins."""
        from . import table as TBL

        ap = AutoLayoutParams.model_validate(params.model_extra or {})
        candidates = ap.layouts()
        tab = TBL.LayoutTable.load()
        specs, change, decisions, dense_bytes, sparse_bytes, ratios_used = {}, {}, {}, 0, 0, []
        with ctx.progress("layout auto", total=len(modules)) as task:
            for name, module in modules:
                w = weight_out_in(module).detach()
                ratios, held = {}, {}
                for layout_cls, lp in candidates:
                    try:
                        layout = layout_cls.from_dense(w, lp)
                    except ValueError:
                        continue  # the weight does not fit this format exactly: not a candidate for it
                    r = tab.ratio(layout, ap.tokens)
                    if r is None:
                        key = TBL.entry_key(layout, ap.tokens)
                        if not ap.measure:
                            raise SparsifyError(f"{name}: the layout table {tab.path} has no entry {key!r} for "
                                                f"{tab.key}; set measure: true (or run `sparsify bench --case 3` "
                                                "for its shapes)")
                        ctx.info(f"layout auto: measuring {key}")
                        r = TBL.measure(layout, ap.tokens)
                        tab.record(layout, ap.tokens, r)
                        tab.save()
                    ratios[layout_cls.name], held[layout_cls.name] = r, layout
                chosen, ratio, why = TBL.choose(ratios, ap.margin)
                ctx.info(f"layout auto: {name}: {why}")
                decisions[name] = {"layout": chosen or "dense", "ratio": ratio, "candidates": ratios,
                                   "tokens": ap.tokens, "why": why}
                dense_bytes += w.numel() * w.element_size()
                if chosen is None:
                    sparse_bytes += w.numel() * w.element_size()
                    ratios_used.append(1.0)
                else:
                    layout = held[chosen]
                    specs[name] = self._swap(ctx, name, module, layout, params.strict) | {
                        "layout": chosen, "layout_params": layout.params.model_dump(mode="json")}
                    change[f"{name}.weight"] = None
                    sparse_bytes += layout.nbytes()
                    ratios_used.append(ratio)
                task.advance(1)
        _rewrite_masks(ctx, change)
        return StageResult(metrics={"modules_converted": float(len(specs)),
                                    "modules_kept_dense": float(len(modules) - len(specs)),
                                    "measured_speedup": sum(ratios_used) / len(ratios_used),
                                    "weight_bytes_ratio": sparse_bytes / max(dense_bytes, 1)},
                           info={"modules": specs, "auto": decisions, "machine": tab.key, "table": str(tab.path)},
                           metric_info=CONVERT_METRICS)

    def rebuild(self, ctx, params, result) -> None:
        fixed = None if getattr(params, "layout", None) == AUTO else self.resolve(params)
        for name, spec in result.info["modules"].items():
            if fixed is None:  # auto: each module's own choice, recorded with its params
                layout_cls = find_layout(spec["layout"])
                lp = layout_cls.Params.model_validate(spec["layout_params"])
            else:
                layout_cls, lp = fixed
            module = SparseLinear.empty(layout_cls.name, lp, tuple(spec["shape"]), spec["storage"], spec["bias"],
                                        getattr(torch, spec["dtype"]), params.strict)
            _set_module(ctx.model, name, module)


class _LayoutAlias(WeightConvert):
    """``layout_convert/weight`` with the layout fixed (``method: nm`` is ``method: weight, layout: nm``)."""

    layout_name: str

    def resolve(self, params):
        layout = find_layout(self.layout_name)
        return layout, layout.Params(**{k: getattr(params, k) for k in layout.Params.model_fields})


def _weight_method(layout_cls):
    name = f"{layout_cls.__name__}ConvertParams"  # also its name in `sparsify schema`
    P = type(name, (WeightLayoutParams, layout_cls.Params), {"__module__": __name__, "__qualname__": name})
    cls_name = f"{layout_cls.__name__}Convert"
    return type(cls_name, (_LayoutAlias,), {
        "__module__": __name__, "__qualname__": cls_name,  # where it is defined, not abc's metaclass module
        "__doc__": f"Hold Linear weights in the {layout_cls.name} layout: the same as `method: weight` with "
                   f"`layout: {layout_cls.name}` (exact; prune first). {layout_cls.describe()}",
        "name": layout_cls.name, "layout_name": layout_cls.name, "Params": P})


def weight_methods():
    """``layout_convert/weight`` and, for existing recipes, one alias per built-in weight layout."""
    from .weight import WEIGHT_LAYOUTS
    return [WeightConvert, *(_weight_method(cls) for cls in WEIGHT_LAYOUTS)]
