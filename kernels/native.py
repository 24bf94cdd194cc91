"""Build-on-first-use C++ kernels, loaded through ctypes.

The C++ sources in ``csrc/`` have a plain C ABI and no Python or torch
headers, so they compile in about a second with the system's ``g++`` (or
``$CXX``) and need neither ninja nor a Python dev package. The shared library
is cached under ``$SPARSIFY_CACHE`` (default ``~/.cache/sparsify``), keyed by
the source, the flags and the CPU's instruction sets, so a machine builds it
once. OpenMP is used when the compiler has it: the library then links
``libgomp.so.1``, which the dynamic loader resolves to the copy torch has
already loaded, so both share one thread pool. Where no compiler works, the
kernels are reported unavailable (one warning) and callers use their torch
paths.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from functools import lru_cache
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
_lock = threading.Lock()


def cache_dir() -> Path:
    """Where compiled kernels are cached: ``$SPARSIFY_CACHE/kernels`` or ``~/.cache/sparsify/kernels``."""
    root = os.environ.get("SPARSIFY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparsify")
    return Path(root) / "kernels"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def isa() -> str:
    """The widest vector ISA the kernels use here: ``avx512``, ``avx2`` or ``generic``."""
    f = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl"} <= f:
        return "avx512"
    if {"avx2", "fma"} <= f:
        return "avx2"
    return "generic"


def _flag_sets() -> list[list[str]]:
    base = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
    arch = {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
            "avx2": ["-mavx2", "-mfma", "-mf16c"], "generic": []}[isa()]
    if platform.machine() not in ("x86_64", "AMD64"):
        arch = ["-mcpu=native"] if platform.machine() in ("aarch64", "arm64") else []
    # Most capable first; each later set drops something a compiler may lack.
    return [base + arch + ["-fopenmp"], base + arch, base]


def _compile(src: Path, out: Path, flags: list[str]) -> str | None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        return "no C++ compiler found (set CXX, or install g++)"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, str(src), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return (proc.stderr.strip().splitlines() or ["compiler failed"])[-1]
        os.replace(tmp, out)  # atomic: concurrent builders never see a half-written library
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_failures: dict[str, str] = {}


def load(name: str) -> ctypes.CDLL | None:
    """The compiled library ``csrc/<name>.cpp``, building it if needed; ``None`` (and one warning) if it cannot.

    ``SPARSIFY_NO_NATIVE=1`` disables native kernels (the torch paths are used).
    """
    if os.environ.get("SPARSIFY_NO_NATIVE") == "1":
        return None
    return _load(name)


@lru_cache(maxsize=None)
def _load(name: str) -> ctypes.CDLL | None:
    import torch  # noqa: F401  - loads torch's libgomp first, so the library shares it

    src = CSRC / f"{name}.cpp"
    # The key covers every header too, so editing one rebuilds its users.
    text = src.read_bytes() + b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))
    errors = []
    with _lock:
        for flags in _flag_sets():
            key = hashlib.sha256(text + " ".join(flags).encode() + platform.machine().encode()).hexdigest()[:16]
            out = cache_dir() / f"{name}-{key}.so"
            if not out.exists():
                err = _compile(src, out, flags)
                if err is not None:
                    errors.append(f"{' '.join(flags[5:]) or 'plain'}: {err}")
                    continue
            try:
                return ctypes.CDLL(str(out))
            except OSError as exc:
                errors.append(str(exc))
    _failures[name] = "; ".join(errors)
    warnings.warn(f"sparsify: could not build the native CPU kernels {name!r} ({_failures[name]}); "
                  "using the slower torch paths", RuntimeWarning, stacklevel=3)
    return None


def failure(name: str) -> str | None:
    """Why ``load(name)`` returned ``None`` (for diagnostics), if it did."""
    return _failures.get(name)
