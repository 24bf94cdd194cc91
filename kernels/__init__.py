"""Compute kernels for sparse layouts (import name ``sparsify_kernels``): fast paths with plain-torch references."""
