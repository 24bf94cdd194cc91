"""The README's first lines are the commands users and CI run: keep them in step."""
from __future__ import annotations

from helpers import REPO


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text().splitlines()
    start = text.index("```bash")
    return text[start + 1:start + 3]


def test_ci_runs_the_readme_test_command():
    run_cmd, test_cmd = _readme_commands()
    assert "sparsify run recipes/prosparse.yaml" in run_cmd
    assert "pytest" in test_cmd
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci_lines


def test_readme_recipe_example_is_valid(tmp_path):
    from sparsify_core.recipe import load_recipe

    text = (REPO / "README.md").read_text()
    block = text.split("## A recipe", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    (tmp_path / "r.yaml").write_text(block)
    assert load_recipe(tmp_path / "r.yaml").recipe.stage_names() == ["relu", "prune50"]
