"""Build-on-first-use C++ kernels, loaded through ctypes.

The C++ sources in ``csrc/`` have a plain C ABI and no Python or torch
headers, so they compile in a few seconds with the system's ``g++`` (or
``$CXX``, or ``c++``/``clang++``) and need neither ninja nor a Python dev
package. They are built into one shared library, cached under
``$SPARSIFY_CACHE`` (default ``~/.cache/sparsify``) and keyed by the sources,
the flags and the machine, so a machine builds it once. The vector width is
chosen from the CPU's flags (AVX-512, else AVX2+FMA, else portable C++).
Threads come from the library's own pool (``csrc/pool.h``), not OpenMP.
Where no compiler works, ``library()`` returns ``None`` after one warning and
callers use their torch paths.
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
    base = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-pthread"]
    arch = {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
            "avx2": ["-mavx2", "-mfma", "-mf16c"], "generic": []}[isa()]
    if platform.machine() not in ("x86_64", "AMD64"):
        arch = ["-mcpu=native"] if platform.machine() in ("aarch64", "arm64") else []
    # Most capable first; the portable set is the last resort.
    return [base + arch, base]


def _compile(srcs: list[Path], out: Path, flags: list[str]) -> str | None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        return "no C++ compiler found (set CXX, or install g++)"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, *map(str, srcs), "-o", tmp], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return (proc.stderr.strip().splitlines() or ["compiler failed"])[-1]
        os.replace(tmp, out)  # atomic: concurrent builders never see a half-written library
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_failure: list[str] = []


def library() -> ctypes.CDLL | None:
    """The compiled kernels (every ``csrc/*.cpp``), building them if needed; ``None`` (one warning) if impossible.

    ``SPARSIFY_NO_NATIVE=1`` disables them (the torch paths are used).
    """
    if os.environ.get("SPARSIFY_NO_NATIVE") == "1":
        return None
    return _library()


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    srcs = sorted(CSRC.glob("*.cpp"))
    # The key covers every source and header, so editing one rebuilds.
    text = b"".join(p.read_bytes() for p in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h")))
    errors = []
    with _lock:
        for flags in _flag_sets():
            key = hashlib.sha256(text + " ".join(flags).encode() + platform.machine().encode()).hexdigest()[:16]
            out = cache_dir() / f"sparsify_cpu-{key}.so"
            if not out.exists():
                err = _compile(srcs, out, flags)
                if err is not None:
                    errors.append(f"{' '.join(flags[6:]) or 'portable'}: {err}")
                    continue
            try:
                return ctypes.CDLL(str(out))
            except OSError as exc:
                errors.append(str(exc))
    _failure[:] = ["; ".join(errors)]
    warnings.warn(f"sparsify: could not build the native CPU kernels ({_failure[0]}); "
                  "using the slower torch paths", RuntimeWarning, stacklevel=3)
    return None


def failure() -> str | None:
    """Why ``library()`` returned ``None`` (for diagnostics), if it did."""
    return _failure[0] if _failure else None


def threads() -> int:
    """Threads the kernels use: torch's setting (``torch.set_num_threads``)."""
    return max(1, _torch().get_num_threads())


@lru_cache(maxsize=1)
def _torch():
    import torch
    return torch
