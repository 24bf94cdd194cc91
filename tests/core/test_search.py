"""sparsify search: budget parsing, and a bisection over real tiny runs that reuses the stages before the varied one."""
from __future__ import annotations

import math

import pytest

from helpers import sparsify_here, tiny_recipe, write
from sparsify_core.errors import RecipeError, SparsifyError
from sparsify_core.registry import Registry
from sparsify_core.search import Budget, parse_budget, search

RECIPE = tiny_recipe("""\
  - kind: substitute_activation
    method: relu
  - kind: prune
    method: magnitude
    params: {sparsity: 0.5}
""", splits={"eval": {"samples": 2}}, evaluate={"metrics": ["weight_sparsity"], "after": "last"},
    output={"save": False})


def test_parse_budget():
    assert parse_budget("kl_divergence<=0.1") == Budget("kl_divergence", "<=", 0.1)
    assert parse_budget("perplexity <= 1.05*dense") == Budget("perplexity", "<=", 1.05, relative=True)
    assert parse_budget("lm_eval/sparsify_pydoc_next/acc>=dense*0.95") == Budget(
        "lm_eval/sparsify_pydoc_next/acc", ">=", 0.95, relative=True)
    b = parse_budget("perplexity<=1.05*dense")
    assert b.met(20.9, dense=20.0) and not b.met(21.1, dense=20.0) and not b.met(math.nan, dense=20.0)
    for bad in ("kl_divergence", "kl<=x", "<=0.1", "kl==0.1", "ppl<=1.05*base"):
        with pytest.raises(SparsifyError, match="--budget"):
            parse_budget(bad)
    with pytest.raises(SparsifyError, match="dense baseline"):
        b.met(20.0, dense=None)


def test_search_bisects_over_real_runs_and_reuses_the_first_stage(workdir, one_thread):
    """weight_sparsity of a magnitude prune is its sparsity: the budget weight_sparsity<=0.35 on [0.1, 0.5] with
    tol 0.1 is found at 0.3 in 4 runs (0.5 over, 0.1 within, 0.3 within, 0.4 over), within max_runs 5."""
    path = write(workdir / "r.yaml", RECIPE)
    with Registry(f"sqlite:///{workdir}/registry.db") as reg:
        out = search(path, "stages.1.params.sparsity", parse_budget("weight_sparsity<=0.35"), reg, lo=0.1, hi=0.5,
                     tol=0.1, max_runs=5, runs_dir=workdir / "runs")
        assert [p.value for p in out.points] == pytest.approx([0.5, 0.1, 0.3, 0.4])
        assert [p.ok for p in out.points] == [False, True, True, False]
        assert out.answer.value == pytest.approx(0.3) and out.above.value == pytest.approx(0.4)
        assert out.answer.metric == pytest.approx(0.3, abs=0.01)
        runs = reg.find_runs(sweep_id=out.sweep_id)
        assert len(runs) == 5 and all(r.status == "finished" for r in runs)  # the first stage's run + 5
        for p in out.points:  # ReLU ran once, in the prefix run; every search run restored it
            stages = reg.get_run(p.run_id).stages
            assert [s.status for s in stages] == ["completed", "completed"] and stages[0].duration_s == 0.0
        assert reg.get_run(out.prefix_run).stages[0].duration_s > 0
    text = out.report()
    assert "answer: stages.1.params.sparsity=0.3" in text and "0.4 (run" in text


def test_search_cli_errors_are_one_line(workdir):
    path = write(workdir / "r.yaml", RECIPE)
    for args, needle in ((["--vary", "stages.1.sparsity"], "expected stages.N.params.NAME"),
                         (["--vary", "stages.5.params.sparsity"], "the recipe has 2 stages"),
                         (["--vary", "stages.1.params.sparsity", "--hi", "2"], "stages.1.params.sparsity"),
                         (["--vary", "stages.1.params.sparsity", "--lo", "0.5", "--hi", "0.5"], "--lo 0.5 must be")):
        budget = ["--budget", "weight_sparsity<=0.3"]
        proc = sparsify_here("search", path, *args, *budget, cwd=workdir)
        assert proc.returncode != 0 and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = sparsify_here("search", path, "--vary", "stages.1.params.sparsity", "--budget", "perplexity<=30",
                         cwd=workdir)
    assert proc.returncode != 0 and "'perplexity' is not among the recipe's evaluate.metrics" in proc.stderr
    proc = sparsify_here("search", path, "--vary", "stages.1.params.sparsity", "--budget", "ws=0.3", cwd=workdir)
    assert proc.returncode != 0 and "--budget 'ws=0.3'" in proc.stderr
