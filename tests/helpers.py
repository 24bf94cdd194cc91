"""Helpers shared by tests (importable as ``helpers``: tests/ is on pytest's pythonpath)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def sparsify(*args, cwd=None, env=None, timeout=600, check=False):
    """Run the ``sparsify`` CLI in a subprocess, as a user would."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("COLUMNS", "200")
    proc = subprocess.run([sys.executable, "-m", "sparsify_core.cli", *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"sparsify {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stderr}")
    return proc


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_RECIPE = """\
name: t
seed: 0
model:
  source: tiny
  params: {arch: llama, hidden_size: 32, intermediate_size: 64, layers: 2, heads: 4}
data:
  source: pydoc
  seq_len: 32
  splits:
    calibration: {samples: 4}
    train: {samples: 8, offset: 4}
    eval: {samples: 4}
stages:
  - kind: substitute_activation
    method: relu
  - kind: prune
    method: magnitude
    params: {sparsity: 0.5}
evaluate:
  after: all
"""


FIXTURE_PLUGINS = Path(__file__).resolve().parent / "fixture_plugins"


def plugin_env(tmp_path: Path) -> dict:
    """Environment that makes ``tests/fixture_plugins`` an installed plugin for subprocesses.

    A minimal ``.dist-info`` folder with an entry point, on PYTHONPATH: the
    same discovery path a pip-installed plugin takes.
    """
    site = tmp_path / "site"
    info = site / "sparsify_test_stages-0.0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sparsify-test-stages\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text("[sparsify.plugins]\ntest-stages = sparsify_test_stages\n")
    path = os.pathsep.join([str(site), str(FIXTURE_PLUGINS), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path}
