"""The CPU's vector ISA and the one dense torch runs, for ``sparsify bench --isa``, and how a machine's
thread count reads in its descriptions.

No torch import here: ``--isa`` must set the environment before torch loads.
"""
from __future__ import annotations

from pathlib import Path

#: What ``sparsify bench --isa NAME`` sets before torch loads, so the *dense* side runs the instruction set
#: a machine of that kind has, not only our kernels: ATen's own kernels (``ATEN_CPU_CAPABILITY``), MKL's
#: GEMM (``MKL_ENABLE_INSTRUCTIONS``) and oneDNN (``ONEDNN_MAX_CPU_ISA``). Without them an AVX2 build of
#: our kernels would be timed against AVX-512 GEMMs, which no AVX2 user has (measured on a Xeon: 1024 tokens
#: x 768->3072 take 21 ms with AVX-512 MKL and 38 ms with AVX2). ``avx512`` restricts nothing.
DENSE_ISA_ENV = {
    "avx512": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "portable": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                 "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
#: every variable some ``DENSE_ISA_ENV`` entry sets
DENSE_ENV_NAMES = tuple(sorted({k for v in DENSE_ISA_ENV.values() for k in v}))
#: torch.backends.cpu.get_cpu_capability() once ``DENSE_ISA_ENV[name]`` took effect
DENSE_CAPABILITY = {"avx2": "AVX2", "portable": "DEFAULT"}


def cpu_info() -> tuple[str | None, frozenset[str]]:
    """The CPU model name and its feature flags, from Linux ``/proc/cpuinfo`` (``None``/empty elsewhere)."""
    model, flags = None, frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model is None:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def widest_isa(flags) -> str:
    """The widest vector ISA of ``flags``: ``avx512``, ``avx2``, ``neon`` or ``generic``."""
    if {"avx512f", "avx512bw", "avx512vl"} <= set(flags):
        return "avx512"
    if {"avx2", "fma"} <= set(flags):
        return "avx2"
    if "asimd" in flags:
        return "neon"
    return "generic"


def cpu_isa() -> str:
    """This CPU's widest vector ISA (``widest_isa`` of its flags)."""
    return widest_isa(cpu_info()[1])


def runnable(name: str, flags=None) -> bool:
    """Whether this CPU (or one with ``flags``) runs ``--isa name``: ``portable`` anywhere, ``avx2`` where the
    widest ISA is avx2 or avx512, ``avx512`` only there. Raises ``KeyError`` for other names."""
    order = {"portable": 0, "avx2": 1, "avx512": 2}
    widest = cpu_isa() if flags is None else widest_isa(flags)
    return order[name] <= order.get(widest, 0)


def threads_text(n) -> str:
    """``"1 thread"``, ``"2 threads"``: a thread count as the bench table, ``--compare`` and ``sparsify runs`` show it."""
    return f"{n} thread{'' if n == 1 else 's'}"
