"""The lm_eval metric (optional extra sparsify[eval]) and the shipped offline task sparsify_pydoc_next."""
from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import write
from sparsify_core import RunContext, TokenSplit
from sparsify_core.errors import RecipeError
from sparsify_core.plugin_manager import catalog
from sparsify_core.recipe import load_recipe
from sparsify_plugins.metrics import downstream
from sparsify_plugins.metrics.downstream import SHIPPED_TASK, TASKS_DIR, LMEval, lm_eval_available

needs_lm_eval = pytest.mark.skipif(not lm_eval_available(), reason="lm-eval is not installed (pip install "
                                                                     "'sparsify[eval]')")


def test_shipped_task_is_built_from_the_eval_partition_only():
    """Every context and choice is text of the pydoc eval partition, none of train; 4 choices, labels in range."""
    from sparsify_plugins.sources.data import PyDoc

    texts = PyDoc().texts(PyDoc.Params())
    flat = {part: " ".join(" ".join(t.split()) for t in texts[part]) for part in ("train", "eval")}
    items = [json.loads(line) for line in (TASKS_DIR / "pydoc_next.jsonl").read_text().splitlines()]
    assert len(items) >= 50
    for item in items:
        assert len(item["choices"]) == 4 and 0 <= item["label"] < 4
        for text in (item["context"], *item["choices"]):
            text = " ".join(text.split())
            assert text in flat["eval"] and text not in flat["train"], text


def test_generator_is_deterministic_and_reproduces_the_shipped_file():
    """The script rebuilds the shipped items exactly (same Python's pydoc_data)."""
    from pydoc_data.topics import topics

    from sparsify_plugins.metrics.lm_eval_tasks import make_pydoc_next as gen
    from sparsify_plugins.sources.data import split_by_group

    _, names = split_by_group(topics, 0.1, 0)
    items = gen.build({n: topics[n] for n in names})
    shipped = [json.loads(line) for line in gen.OUT.read_text().splitlines()]
    assert items == gen.build({n: topics[n] for n in names})
    assert items == shipped


def _ctx(tmp_path, model, tokenizer) -> RunContext:
    data = {"eval": TokenSplit("eval", torch.zeros(1, 4, dtype=torch.long))}
    return RunContext(run_id="t", model=model, tokenizer=tokenizer, task="causal_lm", data=data,
                      device=torch.device("cpu"), dtype=torch.float32, seed=0, workdir=tmp_path)


@needs_lm_eval
def test_shipped_task_on_tiny_model_equals_after_layout_conversion(tmp_path, one_thread):
    """Accuracy and stderr of the shipped task: recorded per task, and the same after a CSR conversion."""
    from sparsify_plugins.sources.models import Tiny

    loaded = Tiny().load(Tiny.Params(hidden_size=32, intermediate_size=64), device=torch.device("cpu"),
                         dtype=torch.float32)
    ctx = _ctx(tmp_path, loaded.model, loaded.tokenizer)
    cat = catalog()
    prune = cat.methods[("prune", "nmg")]()
    prune.apply(ctx, prune.Params(n=2, m=4, g=2))
    ctx.masks.apply(ctx.model)
    metric = LMEval(LMEval.Params(limit=12, batch_size=4))
    assert metric.applies_to(ctx)
    before = {v.name: v.value for v in metric.finish(ctx)}
    assert set(before) == {f"lm_eval/{SHIPPED_TASK}/{m}" for m in ("acc", "acc_stderr", "acc_norm",
                                                                     "acc_norm_stderr")}
    acc = before[f"lm_eval/{SHIPPED_TASK}/acc"]
    assert 0 <= acc <= 1 and acc * 12 == pytest.approx(round(acc * 12))  # a share of 12 documents
    assert metric.info_of(f"lm_eval/{SHIPPED_TASK}/acc").higher_is_better is True
    assert metric.info_of(f"lm_eval/{SHIPPED_TASK}/acc").fraction
    assert metric.info_of(f"lm_eval/{SHIPPED_TASK}/acc_stderr").higher_is_better is None

    convert = cat.methods[("layout_convert", "csr")]()
    convert.apply(ctx, convert.Params())
    assert any(type(m).__name__ == "SparseLinear" for m in ctx.model.modules())
    after = {v.name: v.value for v in LMEval(LMEval.Params(limit=12, batch_size=4)).finish(ctx)}
    assert after == pytest.approx(before)


def _recipe(tmp_path, metric_yaml: str):
    return write(tmp_path / "r.yaml", f"""\
name: t
model: {{source: tiny}}
data: {{splits: {{eval: {{samples: 2}}}}}}
evaluate:
  metrics:
    - perplexity
{metric_yaml}
""")


@needs_lm_eval
def test_recipe_refuses_a_task_whose_dataset_is_not_cached_in_one_line(tmp_path):
    """A local task whose dataset lives on the Hub: refused offline when the recipe loads, never downloaded.

    (An unknown task name is refused the same way, but finding that out indexes lm-eval's whole registry,
    about a minute on a shared CI core: ``test_task_manager_names_unknown_tasks`` covers it without that.)"""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write(tasks / "hub.yaml", "task: hub_task\ndataset_path: sparsify-no-such-user/no-such-dataset\n"
          "output_type: multiple_choice\ntest_split: test\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe(tmp_path, f"    - lm_eval: {{tasks: [hub_task], include_path: [{tasks}]}}"))
    msg = str(err.value)
    assert "evaluate.metrics.1.lm_eval" in msg and "r.yaml:7:" in msg, msg
    assert "hub_task" in msg and "offline" in msg and "\n" not in msg


@needs_lm_eval
def test_task_manager_names_unknown_tasks(monkeypatch):
    class Manager:  # lm-eval's TaskManager, without indexing its registry
        def __init__(self, include_path=None, include_defaults=True):
            self.all_tasks = ["sparsify_pydoc_next"]

    import lm_eval.tasks
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Manager)
    with pytest.raises(ValueError, match="unknown lm-eval task no_such_task"):
        downstream.task_manager(["sparsify_pydoc_next", "no_such_task"], [])


def test_recipe_without_lm_eval_installed_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(downstream, "lm_eval_available", lambda: False)
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe(tmp_path, "    - lm_eval: {limit: 4}"))
    assert "pip install 'sparsify[eval]'" in str(err.value) and "evaluate.metrics.1" in str(err.value)


def test_lm_eval_is_not_part_of_all_and_bad_params_name_the_field(tmp_path):
    from sparsify_core.runner import Runner

    loaded = load_recipe(write(tmp_path / "a.yaml", "name: t\nmodel: {source: tiny}\n"))
    assert "lm_eval" not in {m.name for m in Runner(loaded, None)._metrics()}
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe(tmp_path, "    - lm_eval: {batch_size: 0}"))
    assert "evaluate.metrics.1.lm_eval.batch_size" in str(err.value)
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe(tmp_path, "    - lm_eval: {tasks: [a]}\n      perplexity: {}"))
    assert "evaluate.metrics.1" in str(err.value) and "one {name: {params}}" in str(err.value)


def test_values_from_lm_eval_results_skip_text_and_na():
    """Names lm_eval/<task>/<metric>[@filter]; N/A stderr, aliases and sample counts are not recorded."""
    m = LMEval()
    values = m._values({"results": {"boolq": {"alias": "boolq", "acc,none": 0.5, "acc_stderr,none": "N/A",
                                              "exact_match,strict": 0.25, "sample_len": 10}},
                        "higher_is_better": {"boolq": {"acc": True, "exact_match": True}}})
    assert [(v.name, v.value) for v in values] == [("lm_eval/boolq/acc", 0.5),
                                                   ("lm_eval/boolq/exact_match@strict", 0.25)]
    assert not math.isnan(values[0].value)


@needs_lm_eval
def test_run_records_task_accuracy_and_show_compare_list_it(workdir, one_thread):
    """End to end: a recipe asks for lm_eval; the run records it with its info; show and compare print it."""
    from helpers import sparsify_here, tiny_recipe
    from sparsify_core.registry import Registry, final_evaluation, metric_info_for
    from sparsify_core.runner import Runner

    text = tiny_recipe("""\
  - kind: prune
    method: magnitude
    params: {sparsity: 0.5}
""", splits={"eval": {"samples": 2}}, output={"save": False},
        evaluate={"metrics": ["perplexity", "bytes_per_token", {"lm_eval": {"limit": 8, "batch_size": 8}}],
                  "after": "last"})
    with Registry(f"sqlite:///{workdir}/registry.db") as reg:
        run_id = Runner(load_recipe(write(workdir / "r.yaml", text)), reg, runs_dir=workdir / "runs").run()
        rec = reg.get_run(run_id)
        acc = f"lm_eval/{SHIPPED_TASK}/acc"
        final = final_evaluation(rec).values
        assert 0 <= final[acc] <= 1 and final["bytes_per_token"] < final["bytes_per_token_dense"]
        info = metric_info_for([rec], acc)
        assert info.higher_is_better is True and info.fraction
    for cmd in (("show", run_id), ("compare", run_id)):
        proc = sparsify_here(*cmd, cwd=workdir)
        assert proc.returncode == 0 and acc in proc.stdout and "bytes_per_token" in proc.stdout, proc.stdout
