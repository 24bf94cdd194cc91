"""The measured layout table behind ``layout: auto``: which layout beats dense on this machine, and by how much.

An entry is one measurement: a weight of one shape, held in one layout (with
its params) at one stored density, multiplied by ``tokens`` tokens, timed
against dense ``F.linear`` on the same weight, interleaved in one process
(``sparsify_core.bench.interleaved``); its value is the ratio ``dense time /
layout time`` (above 1: the layout is faster). Entries live in a JSON file in
the user cache (``$SPARSIFY_CACHE/layout_table.json``, default
``~/.cache/sparsify``), grouped by the machine they were measured on: CPU
model, the kernel ISA path in use (``SPARSIFY_ISA`` changes it), torch
threads and torch version. So a table measured on one machine (or ISA, or
thread count) is never read on another.

``sparsify bench --case 3`` stores its measurements here; ``layout: auto``
(``convert.py``) looks its candidates up and measures the missing entries on
the weight being converted. ``choose`` is the decision alone, a pure function.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsify_core import Layout

FILE = "layout_table.json"
DENSITY_STEP = 0.01  # stored densities are keyed to this step: 0.148 and 0.152 share the entry d=0.15


def table_path() -> Path:
    """``$SPARSIFY_CACHE/layout_table.json`` (default ``~/.cache/sparsify/layout_table.json``)."""
    root = os.environ.get("SPARSIFY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparsify")
    return Path(root) / FILE


def machine_key() -> str:
    """What a measurement depends on: ``"<CPU model> | <kernel ISA path> | kernels <source key> | dense
    <torch's CPU capability> | <threads> threads | torch <version>"``.

    The ISA path is the native kernel variant actually loaded
    (``sparsify_kernels.native.loaded_isa``), ``torch`` where none loads; the source key changes with the
    kernels (``native.source_key``) and the capability with ``ATEN_CPU_CAPABILITY`` (``sparsify bench --isa``).
    Raises ``sparsify_kernels.native.ISAError`` for a ``SPARSIFY_ISA`` the CPU cannot run.
    """
    from sparsify_core.bench import machine
    from sparsify_kernels import native

    path = native.loaded_isa() or "torch"
    cpu = machine()["cpu_model"] or "unknown CPU"
    return (f"{cpu} | {path} | kernels {native.source_key()} | dense {torch.backends.cpu.get_cpu_capability()} | "
            f"{torch.get_num_threads()} threads | torch {torch.__version__}")


def stored_density(layout: Layout) -> float:
    """Values the layout stores (explicit zeros of fixed-pattern formats included) per dense entry, 0..1."""
    n = layout.nnz() if hasattr(layout, "nnz") else int((layout.to_dense() != 0).sum())
    out, n_in = layout.shape
    return min(1.0, n / max(1, out * n_in))


def entry_key(layout: Layout, tokens: int) -> str:
    """``"<name>{<params>} <out>x<in> d=<density> T=<tokens>"``: the table key of a measurement."""
    params = json.dumps(layout.params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    d = round(round(stored_density(layout) / DENSITY_STEP) * DENSITY_STEP, 4)
    out, n_in = layout.shape
    return f"{layout.name}{params} {out}x{n_in} d={d:.2f} T={tokens}"


@dataclass
class LayoutTable:
    """The entries of one machine (``key``) in the table file at ``path``: ``{entry_key: ratio}``."""

    path: Path
    key: str
    entries: dict[str, float]

    @classmethod
    def load(cls, path: Path | None = None, key: str | None = None) -> "LayoutTable":
        """This machine's entries (none yet: empty); a file that is not a table is an error naming it."""
        path = table_path() if path is None else Path(path)
        key = machine_key() if key is None else key
        entries = _read(path).get(key, {})
        return cls(path, key, {k: float(v) for k, v in entries.items()})

    def save(self) -> None:
        """Merge this machine's entries into the file (other machines' entries kept), atomically."""
        data = _read(self.path)
        data[self.key] = dict(sorted({**data.get(self.key, {}), **self.entries}.items()))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def ratio(self, layout: Layout, tokens: int) -> float | None:
        """The measured ``dense / layout`` time for this layout, shape, density and token count, if any."""
        return self.entries.get(entry_key(layout, tokens))

    def record(self, layout: Layout, tokens: int, ratio: float) -> str:
        """Store one measurement (``save`` writes the file); returns its key."""
        k = entry_key(layout, tokens)
        self.entries[k] = float(ratio)
        return k


def _read(path: Path) -> dict:
    from sparsify_core.errors import SparsifyError

    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SparsifyError(f"{path}: not a layout table ({exc}); delete it to measure afresh") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise SparsifyError(f"{path}: not a layout table (expected {{machine: {{entry: ratio}}}}); "
                            "delete it to measure afresh")
    return data


@torch.no_grad()
def measure(layout: Layout, tokens: int, repeats: int = 15, budget_s: float = 1.5, seed: int = 0) -> float:
    """``dense time / layout time`` for ``tokens`` random float32 tokens on the CPU, interleaved, medians.

    The layout computes as it does in a model (``SparseLinear``: its fast
    kernel, else its reference); dense is ``F.linear`` on ``to_dense()``.
    """
    from sparsify_core.bench import interleaved

    from .modules import SparseLinear

    dense = layout.to_dense().float()
    module = SparseLinear(layout, None)
    x = torch.randn(tokens, layout.shape[1], generator=torch.Generator().manual_seed(seed))
    m = interleaved({"dense": lambda: F.linear(x, dense), "layout": lambda: module(x)}, repeats, budget_s=budget_s)
    return m["dense"] / m["layout"]


def choose(ratios: dict[str, float], margin: float = 1.0) -> tuple[str | None, float | None, str]:
    """The fastest candidate if it beats dense by more than ``margin``: ``(name, ratio, why)``; ``name`` None: dense.

    ``ratios`` maps candidate name -> measured ``dense / candidate`` time
    (candidates that cannot hold the weight are simply absent). Ties go to
    the first candidate listed.
    """
    if not ratios:
        return None, None, "no candidate layout holds this weight exactly"
    best = max(ratios, key=lambda k: (ratios[k], -list(ratios).index(k)))
    shown = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
    if ratios[best] <= margin:
        return None, ratios[best], f"kept dense: no layout beats it here ({shown})"
    return best, ratios[best], f"{best} {ratios[best]:.2f}x dense ({shown})"
