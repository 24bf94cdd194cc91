"""The gmp and scaling-sweep recipes: valid as shipped, and sized as their comments say."""
from __future__ import annotations

from helpers import RECIPES, sparsify_here

from sparsify_core.recipe import load_recipe, load_sweep


def test_gmp_recipe_validates(tmp_path):
    proc = sparsify_here("validate", RECIPES / "gmp.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "gmp (prune/gmp)" in proc.stdout and "finetune" not in proc.stdout
    loaded = load_recipe(RECIPES / "gmp.yaml")
    magnitude = load_recipe(RECIPES / "magnitude-50.yaml")  # compared side by side: same model and eval split
    assert loaded.recipe.model == magnitude.recipe.model
    assert loaded.recipe.data.splits["eval"] == magnitude.recipe.data.splits["eval"]
    assert loaded.recipe.data.seq_len == magnitude.recipe.data.seq_len
    assert loaded.stages[0].params.sparsity == 0.5


def test_scaling_sweep_validates_and_can_fit_seven_coefficients(tmp_path):
    proc = sparsify_here("validate", RECIPES / "scaling-sweep.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "sweep scaling-sweep of 36 runs" in proc.stdout
    plan = load_sweep(RECIPES / "scaling-sweep.yaml")
    recipes = [p.loaded for p in plan.points]
    sizes = {r.recipe.model.params["hidden_size"] for r in recipes}
    sparsities = {r.stages[0].params.sparsity for r in recipes}
    steps = {r.stages[0].params.train.steps for r in recipes}
    assert len(sizes) >= 3 and len(sparsities) >= 3 and 0.0 in sparsities and len(steps) >= 3
    assert len(recipes) >= 7 and len({r.recipe.name for r in recipes}) == len(recipes)
    for r in recipes:  # from scratch, on pydoc, trained by gmp, and no data seen twice
        assert r.recipe.model.source == "tiny" and r.recipe.data.source == "pydoc"
        assert [(s.kind, s.method) for s in r.recipe.stages] == [("prune", "gmp")]
        train = r.stages[0].params.train
        assert train.steps * train.batch_size <= r.recipe.data.splits["train"].samples


def test_every_recipe_validates_against_its_model_config():
    """What `sparsify validate` checks, in-process: params, data splits, and the model's skeleton (no weights)."""
    from sparsify_core.recipe import check_model

    recipes = sorted(RECIPES.glob("*.yaml"))
    assert any(r.name == "quickstart.yaml" for r in recipes)
    for path in recipes:
        plan = load_sweep(path)
        for loaded in [p.loaded for p in plan.points] if plan else [load_recipe(path)]:
            check_model(loaded)


def test_maskllm_recipe_validates_and_compares_with_the_one_shot_2of4_recipes(tmp_path):
    proc = sparsify_here("validate", RECIPES / "maskllm.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    loaded = load_recipe(RECIPES / "maskllm.yaml")
    for other in ("wanda-2of4.yaml", "sparsegpt-50.yaml"):  # side by side: same model, eval split, calibration
        one_shot = load_recipe(RECIPES / other)
        assert loaded.recipe.model == one_shot.recipe.model
        assert loaded.recipe.data.splits["eval"] == one_shot.recipe.data.splits["eval"]
        assert loaded.recipe.data.splits["calibration"] == one_shot.recipe.data.splits["calibration"]
        assert loaded.recipe.data.seq_len == one_shot.recipe.data.seq_len
    params = loaded.stages[0].params
    assert params.pattern == "2:4" and params.prior in ("sparsegpt", "wanda")
    train, split = params.train, loaded.recipe.data.splits["train"]
    assert train.steps * train.batch_size <= split.samples  # one pass, no sequence seen twice
    assert split.offset * split.seq_len >= loaded.recipe.data.splits["calibration"].samples * loaded.recipe.data.seq_len
