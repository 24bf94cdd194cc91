"""The native kernels build by themselves, and everything still works (densely, warned once) where they cannot."""
from __future__ import annotations

import subprocess
import sys

SNIPPET = r"""
import warnings, torch
warnings.simplefilter("always")
from sparsify_kernels import native, ffn, spmm
with warnings.catch_warnings(record=True) as rec:
    assert native.library() is None and native.library() is None
assert sum("could not build the native CPU kernels" in str(r.message) for r in rec) == 1, [str(r.message) for r in rec]
assert ffn.ffn_sparse(torch.randn(1, 4), torch.randn(6, 4), None, None, None, torch.randn(6, 4), None) is None
from sparsify_plugins.layouts import CSR
from sparsify_plugins.layouts.modules import SparseLinear
w = torch.randn(5, 7) * (torch.rand(5, 7) > 0.5)
lin = SparseLinear(CSR.from_dense(w))
x = torch.randn(3, 7)
with warnings.catch_warnings(record=True) as rec:
    y = lin(x); lin(x)
assert sum("no fast kernel" in str(r.message) for r in rec) == 1
torch.testing.assert_close(y, x @ w.T)
print("ok")
"""


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    env = {"SPARSIFY_CACHE": str(tmp_path), "CXX": "/bin/false", "PATH": "/usr/bin:/bin"}
    import os
    proc = subprocess.run([sys.executable, "-c", SNIPPET], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_builds_into_the_cache(tmp_path):
    import os
    code = ("from sparsify_kernels import native; lib = native.library(); "
            "print(lib is not None, native.cache_dir())")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SPARSIFY_CACHE": str(tmp_path)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    built, where = proc.stdout.split()
    assert built == "True" and list((tmp_path / "kernels").glob("sparsify_cpu-*.so"))
