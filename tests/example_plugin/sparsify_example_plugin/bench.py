"""A ``sparsify bench`` case for the ``example_coo`` layout: its kernel against dense ``F.linear``.

Numbered 101 so it never clashes with the built-in cases (1-4); not a
default case, so a plain ``sparsify bench`` runs only the built-in ones
(``sparsify bench --case 101`` runs it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsify_core.bench import BenchCase, BenchOptions, Row, interleaved

from .layout import COO

NUMBER = 101


def case_coo(options: BenchOptions) -> list[Row]:
    """Case 101: the example_coo layout's kernel (torch.sparse.mm) vs dense F.linear, float32 on the CPU."""
    shape, tokens, sparsities, repeats = (((128, 128), (1, 16), (0.9,), 3) if options.quick
                                          else ((1024, 1024), (1, 128), (0.5, 0.9, 0.99), 20))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for s in sparsities:
        w = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) >= s)
        kernel = COO.from_dense(w).kernel(torch.device("cpu"), torch.float32)
        for T in tokens:
            x = torch.randn(T, shape[1], generator=gen)
            err = float((kernel(x, None) - x @ w.T).abs().max())
            t = interleaved({"dense": lambda: F.linear(x, w), "example_coo": lambda: kernel(x, None)}, repeats)
            rows.append(Row(NUMBER, f"{shape[1]}->{shape[0]} T={T} s={s:.0%}", t["dense"] * 1e3,
                            {"example_coo": t["example_coo"] * 1e3}, {"example_coo": t["dense"] / t["example_coo"]},
                            bound=1 / (1 - s), extra={"max_abs_err": err}))
    return rows


CASES = [BenchCase(NUMBER, "example COO layout", case_coo.__doc__.splitlines()[0], case_coo, default=False)]
