"""``sparsify bench``: the harness that runs benchmark cases, measures side by side, and records.

The cases are not here: plugins contribute them through the
``sparsify_bench_cases`` hook (the built-in ones come from the layouts
plugin, which owns the modules they time). This module discovers them, runs
the chosen ones, describes the machine, formats the table and stores the
results in the registry as a ``bench`` record with its machine fields.

Timing rule every case follows (``interleaved``): candidates are timed
*interleaved* with the dense baseline (one call of each per round, the order
rotating between rounds) after a warm-up, and reported as medians, so load
from other processes hits all of them alike. A ratio is ``dense time /
candidate time``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .dense_isa import (DENSE_CAPABILITY, DENSE_ENV_NAMES, DENSE_ISA_ENV, cpu_info,  # noqa: F401 (re-exported)
                        threads_text, widest_isa)
from .errors import SparsifyError
from .metric import MetricInfo


@dataclass
class Row:
    """One measured configuration: medians in milliseconds and the ratios against dense."""

    case: int
    config: str
    dense_ms: float
    ours_ms: dict[str, float]
    ratio: dict[str, float]
    target: float | None = None
    bound: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def best(self) -> tuple[str, float]:
        mine = {k: v for k, v in self.ratio.items() if not k.startswith("torch")}
        return max(mine.items(), key=lambda kv: kv[1]) if mine else ("", 0.0)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.best[1] >= self.target


@dataclass(frozen=True)
class BenchOptions:
    """What the user chose for every case: ``quick`` (smoke sizes: plumbing, not numbers) and a model folder.

    ``model_dir`` is a sparsify output folder, for the cases that run a whole
    model (the others ignore it).
    """

    quick: bool = False
    model_dir: Path | None = None


@dataclass(frozen=True)
class BenchCase:
    """A benchmark case a plugin contributes (``sparsify_bench_cases``).

    ``number`` selects it on the command line (``--case N``, unique across
    plugins), ``name`` and ``description`` say what it times, and ``run``
    measures it, returning ``Row`` s whose ``case`` is ``number``. ``default``
    cases run when no ``--case`` is given.
    """

    number: int
    name: str
    description: str
    run: Callable[[BenchOptions], list[Row]]
    default: bool = True


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 2,
                budget_s: float | None = None, before: Callable[[], object] | None = None) -> dict[str, float]:
    """Median seconds per function, called in rotating order each round (``budget_s`` caps the rounds).

    ``before`` runs, untimed, before every timed call (e.g. ``flush_caches``).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            if before is not None:
                before()
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
        if budget_s is not None and r >= 4 and time.perf_counter() - start > budget_s:
            break
    return {n: statistics.median(v) for n, v in times.items()}


_SCRATCH: list[torch.Tensor] = []


def flush_caches(mb: int = 128) -> None:
    """Stream ``mb`` MB through the caches, evicting what the previous call left there.

    For candidates whose working set fits the last-level cache (a predictor
    and a few hundred rows, tens of MB): in a model, the other layers' weights
    evict it between two calls, so timing it warm would overstate the speed.
    """
    if not _SCRATCH:
        _SCRATCH.append(torch.zeros(mb * (1 << 20) // 4))
    _SCRATCH[0].add_(1.0)


# -- discovery -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProvidedCase:
    """A bench case and where it comes from: the plugin (entry-point name) and its distribution ("name version")."""

    case: BenchCase
    plugin: str
    distribution: str


def provided_cases() -> list[ProvidedCase]:
    """Every case the installed plugins contribute, with its plugin, ordered by number.

    Raises ``SparsifyError`` when two cases claim one number.
    """
    from .plugin_manager import plugin_manager

    pm, dists, _ = plugin_manager()
    found: dict[int, ProvidedCase] = {}
    # a provider hook (results collected), not a lifecycle call (``hooks()`` returns nothing)
    for impl in reversed(pm.hook.sparsify_bench_cases.get_hookimpls()):  # registration order
        plugin = pm.get_name(impl.plugin)
        for case in impl.function() or []:
            if case.number in found:
                other = found[case.number]
                raise SparsifyError(f"bench case {case.number} is contributed twice: {other.case.name!r} "
                                    f"({other.plugin}) and {case.name!r} ({plugin})")
            found[case.number] = ProvidedCase(case, plugin, dists.get(plugin, "<in-process>"))
    return [found[n] for n in sorted(found)]


def cases() -> dict[int, BenchCase]:
    """Every case the installed plugins contribute, by number (a number claimed twice is an error)."""
    return {p.case.number: p.case for p in provided_cases()}


# -- the machine -----------------------------------------------------------------------------

#: The vector instruction sets worth recording (x86 and Arm names as ``/proc/cpuinfo`` spells them).
ISA_FLAGS = ("sse4_2", "avx", "fma", "f16c", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
             "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve", "sve2")


def machine() -> dict:
    """What the numbers depend on: CPU model, ISA, threads, torch, and the load right now.

    ``dense_isa`` is the ISA ATen dispatches dense CPU kernels to (``AVX512``, ``AVX2``, ``DEFAULT``);
    ``dense_env`` the ``DENSE_ISA_ENV`` variables that were set (they cap MKL and oneDNN too)."""
    model, flags = cpu_info()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu_model": model or platform.processor() or platform.machine() or None,
            "isa": widest_isa(flags), "isa_flags": [f for f in ISA_FLAGS if f in flags],
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "dense_isa": torch.backends.cpu.get_cpu_capability(),
            "dense_env": {k: os.environ[k] for k in DENSE_ENV_NAMES if k in os.environ},
            "load_average_1m": load}


def check_dense_isa(name: str) -> None:
    """Raise ``SparsifyError`` (one line) unless dense torch in this process runs ISA ``name``'s dense kernels.

    ATen reads ``ATEN_CPU_CAPABILITY`` once, at its first dispatched op: ``DENSE_ISA_ENV`` must be in the
    environment before that (``sparsify bench --isa`` sets it before importing torch)."""
    want = DENSE_CAPABILITY.get(name)
    got = torch.backends.cpu.get_cpu_capability()
    if want is not None and got != want:
        env = " ".join(f"{k}={v}" for k, v in DENSE_ISA_ENV[name].items())
        raise SparsifyError(f"--isa {name}: dense torch already runs {got} kernels in this process; "
                            f"start a fresh process with {env} set")


# -- running ---------------------------------------------------------------------------------

def run(numbers=(1, 2, 3), quick: bool = False, threads: int | None = None,
        progress: Callable[[str], None] = lambda s: None, model_dir: str | os.PathLike | None = None,
        available: dict[int, BenchCase] | None = None) -> dict:
    """Run the cases ``numbers`` (of ``available``, default: the plugins' ``cases()``); returns the result dict.

    The environment records the machine (``machine()``); where rows report
    the kernel ISA variant they ran (extra ``kernel_isa``), ``isa`` is that
    path (e.g. ``avx2`` forced by ``SPARSIFY_ISA`` on an AVX-512 CPU) and
    ``cpu_isa`` the CPU's widest. ``quick`` runs every case at smoke sizes (plumbing, numbers not
    meaningful: the targets are dropped). ``threads`` sets
    ``torch.set_num_threads`` for dense torch and the candidates alike. On a
    machine other processes load, one thread gives the stable per-core
    ratio: with several, whichever side waits on a preempted thread loses a
    scheduler time slice, which says more about the load than the kernel.
    """
    available = cases() if available is None else available
    unknown = [n for n in numbers if n not in available]
    if unknown:
        raise SparsifyError(f"unknown bench case(s) {unknown}: choose among {sorted(available)}")
    if threads:
        torch.set_num_threads(threads)
    options = BenchOptions(quick=quick, model_dir=None if model_dir is None else Path(model_dir))
    rows: list[Row] = []
    seconds: dict[int, float] = {}
    before = machine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.sparse "beta" notices
        for n in numbers:
            progress(f"case {n}: {available[n].name}")
            start = time.perf_counter()
            got = available[n].run(options)
            seconds[n] = time.perf_counter() - start
            if quick:  # smoke sizes: the targets do not apply
                for r in got:
                    r.target = None
            rows += got
    # The ISA that computed: cases whose kernels pick an ISA variant at run time report it per row
    # (extra "kernel_isa"); the CPU's widest stays recorded as cpu_isa.
    paths = sorted({r.extra["kernel_isa"] for r in rows if isinstance(r.extra.get("kernel_isa"), str)})
    if paths:
        before = before | {"cpu_isa": before["isa"], "isa": "/".join(paths)}
    return {"environment": before, "load_average_1m_after": machine()["load_average_1m"], "quick": quick,
            "case_seconds": seconds, "cases": {n: available[n].name for n in numbers},
            "rows": [asdict(r) | {"best": r.best[0], "best_ratio": r.best[1], "met": r.met} for r in rows]}


def record(registry, result: dict, json_path: str | os.PathLike | None = None) -> str:
    """Store a ``run`` result in the registry as a ``bench`` record; returns its id.

    The machine (CPU model, ISA flags, threads, torch, load before and after)
    goes in the record's machine fields; where dense torch was capped (``--isa``) the ISA field says so:
    ``avx2 (dense torch AVX2)``. One stage per case; each row becomes
    metrics named ``"<config> <candidate> speedup"`` (dense time / candidate
    time) and ``"<config> dense ms"``, plus the numeric extras (recall,
    sparsity, bandwidth...) as ``"<config> <name>"``.
    """
    env = result["environment"]
    run_id = registry.create_run(recipe_name="bench", recipe_hash=None, recipe_text=None, recipe_json=None,
                                 overrides=None, model=None, data=None, seed=None, output_dir=None, workdir=None,
                                 kind="bench")
    isa = env.get("isa")
    if env.get("dense_env"):  # a capped dense side is part of what the ratios mean (`sparsify runs` shows it)
        isa = f"{isa} (dense torch {env.get('dense_isa')})"
    registry.record_machine(run_id, cpu_model=env.get("cpu_model"), isa=isa,
                            isa_flags=env.get("isa_flags"), threads=env.get("threads"), cpus=env.get("cpus"),
                            torch_version=env.get("torch"), load_before=env.get("load_average_1m"),
                            load_after=result.get("load_average_1m_after"), quick=bool(result.get("quick")))
    names = {int(k): v for k, v in (result.get("cases") or {}).items()}
    seconds = {int(k): v for k, v in (result.get("case_seconds") or {}).items()}
    for idx, c in enumerate(sorted({r["case"] for r in result["rows"]})):
        registry.start_stage(run_id, idx, name=f"case {c}", kind="bench", method=names.get(c), params={})
        values: dict[str, float] = {}
        info: dict[str, MetricInfo] = {}  # extras are the case's own: undeclared
        for r in result["rows"]:
            if r["case"] != c:
                continue
            values[f"{r['config']} dense ms"] = r["dense_ms"]
            info[f"{r['config']} dense ms"] = MetricInfo(higher_is_better=False, unit="ms")
            for cand, ratio in r["ratio"].items():
                values[f"{r['config']} {cand} speedup"] = ratio
                info[f"{r['config']} {cand} speedup"] = MetricInfo(higher_is_better=True, unit="x")
            if r["target"] is not None:
                values[f"{r['config']} target speedup"] = r["target"]
                info[f"{r['config']} target speedup"] = MetricInfo(higher_is_better=None, unit="x")
            for k, v in r["extra"].items():
                if isinstance(v, (bool, int, float)):
                    values[f"{r['config']} {k}"] = float(v)
        registry.log_metrics(run_id, f"case {c}", idx, values, info=info)
        registry.finish_stage(run_id, idx, "completed", duration_s=seconds.get(c))
    if json_path is not None:
        registry.add_artifact(run_id, "bench_json", os.path.abspath(json_path))
    registry.set_run_status(run_id, "finished")
    return run_id


def read_result(path: str | os.PathLike) -> dict:
    """A result ``sparsify bench --json`` wrote. Raises ``SparsifyError`` (one line naming the file) otherwise."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except OSError as exc:
        raise SparsifyError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise SparsifyError(f"{path}: not JSON ({exc})") from None
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list) \
            or not isinstance(result.get("environment"), dict):
        raise SparsifyError(f"{path}: not a `sparsify bench --json` result (no rows and environment)")
    return result


def describe_machine(env: dict) -> str:
    """One line: ``AMD EPYC, avx2, 2 threads, torch 2.13.0`` (what a ratio depends on).

    Where the kernels or dense torch ran a narrower ISA than the CPU's widest (``--isa``), it says so:
    ``Intel Xeon, avx2 (dense torch AVX2; CPU avx512), 2 threads, torch 2.13.0``."""
    isa = str(env.get("isa"))
    cpu_isa, dense = env.get("cpu_isa"), env.get("dense_isa")
    if env.get("dense_env") or (cpu_isa and cpu_isa != isa):
        isa += f" (dense torch {dense or '?'}; CPU {cpu_isa or '?'})"
    return ", ".join(str(v) for v in (env.get("cpu_model") or "unknown CPU", isa,
                                      threads_text(env.get("threads")), f"torch {env.get('torch')}"))


def compare_results(results: Sequence[dict]) -> list[list[str]]:
    """Rows of strings putting saved results side by side: case, config, then per result the best ratio
    (``nm 1.83x``, dense ms in brackets) or ``-`` where that result lacks the configuration.

    Configurations are matched by (case, config) and listed in the order they first appear."""
    keyed = [{(r["case"], r["config"]): r for r in res["rows"]} for res in results]
    keys = list(dict.fromkeys(k for rows in keyed for k in rows))
    out = []
    for case, config in keys:
        cells = []
        for rows in keyed:
            r = rows.get((case, config))
            cells.append("-" if r is None else f"{r['best']} {r['best_ratio']:.2f}x ({r['dense_ms']:.3g} ms)")
        out.append([str(case), config, *cells])
    return out


def format_table(result: dict) -> list[list[str]]:
    """Rows of strings for a table: case, config, dense ms, each candidate's ratio, best, target."""
    out = []
    for r in result["rows"]:
        ratios = "  ".join(f"{k} {v:.2f}x" for k, v in r["ratio"].items())
        target = "" if r["target"] is None else f">= {r['target']:.2f}x {'met' if r['met'] else 'MISSED'}"
        bound = "" if r["bound"] is None else f"{r['bound']:.2f}x"
        out.append([str(r["case"]), r["config"], f"{r['dense_ms']:.3f}", ratios, bound, target])
    return out
