"""Shared fixtures: every test runs in its own folder with its own registry; ``isa``: a kernel test runs once per
ISA variant this CPU can run (others skipped, saying why)."""
from __future__ import annotations

import os

import pytest

from sparsify_kernels import native

# Without a GPU, the Triton kernels are tested under Triton's interpreter. The switch must be
# on before triton is first imported, and loading a transformers model imports it: set it here.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same numbers on every run (torch's, Python's and NumPy's global generators seeded
    first): a tolerance that a rare draw misses then fails every time, not once in a few hundred runs (an
    unseeded FFN check missed atol 1e-4 by float rounding once). Tests that spawn Python seed there too."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(params=native.ISAS)
def isa(request, monkeypatch):
    """Force the native kernels to one ISA variant (``SPARSIFY_ISA``) for the test; skips what the CPU lacks."""
    name = request.param
    if name not in native.supported_isas():
        pytest.skip(f"this CPU cannot run the {name} kernels (it runs {', '.join(native.supported_isas())})")
    monkeypatch.setenv(native.ENV, name)
    if native.library() is None:
        pytest.skip(f"no C++ compiler: native kernels unavailable ({native.failure()})")
    return name


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory with its own registry and runs folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPARSIFY_REGISTRY", f"sqlite:///{tmp_path}/registry.db")
    monkeypatch.setenv("SPARSIFY_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path


# -- registries on SQLite and on a PostgreSQL server --------------------------------------------

PG_ENV, PG_REQUIRED_ENV = "SPARSIFY_TEST_PG_URL", "SPARSIFY_REQUIRE_PG"


def _pg_unavailable(reason: str):
    """Skip (saying why), or fail where the PostgreSQL tests must run (``.ci/run`` sets SPARSIFY_REQUIRE_PG=1)."""
    if os.environ.get(PG_REQUIRED_ENV) == "1":
        pytest.fail(f"PostgreSQL required ({PG_REQUIRED_ENV}=1) but {reason}")
    pytest.skip(f"PostgreSQL registry tests: {reason} (`.ci/postgres start DIR` starts a server and prints the URL "
                f"to put in {PG_ENV})")


@pytest.fixture
def pg_url():
    """The URL of a fresh, empty database on the server ``$SPARSIFY_TEST_PG_URL`` names, dropped afterwards."""
    base = os.environ.get(PG_ENV)
    if not base:
        _pg_unavailable(f"{PG_ENV} is not set")
    import secrets

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    try:
        import psycopg  # noqa: F401
    except ImportError:
        _pg_unavailable("the psycopg driver is not installed (pip install -e '.[postgres]')")
    admin = create_engine(make_url(base), isolation_level="AUTOCOMMIT")
    name = f"sparsify_test_{secrets.token_hex(6)}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any reason the server cannot be used is reported
        admin.dispose()
        _pg_unavailable(f"cannot create a database on {make_url(base).render_as_string()}: "
                        f"{str(exc).splitlines()[0]}")
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request, tmp_path):
    """A fresh registry URL: a SQLite file, and (second parameter) a database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/r.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def shared_registry_url(request, tmp_path):
    """One fresh registry URL for a heavy multi-process scenario (several `sparsify` interpreters): the test
    PostgreSQL server's when ``$SPARSIFY_TEST_PG_URL`` is set (CI; required with ``SPARSIFY_REQUIRE_PG=1``),
    else a SQLite file. Running it on both costs ~20 s more for no new path: SQLite's cross-process locking
    keeps its own cheaper tests (registry-only worker processes, parametrised with ``registry_url``)."""
    if os.environ.get(PG_ENV) or os.environ.get(PG_REQUIRED_ENV) == "1":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path}/r.db"


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread (two threads on a shared 2-core machine mostly wait on each other)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def test_stages():
    """``tests/fixture_plugins`` (test stage methods: wait_for_file, fail) registered in this process, for runs in
    process; subprocesses get it through ``helpers.plugin_env``."""
    import sys

    from helpers import FIXTURE_PLUGINS

    sys.path.insert(0, str(FIXTURE_PLUGINS))
    import sparsify_test_stages

    from sparsify_core.plugin_manager import plugin_manager, register, unregister

    ours = not plugin_manager()[0].is_registered(sparsify_test_stages)
    if ours:
        register(sparsify_test_stages, name="test-stages", distribution="sparsify-test-stages (in-process)")
    yield
    if ours:
        unregister(sparsify_test_stages)
    sys.path.remove(str(FIXTURE_PLUGINS))


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
