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


#: The folders whose every sub-folder the README's "Repository layout" lists, one line each.
LISTED_TREES = ("sparsify_core", "plugins", "kernels")


def _layout_entries() -> set[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("## Repository layout", 1)[1].split("```", 2)[1]
    return {line.split()[0].rstrip("/") for line in block.splitlines() if line.strip()}


def test_readme_lists_every_package_folder():
    """Read from the tree: a folder added or renamed under sparsify_core/, plugins/ or kernels/ must be listed."""
    folders = set(LISTED_TREES)
    for root in LISTED_TREES:
        for path in (REPO / root).rglob("*"):
            rel = path.relative_to(REPO)
            if path.is_dir() and not any(part.startswith((".", "__")) or part.endswith(".egg-info")
                                         for part in rel.parts):  # caches and build leftovers
                folders.add(rel.as_posix())
    listed = _layout_entries()
    assert sorted(folders - listed) == [], "add a line for each to README.md's Repository layout"
    stale = {e for e in listed if e.split("/")[0] in LISTED_TREES and not (REPO / e).is_dir()}
    assert sorted(stale) == [], "README.md's Repository layout lists folders that no longer exist"
    assert {"plugins/prune", "kernels/csrc"} <= listed  # the check reads the block it means to
