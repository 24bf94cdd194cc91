"""Recipe validation: every malformed recipe gives one line naming file, line and field."""
from __future__ import annotations

import json

import pytest
from helpers import RECIPES, TINY_RECIPE, sparsify_here, tiny_recipe, write

from sparsify_core.errors import RecipeError
from sparsify_core.recipe import json_schema, load_recipe


def _error(tmp_path, text, overrides=None) -> RecipeError:
    path = write(tmp_path / "r.yaml", text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    err = info.value
    assert "\n" not in str(err)
    assert str(err).startswith(str(path))
    return err


def test_shipped_recipes_validate():
    for path in sorted(RECIPES.glob("*.yaml")):
        loaded = load_recipe(path)
        assert loaded.recipe.name


def test_defaults_and_stage_names(tmp_path):
    loaded = load_recipe(write(tmp_path / "r.yaml", TINY_RECIPE))
    assert loaded.recipe.stage_names() == ["relu", "magnitude"]
    assert loaded.stages[1].params.sparsity == 0.5
    assert len(loaded.hash) == 16


def test_bad_yaml_names_the_line(tmp_path):
    err = _error(tmp_path, "name: x\nstages:\n  - kind: prune\n   method: [\n")
    assert err.line in (3, 4) and "invalid YAML" in str(err)


def test_unknown_top_level_key_suggests(tmp_path):
    err = _error(tmp_path, TINY_RECIPE.replace("stages:", "stagez:"))
    assert err.field == "stagez" and err.line == 13
    assert "stages" in err.suggestions


def test_unknown_param_key_suggests(tmp_path):
    err = _error(tmp_path, TINY_RECIPE.replace("params: {sparsity: 0.5}", "params: {sparsty: 0.5}"))
    assert err.field == "stages.1.params.sparsty"
    assert err.line == 18
    assert err.suggestions == ["sparsity"]


def test_wrong_type(tmp_path):
    err = _error(tmp_path, TINY_RECIPE.replace("seed: 0", "seed: lots"))
    assert err.field == "seed" and err.line == 2


def test_bad_value(tmp_path):
    err = _error(tmp_path, TINY_RECIPE.replace("sparsity: 0.5", "sparsity: 1.5"))
    assert err.field == "stages.1.params.sparsity" and err.line == 18


def test_unknown_method_and_kind(tmp_path):
    err = _error(tmp_path, TINY_RECIPE.replace("method: magnitude", "method: magnitud"))
    assert err.field == "stages.1.method" and err.line == 17 and err.suggestions == ["magnitude"]
    err = _error(tmp_path, TINY_RECIPE.replace("kind: prune", "kind: prun"))
    assert err.field == "stages.1.kind" and "prune" in err.suggestions
    err = _error(tmp_path, TINY_RECIPE.replace("method: magnitude", "method: relu"))
    assert "substitute_activation" in str(err)


def test_unknown_sources_and_metrics(tmp_path):
    err = _error(tmp_path, TINY_RECIPE.replace("source: tiny", "source: tinyy"))
    assert err.field == "model.source" and err.suggestions[0] == "tiny"
    err = _error(tmp_path, TINY_RECIPE.replace("params: {arch: llama,", "params: {archh: llama,"))
    assert err.field == "model.params.archh" and err.suggestions == ["arch"]
    err = _error(tmp_path, TINY_RECIPE.replace("  after: all", "  after: all\n  metrics: [perplexity, perplexty]"))
    assert err.field == "evaluate.metrics.1" and err.suggestions == ["perplexity"]
    err = _error(tmp_path, TINY_RECIPE.replace("  after: all", "  after: [relu, magnitud]"))
    assert err.field == "evaluate.after.1" and err.suggestions == ["magnitude"]


@pytest.mark.parametrize("stage", ["substitute_activation, method: relu", "substitute_activation, method: cats",
                                   "moeify, method: param_cluster",
                                   "layout_convert, method: activation_sparse_ffn", "layout_convert, method: moe_ffn"])
@pytest.mark.parametrize("layers", ["[]", "[0, -1]"])
def test_bad_layers_name_the_field(tmp_path, stage, layers):
    """Every stage's ``layers`` (sparsify_core.method.LayerIndices) is omitted or non-empty and 0-based."""
    err = _error(tmp_path, tiny_recipe(f"  - {{kind: {stage}, params: {{layers: {layers}}}}}\n"))
    assert err.field == "stages.0.params.layers" and err.line == 14
    assert "layers must be a non-empty list of 0-based layer indices (or omitted for all)" in str(err)


def test_duplicate_stage_names_and_missing_field(tmp_path):
    text = TINY_RECIPE.replace("    method: relu", "    method: relu\n    name: a").replace(
        "    method: magnitude", "    method: magnitude\n    name: a")
    err = _error(tmp_path, text)
    assert "already used" in str(err)
    err = _error(tmp_path, TINY_RECIPE.replace("  - kind: prune\n", "  - \n"))
    assert err.field == "stages.1.kind" and "missing" in str(err)


def test_overrides(tmp_path):
    path = write(tmp_path / "r.yaml", TINY_RECIPE)
    loaded = load_recipe(path, ["stages.1.params.sparsity=0.75", "seed=3", "evaluate.batch_size=2"])
    assert loaded.stages[1].params.sparsity == 0.75 and loaded.recipe.seed == 3
    assert loaded.overrides == ["stages.1.params.sparsity=0.75", "seed=3", "evaluate.batch_size=2"]
    with pytest.raises(RecipeError, match="no list item"):
        load_recipe(path, ["stages.7.params.sparsity=0.5"])
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["stages.1.params.sparsity=2"])
    assert info.value.field == "stages.1.params.sparsity" and info.value.line is None


def test_schema_has_every_method():
    schema = json.dumps(json_schema())
    for name in ("relu", "magnitude", "sparsity", "tiny", "pydoc", "perplexity"):
        assert name in schema


def test_cli_validate_exit_codes(tmp_path):
    good = write(tmp_path / "good.yaml", TINY_RECIPE)
    bad = write(tmp_path / "bad.yaml", TINY_RECIPE.replace("sparsity: 0.5", "sparsty: 0.5"))
    ok = sparsify_here("validate", good)
    assert ok.returncode == 0, ok.stderr
    proc = sparsify_here("validate", bad)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.yaml:18" in lines[0] and "sparsity" in lines[0]
    assert "Traceback" not in proc.stderr
    proc = sparsify_here("validate", tmp_path / "missing.yaml")
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_nm_patterns_and_exponents_read_as_meant():
    """YAML 1.1 reads 2:4 as the base-60 integer 124 and 1e-4 as a string; recipes read them as meant."""
    from sparsify_core.recipe import parse_override, safe_load

    assert safe_load("a: 2:4\nb: 1e-4\nc: 12\nd: 0.5\ne: '2:4'") == {"a": "2:4", "b": 1e-4, "c": 12, "d": 0.5, "e": "2:4"}
    assert parse_override("stages.0.params.pattern=2:4") == ("stages.0.params.pattern", "2:4")
    assert parse_override("stages.0.params.train.lr=3e-4") == ("stages.0.params.train.lr", 3e-4)


def test_recipe_yaml_builds_no_python_objects():
    """The recipe loader is a SafeLoader: python tags are refused, never constructed."""
    import yaml

    from sparsify_core.recipe import RecipeLoader, safe_load

    assert issubclass(RecipeLoader, yaml.SafeLoader)
    for text in ("x: !!python/object/apply:os.system ['true']", "x: !!python/name:os.system", "x: !!python/tuple [1]"):
        with pytest.raises(yaml.constructor.ConstructorError):
            safe_load(text)
