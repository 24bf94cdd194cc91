"""Build-on-first-use C++ kernels, one build per instruction set, loaded through ctypes.

The C++ sources in ``csrc/`` have a plain C ABI and no Python or torch
headers, so they compile in a few seconds with the system's ``g++`` (or
``$CXX``, or ``c++``/``clang++``) and need neither ninja nor a Python dev
package. Each ISA variant (``ISAS``: ``avx512``, ``avx2`` = AVX2+FMA,
``portable`` = plain C++ the compiler vectorises for the baseline target) is
built into its own shared library, cached under ``$SPARSIFY_CACHE`` (default
``~/.cache/sparsify``) and keyed by the sources, the flags and the machine,
so a machine builds each variant once, when first used. ``isa()`` is the
variant in use: the widest the CPU runs (``/proc/cpuinfo`` flags), or the one
``SPARSIFY_ISA=avx512|avx2|portable`` forces (an ``ISAError``, one line,
where the CPU cannot run it). Threads: OpenMP regions on the libgomp torch
already loaded, so kernels and torch ops share one thread team
(``csrc/pool.h``; a compiler without OpenMP gets the kernels' own pool
instead). Where no compiler works, ``library()`` returns ``None`` after one
warning and callers use their torch paths.
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

from sparsify_core.errors import SparsifyError

CSRC = Path(__file__).resolve().parent / "csrc"
ISAS = ("avx512", "avx2", "portable")  #: the kernel variants, widest first
ENV = "SPARSIFY_ISA"
_lock = threading.Lock()
_X86 = platform.machine() in ("x86_64", "AMD64")
# The CPU flags each variant needs (x86); the portable build runs everywhere.
_NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"},
          "avx2": {"avx2", "fma", "f16c"}, "portable": set()}
_ARCH = {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
         "avx2": ["-mavx2", "-mfma", "-mf16c"], "portable": []}


class ISAError(SparsifyError):
    """``SPARSIFY_ISA`` names an unknown instruction set, or one this CPU cannot run."""


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


def supported_isas(flags: frozenset[str] | None = None) -> list[str]:
    """The variants of ``ISAS`` this CPU (or one with ``flags``) can run, widest first; ``portable`` always."""
    if flags is None:
        if not _X86:
            return ["portable"]
        flags = cpu_flags()
    return [name for name in ISAS if _NEEDS[name] <= flags]


def isa() -> str:
    """The kernel variant in use: ``$SPARSIFY_ISA`` if set, else the widest this CPU runs.

    Raises ``ISAError`` (one line) when ``SPARSIFY_ISA`` is not one of
    ``ISAS`` or names an ISA the CPU lacks. Read at every call, so a test (or
    a user) can switch variants inside one process.
    """
    forced = os.environ.get(ENV, "").strip().lower()
    runnable = supported_isas()
    if not forced:
        return runnable[0]
    if forced not in ISAS:
        raise ISAError(f"{ENV}={forced!r}: choose one of {', '.join(ISAS)}")
    if forced not in runnable:
        missing = sorted(_NEEDS[forced] - cpu_flags()) if _X86 else ["an x86-64 CPU"]
        raise ISAError(f"{ENV}={forced}: this CPU cannot run it (lacks {', '.join(missing)}); "
                       f"it runs {', '.join(runnable)}")
    return forced


def flags_for(name: str, openmp: bool = True) -> list[str]:
    """The compiler flags of variant ``name`` (``-shared`` build; ``-mcpu=native`` for portable on ARM).

    ``openmp``: build with ``-fopenmp``, so the kernels share torch's OpenMP
    threads (``csrc/pool.h`` says why); ``build`` retries without it where
    the compiler lacks OpenMP.
    """
    # -ffp-contract=off: a scalar a * b + c is two roundings wherever it appears. GCC's default (fast) fuses it
    # into an FMA where the code's shape allows, so the same source line gave different bits in different
    # kernels (AVX2 dot4's scalar tail vs dot_as_dot4's: a neuron's gate differed in its last bit between
    # kernels that promise the same floats). The vector FMAs are intrinsics, unaffected.
    base = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off", "-pthread"] \
        + (["-fopenmp"] if openmp else [])
    if not _X86:
        return base + (["-mcpu=native"] if platform.machine() in ("aarch64", "arm64") else [])
    return base + _ARCH[name]


def compile_sources(srcs: list[Path], out: Path, flags: list[str]) -> str | None:
    """Compile ``srcs`` with ``flags`` into ``out`` (atomically); ``None``, or the compiler's last error line.

    The compiler is ``$CXX``, else ``g++``, ``c++`` or ``clang++``."""
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


def _source_bytes() -> bytes:
    return b"".join(p.read_bytes() for p in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h")))


@lru_cache(maxsize=1)
def source_key() -> str:
    """12 hex digits identifying the kernels' sources (every ``csrc`` file): measurements of one build
    (``layout: auto``'s table) are not reused after the kernels change."""
    return hashlib.sha256(_source_bytes()).hexdigest()[:12]


def build(name: str) -> tuple[Path | None, str | None]:
    """Compile variant ``name`` into the cache if it is not there; ``(path, None)`` or ``(None, error)``.

    Builds without loading, so any variant the compiler can target builds on
    any x86 machine (an AVX-512 library builds here even where it cannot run).
    """
    if name not in ISAS:
        raise ISAError(f"unknown kernel ISA {name!r}: choose one of {', '.join(ISAS)}")
    srcs = sorted(CSRC.glob("*.cpp"))
    # The key covers every source and header, so editing one rebuilds.
    text = _source_bytes()
    builds = []
    for openmp in (True, False):  # without OpenMP the kernels use their own pool (csrc/pool.h)
        flags = flags_for(name, openmp)
        key = hashlib.sha256(text + " ".join(flags).encode() + platform.machine().encode()).hexdigest()[:16]
        builds.append((cache_dir() / f"sparsify_cpu-{name}-{key}.so", flags))
    err = None
    with _lock:
        for out, _ in builds:  # a cached build of either kind: no compiler run (nor a failing one) again
            if out.exists():
                return out, None
        for out, flags in builds:
            err = compile_sources(srcs, out, flags)
            if err is None:
                return out, None
    return None, err


_failure: list[str] = []
_loaded: dict[str, str] = {}  # requested variant -> the variant actually loaded (a failed build falls back)


def library(name: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernels of variant ``name`` (default ``isa()``), built if needed; ``None`` if impossible.

    A variant that does not build (an old compiler) falls back to
    ``portable`` (``loaded_isa()`` says which one runs); where nothing builds,
    one warning and ``None``. ``SPARSIFY_NO_NATIVE=1`` disables them (the
    torch paths are used). Raises ``ISAError`` as ``isa()`` does, or when
    ``name`` is a variant this CPU cannot run.
    """
    # Every kernel call asks: the answer is cached by what decides it, still read at every call so
    # SPARSIFY_ISA can change in a process. The variables are read from os.environ's own dict (one C-level
    # lookup each): through os.environ.get the key cost 13-16 us right after a weight streamed through the
    # caches (2.7 us this way), a tenth of a one-token 768 x 3072 sparse Linear (measured on a 2-core Xeon).
    env = _ENV_DATA
    if env is not None:
        key = (name, env.get(_NO_NATIVE_KEY), env.get(_ISA_KEY), cpu_flags, _X86)
    else:
        key = (name, os.environ.get("SPARSIFY_NO_NATIVE"), os.environ.get(ENV), cpu_flags, _X86)
    try:
        return _answers[key]
    except KeyError:
        pass
    if key[1] in ("1", b"1"):  # the fast path reads os.environ's encoded bytes
        lib = None
    elif name is None:
        lib = _library(isa())
    elif name not in supported_isas():
        raise ISAError(f"kernel ISA {name!r}: this CPU runs only {', '.join(supported_isas())}")
    else:
        lib = _library(name)
    _answers[key] = lib
    return lib


_answers: dict = {}  # library()'s answers (not its errors) by what decides them
# os.environ's backing dict and its keys' encoding (CPython's os._Environ; None elsewhere: os.environ.get)
_ENV_DATA = getattr(os.environ, "_data", None)
if not isinstance(_ENV_DATA, dict):
    _ENV_DATA = None
_encode = getattr(os.environ, "encodekey", None)
if not callable(_encode):
    _ENV_DATA = None
_NO_NATIVE_KEY, _ISA_KEY = (_encode("SPARSIFY_NO_NATIVE"), _encode(ENV)) if _ENV_DATA is not None else (None, None)


def loaded_isa(name: str | None = None) -> str | None:
    """The variant that computes when ``name`` (default ``isa()``) is asked for; ``None`` without kernels."""
    lib = library(name)
    return None if lib is None else _loaded.get(name or isa())


@lru_cache(maxsize=None)
def _library(name: str) -> ctypes.CDLL | None:
    errors = []
    for variant in dict.fromkeys([name, "portable"]):
        path, err = build(variant)
        if path is None:
            errors.append(f"{variant}: {err}")
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            errors.append(f"{variant}: {exc}")
            continue
        _loaded[name] = variant
        if variant != name:
            warnings.warn(f"sparsify: could not build the {name} kernels ({errors[0]}); using the portable ones",
                          RuntimeWarning, stacklevel=3)
        return lib
    _failure[:] = ["; ".join(errors)]
    warnings.warn(f"sparsify: could not build the native CPU kernels ({_failure[0]}); "
                  "using the slower torch paths", RuntimeWarning, stacklevel=3)
    return None


def failure() -> str | None:
    """Why ``library()`` returned ``None`` (for diagnostics), if it did."""
    return _failure[0] if _failure else None


def threads() -> int:
    """Threads the kernels use: torch's setting (``torch.set_num_threads``)."""
    n = (_num_threads or _bind_num_threads())()
    return n if n > 0 else 1


_num_threads = None  # torch.get_num_threads, bound on first use (no torch import at module import)


def _bind_num_threads():
    global _num_threads
    _num_threads = _torch().get_num_threads
    return _num_threads


@lru_cache(maxsize=1)
def _torch():
    import torch
    return torch
