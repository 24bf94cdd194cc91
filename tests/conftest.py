"""Shared fixtures: every test runs in its own folder with its own registry."""
from __future__ import annotations

import os

import pytest

# Without a GPU, the Triton kernels are tested under Triton's interpreter. The switch must be
# on before triton is first imported, and loading a transformers model imports it: set it here.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory with its own registry and runs folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPARSIFY_REGISTRY", f"sqlite:///{tmp_path}/registry.db")
    monkeypatch.setenv("SPARSIFY_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path




@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread (two threads on a shared 2-core machine mostly wait on each other)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def example_plugin_module():
    """The example plugin (tests/example_plugin) registered in this process, as if pip-installed.

    Imported from its source folder; registered only if its entry point has not
    registered it already (it may be installed), and unregistered afterwards.
    """
    from helpers import import_example_plugin

    from sparsify_core.plugin_manager import plugin_manager, register, unregister

    module = import_example_plugin()
    pm = plugin_manager()[0]
    ours = not pm.is_registered(module)
    if ours:
        register(module, name="example", distribution="sparsify-example-plugin (in-process)")
    yield module
    if ours:
        unregister(module)
