"""Every value a recipe accepts works, or is refused before any weights load (issue 11).

Field cases: float16 with a training stage, a stage reading a data split the
recipe lacks, n:m on a layer whose width is not a multiple of m. Each is
refused by ``sparsify validate`` (exit 2, one line naming file:line and field)
and by ``sparsify run`` before a model source's ``load`` is called and before
anything is recorded. Sweeps: every stage that reads splits x a missing
split; n:m divisibility over the tiny architectures; every documented
(Literal / enum) value of every installed params model written bare in YAML.
"""
from __future__ import annotations

import enum
import re
import typing
from typing import Annotated, Any, Literal

import pytest
import torch
import yaml
from helpers import TINY_SPLITS, make_ctx, tiny_model, tiny_recipe, write, sparsify_here
from pydantic import BaseModel, TypeAdapter

from sparsify_core.errors import RecipeError, SparsifyError
from sparsify_core.plugin_manager import catalog
from sparsify_core.recipe import Recipe, check_model, load_recipe, safe_load
from sparsify_core.registry import Registry
from sparsify_core.training import TrainCallback, TrainConfig, train

# --------------------------------------------------------------------------- helpers


def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in this process as a user would: (exit status, stdout, stderr)."""
    proc = sparsify_here(*args)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def loads(monkeypatch):
    """Every model source's ``load`` records its call and refuses: a test sees whether weights were loaded."""
    calls = []
    for cls in catalog().model_sources.values():
        def load(self, params, *, device, dtype, _name=cls.name):
            calls.append(_name)
            raise AssertionError("weights were loaded")
        monkeypatch.setattr(cls, "load", load)
    return calls


def _line_of(text: str, pattern: str) -> int:
    """1-based line of the first line matching ``pattern``."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if re.search(pattern, line))


def _with_dtype(text: str, dtype: str) -> str:
    return text.replace("  source: tiny\n", f"  source: tiny\n  dtype: {dtype}\n", 1)


def _refused_before_load(monkeypatch, capsys, workdir, loads, path, *, line: int, field: str, says: str) -> str:
    """``validate`` and ``run`` both exit 2 with one line naming file:line and field; nothing loaded or recorded."""
    for command in ("validate", "run"):
        code, out, err = _cli(monkeypatch, capsys, command, path)
        assert code == 2, (command, out, err)
        assert err.strip().count("\n") == 0, err
        assert err.startswith(f"error: {path}:{line}: {field}: "), err
        assert re.search(says, err), err
    assert loads == []
    assert Registry(f"sqlite:///{workdir}/registry.db").find_runs() == []
    return err


# --------------------------------------------------------------------------- case 06: float16 and training

CASE06 = _with_dtype(tiny_recipe("""\
  - kind: prune
    method: sparsegpt
    params: {pattern: 2:4}
  - kind: train
    method: finetune
    params:
      train: {steps: 2, batch_size: 2, lr: 1.0e-5}
"""), "float16")


@pytest.mark.parametrize("stages, stage", [
    (CASE06.split("stages:\n")[1].split("evaluate:")[0], "'finetune' (train/finetune)"),
    ("  - kind: prune\n    method: gmp\n    params: {sparsity: 0.5, train: {steps: 2}}\n", "'gmp' (prune/gmp)"),
    ("  - kind: substitute_activation\n    method: relu\n"
     "  - kind: regularize\n    method: blockwise_l1\n    params: {l1: 0.1, steps: 2}\n",
     "'blockwise_l1' (regularize/blockwise_l1)"),
])
def test_float16_with_a_training_stage_is_refused_naming_the_dtype_line(monkeypatch, capsys, workdir, loads,
                                                                        stages, stage):
    text = _with_dtype(tiny_recipe(stages), "float16")
    path = write(workdir / "fp16.yaml", text)
    err = _refused_before_load(monkeypatch, capsys, workdir, loads, path, line=_line_of(text, "dtype: float16"),
                               field="model.dtype", says="float16 weights cannot train")
    assert f"stage {stage}" in err and "bfloat16" in err and "lower the learning rate" not in err


def test_half_precision_that_does_not_train_and_bfloat16_that_does_validate():
    load_recipe("bf16.yaml", text=CASE06.replace("dtype: float16", "dtype: bfloat16"))
    load_recipe("fp16.yaml", text=_with_dtype(tiny_recipe("  - kind: prune\n    method: magnitude\n"
                                                          "    params: {sparsity: 0.5}\n"), "float16"))


def test_every_method_with_an_optimizer_is_known_to_need_it():
    uses = {name for (_, name), cls in catalog().methods.items() if cls.uses_optimizer()}
    assert {"finetune", "progressive_l1", "lte", "ssd", "blockwise_l1", "gmp", "maskllm"} <= uses
    assert not uses & {"magnitude", "wanda", "sparsegpt", "relu", "nm"}


def test_a_nan_loss_on_float16_weights_names_the_precision(tmp_path):
    ctx = make_ctx(tmp_path, tiny_model().half())

    class Explode(TrainCallback):
        def penalty(self, step):
            return torch.tensor(float("nan")), {}

    cfg = TrainConfig(steps=2, batch_size=2, checkpoint_every=0, autocast="off")
    with pytest.raises(SparsifyError, match="float16.*bfloat16") as info:
        train(ctx, cfg, [Explode()])
    assert "learning rate" not in str(info.value)
    with pytest.raises(SparsifyError, match="lower the learning rate"):  # float32: the lr advice stands
        train(make_ctx(tmp_path, tiny_model()), cfg, [Explode()])


# --------------------------------------------------------------------------- case 08: data splits

CASE08 = tiny_recipe("  - kind: prune\n    method: wanda\n    params: {sparsity: 0.5}\n",
                     splits={"train": {"samples": 8}, "eval": {"samples": 4}})


def test_wanda_without_a_calibration_split_is_refused_before_load(monkeypatch, capsys, workdir, loads):
    path = write(workdir / "case08.yaml", CASE08)
    err = _refused_before_load(monkeypatch, capsys, workdir, loads, path,
                               line=_line_of(CASE08, r"params: \{sparsity"),
                               field="stages.0.params.calibration_split",
                               says=r"stage 'wanda' \(prune/wanda\) reads data split 'calibration'")
    assert err.rstrip().endswith("splits: train, eval")


def test_a_misspelt_split_points_at_its_line_and_suggests_the_split():
    text = tiny_recipe("  - kind: prune\n    method: wanda\n    params:\n      sparsity: 0.5\n"
                       "      calibration_split: calibraton\n")
    with pytest.raises(RecipeError) as info:
        load_recipe("typo.yaml", text=text)
    e = info.value
    assert (e.field, e.line) == ("stages.0.params.calibration_split", _line_of(text, "calibraton"))
    assert e.suggestions == ["calibration"]


def test_a_training_split_that_is_missing_points_at_train_split():
    text = tiny_recipe("  - kind: train\n    method: finetune\n    params:\n      train: {steps: 2, split: tune}\n")
    with pytest.raises(RecipeError, match="reads data split 'tune'") as info:
        load_recipe("t.yaml", text=text)
    assert (info.value.field, info.value.line) == ("stages.0.params.train.split", _line_of(text, "split: tune"))


# Minimal valid params of every installed method (the split sweep must cover them all: see the test below).
PARAMS: dict[tuple[str, str], dict] = {
    ("layout_convert", "activation_sparse_ffn"): {"predictor": {}},
    ("layout_convert", "bsr"): {}, ("layout_convert", "csr"): {}, ("layout_convert", "moe_ffn"): {},
    ("layout_convert", "nm"): {}, ("layout_convert", "nmg"): {}, ("layout_convert", "weight"): {"layout": "csr"},
    ("moeify", "coactivation"): {"top_k": 1}, ("moeify", "param_cluster"): {"top_k": 1},
    ("moeify", "routing"): {"routing": "dense"}, ("moeify", "reap"): {"experts_keep": 0.75},
    ("prune", "gmp"): {"sparsity": 0.5, "profile": "owl", "train": {"steps": 2}}, ("prune", "magnitude"): {"sparsity": 0.5, "profile": "owl"},
    ("prune", "nmg"): {}, ("prune", "sparsegpt"): {"sparsity": 0.5}, ("prune", "wanda"): {"sparsity": 0.5},
    ("prune", "maskllm"): {"train": {"steps": 2}},
    ("prune", "width"): {"ffn_keep": 0.5},
    ("regularize", "blockwise_l1"): {"l1": 0.1},
    ("regularize", "lte"): {"stage1_steps": 1, "train": {"steps": 2}},
    ("regularize", "progressive_l1"): {"schedule": [{"lambda": 0.1, "steps": 2}], "train": {"steps": 2}},
    ("substitute_activation", "cats"): {"target_sparsity": 0.5},
    ("substitute_activation", "fatrelu"): {"target_sparsity": 0.5}, ("substitute_activation", "relu"): {},
    ("substitute_activation", "drelu"): {}, ("substitute_activation", "teal"): {"sparsity": 0.4},
    ("train", "finetune"): {"train": {"steps": 2}}, ("train", "ssd"): {"train": {"steps": 2}},
}


def _stage_yaml(kind: str, method: str, params: dict) -> str:
    import json

    return f"  - kind: {kind}\n    method: {method}\n    params: {json.dumps(params)}\n"


def test_the_split_sweep_covers_every_built_in_method():
    built_in = {tuple(e.key.split("/")) for e in catalog().entries
                if e.category == "method" and e.distribution.split()[0] == "sparsify"}
    assert set(PARAMS) == built_in


def _reads(kind, method) -> list[tuple[tuple, str]]:
    cls = catalog().methods[(kind, method)]
    return cls().data_splits(cls.Params.model_validate(PARAMS[(kind, method)]))


@pytest.mark.parametrize("kind, method", sorted(PARAMS))
def test_every_split_a_stage_reads_is_checked(kind, method):
    text = tiny_recipe(_stage_yaml(kind, method, PARAMS[(kind, method)]))
    load_recipe("all-splits.yaml", text=text)  # with every split, the stage validates
    for split in sorted({s for _, s in _reads(kind, method)}):
        fields = {"stages.0.params." + ".".join(map(str, path)) for path, s in _reads(kind, method) if s == split}
        rest = {k: v for k, v in TINY_SPLITS.items() if k != split}
        missing = tiny_recipe(_stage_yaml(kind, method, PARAMS[(kind, method)]), splits=rest)
        with pytest.raises(RecipeError, match=f"stage '{method}' \\({kind}/{method}\\) reads data split '{split}'"
                                              f".*; splits: {', '.join(rest)}") as info:
            load_recipe("missing.yaml", text=missing)
        assert info.value.field in fields and info.value.line == _line_of(missing, r"^    params: ")


def test_the_stages_known_to_read_splits_say_so():
    reads = {m: {s for _, s in _reads(k, m)} for k, m in PARAMS}
    assert reads["wanda"] == reads["sparsegpt"] == reads["cats"] == reads["fatrelu"] == {"calibration"}
    assert reads["finetune"] == reads["progressive_l1"] == reads["lte"] == reads["blockwise_l1"] == {"train"}
    assert reads["gmp"] == {"train", "calibration"}  # its training loop, and the owl profile
    assert reads["maskllm"] == {"train", "calibration"}  # its training loop, and the default sparsegpt prior
    assert reads["ssd"] == {"train", "calibration"} and reads["activation_sparse_ffn"] == {"calibration"}
    assert reads["coactivation"] == reads["param_cluster"] == reads["reap"] == {"calibration"}
    # conditional: magnitude and gmp read calibration data for the owl profile only
    magnitude, gmp = catalog().methods[("prune", "magnitude")], catalog().methods[("prune", "gmp")]
    assert magnitude().data_splits(magnitude.Params(sparsity=0.5)) == []
    assert gmp().data_splits(gmp.Params(sparsity=0.5, train={"steps": 2})) == [(("train", "split"), "train")]
    fatrelu = catalog().methods[("substitute_activation", "fatrelu")]
    assert fatrelu().data_splits(fatrelu.Params(threshold=0.1)) == []


# --------------------------------------------------------------------------- case 12: shapes from the config

CASE12 = tiny_recipe("  - kind: prune\n    method: wanda\n    params: {pattern: 2:4}\n",
                     model={"arch": "gpt2", "hidden_size": 64, "intermediate_size": 250, "layers": 2, "heads": 4})


def test_nm_on_an_odd_width_is_refused_before_load_naming_the_modules(monkeypatch, capsys, workdir, loads):
    path = write(workdir / "case12.yaml", CASE12)
    err = _refused_before_load(monkeypatch, capsys, workdir, loads, path, line=_line_of(CASE12, "pattern: 2:4"),
                               field="stages.0.params.pattern", says="not a multiple of 4")
    assert "transformer.h.0.mlp.c_proj, transformer.h.1.mlp.c_proj" in err
    assert "exclude: ['lm_head', 'mlp\\.c_proj']" in err


def test_the_excluded_odd_width_runs_and_converts_exactly(monkeypatch, capsys, workdir, one_thread):
    text = tiny_recipe(
        "  - kind: prune\n    method: wanda\n    params: {pattern: 2:4, exclude: ['mlp\\.c_proj']}\n"
        "  - kind: layout_convert\n    method: nm\n    params: {n: 2, m: 4, exclude: ['mlp\\.c_proj', 'lm_head']}\n",
        model={"arch": "gpt2", "hidden_size": 64, "intermediate_size": 250, "layers": 2, "heads": 4},
        splits={"calibration": {"samples": 4}, "eval": {"samples": 4}},
        evaluate={"metrics": ["perplexity"], "after": "all"}, output={"save": False})
    path = write(workdir / "excluded.yaml", text)
    code, out, err = _cli(monkeypatch, capsys, "validate", path)
    assert code == 0, err
    code, out, err = _cli(monkeypatch, capsys, "run", path)
    assert code == 0, err
    (run,) = Registry(f"sqlite:///{workdir}/registry.db").find_runs()
    ppl = {m.stage: m.value for m in run.metrics if m.name == "perplexity" and m.layer is None}
    assert run.status == "finished" and ppl["nm"] == pytest.approx(ppl["wanda"], rel=1e-5)


# The FFN down projection of each tiny architecture: its input width is the FFN width.
DOWN = {"gpt2": "mlp.c_proj", "llama": "mlp.down_proj", "opt": "fc2", "bert": "output.dense"}


@pytest.mark.parametrize("arch", sorted(DOWN))
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_divisibility_over_the_tiny_architectures(arch, method):
    model = {"arch": arch, "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 4}
    stage = "  - kind: prune\n    method: {}\n    params: {{pattern: '{}'}}\n"
    check_model(load_recipe("ok.yaml", text=tiny_recipe(stage.format(method, "2:4"), model=model)))
    model["intermediate_size"] = 66  # the FFN width: only the down projection's input is odd
    check_model(load_recipe("1of2.yaml", text=tiny_recipe(stage.format(method, "1:2"), model=model)))
    bad = load_recipe("bad.yaml", text=tiny_recipe(stage.format(method, "2:4"), model=model))
    with pytest.raises(RecipeError, match="not a multiple of 4") as info:
        check_model(bad)
    assert info.value.field == "stages.0.params.pattern"
    odd = re.search(r"the input size of (.*?)(?: \.\.\.)? is not", str(info.value)).group(1).split(", ")
    assert odd and all(name.endswith(DOWN[arch]) for name in odd), odd
    hint = re.search(r"exclude: (\[.*\])", str(info.value)).group(1)
    fixed = stage.format(method, "2:4").replace("}", f", exclude: {hint}}}")
    check_model(load_recipe("fixed.yaml", text=tiny_recipe(fixed, model=model)))  # the hint is the fix


def test_targets_layers_and_profiles_are_checked_against_the_skeleton():
    cases = [
        ("  - kind: prune\n    method: magnitude\n    params: {sparsity: 0.5, targets: ['nothing_here']}\n",
         "stages.0.params.targets", "no Linear/Conv1D module matches"),
        ("  - kind: prune\n    method: wanda\n    params: {sparsity: 0.5, targets: ['lm_head'], exclude: []}\n",
         "stages.0.params.targets", "outside the transformer layers"),
        ("  - kind: prune\n    method: wanda\n    params: {profile: [0.5, 0.5, 0.5]}\n",
         "stages.0.params.profile", "lists 3 values but there are 2 layers"),
        ("  - kind: substitute_activation\n    method: relu\n    params: {layers: [0, 2]}\n",
         "stages.0.params.layers", r"layers \[2\] out of range: the model has 2 FFN layers"),
        ("  - kind: layout_convert\n    method: csr\n    params: {targets: ['nothing_here']}\n",
         "stages.0.params.targets", "no Linear/Conv1D module matches"),
        ("  - kind: train\n    method: ssd\n    params: {train: {steps: 2}, experts: {top_k: 1, layers: [5]}}\n",
         "stages.0.params.experts.layers", r"layers \[5\] out of range"),
    ]
    for stages, field, says in cases:
        text = tiny_recipe(stages)
        loaded = load_recipe("s.yaml", text=text)
        with pytest.raises(RecipeError, match=says) as info:
            check_model(loaded)
        assert (info.value.field, info.value.line) == (field, _line_of(text, r"^    params: ")), stages


def test_checks_stop_at_the_first_stage_that_moves_linear_layers(monkeypatch):
    seen = []
    keys = (("prune", "wanda"), ("substitute_activation", "relu"), ("layout_convert", "csr"), ("prune", "magnitude"))
    for key in keys:
        cls = catalog().methods[key]
        original = cls.check
        monkeypatch.setattr(cls, "check", lambda self, model, params, _o=original, _k=key: (seen.append(_k),
                                                                                            _o(self, model, params)))
    loaded = load_recipe("order.yaml", text=tiny_recipe(
        "  - kind: prune\n    method: wanda\n    params: {sparsity: 0.5}\n"
        "  - kind: substitute_activation\n    method: relu\n"
        "  - kind: layout_convert\n    method: csr\n"
        "  - kind: prune\n    method: magnitude\n    params: {sparsity: 0.5, targets: ['not_after_csr']}\n"))
    check_model(loaded)  # csr swaps the Linear layers for SparseLinear: magnitude's targets are not checked
    assert seen == list(keys[:3])


def test_an_activation_swap_keeps_the_later_stages_checked():
    text = CASE12.replace("stages:\n", "stages:\n  - kind: substitute_activation\n    method: relu\n")
    with pytest.raises(RecipeError, match="not a multiple of 4") as info:
        check_model(load_recipe("relu-first.yaml", text=text))
    assert info.value.field == "stages.1.params.pattern"


def test_every_built_in_source_builds_a_skeleton_without_weights():
    from sparsify_plugins.sources.models import MiniLM, SmolLM2, Tiny

    models = {source.name: source().skeleton(source.Params.model_validate(params))
              for source, params in ((Tiny, {"arch": "opt"}), (SmolLM2, {}), (MiniLM, {}))}
    for name, model in models.items():
        tensors = list(model.parameters())
        assert tensors and all(t.device.type == "meta" for t in tensors), name
    smol = models["smollm2-135m"]  # from the packaged GGUF's header: SmolLM2-135M's shapes
    assert (smol.config.hidden_size, smol.config.intermediate_size, smol.config.num_hidden_layers) == (576, 1536, 30)
    assert smol.config.tie_word_embeddings and smol.config.vocab_size == 49152


# --------------------------------------------------------------------------- YAML 1.1 implicit typing


def _models(root: type[BaseModel], seen: set) -> typing.Iterator[type[BaseModel]]:
    """``root`` and every pydantic model its fields hold, nested in unions, lists and dicts."""
    if root in seen:
        return
    seen.add(root)
    yield root
    for f in root.model_fields.values():
        for t in _leaf_types(f.annotation):
            if isinstance(t, type) and issubclass(t, BaseModel):
                yield from _models(t, seen)


def _leaf_types(t) -> list:
    args = typing.get_args(t)
    if typing.get_origin(t) is Literal or not args:
        return [t]
    if typing.get_origin(t) is Annotated:
        return _leaf_types(args[0])
    return [leaf for a in args for leaf in _leaf_types(a)]


def _documented_values(annotation) -> list[Any]:
    values = []
    for t in _leaf_types(annotation):
        if typing.get_origin(t) is Literal:
            values += list(typing.get_args(t))
        elif isinstance(t, type) and issubclass(t, enum.Enum):
            values += [m.value for m in t]
    return values


def _every_params_model() -> list[type[BaseModel]]:
    cat = catalog()
    roots = [Recipe, TrainConfig]
    roots += [cls.Params for cls in cat.methods.values()]
    roots += [cls.Params for cls in [*cat.model_sources.values(), *cat.data_sources.values()]]
    roots += [cls.Params for cls in [*cat.metrics.values(), *cat.layouts.values()] if hasattr(cls, "Params")]
    seen: set = set()
    return [m for root in roots for m in _models(root, seen)]


def _literal_fields():
    for model in _every_params_model():
        for name, f in model.model_fields.items():
            for value in _documented_values(f.annotation):
                yield model, name, f, value


def test_the_literal_sweep_finds_the_documented_values():
    found = {(m.__name__, n, v) for m, n, _, v in _literal_fields()}
    for expected in [("TrainConfig", "autocast", "off"), ("ModelSpec", "dtype", "float16"),
                     ("Params", "arch", "opt"), ("EvaluateSpec", "after", "none"),
                     ("SSDParams", "final_routing", "dense")]:
        assert expected in found, expected
    assert len(found) > 40


def test_every_documented_value_written_bare_validates_to_itself():
    wrong = []
    for model, name, f, value in _literal_fields():
        bare = value if not isinstance(value, bool) else str(value).lower()
        parsed = safe_load(f"{name}: {bare}")[name]
        try:
            annotation = Annotated[f.annotation, *f.metadata] if f.metadata else f.annotation
            got = TypeAdapter(annotation).validate_python(parsed)
        except Exception as exc:  # noqa: BLE001 - collected, reported together
            got = exc
        if got != value or type(got) is not type(value):
            wrong.append(f"{model.__name__}.{name}: {bare} -> {got!r}")
    assert wrong == []


def test_yaml_1_1_words_stay_words_and_booleans_stay_booleans():
    assert yaml.safe_load("a: off")["a"] is False  # what YAML 1.1 does, and why the loader differs
    assert safe_load("a: off\nb: no\nc: yes\nd: on\ne: y\nf: '='") == {
        "a": "off", "b": "no", "c": "yes", "d": "on", "e": "y", "f": "="}
    assert safe_load("a: true\nb: False\nc: ~\nd: null\ne: 2:4\nf: 1e-4\ng: 12") == {
        "a": True, "b": False, "c": None, "d": None, "e": "2:4", "f": 1e-4, "g": 12}
    text = tiny_recipe("  - kind: train\n    method: finetune\n    params: {train: {steps: 2, autocast: off}}\n",
                       output={"save": "no"})
    loaded = load_recipe("words.yaml", text=text)
    assert loaded.stages[0].params.train.autocast == "off"
    assert loaded.recipe.output.save is False  # a bool field still reads yes/no/on/off


def test_an_hf_model_is_checked_from_its_config_alone(tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2-odd"
    GPT2Config(n_embd=32, n_inner=250, n_layer=2, n_head=4, vocab_size=100).save_pretrained(folder)  # no weights
    stage = "  - kind: prune\n    method: wanda\n    params: {pattern: 2:4}\n"
    text = tiny_recipe(stage).replace("  source: tiny\n  params: {arch: llama, hidden_size: 32, intermediate_size: "
                                      "64, layers: 2, heads: 4}\n", f"  source: hf\n  params: {{path: '{folder}'}}\n")
    assert "source: hf" in text
    with pytest.raises(RecipeError, match=r"transformer\.h\.0\.mlp\.c_proj.*not a multiple of 4"):
        check_model(load_recipe("hf.yaml", text=text))
    # a model that is not on this machine: nothing to check here; `load` reports it when the run starts
    check_model(load_recipe("gone.yaml", text=text.replace(str(folder), str(tmp_path / "gone"))))


@pytest.mark.parametrize("bare, kind", [("2024", "int"), ("1e3", "float"), ("true", "bool")])
def test_a_number_or_boolean_where_a_name_goes_asks_for_quotes(bare, kind):
    text = tiny_recipe("  - kind: prune\n    method: wanda\n    params:\n      sparsity: 0.5\n"
                       f"      calibration_split: {bare}\n")
    with pytest.raises(RecipeError, match=f"valid string, got .*YAML reads it as a {kind}: quote it") as info:
        load_recipe("q.yaml", text=text)
    assert (info.value.field, info.value.line) == ("stages.0.params.calibration_split", _line_of(text, "_split"))
    quoted = load_recipe("q.yaml", text=text.replace(f"split: {bare}", f"split: '{bare}'").replace(
        "    calibration:", f"    '{bare}':"))
    assert quoted.stages[0].params.calibration_split == bare


def test_a_sweep_point_the_model_cannot_take_is_named_and_stops_the_sweep_first(monkeypatch, capsys, workdir, loads):
    text = CASE12.replace("intermediate_size: 250", "intermediate_size: 64") + (
        "sweep:\n  grid:\n    model.params.intermediate_size: [64, 250]\n")
    path = write(workdir / "sweep.yaml", text)
    for command in ("validate", "run"):
        code, out, err = _cli(monkeypatch, capsys, command, path)
        assert code == 2, (command, err)
        where = rf"error: {re.escape(str(path))}:\d+: stages\.0\.params\.pattern: "
        assert re.fullmatch(where + r"run 't-intermediate_size250': stage 'wanda' \(prune/wanda\): pattern 2:4: "
                                    r".* not a multiple of 4; .*\n", err), err
    assert loads == [] and Registry(f"sqlite:///{workdir}/registry.db").find_sweeps() == []


@pytest.mark.parametrize("arch", ["gpt2", "opt", "bert", "llama", "mixtral"])
def test_sequences_longer_than_learned_positions_are_refused(arch):
    model = {"arch": arch, "max_positions": 64}
    stage = "  - kind: prune\n    method: magnitude\n    params: {sparsity: 0.5}\n"
    if arch == "mixtral":  # a native MoE: the stage that applies to it
        stage = "  - kind: moeify\n    method: reap\n    params: {experts_keep: 0.5}\n"
    check_model(load_recipe("64.yaml", text=tiny_recipe(stage, model=model, seq_len=64)))
    longer = tiny_recipe(stage, model=model, seq_len=65)
    if arch in ("llama", "mixtral"):  # rotary positions: no table to run past
        check_model(load_recipe("65.yaml", text=longer))
        return
    with pytest.raises(RecipeError, match="sequences of 65 tokens, but the model has learned positions for 64") as e:
        check_model(load_recipe("65.yaml", text=longer))
    assert (e.value.field, e.value.line) == ("data.seq_len", _line_of(longer, "seq_len: 65"))
    split = tiny_recipe(stage, model=model, splits={**TINY_SPLITS, "eval": {"samples": 2, "seq_len": 80}})
    with pytest.raises(RecipeError, match="split 'eval' has sequences of 80 tokens") as e:
        check_model(load_recipe("80.yaml", text=split))
    assert (e.value.field, e.value.line) == ("data.splits.eval.seq_len", _line_of(split, "seq_len: 80"))
