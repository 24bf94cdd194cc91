"""A memory plan before a run (``sparsify run --dry-run``): per stage and per rank, will it fit the devices?

The plan reads the model's skeleton (its config on the meta device: no
weights are read, ``ModelSource.skeleton``) and the recipe, and estimates
the bytes each rank holds at the peak of each stage:

- **weights**: every parameter and buffer in the recipe's dtype; under FSDP
  a training stage holds 1/N of them plus two transformer layers gathered
  whole (the one computing and the one prefetched); with ``model.offload``
  a calibrating stage holds what lies outside the layers plus one layer.
- **grads**: one per trainable parameter (not ``train.freeze``), in the
  parameter's dtype (1/N under FSDP).
- **optimizer**: AdamW's two moments per trainable parameter, in the
  parameter's dtype as ``torch.optim.AdamW`` keeps them (2 x fp32 for a
  float32 model; 1/N under FSDP).
- **activations**: training at ``train.batch_size`` x the split's
  ``seq_len`` per rank: what each layer keeps for backward, ``10 h + 4 i``
  values per token (hidden size h, FFN size i; attention through SDPA, so
  no seq_len^2 scores), or with ``gradient_checkpointing`` one hidden state
  per layer plus one layer recomputed; plus the logits (the model's, their
  float32 copy for the loss and its gradient). Calibration: the hidden
  states of every calibration sequence plus one batch through one layer.
  Evaluation (rank 0): one batch's forward and its logits.
- **other**: DDP's gradient buckets (a copy of the gradients) and the frozen
  dense model when ``kd_weight > 0``.

Estimates leave out the CUDA context, allocator fragmentation and
method-specific statistics (SparseGPT's Hessians: in_features^2 floats per
Linear), so a plan that barely fits may not. ``train.parallel: auto`` is
planned as DDP when it fits, else FSDP (with more than one rank).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from .errors import SparsifyError
from .recipe import LoadedRecipe

GiB = 2**30
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": GiB, "GB": GiB, "GIB": GiB, "T": 2**40, "TB": 2**40, "TIB": 2**40}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def parse_memory(text: str) -> int:
    """``"80GB"`` -> bytes. Units K/M/G/T(B), binary as GPU memory is quoted (80GB = 80 GiB); ``ValueError`` else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"{text!r} is not a memory size such as 80GB, 40GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class Devices:
    """What to plan for: ``count`` ranks with ``memory`` bytes each (``kind``: cuda or cpu)."""

    count: int
    memory: int
    kind: str = "cuda"

    def describe(self) -> str:
        return f"{self.count} x {self.memory / GiB:.1f} GiB ({self.kind})"


def visible_devices() -> Devices:
    """The GPUs this process sees (the smallest one's memory), else one CPU with the machine's RAM."""
    if torch.cuda.is_available() and torch.cuda.device_count():
        n = torch.cuda.device_count()
        return Devices(n, min(torch.cuda.get_device_properties(i).total_memory for i in range(n)), "cuda")
    import psutil

    return Devices(1, psutil.virtual_memory().total, "cpu")


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, read from its skeleton."""

    parameters: int  # unique parameters (tied ones once)
    buffers: int  # buffer elements (rotary tables...)
    layers: int  # transformer layers
    layer_parameters: int  # parameters of the largest layer
    outside_layers: int  # parameters outside the layers (embeddings, head, final norm)
    hidden: int
    intermediate: int
    vocab: int
    names: tuple[str, ...] = field(repr=False, default=())  # parameter names, for train.freeze
    sizes: tuple[int, ...] = field(repr=False, default=())


def model_shape(skeleton: torch.nn.Module) -> ModelShape:
    """Counts from a (meta) model: parameters, layers, hidden, FFN and vocabulary sizes."""
    from .ffn import transformer_layers

    named = list(skeleton.named_parameters())
    layers = transformer_layers(skeleton)
    in_layers = sum(p.numel() for _, m in layers for p in m.parameters())
    total = sum(p.numel() for _, p in named)
    config = getattr(skeleton, "config", None)
    emb = skeleton.get_input_embeddings() if hasattr(skeleton, "get_input_embeddings") else None
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or emb.embedding_dim
    inter = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
             or getattr(config, "ffn_dim", None) or 4 * hidden)
    vocab = getattr(config, "vocab_size", None) or (emb.num_embeddings if emb is not None else 0)
    return ModelShape(parameters=total, buffers=sum(b.numel() for b in skeleton.buffers()), layers=len(layers),
                      layer_parameters=max((sum(p.numel() for p in m.parameters()) for _, m in layers), default=0),
                      outside_layers=total - in_layers, hidden=hidden, intermediate=inter, vocab=vocab,
                      names=tuple(n for n, _ in named), sizes=tuple(p.numel() for _, p in named))


@dataclass
class Estimate:
    """One row of the plan: bytes per rank of one stage (or the evaluation) under one parallelism."""

    stage: str  # "name (kind/method)" or "evaluate"
    what: Literal["train", "calibrate", "apply", "evaluate"]
    parallel: str  # ddp, fsdp, single (one process) or - (does not train)
    weights: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    other: int = 0
    chosen: bool = True
    fix: str = ""  # how to make it fit, when it does not

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.other


@dataclass
class Plan:
    """The estimates of every stage, for ``devices``; ``problem`` is the one-line refusal, or ``""``."""

    recipe: str
    model: str
    shape: ModelShape
    dtype: str
    devices: Devices
    rows: list[Estimate]
    problem: str = ""

    def fits(self) -> bool:
        return not self.problem


def _train_config(params):
    from .training import TrainConfig

    for name in type(params).model_fields:
        value = getattr(params, name)
        if isinstance(value, TrainConfig):
            return value
    return None


def _act_bytes(dtype: str, autocast: str, devices: Devices) -> int:
    """Bytes of one activation value: 2 in a 16-bit model or under bf16 autocast (``auto``: on GPUs), else 4."""
    if _DTYPE_BYTES[dtype] == 2 or autocast == "bf16" or (autocast == "auto" and devices.kind == "cuda"):
        return 2
    return 4


def _layer_activation_values(shape: ModelShape) -> int:
    """Values one layer keeps for backward per token: norms, q/k/v/o, attention output (~10 h), FFN (~4 i)."""
    return 10 * shape.hidden + 4 * shape.intermediate


def train_estimate(label: str, shape: ModelShape, dtype: str, cfg, seq_len: int, devices: Devices,
                   parallel: str, *, batch_size: int | None = None, checkpointing: bool | None = None) -> Estimate:
    """Bytes per rank of a training stage with ``cfg`` (a ``TrainConfig``) under ``parallel`` (single/ddp/fsdp)."""
    wb = _DTYPE_BYTES[dtype]
    ab = _act_bytes(dtype, cfg.autocast, devices)
    b = cfg.batch_size if batch_size is None else batch_size
    ckpt = cfg.gradient_checkpointing if checkpointing is None else checkpointing
    frozen = sum(n for name, n in zip(shape.names, shape.sizes) if any(re.search(f, name) for f in cfg.freeze))
    trainable = shape.parameters - frozen
    n = devices.count if parallel == "fsdp" else 1
    tokens = b * seq_len
    per_layer = tokens * _layer_activation_values(shape) * ab
    layers_act = (shape.layers * tokens * shape.hidden * ab + per_layer) if ckpt else shape.layers * per_layer
    logits = tokens * shape.vocab * (ab + 4 + 4)  # the logits, their float32 copy for the loss, its gradient
    est = Estimate(label, "train", parallel,
                   weights=(shape.parameters * wb + shape.buffers * 4) // n,
                   grads=trainable * wb // n, optimizer=2 * trainable * wb // n,
                   activations=layers_act + logits)
    if parallel == "fsdp":
        est.weights += 2 * shape.layer_parameters * wb  # the gathered layer and the prefetched next one
    if parallel == "ddp":
        est.other += trainable * wb  # the reducer's gradient buckets
    if cfg.kd_weight > 0:
        est.other += shape.parameters * wb  # the frozen dense model, whole on every rank
    return est


def calibrate_estimate(label: str, shape: ModelShape, dtype: str, samples: int, seq_len: int, batch_size: int,
                       offload: str) -> Estimate:
    """Bytes of a one-shot stage that reads calibration data, layer by layer (the same on every rank)."""
    wb = _DTYPE_BYTES[dtype]
    weights = (shape.outside_layers + shape.layer_parameters if offload != "none" else shape.parameters) * wb
    acts = samples * seq_len * shape.hidden * wb + batch_size * seq_len * _layer_activation_values(shape) * wb
    return Estimate(label, "calibrate", "-", weights=weights + shape.buffers * 4, activations=acts)


def evaluate_estimate(shape: ModelShape, dtype: str, batch_size: int, seq_len: int, offload: str) -> Estimate:
    """Bytes of the evaluation on rank 0: the model and one batch's forward with its float32 logits."""
    wb = _DTYPE_BYTES[dtype]
    weights = (shape.outside_layers + shape.layer_parameters if offload != "none" else shape.parameters) * wb
    tokens = batch_size * seq_len
    acts = tokens * (_layer_activation_values(shape) * wb + shape.vocab * (wb + 4))
    return Estimate("evaluate (rank 0)", "evaluate", "-", weights=weights + shape.buffers * 4, activations=acts)


def _seq_len(loaded: LoadedRecipe, split: str) -> int:
    spec = loaded.recipe.data.splits.get(split)
    return (spec.seq_len if spec is not None and spec.seq_len else None) or loaded.recipe.data.seq_len


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def make_plan(loaded: LoadedRecipe, skeleton: torch.nn.Module, devices: Devices) -> Plan:
    """Estimate every stage of ``loaded`` (and its evaluation) on ``devices``; see the module docstring.

    A training stage gets the row of its ``train.parallel`` (``auto``: DDP
    when it fits, else FSDP when there is more than one rank) plus, with
    several ranks, the other one for comparison. ``Plan.problem`` names the
    first chosen row that does not fit and the change that would make it fit.
    """
    rec = loaded.recipe
    shape = model_shape(skeleton)
    dtype, cap = rec.model.dtype, devices.memory
    rows: list[Estimate] = []
    problem = ""
    for stage in loaded.stages:
        label, params = f"{stage.name} ({stage.spec.kind}/{stage.spec.method})", stage.params
        cfg = _train_config(params) if stage.method_cls.uses_optimizer() else None
        if cfg is not None:
            seq = _seq_len(loaded, cfg.split)
            if devices.count == 1:
                options = {"single": train_estimate(label, shape, dtype, cfg, seq, devices, "single")}
                chosen = "single"
            else:
                options = {p: train_estimate(label, shape, dtype, cfg, seq, devices, p) for p in ("ddp", "fsdp")}
                chosen = cfg.parallel if cfg.parallel != "auto" else (
                    "ddp" if options["ddp"].total <= cap else "fsdp")
            for name, est in options.items():
                est.chosen = name == chosen
                rows.append(est)
            est = options[chosen]
            if est.total > cap and not problem:
                problem = (f"stage {stage.name!r} needs {_gib(est.total)} per rank with {chosen} on "
                           f"{devices.describe()}: {_train_fix(stage, shape, dtype, cfg, seq, devices, chosen)}")
            continue
        splits = [s for _, s in stage.method_cls().data_splits(params)]
        if splits and splits[0] in rec.data.splits:
            split = splits[0]
            batch = getattr(params, "batch_size", 8) or 8
            samples = rec.data.splits[split].samples
            est = calibrate_estimate(label, shape, dtype, samples, _seq_len(loaded, split), batch, rec.model.offload)
        else:
            held = shape.outside_layers + shape.layer_parameters if rec.model.offload != "none" else shape.parameters
            est = Estimate(label, "apply", "-", weights=held * _DTYPE_BYTES[dtype] + shape.buffers * 4)
        rows.append(est)
        if est.total > cap and not problem:
            if est.what != "calibrate":
                fix = "set model.offload: cpu" if rec.model.offload == "none" else "use a device with more memory"
            elif rec.model.offload == "none" and calibrate_estimate(
                    label, shape, dtype, samples, _seq_len(loaded, split), batch, "cpu").total <= cap:
                fix = "set model.offload: cpu (one layer on the device at a time)"
            else:
                fix = (("set model.offload: cpu and " if rec.model.offload == "none" else "")
                       + f"calibrate on fewer samples than {samples} or shorter sequences")
            problem = f"stage {stage.name!r} needs {_gib(est.total)} on {devices.describe()}: {fix}"
    ev = rec.evaluate  # the dense model is evaluated before the first stage, whatever evaluate.after says
    est = evaluate_estimate(shape, dtype, ev.batch_size, _seq_len(loaded, ev.split), rec.model.offload)
    rows.append(est)
    if est.total > cap and not problem:
        fits = [b for b in range(ev.batch_size - 1, 0, -1)
                if evaluate_estimate(shape, dtype, b, _seq_len(loaded, ev.split), rec.model.offload).total <= cap]
        problem = (f"evaluation needs {_gib(est.total)} on {devices.describe()}: "
                   + (f"set evaluate.batch_size: {fits[0]}" if fits else "set model.offload: cpu"))
    model = f"{rec.model.source} {loaded.model_params.model_dump().get('path', '')}".strip()
    return Plan(loaded.path, model, shape, dtype, devices, rows, problem)


def _train_fix(stage, shape, dtype, cfg, seq, devices: Devices, chosen: str) -> str:
    """The smallest change that makes a training stage fit: FSDP, checkpointing, a smaller batch, more ranks."""
    cap = devices.memory
    where = f"stages.{stage.index}.params.train"

    def fits(dev=devices, parallel="fsdp", **kw):
        return train_estimate(stage.name, shape, dtype, cfg, seq, dev, parallel, **kw).total <= cap

    if chosen != "fsdp" and devices.count > 1 and fits():
        return f"set {where}.parallel: fsdp ({_gib(train_estimate('', shape, dtype, cfg, seq, devices, 'fsdp').total)} per rank)"
    para = "fsdp" if devices.count > 1 else "single"
    if not cfg.gradient_checkpointing and fits(parallel=para, checkpointing=True):
        return f"set {where}.gradient_checkpointing: true"
    for b in range(cfg.batch_size - 1, 0, -1):
        if fits(parallel=para, batch_size=b):
            return (f"set {where}.batch_size: {b} (and raise grad_accum to keep the tokens per step)"
                    + (" with parallel: fsdp" if para == "fsdp" and chosen != "fsdp" else ""))
    for n in (2, 4, 8, 16, 32, 64, 128, 256):  # the fewest ranks; ranks shard the state, not the activations
        for b in range(cfg.batch_size, 0, -1):
            if n > devices.count and fits(Devices(n, cap, devices.kind), batch_size=b):
                return (f"run on at least {n} ranks with {where}.parallel: fsdp"
                        + (f" and batch_size: {b} (raise grad_accum to keep the tokens per step)"
                           if b < cfg.batch_size else ""))
    return "no plan up to 256 ranks at batch size 1 fits it: use devices with more memory"


def format_plan(plan: Plan) -> list[str]:
    """The plan as lines of text: a header, one line per row, and the verdict."""
    s = plan.shape
    lines = [f"plan for {plan.recipe}: {plan.model}, {s.parameters / 1e9:.2f}B parameters "
             f"({s.layers} layers, hidden {s.hidden}, FFN {s.intermediate}, vocab {s.vocab}) in {plan.dtype}, "
             f"on {plan.devices.describe()}; GiB per rank:"]
    head = f"  {'stage':44s} {'parallel':8s} {'weights':>8s} {'grads':>7s} {'optim':>7s} {'activ':>7s} " \
           f"{'other':>7s} {'total':>8s}  fits"
    lines.append(head)
    for r in plan.rows:
        verdict = ("yes" if r.total <= plan.devices.memory else "NO") + ("" if r.chosen else " (not chosen)")
        lines.append(f"  {r.stage[:44]:44s} {r.parallel:8s} {r.weights / GiB:8.2f} {r.grads / GiB:7.2f} "
                     f"{r.optimizer / GiB:7.2f} {r.activations / GiB:7.2f} {r.other / GiB:7.2f} "
                     f"{r.total / GiB:8.2f}  {verdict}")
    lines.append("the plan fits" if plan.fits() else f"the plan does not fit: {plan.problem}")
    return lines


def plan_recipe(loaded: LoadedRecipe, devices: Devices | None = None) -> Plan:
    """The plan of a validated recipe from its model's skeleton; ``SparsifyError`` when there is no skeleton."""
    from .plugin_manager import catalog
    from .recipe import check_model

    check_model(loaded)
    source = catalog().model_sources[loaded.recipe.model.source]()
    skeleton = source.skeleton(loaded.model_params)
    if skeleton is None:
        raise SparsifyError(f"{loaded.path}: cannot plan: the {loaded.recipe.model.source} model source cannot build "
                            "the model from its config alone (is the model on this machine?)")
    return make_plan(loaded, skeleton, devices or visible_devices())
