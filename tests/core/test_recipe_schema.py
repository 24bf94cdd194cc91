"""``sparsify schema``: the JSON Schema derived from the recipe models and the installed plugins.

It must accept what ``load_recipe`` accepts (every shipped recipe), refuse
unknown keys wherever the models forbid them, carry each plugin's methods and
sources with their ``Params``, and state every default exactly as the models
apply it (swept over every field of every model it holds).
"""
from __future__ import annotations

import copy
import typing

import pytest
from helpers import RECIPES, TINY_RECIPE, tiny_recipe
from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python

from sparsify_core.plugin_manager import catalog
from sparsify_core.recipe import DataSpec, ModelSpec, Recipe, StageSpec, json_schema, safe_load

jsonschema = pytest.importorskip("jsonschema")  # in the test extra


@pytest.fixture(scope="module")
def schema():
    return json_schema()


def _errors(schema, recipe: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(recipe)]


def test_schema_is_draft_2020_12_and_accepts_every_shipped_recipe(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    paths = sorted(RECIPES.glob("*.yaml"))
    assert paths
    for path in paths:
        assert _errors(schema, safe_load(path.read_text())) == [], path.name


def _at(recipe: dict, path: str):
    cur = recipe
    for part in path.split(".") if path else []:
        cur = cur[int(part)] if isinstance(cur, list) else cur[part]
    return cur


@pytest.mark.parametrize("where", ["", "model", "model.params", "data", "data.splits.eval", "stages.0",
                                   "stages.1", "stages.1.params", "evaluate", "output"])
def test_schema_rejects_an_unknown_key(schema, where):
    recipe = safe_load(tiny_recipe(TINY_RECIPE.split("stages:\n")[1].split("evaluate:")[0],
                                   output={"dir": "out", "save": True}))
    recipe["stages"][0]["params"] = {}
    assert _errors(schema, recipe) == []
    bad = copy.deepcopy(recipe)
    _at(bad, where)["bogus"] = 1
    assert _errors(schema, bad), where


@pytest.mark.parametrize("change,value", [
    ("stages.1.method", "relu"),             # a method of another kind
    ("stages.1.params.sparsity", "half"),    # a param of the wrong type
    ("stages.1.params.sparsity", 1.5),       # out of the param's range
    ("model.params.arch", "rnn"),            # a source param outside its Literal
    ("model.source", "no_such_source"),
    ("evaluate.metrics", ["perplexity", "no_such_metric"]),
    ("data.splits.eval.samples", 0),
])
def test_schema_rejects_what_the_models_refuse(schema, change, value):
    recipe = safe_load(TINY_RECIPE)
    *parent, key = change.split(".")
    _at(recipe, ".".join(parent))[key] = value
    assert _errors(schema, recipe), change


def test_schema_holds_a_plugins_methods_sources_and_params(example_plugin_module):
    """Registered, the example plugin's method, kind, sources and metric are in the schema: no edit to the core."""
    schema = json_schema()
    text = tiny_recipe("  - {kind: prune, method: random, params: {sparsity: 0.5}}\n"
                       "  - {kind: quantize, method: round_to_grid}\n", evaluate={"metrics": ["weight_l2"]})
    recipe = safe_load(text.replace("source: pydoc", "source: arithmetic\n  params: {limit: 40}"))
    assert _errors(schema, recipe) == []
    recipe["stages"][1]["params"] = {"bits": 99}  # RoundToGrid.Params: bits <= 16
    assert _errors(schema, recipe)
    del recipe["stages"][0]["params"]  # prune/random's sparsity is required: so is its params
    recipe["stages"][1]["params"] = {}
    assert _errors(schema, recipe)
    gpt2 = {"name": "g", "model": {"source": "arithmetic_gpt2", "params": {"hidden_size": 16}}}
    assert _errors(schema, gpt2) == []
    assert _errors(schema, {**gpt2, "model": {"source": "arithmetic_gpt2", "params": {"arch": "llama"}}})
    assert {"Stage_prune_random", "Stage_quantize_round_to_grid", "Model_arithmetic_gpt2",
            "Data_arithmetic"} <= set(schema["$defs"])


# -- defaults: every field of every model, against the schema -------------------------------------


def _models_in(annotation) -> list[type[BaseModel]]:
    """Every pydantic model an annotation holds (through Optional, unions, list, dict, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _reachable(schema, node) -> list[dict]:
    """``node`` and every schema it reaches through $ref, unions, items and additionalProperties."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        if not isinstance(n, dict) or any(n is o for o in out):
            continue
        out.append(n)
        if "$ref" in n:
            todo.append(schema["$defs"][n["$ref"].rsplit("/", 1)[-1]])
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            todo.extend(n.get(key, []))
        todo.extend(n.get(k) for k in ("items", "additionalProperties"))
    return out


def _default(info):
    if info.default_factory is not None:
        return info.default_factory()
    return info.default


def _check(schema, model: type[BaseModel], node: dict, seen: list, where: str) -> None:
    """Compare ``model``'s field defaults with object schema ``node``'s, then recurse into nested models."""
    props = node["properties"]
    assert set(props) == {info.alias or name for name, info in model.model_fields.items()}, where
    for name, info in model.model_fields.items():
        prop, here = props[info.alias or name], f"{where}.{name}"
        if "default" in prop:
            assert not info.is_required(), f"{here}: the schema has a default, the model requires the field"
            assert prop["default"] == to_jsonable_python(_default(info)), here
        else:  # only a variant may require what the model defaults: its tag, or params with a required field
            assert info.is_required() or name in ("source", "params"), f"{here}: default missing from the schema"
        seen.append(here)
        for inner in _models_in(info.annotation):
            keys = {i.alias or n for n, i in inner.model_fields.items()}
            matches = [o for o in _reachable(schema, prop) if set(o.get("properties", ())) == keys]
            assert matches, f"{here}: no schema for {inner.__name__}"
            for obj in matches:
                _check(schema, inner, obj, seen, here)


def _variants(schema, prop) -> list[dict]:
    return [o for o in _reachable(schema, prop) if o.get("title", "").split("_")[0] in ("Stage", "Model", "Data")
            and "properties" in o]


def test_every_default_in_the_schema_is_the_models(schema):
    cat = catalog()
    seen: list[str] = []
    top = schema["properties"]
    root = {k: v for k, v in schema.items() if k not in ("$defs",)}
    # the recipe's own fields; narrowed ones (model, data, stages, evaluate) are checked again per variant below
    _check(schema, Recipe, root, seen, "recipe")
    for prop, spec, table, tag in ((top["model"], ModelSpec, cat.model_sources, "source"),
                                   (top["data"], DataSpec, cat.data_sources, "source"),
                                   (top["stages"], StageSpec, cat.methods, None)):
        variants = _variants(schema, prop)
        assert len(variants) == len(table)
        for variant in variants:
            p = variant["properties"]
            key = p["source"]["const"] if tag else (p["kind"]["const"], p["method"]["const"])
            plugin = table[key]
            _check(schema, spec, variant, seen, f"{spec.__name__}[{key}]")
            params = [o for o in _reachable(schema, p["params"]) if o.get("type") == "object" and "properties" in o]
            if plugin.Params.model_fields:
                assert len(params) == 1, key
                _check(schema, plugin.Params, params[0], seen, f"{key}.params")
    assert len(seen) > 300  # every field of every model, not a handful
