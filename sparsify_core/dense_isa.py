"""The instruction set dense torch runs, for ``sparsify bench --isa`` (no torch import: set before torch loads)."""
from __future__ import annotations

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
#: torch.backends.cpu.get_cpu_capability() once ``DENSE_ISA_ENV[name]`` took effect
DENSE_CAPABILITY = {"avx2": "AVX2", "portable": "DEFAULT"}
