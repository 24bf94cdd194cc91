"""The ``isa`` fixture: a kernel test runs once per ISA variant this CPU can run (others skipped, saying why)."""
from __future__ import annotations

import pytest

from sparsify_kernels import native


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
