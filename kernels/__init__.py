"""Compute kernels for sparse layouts (import name ``sparsify_kernels``): fast paths with plain-torch references.

- ``native``: builds ``csrc/*.cpp`` (C ABI, no Python/torch headers) with the
  system C++ compiler on first use, once per ISA variant (avx512, avx2,
  portable; the widest the CPU runs, or ``SPARSIFY_ISA``), caches it under
  ``$SPARSIFY_CACHE``, and reports ``None`` (one warning) where it cannot; its
  thread pool (``csrc/pool.h``) follows ``torch.set_num_threads``.
- ``ffn``: activation-sparse and mixture-of-experts FFN for decoding, and a
  Linear that skips zero inputs; ``ffn_reference`` is the definition.
- ``spmm``: sparse weight x dense activations (panel CSR for any layout, an
  n:m few-token kernel, a BSR tile kernel); ``reference`` is ``F.linear``.
- ``triton_kernels``: the CUDA versions (activation-sparse FFN, MoE FFN, n:m
  matmul), optional; tested under ``TRITON_INTERPRET=1``.

Every fast function returns ``None`` where it does not apply (device, dtype,
token count, no compiler), so callers decide how to fall back.
"""
