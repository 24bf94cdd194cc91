"""The tree shows the architecture: each built-in method lives in its kind's folder, tests mirror plugins/."""
from __future__ import annotations

from pathlib import Path

from sparsify_core.plugin_manager import catalog

REPO = Path(__file__).resolve().parents[2]
#: Kinds whose folder is not named after the kind itself (the README's "Repository layout" says why).
FOLDER = {"substitute_activation": "activation", "layout_convert": "layouts"}


def _families() -> list[str]:
    return sorted(p.name for p in (REPO / "plugins").iterdir() if (p / "__init__.py").exists())


def test_each_built_in_method_lives_in_its_kinds_folder():
    built_in = {key: cls for key, cls in catalog().methods.items() if cls.__module__.startswith("sparsify_plugins.")}
    assert len(built_in) >= 20  # the walk sees the built-in methods at all
    misplaced = {f"{kind}/{name}": cls.__module__ for (kind, name), cls in built_in.items()
                 if cls.__module__.split(".")[1] != FOLDER.get(kind, kind)}
    assert misplaced == {}, "move each to plugins/<its kind>/"


def test_every_method_kind_folder_exists():
    kinds = {kind for (kind, _), cls in catalog().methods.items() if cls.__module__.startswith("sparsify_plugins.")}
    assert {FOLDER.get(k, k) for k in kinds} <= set(_families())


def test_tests_mirror_the_plugin_families():
    tests = REPO / "tests" / "plugins"
    assert sorted(p.name for p in tests.glob("test_*.py")) == ["test_tree.py"], \
        "plugin tests go into tests/plugins/<family>/"
    for family in _families():
        assert list((tests / family).glob("test_*.py")), f"tests/plugins/{family}/ has no tests"
    stale = sorted(p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))
                   and p.name not in _families())
    assert stale == [], "tests/plugins/ folders for families that no longer exist"
