"""Shared fixtures: every test runs in its own folder with its own registry."""
from __future__ import annotations

import pytest

@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory with its own registry and runs folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPARSIFY_REGISTRY", f"sqlite:///{tmp_path}/registry.db")
    monkeypatch.setenv("SPARSIFY_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path


