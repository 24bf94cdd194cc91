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


def _readme_block(heading: str, lang: str) -> str:
    """The first ``lang`` code block after ``heading`` in the README, as written there."""
    text = (REPO / "README.md").read_text()
    return text.split(heading, 1)[1].split(f"```{lang}\n", 1)[1].split("```", 1)[0]


def test_readme_score_pruner_example_is_a_short_working_plugin(workdir, one_thread):
    """The README's SNIP block, run as a plugin in a recipe on the tiny model: under 25 lines, exact
    sparsity, and masks of its own (not magnitude's)."""
    import types

    import torch
    from helpers import tiny_recipe, write

    from sparsify_core import load_output
    from sparsify_core.plugin_manager import register, unregister
    from sparsify_core.recipe import load_recipe
    from sparsify_core.registry import Registry
    from sparsify_core.runner import Runner
    from sparsify_plugins.prune.masks import prune_count

    code = _readme_block("### A pruning criterion in a few lines", "python")
    assert len([line for line in code.splitlines() if line.strip()]) < 25
    plugin = types.ModuleType("readme_snip")
    exec(compile(code, "README.md (SNIP block)", "exec"), plugin.__dict__)
    register(plugin, name="readme-snip")
    registry = Registry(f"sqlite:///{workdir}/registry.db")
    masks, runs = {}, {}
    try:
        for method in ("snip", "magnitude"):
            text = tiny_recipe("  - {kind: prune, method: %s, params: {sparsity: 0.5}}\n" % method, seq_len=16,
                               evaluate={"after": "none"}, output={"dir": method, "save": True})
            run_id = Runner(load_recipe(write(workdir / f"{method}.yaml", text)), registry,
                            runs_dir=workdir / "runs").run()
            masks[method], runs[method] = load_output(workdir / method).masks, registry.get_run(run_id)
    finally:
        unregister(plugin)
    snip, magnitude = dict(masks["snip"].items()), dict(masks["magnitude"].items())
    assert len(snip) == 14 and snip.keys() == magnitude.keys()  # the same targets: the template's
    for name, keep in snip.items():
        assert int((~keep).sum()) == prune_count(keep.numel(), 0.5), name  # exactly half of every matrix
    assert {m.name: m.value for m in runs["snip"].metrics if m.step is None}["sparsity"] == 0.5
    differ = sum(int((keep != magnitude[name]).sum()) for name, keep in snip.items())
    assert differ > 0.05 * sum(keep.numel() for keep in snip.values())  # its own criterion, not |w|
    assert all(not torch.equal(keep, magnitude[name]) for name, keep in snip.items())
