"""Recipes: YAML -> validated ``Recipe``, with errors that name file, line and field.

Everything here runs before any model or data is loaded. A recipe with a
``sweep:`` expands into one validated recipe per grid point (``load_sweep``). Parsing uses
PyYAML's safe loader (``RecipeLoader``, a ``yaml.SafeLoader`` that reads
``2:4`` as the string it means rather than YAML 1.1's base-60 integer 124);
nothing in a recipe is ever evaluated as code. ``check_model`` then checks
the stages against the model's skeleton (its config, no weights).
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, create_model, field_validator,
                      model_validator)
from pydantic.json_schema import GenerateJsonSchema

from .errors import ParamsError, RecipeError, SparsifyError
from .method import Method, Params, is_layer_indices, param_fields



class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2's plain scalars where YAML 1.1 guesses.

    ``2:4`` stays ``"2:4"`` (an n:m pattern, not base-60 124); ``1e-4`` is a
    float; only ``true``/``false`` are booleans, so ``autocast: off`` or
    ``router: no`` keep the word they name (a bool field still takes
    yes/no/on/off: pydantic reads those strings as booleans); a lone ``=`` is
    a string, not YAML 1.1's "value" tag that no safe constructor builds.
    """


_DROPPED = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:value")
RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in _DROPPED
            and not (tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") and ":" in regexp.pattern)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _first in (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$""",
     "-+0123456789"),
    # after int, so "12" stays an int; like YAML 1.2, "1e-4" is a float too
    ("tag:yaml.org,2002:float", r"""^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"""
     r"""|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", "-+0123456789."),
):
    RecipeLoader.add_implicit_resolver(_tag, re.compile(_pattern, re.X), list(_first))


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with ``RecipeLoader`` (no code, no base-60 numbers)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


# --------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """Which model to sparsify."""

    source: str = Field("smollm2-135m", description="model source plugin (see `sparsify plugins`)")
    params: dict[str, Any] = Field(default_factory=dict, description="parameters of the model source")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    offload: Literal["none", "cpu", "disk"] = Field("none", description=(
        "models larger than the device, for one-shot stages: keep the transformer layers' weights in host memory "
        "(cpu) or memory-mapped from a safetensors file in the run's work folder (disk), and move one layer at a "
        "time to the device while it runs; stages that train need every weight on the device and refuse it"))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError("must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return v


class SplitSpec(_Strict):
    """One named split: ``samples`` packed sequences drawn from a partition of the data source."""

    samples: int = Field(gt=0, description="number of packed sequences")
    partition: str | None = Field(None, description="source partition (default: 'eval' for eval, else 'train')")
    offset: int = Field(0, ge=0, description="first sequence of the partition's stream to use")
    seq_len: int | None = Field(None, gt=1, description="overrides data.seq_len for this split")


class DataSpec(_Strict):
    """Where text comes from and how it is cut into splits."""

    source: str = "pydoc"
    params: dict[str, Any] = Field(default_factory=dict)
    seq_len: int = Field(256, gt=1)
    splits: dict[str, SplitSpec] = Field(default_factory=lambda: {
        "calibration": SplitSpec(samples=16), "train": SplitSpec(samples=64, offset=16),
        "eval": SplitSpec(samples=16)})

    @field_validator("splits")
    @classmethod
    def _has_eval(cls, v: dict[str, SplitSpec]) -> dict[str, SplitSpec]:
        if not v:
            raise ValueError("needs at least one split")
        return v


class StageSpec(_Strict):
    """One step of the recipe: a method of a kind, with its parameters."""

    kind: str
    method: str
    name: str | None = Field(None, description="unique name (default: the method name)")
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.\-]+", v):
            raise ValueError("may hold only letters, digits, '_', '.', '-'")
        if v == "dense":
            raise ValueError("'dense' is reserved for the baseline")
        return v


class EvaluateSpec(_Strict):
    """What to measure, and when. The dense model is always evaluated before the first stage."""

    metrics: list[str | dict[str, dict[str, Any]]] | Literal["all"] = Field("all", description=(
        "metric names, or {name: {params}} for a metric that takes parameters (e.g. {lm_eval: {tasks: "
        "[sparsify_pydoc_next]}}); all: every installed metric that needs no parameters"))
    after: list[str] | Literal["all", "last", "none"] = Field(
        "last", description="stage names after which to evaluate, or all / last / none")
    split: str = "eval"
    batch_size: int = Field(4, gt=0)


class OutputSpec(_Strict):
    """Where the sparse model goes."""

    dir: str = Field("outputs/{name}-{run_id}", description="folder; {name} and {run_id} are filled in")
    save: bool = True
    storage: Literal["dense", "compressed"] | None = Field(
        None, description="dense: weights as transformers saves them (plain from_pretrained loads a pruned "
                          "output); compressed: sparse weights as a bitmask plus values, loadable by sparsify "
                          "only (load_output, sparsify generate); default: compressed when the model has masks "
                          "or swapped modules, else dense. `sparsify export` converts between them")


class SweepSpec(_Strict):
    """A grid of runs: every combination of the listed values, set by dotted path into the recipe."""

    grid: dict[str, list[Any]] = Field(description=(
        "dotted recipe path -> values, e.g. {model.params.hidden_size: [64, 128], stages.1.params.sparsity: "
        "[0, 0.5]}; a mapping value sets each of its keys (to vary related values together)"))
    name: str | None = Field(None, description=(
        "run name template: {name} and any {dotted.path} of the run's recipe, e.g. "
        "'{name}-h{model.params.hidden_size}'; default: the recipe name and every varied value"))

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not v:
            raise ValueError("needs at least one dotted path with a list of values")
        return v  # each entry is checked where its line is known (load_sweep)


class Recipe(_Strict):
    """A sparsify recipe."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    stages: list[StageSpec] = Field(default_factory=list)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    sweep: SweepSpec | None = Field(None, description="run a grid of variants of this recipe (`sparsify run` "
                                                        "expands it; `sparsify fit` fits the scaling law to it)")

    @model_validator(mode="after")
    def _names(self) -> "Recipe":
        seen: dict[str, int] = {}
        for i, st in enumerate(self.stages):
            if st.name is None:
                base, n = st.method, 2
                st.name = base
                while st.name in seen:
                    st.name, n = f"{base}-{n}", n + 1
            elif st.name in seen:
                raise ValueError(f"stages.{i}.name {st.name!r} is already used by stages.{seen[st.name]}")
            seen[st.name] = i
        return self

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]  # type: ignore[misc]


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ResolvedStage:
    """One stage of a validated recipe: its recipe entry, the method class it names and its validated params.

    ``index`` is the stage's 0-based position in ``Recipe.stages`` (its
    ``stages.<index>`` path in errors, its index in the registry and in hooks).
    """

    index: int
    spec: StageSpec
    method_cls: type[Method]
    params: Params

    @property
    def name(self) -> str:
        """The stage's unique name (``spec.name``, defaulted to the method name while validating)."""
        return self.spec.name  # type: ignore[return-value]

    @property
    def label(self) -> str:
        """``stage 'NAME' (KIND/METHOD)``: how messages name the stage."""
        return f"stage {self.spec.name!r} ({self.spec.kind}/{self.spec.method})"


@dataclass
class LoadedRecipe:
    """A validated recipe with its resolved plugins and validated parameters.

    ``stages`` holds one ``ResolvedStage`` per entry of ``recipe.stages``, in order.
    """

    recipe: Recipe
    text: str
    path: str
    overrides: list[str]
    stages: list[ResolvedStage]
    model_params: Params
    data_params: Params
    metrics: list[tuple[str, Params]] | None = None  # evaluate.metrics resolved; None: all that apply by default
    raw: dict = field(repr=False, default_factory=dict)
    lines: "_Lines | None" = field(repr=False, default=None)  # for errors found later (check_model)

    @property
    def effective_json(self) -> str:
        """The recipe after overrides and defaults, as canonical JSON."""
        return json.dumps(self.recipe.model_dump(mode="json"), sort_keys=True)

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.effective_json.encode()).hexdigest()[:16]


class _Lines:
    """Maps a field path (('stages', 1, 'params', 'lr')) to its line in the YAML text."""

    def __init__(self, text: str):
        self._map: dict[tuple, tuple[int, int]] = {}  # path -> (key line, value line)
        try:
            node = yaml.compose(text, Loader=RecipeLoader)
        except yaml.YAMLError:
            node = None
        if node is not None:
            self._walk(node, ())
        self.overridden: set[tuple] = set()
        self.redirected: dict[tuple, int] = {}  # paths set by a sweep point -> the line of its grid entry

    def _walk(self, node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (k.value,)
                self._map[p] = (k.start_mark.line + 1, v.start_mark.line + 1)
                self._walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = path + (i,)
                self._map[p] = (v.start_mark.line + 1, v.start_mark.line + 1)
                self._walk(v, p)

    def line(self, path: tuple, *, key: bool = False) -> int | None:
        path = tuple(path)
        for n in range(len(path), 0, -1):
            p = path[:n]
            if p in self.redirected:
                return self.redirected[p]
            if any(p[:len(o)] == o for o in self.overridden):
                return None
            if p in self._map:
                return self._map[p][0 if key else 1]
        return 1 if self._map else None


def _dotted(path) -> str:
    return ".".join(str(p) for p in path) if path else "(top level)"


def _closest(word: str, options) -> list[str]:
    """Up to two likely corrections: close matches, and only those nearly as close as the best one."""
    word = str(word)
    scored = sorted(((difflib.SequenceMatcher(None, word, o).ratio(), o) for o in set(map(str, options))),
                    key=lambda t: (-t[0], t[1]))
    scored = [(r, o) for r, o in scored if r >= 0.5]
    return [o for r, o in scored[:2] if r >= scored[0][0] - 0.1]


def _is_model(t) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _model_at(model: type[BaseModel], path: tuple):
    """The pydantic model class a field path lands in (for 'did you mean' on unknown keys)."""
    cur: Any = model
    for part in path:
        if _is_model(cur):
            f = cur.model_fields.get(str(part))
            if f is None:
                return None
            cur = f.annotation
        elif typing.get_origin(cur) in (list, dict):
            cur = typing.get_args(cur)[-1]
        else:
            return None
        # Optional[X] / X | Y: keep the first pydantic model or container member.
        if typing.get_origin(cur) not in (list, dict, None):
            args = typing.get_args(cur)
            cur = next((a for a in args if _is_model(a) or typing.get_origin(a) in (list, dict)), None)
    return cur if _is_model(cur) else None


def _pydantic_error(exc: ValidationError, model: type[BaseModel], prefix: tuple, lines: _Lines, file: str) -> RecipeError:
    # A misspelt key shows up as an unknown key plus a missing one: report the unknown key.
    errs = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    e = errs[0]
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # Pydantic puts union/literal member names in the loc; drop what isn't a field path.
    path = prefix + loc
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    if e["type"] == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        options = [f.alias or n for n, f in owner.model_fields.items()] if owner else []
        return RecipeError(f"unknown key{more}; valid keys: {', '.join(options)}" if options else f"unknown key{more}",
                           file=file, line=lines.line(path, key=True), field=_dotted(path),
                           suggestions=_closest(loc[-1], options))
    if e["type"] == "missing":
        return RecipeError(f"required field is missing{more}", file=file, line=lines.line(path[:-1]),
                           field=_dotted(path))
    msg = e["msg"]
    if e["type"] not in ("value_error", "assertion_error") and "input" in e and not isinstance(e["input"], (dict, list)):
        msg += f", got {e['input']!r}"
    msg = msg.removeprefix("Value error, ")
    if e["type"] == "string_type" and isinstance(e.get("input"), (bool, int, float)):
        # YAML typed a bare word or number (2024, 1e3, true): a string field needs it quoted
        msg += f" (YAML reads it as a {type(e['input']).__name__}: quote it)"
    return RecipeError(msg + more, file=file, line=lines.line(path), field=_dotted(path))


def _set_path(raw: dict, dotted: str, value: Any, spec: str, *, file: str = "--set", line: int | None = None) -> tuple:
    parts: list[Any] = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    cur: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = _dotted(parts[: i + 1])
        if isinstance(cur, list):
            if not isinstance(part, int) or not 0 <= part < len(cur):
                raise RecipeError(f"no list item {part!r} (the list has {len(cur)} items)", file=file, line=line,
                                  field=where)
        elif isinstance(cur, dict):
            if not last and part not in cur:
                cur[part] = {}
        else:
            raise RecipeError(f"{spec!r}: {_dotted(parts[:i])} is a value, not a mapping or list", file=file,
                              line=line, field=where)
        if last:
            cur[part] = value
        else:
            cur = cur[part]
    return tuple(parts)


def parse_override(spec: str) -> tuple[str, Any]:
    """``'stages.1.params.lr=3e-4'`` -> (path, value); the value is read as YAML (safely)."""
    if "=" not in spec:
        raise RecipeError(f"{spec!r} must look like KEY.PATH=VALUE", file="--set")
    key, _, value = spec.partition("=")
    try:
        return key.strip(), safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"value of {key!r} is not valid YAML: {exc}", file="--set") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, text: str | None = None) -> LoadedRecipe:
    """Read, override and validate a recipe, resolving every plugin it names.

    Raises ``RecipeError`` (one line: file, line, field, message, suggestions)
    on the first problem found. Loads no model and no data.
    """
    file, text, raw, lines = _read(path, overrides, text)
    return _validate(raw, lines, file, text, list(overrides or []))


def _read(path: str | Path, overrides: list[str] | None, text: str | None) -> tuple[str, str, dict, _Lines]:
    """Read and parse a recipe, and apply ``--set`` overrides: ``(file, text, raw dict, line map)``."""
    file = str(path)
    if text is None:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise RecipeError("no such file", file=file) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"cannot read: {exc}", file=file) from None
    try:
        raw = safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"invalid YAML: {problem}", file=file, line=mark.line + 1 if mark else None) from None
    if raw is None:
        raise RecipeError("the recipe is empty", file=file)
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe is a mapping of fields, got a {type(raw).__name__}", file=file, line=1)
    lines = _Lines(text)
    for spec in overrides or []:
        key, value = parse_override(spec)
        lines.overridden.add(_set_path(raw, key, value, spec))
    return file, text, raw, lines


def _validate(raw: dict, lines: _Lines, file: str, text: str, overrides: list[str]) -> LoadedRecipe:
    """Validate a parsed recipe and resolve every plugin it names."""
    from .plugin_manager import catalog

    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise _pydantic_error(exc, Recipe, (), lines, file) from None

    cat = catalog()

    def plugin_params(table: dict, name: str, params: dict, path: tuple, what: str):
        if name not in table:
            raise RecipeError(f"unknown {what} {name!r}; installed: {', '.join(sorted(table)) or 'none'}",
                              file=file, line=lines.line(path), field=_dotted(path),
                              suggestions=_closest(name, table))
        cls = table[name]
        try:
            return cls, cls.Params.model_validate(params)
        except ValidationError as exc:
            raise _pydantic_error(exc, cls.Params, path[:-1] + ("params",), lines, file) from None

    _, model_params = plugin_params(cat.model_sources, recipe.model.source, recipe.model.params,
                                    ("model", "source"), "model source")
    _, data_params = plugin_params(cat.data_sources, recipe.data.source, recipe.data.params,
                                   ("data", "source"), "data source")
    stages: list[ResolvedStage] = []
    for i, st in enumerate(recipe.stages):
        if st.kind not in cat.kinds:
            raise RecipeError(f"unknown stage kind {st.kind!r}; installed kinds: {', '.join(cat.kinds)}",
                              file=file, line=lines.line(("stages", i, "kind")), field=f"stages.{i}.kind",
                              suggestions=_closest(st.kind, cat.kinds))
        table = {n: cat.methods[(st.kind, n)] for n in cat.methods_of_kind(st.kind)}
        elsewhere = [k for k, n in cat.methods if n == st.method and k != st.kind]
        if st.method not in table and elsewhere:
            raise RecipeError(f"method {st.method!r} is of kind {elsewhere[0]!r}, not {st.kind!r}", file=file,
                              line=lines.line(("stages", i, "method")), field=f"stages.{i}.method")
        cls, p = plugin_params(table, st.method, st.params, ("stages", i, "method"), f"{st.kind} method")
        stages.append(ResolvedStage(i, st, cls, p))

    if recipe.model.dtype == "float16":
        for stage in stages:
            if stage.method_cls.uses_optimizer():
                raise RecipeError(
                    f"float16 weights cannot train: {stage.label} updates them with "
                    "AdamW, whose eps and squared gradients underflow in float16 (NaN within a few steps, whatever "
                    "the learning rate); use dtype bfloat16 (or float32)", file=file,
                    line=lines.line(("model", "dtype")), field="model.dtype")

    if recipe.model.offload != "none":
        for stage in stages:
            if stage.method_cls.uses_optimizer():
                raise RecipeError(
                    f"offload {recipe.model.offload} serves one-shot stages, but {stage.label} trains with AdamW, "
                    "which needs every weight on the device at once: use offload none for this recipe (and "
                    "train.parallel: fsdp to shard a model too large for one device)", file=file,
                    line=lines.line(("model", "offload")), field="model.offload")
            if not stage.method_cls.supports_offload():
                raise RecipeError(
                    f"offload {recipe.model.offload} keeps each layer's weights as tensors it tracks, but "
                    f"{stage.label} replaces them with smaller ones: use offload none for this recipe", file=file,
                    line=lines.line(("model", "offload")), field="model.offload")

    if recipe.output.save and recipe.output.storage == "dense":
        for stage in stages:
            why = stage.method_cls().plain_form(stage.params)
            if why:
                raise RecipeError(
                    f"dense writes the model as plain transformers holds it, but {stage.label} leaves "
                    f"{why}, which plain transformers cannot compute: leave storage out (compressed) and load "
                    "the output with sparsify", file=file, line=lines.line(("output", "storage")),
                    field="output.storage")

    for stage in stages:
        for path, split in stage.method_cls().data_splits(stage.params):
            if split not in recipe.data.splits:
                where = ("stages", stage.index, "params") + tuple(path)
                raise RecipeError(f"{stage.label} reads data split {split!r}, which "
                                  f"data.splits does not define; splits: {', '.join(recipe.data.splits)}",
                                  file=file, line=lines.line(where), field=_dotted(where),
                                  suggestions=[c for c in _closest(split, recipe.data.splits)
                                               if difflib.SequenceMatcher(None, split, c).ratio() >= 0.75])

    names = recipe.stage_names()
    if isinstance(recipe.evaluate.after, list):
        for j, n in enumerate(recipe.evaluate.after):
            if n not in names:
                raise RecipeError(f"no stage named {n!r}; stages: {', '.join(names) or 'none'}", file=file,
                                  line=lines.line(("evaluate", "after", j)), field=f"evaluate.after.{j}",
                                  suggestions=_closest(n, names))
    metrics = None
    if isinstance(recipe.evaluate.metrics, list):
        metrics = []
        for j, entry in enumerate(recipe.evaluate.metrics):
            path = ("evaluate", "metrics", j)
            if isinstance(entry, dict):
                if len(entry) != 1:
                    raise RecipeError(f"a metric with parameters is one {{name: {{params}}}} mapping, got keys "
                                      f"{', '.join(map(str, entry)) or 'none'}", file=file, line=lines.line(path),
                                      field=_dotted(path))
                (n, params), = entry.items()
                where = path + (n,)
            else:
                n, params, where = entry, {}, path
            if n not in cat.metrics:
                raise RecipeError(f"unknown metric {n!r}; installed: {', '.join(sorted(cat.metrics))}", file=file,
                                  line=lines.line(where), field=_dotted(where), suggestions=_closest(n, cat.metrics))
            cls = cat.metrics[n]
            try:
                p = cls.Params.model_validate(params or {})
            except ValidationError as exc:
                raise _pydantic_error(exc, cls.Params, where, lines, file) from None
            try:
                cls.check(p)
            except (ValueError, SparsifyError) as exc:
                raise RecipeError(f"metric {n}: {exc}", file=file, line=lines.line(where), field=_dotted(where)) \
                    from None
            metrics.append((n, p))
    if recipe.evaluate.split not in recipe.data.splits:
        raise RecipeError(f"no data split {recipe.evaluate.split!r}; splits: {', '.join(recipe.data.splits)}",
                          file=file, line=lines.line(("evaluate", "split")), field="evaluate.split",
                          suggestions=_closest(recipe.evaluate.split, recipe.data.splits))
    return LoadedRecipe(recipe=recipe, text=text, path=file, overrides=overrides, stages=stages,
                        model_params=model_params, data_params=data_params, metrics=metrics, raw=raw, lines=lines)


def check_model(loaded: LoadedRecipe) -> None:
    """Check the stages against the model's skeleton: what shapes alone decide, before any weights load.

    The model source builds the skeleton from the model's config on the meta
    device (``ModelSource.skeleton``; no weights, no memory); a source that
    cannot returns ``None`` and nothing is checked. Then, for each stage in
    order (after the data's ``seq_len`` against learned position embeddings,
    ``sources.position_limit``): every ``LayerIndices`` field is in range (no stage changes how
    many FFN layers a model has, so this holds for every stage), and
    ``Method.check`` runs on the skeleton up to and including the first stage
    that moves Linear layers (``Method.keeps_layers`` false: moeify, layout
    conversions; activation swaps keep them); stages after it would meet
    modules the skeleton does not have, so their ``check`` is skipped. Raises
    ``RecipeError`` naming the file, line and field.
    """
    from .ffn import find_ffn_blocks
    from .plugin_manager import catalog
    from .sources import position_limit

    rec, file = loaded.recipe, loaded.path
    lines = loaded.lines or _Lines(loaded.text)
    source = catalog().model_sources[rec.model.source]()
    try:
        skeleton = source.skeleton(loaded.model_params)
    except (SparsifyError, ValueError) as exc:
        raise RecipeError(str(exc), file=file, line=lines.line(("model", "params")), field="model") from None
    if skeleton is None:
        return
    limit = position_limit(skeleton)
    for name, split in rec.data.splits.items():
        length = split.seq_len or rec.data.seq_len
        if limit is not None and length > limit:
            path = ("data", "splits", name, "seq_len") if split.seq_len else ("data", "seq_len")
            raise RecipeError(f"split {name!r} has sequences of {length} tokens, but the model has learned positions "
                              f"for {limit}: use at most {limit}", file=file, line=lines.line(path),
                              field=_dotted(path))
    try:
        ffn_layers: int | None = len(find_ffn_blocks(skeleton))
    except SparsifyError:
        ffn_layers = None  # no FFN blocks: the stages that need them say so when they run
    same_structure = True
    for stage in loaded.stages:
        cls, params, label = stage.method_cls, stage.params, stage.label
        prefix = ("stages", stage.index, "params")
        for path, value, info in param_fields(params):
            if ffn_layers is not None and value is not None and is_layer_indices(info):
                bad = [j for j in value if j >= ffn_layers]
                if bad:
                    raise RecipeError(f"{label}: layers {bad} out of range: the model has {ffn_layers} FFN layers "
                                      f"(0..{ffn_layers - 1})", file=file, line=lines.line(prefix + path),
                                      field=_dotted(prefix + path))
        if not same_structure:
            continue
        try:
            cls().check(skeleton, params)
        except (ValueError, SparsifyError) as exc:
            at = getattr(exc, "field", None) if isinstance(exc, ParamsError) else None
            path = prefix + tuple(int(p) if p.isdigit() else p for p in at.split(".")) if at else prefix
            raise RecipeError(f"{label}: {str(exc).strip().splitlines()[0]}", file=file, line=lines.line(path),
                              field=_dotted(path)) from None
        same_structure = cls.keeps_layers()


# --------------------------------------------------------------------------- sweeps


@dataclass
class SweepPoint:
    """One run of a sweep: the grid values it sets (grid path -> value) and its validated recipe."""

    index: int
    values: dict[str, Any]
    loaded: LoadedRecipe

    @property
    def key(self) -> str:
        """The point's identity within its sweep (canonical JSON of its values): how resuming finds its run."""
        return json.dumps(self.values, sort_keys=True, default=str)


@dataclass
class SweepPlan:
    """A recipe with a ``sweep:``, expanded: every point validated, nothing loaded or run."""

    name: str
    path: str
    text: str
    overrides: list[str]
    spec: SweepSpec
    points: list[SweepPoint]


def _leaves(key: str, value: Any):
    """``(dotted path, value)`` pairs a grid value sets: a non-empty mapping sets each of its keys."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _leaves(f"{key}.{k}", v)
    else:
        yield key, value


def _label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _run_name(template: str | None, base: str, raw: dict, values: dict, file: str, line: int | None) -> str:
    """The name of a sweep point's run, from ``sweep.name`` or (default) the base name and every varied value."""
    if template is None:
        text = "-".join([str(base)] + [f"{leaf.rsplit('.', 1)[-1]}{_label(v)}"
                                       for key, value in values.items() for leaf, v in _leaves(key, value)])
    else:
        def lookup(match):
            dotted = match.group(1).strip()
            if dotted == "name":
                return str(base)
            cur: Any = raw
            for part in dotted.split("."):
                if isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
                    cur = cur[int(part)]
                elif isinstance(cur, dict) and part in cur:
                    cur = cur[part]
                else:
                    raise RecipeError(f"{{{dotted}}}: no such value in the recipe", file=file, line=line,
                                      field="sweep.name")
            return _label(cur)
        text = re.sub(r"\{([^{}]+)\}", lookup, template)
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text)


def load_sweep(path: str | Path, overrides: list[str] | None = None, *, text: str | None = None) -> SweepPlan | None:
    """Expand a recipe's ``sweep:`` into its runs, each validated like a recipe; ``None`` without a sweep.

    Points are the cartesian product of the grid, in the order written (the
    last path varies fastest). Each point is the recipe with ``--set``-style
    overrides (recorded with its run, so ``--resume`` of a single run works as
    for any run) plus its ``name``. Errors name the grid entry's line.
    """
    file, text, raw, lines = _read(path, overrides, text)
    if raw.get("sweep") is None:
        return None
    try:
        spec = SweepSpec.model_validate(raw["sweep"])
    except ValidationError as exc:
        raise _pydantic_error(exc, SweepSpec, ("sweep",), lines, file) from None
    for key, values in spec.grid.items():
        problem = ("needs at least one value" if not values else
                   "a sweep cannot vary the recipe name or the sweep itself"
                   if key.split(".")[0] in ("sweep", "name") else None)
        if problem:
            raise RecipeError(problem, file=file, line=lines.line(("sweep", "grid", key), key=True),
                              field=f"sweep.grid.{key}")
    base = raw.get("name")
    if not base:
        raise RecipeError("required field is missing (the runs of a sweep are named after it)", file=file,
                          line=lines.line(("sweep",), key=True), field="name")
    points, names = [], {}
    for index, combo in enumerate(itertools.product(*spec.grid.values())):
        values = dict(zip(spec.grid, combo))
        point_raw, point_lines = copy.deepcopy(raw), copy.copy(lines)
        point_lines.redirected = dict(lines.redirected)
        sets = []
        for key, value in values.items():
            line = lines.line(("sweep", "grid", key), key=True)
            for leaf, leaf_value in _leaves(key, value):
                spec_text = f"{leaf}={json.dumps(leaf_value)}"
                point_lines.redirected[_set_path(point_raw, leaf, leaf_value, spec_text, file=file, line=line)] = line
                sets.append(spec_text)
        name_line = lines.line(("sweep", "name")) if spec.name is not None else lines.line(("sweep",), key=True)
        name = _run_name(spec.name, base, point_raw, values, file, name_line)
        if name in names:
            raise RecipeError(f"points {names[name]} and {index} both get the run name {name!r}: put the varied "
                              "values in the template", file=file, line=name_line, field="sweep.name")
        names[name] = index
        point_raw["name"] = name
        sets.append(f"name={json.dumps(name)}")
        loaded = _validate(point_raw, point_lines, file, text, list(overrides or []) + sets)
        points.append(SweepPoint(index, values, loaded))
    return SweepPlan(name=str(base), path=file, text=text, overrides=list(overrides or []), spec=spec, points=points)


def check_sweep(plan: SweepPlan) -> None:
    """``check_model`` for every point of a sweep; an error names the point's run."""
    for point in plan.points:
        try:
            check_model(point.loaded)
        except RecipeError as exc:
            raise RecipeError(f"run {point.loaded.recipe.name!r}: {exc.bare_message}", file=exc.file, line=exc.line,
                              field=exc.field, suggestions=exc.suggestions) from None


# --------------------------------------------------------------------------- JSON Schema


class _FactoryDefaults(GenerateJsonSchema):
    """Pydantic's JSON Schema generator, also showing a ``default_factory``'s value as the default.

    Pydantic leaves such defaults out; a recipe's ``data.splits`` or
    ``model`` would then look as if they had none.
    """

    def get_default_value(self, schema):
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return factory()
        return super().get_default_value(schema)


def _variant(base: type[BaseModel], title: str, doc: str | None = None, **fields) -> type[BaseModel]:
    """``base`` with some fields' types narrowed; a field given as a bare type keeps ``base``'s default and text."""
    spec = {}
    for name, value in fields.items():
        if isinstance(value, tuple):
            spec[name] = value
        else:
            info = copy.copy(base.model_fields[name])
            info.annotation = None  # create_model takes the type from the tuple
            spec[name] = (value, info)
    return create_model(re.sub(r"\W", "_", title), __base__=base, __doc__=doc or base.__doc__, **spec)


def _tagged(variants: dict[str, type[BaseModel]], tag) -> Any:
    """A union of ``variants`` (tag -> model) that pydantic writes as a JSON Schema ``oneOf``."""
    members = tuple(Annotated[cls, Tag(key)] for key, cls in variants.items())
    return Annotated[typing.Union[members], Discriminator(tag)] if len(members) > 1 else variants[next(iter(variants))]


def _plugin_params(cls, base: type[BaseModel]):
    """The ``params`` field of a variant for plugin class ``cls``: its ``Params``, required when a param is."""
    info = base.model_fields["params"]
    doc = cls.describe() or info.description
    if any(f.is_required() for f in cls.Params.model_fields.values()):
        return (cls.Params, Field(description=doc))
    return (cls.Params, Field(default_factory=info.default_factory, description=doc))


def json_schema() -> dict:
    """JSON Schema (draft 2020-12) of a recipe, for editors and ``sparsify schema``.

    Derived from the recipe models (``Recipe`` and the specs it holds: their
    fields, defaults, descriptions, ``extra="forbid"``) with the plugin
    catalog filled in: each stage is a ``oneOf`` over every installed
    ``kind``/``method`` whose ``params`` is that method's ``Params`` schema;
    ``model`` and ``data`` are a ``oneOf`` over the installed sources, each
    with its own ``Params``; ``evaluate.metrics`` names installed metrics. A
    plugin's method or source appears with no edit here. A default made by a
    ``default_factory`` is shown like any other default.
    """
    from .plugin_manager import catalog

    cat = catalog()

    stage_variants = {
        f"{kind}/{name}": _variant(StageSpec, f"Stage_{kind}_{name}", cls.describe() or None,
                                   kind=(Literal[kind], Field(description=f"stage kind: {kind}")),
                                   method=(Literal[name], Field(description=f"{kind} method: {name}")),
                                   params=_plugin_params(cls, StageSpec))
        for (kind, name), cls in sorted(cat.methods.items())}

    def source_variants(spec: type[BaseModel], table: dict, prefix: str) -> dict:
        default = spec.model_fields["source"].default
        return {name: _variant(spec, f"{prefix}_{name}", cls.describe() or None,
                               # only the default source may be left out
                               source=(Literal[name], Field(name if name == default else ...,
                                                            description=spec.model_fields["source"].description)),
                               params=_plugin_params(cls, spec))
                for name, cls in sorted(table.items())}

    def source_tag(spec: type[BaseModel]):
        default = spec.model_fields["source"].default
        return lambda v: v.get("source", default) if isinstance(v, dict) else v.source

    fields: dict[str, Any] = {}
    if stage_variants:
        fields["stages"] = list[_tagged(stage_variants, lambda v: f"{v.get('kind')}/{v.get('method')}"
                                        if isinstance(v, dict) else f"{v.kind}/{v.method}")]
    if cat.model_sources:
        fields["model"] = _tagged(source_variants(ModelSpec, cat.model_sources, "Model"), source_tag(ModelSpec))
    if cat.data_sources:
        fields["data"] = _tagged(source_variants(DataSpec, cat.data_sources, "Data"), source_tag(DataSpec))
    if cat.metrics:
        metric = Literal[tuple(sorted(cat.metrics))]
        fields["evaluate"] = _variant(EvaluateSpec, "Evaluate",
                                      metrics=list[metric | dict[metric, dict[str, Any]]] | Literal["all"])
    schema = _variant(Recipe, "Recipe", **fields).model_json_schema(schema_generator=_FactoryDefaults)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "sparsify recipe"
    return schema
