"""``sparsify plugins`` (in-process, typer's CliRunner): every provided thing, with its provider.

Methods, sources, metrics, layouts (with the kernels each declares per device)
and bench cases, built-in and the example plugin's, each on a row naming its
distribution and plugin.
"""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sparsify_core import Layout, hookimpl
from sparsify_core.bench import provided_cases
from sparsify_core.cli import app
from sparsify_core.plugin_manager import catalog, register, unregister


def _rows(stdout: str) -> list[list[str]]:
    """The table's rows as cells; a cell wrapped over several lines is joined back."""
    rows: list[list[str]] = []
    for line in stdout.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip("│").split("│")]
        if rows and not cells[0]:  # a wrapped cell goes on below its row
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
        else:
            rows.append(cells)
    return rows


def _plugins():
    result = CliRunner().invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    return _rows(result.stdout), result


def test_every_catalog_entry_and_bench_case_is_listed_with_its_provider(example_plugin_module):
    rows, _ = _plugins()
    listed = {(r[0], r[1]): r for r in rows}
    cat = catalog()
    for e in cat.entries:
        row = listed[(e.category.replace("_", " "), e.key)]
        assert row[2].startswith(e.cls.describe()) and row[3] == f"{e.distribution} ({e.plugin})", row
    cases = provided_cases()
    assert {1, 2, 3, 4, 101} <= {p.case.number for p in cases}
    for p in cases:
        row = listed[("bench case", f"{p.case.number} ({p.case.name})")]
        assert row[2].startswith(p.case.description) and row[3] == f"{p.distribution} ({p.plugin})", row
        assert ("[only with --case" in row[2]) is (not p.case.default)
    assert len(rows) == len(cat.entries) + len(cases)  # nothing else, nothing twice
    assert listed[("bench case", "101 (example COO layout)")][3] == "sparsify-example-plugin (in-process) (example)"
    assert listed[("bench case", "1 (activation-sparse FFN)")][3].startswith("sparsify 0.1.0 (layouts)")


def test_layouts_show_their_kernels(example_plugin_module):
    rows, _ = _plugins()
    kernels = {r[1]: r[2].split(" Kernels: ", 1)[1] for r in rows if r[0] == "layout"}
    assert set(kernels) == set(catalog().layouts) and "example_coo" in kernels
    assert kernels["example_coo"] == "torch.sparse.mm on the CPU (float32 and float64); none elsewhere."
    assert "CUDA: Triton" in kernels["nm"] and "CPU" in kernels["csr"]
    assert kernels["nmg"] == "The n:m kernels (an n:m:g weight is n:m too)."  # plain text: no emoji for ":m:"


class _NoKernel(Layout):
    """A layout without a fast kernel."""

    name = "no_kernel"
    names = ("w",)

    @classmethod
    def from_dense(cls, weight, params=None):
        return cls(weight.shape, params or cls.Params(), w=weight.clone())

    def to_dense(self):
        return self.w

    def matmul(self, x):
        return x @ self.w.T


class _Broken:
    """A plugin whose layout has no kernel and whose bench cases fail to load."""

    @hookimpl
    def sparsify_layouts(self):
        return [_NoKernel]

    @hookimpl
    def sparsify_bench_cases(self):
        raise ImportError("no module named 'fancy_timer'")


@pytest.fixture
def broken():
    plugin = _Broken()
    register(plugin, name="broken")
    yield plugin
    unregister(plugin)


def test_a_layout_without_kernel_and_a_broken_bench_hook(broken):
    rows, result = _plugins()
    assert ["layout", "no_kernel", "A layout without a fast kernel. Kernels: none (dense fallback)",
            "<in-process> (broken)"] in rows
    assert not any(r[0] == "bench case" for r in rows)  # the hook failed: listed as a warning, not half a list
    assert "warning: bench cases not listed: ImportError: no module named 'fancy_timer'" in result.stderr
    assert any(r[1] == "prune/magnitude" for r in rows)
