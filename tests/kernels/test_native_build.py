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


def test_kernels_share_torchs_openmp_runtime():
    """Loaded after torch, the kernels' libgomp is torch's own (one thread team, csrc/pool.h says why)."""
    code = r"""
import torch
torch.ones(64, 64) @ torch.ones(64, 64)
before = {l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l}
from sparsify_kernels import native, ffn
assert native.library() is not None
after = {l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l}
# seeded, weights scaled as a layer's are (1/sqrt(fan-in)): unscaled randn gave outputs in the thousands whose
# cancellations near zero missed atol 1e-4 by float rounding alone (1 run in a few hundred)
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 64, generator=g)
wg, wu, wd = (torch.randn(96, 64, generator=g) / 8 for _ in range(3))
torch.set_num_threads(2)
torch.testing.assert_close(ffn.ffn_sparse(x, wg, None, wu, None, wd, None),
                           ffn.ffn_reference(x, wg, None, wu, None, wd, None),
                           atol=1e-4, rtol=1e-4)
print(len(before), len(after), before == after)
"""
    import os
    proc = subprocess.run([sys.executable, "-c", code], env=os.environ, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_before, n_after, same = proc.stdout.split()
    if n_before == "0":
        import pytest
        pytest.skip("this torch build does not use libgomp")
    assert n_after == "1" and same == "True", proc.stdout


def test_compiler_without_openmp_gets_the_own_pool(tmp_path):
    """A compiler that rejects -fopenmp: the kernels build without it (their own thread pool), compute the same,
    and later processes reuse that build without trying the failing compile again."""
    import os
    log = tmp_path / "calls"
    cxx = tmp_path / "cxx"
    cxx.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n"
                   "case \" $* \" in *\" -fopenmp \"*) echo 'unsupported option -fopenmp' >&2; exit 1;; esac\n"
                   "exec g++ \"$@\"\n")
    cxx.chmod(0o755)
    code = r"""
import warnings, torch
warnings.simplefilter("error")
from sparsify_kernels import native, ffn, spmm
assert native.library() is not None
torch.set_num_threads(2)
torch.manual_seed(0)
for T in (1, 3):
    x, wg, wu, wd = torch.randn(T, 64), torch.randn(300, 64) / 8, torch.randn(300, 64) / 8, torch.randn(300, 64) / 8
    torch.testing.assert_close(ffn.ffn_sparse(x, wg, None, wu, None, wd, None),
                               ffn.ffn_reference(x, wg, None, wu, None, wd, None), atol=1e-4, rtol=1e-4)
print("ok")
"""
    env = {**os.environ, "SPARSIFY_CACHE": str(tmp_path / "cache"), "CXX": str(cxx)}
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and "-fopenmp" in calls[0] and "-fopenmp" not in calls[1], calls

