"""``sparsify bench``'s harness: cases discovered through the hook, run, recorded with the machine, shown."""
from __future__ import annotations

import json

import pytest
from rich.console import Console

from helpers import sparsify, sparsify_here
from sparsify_core import bench, hookimpl
from sparsify_core.errors import SparsifyError
from sparsify_core.plugin_manager import register, unregister
from sparsify_core.registry import Registry
from sparsify_core.report import show_run


def _rows(options: bench.BenchOptions) -> list[bench.Row]:
    """A case that times two trivial functions: plumbing only."""
    m = bench.interleaved({"dense": lambda: sum(range(200)), "ours": lambda: sum(range(100))}, repeats=3, warmup=1)
    extra = {"quick": options.quick, "note": "not a number", "model": str(options.model_dir)}
    return [bench.Row(97, "n=200", m["dense"] * 1e3, {"ours": m["ours"] * 1e3}, {"ours": m["dense"] / m["ours"]},
                      target=1.0, bound=2.0, extra=extra)]


CASE = bench.BenchCase(97, "toy sums", "two sums, dense and ours", _rows, default=False)


class ToyPlugin:
    @hookimpl
    def sparsify_bench_cases(self):
        return [CASE]


@pytest.fixture
def toy_plugin():
    plugin = ToyPlugin()
    register(plugin, name="toy-bench")
    yield plugin
    unregister(plugin)


def test_cases_come_from_every_plugin_through_the_hook(toy_plugin):
    found = bench.cases()
    assert found[97] is CASE and {1, 2, 3, 4} <= set(found)  # the built-in cases: the layouts plugin's

    class Clash:
        @hookimpl
        def sparsify_bench_cases(self):
            return [bench.BenchCase(97, "other", "", _rows)]

    clash = Clash()
    register(clash, name="clash-bench")
    try:
        with pytest.raises(SparsifyError, match="bench case 97 is contributed twice"):
            bench.cases()
    finally:
        unregister(clash)


def test_run_passes_the_options_and_drops_targets_when_quick(tmp_path):
    cases = {97: CASE}
    (row,) = bench.run((97,), quick=True, model_dir=tmp_path, available=cases)["rows"]
    assert row["extra"]["quick"] is True and row["extra"]["model"] == str(tmp_path) and row["target"] is None
    result = bench.run((97,), available=cases)
    assert result["rows"][0]["target"] == 1.0 and result["cases"] == {97: "toy sums"}
    assert set(result["environment"]) >= {"cpu_model", "isa", "isa_flags", "threads", "cpus", "torch"}
    with pytest.raises(SparsifyError, match="unknown bench case"):
        bench.run((98,), available=cases)


def test_the_recorded_isa_is_the_kernel_path_the_rows_report():
    def rows(options):
        return [bench.Row(96, "x", 1.0, {"ours": 1.0}, {"ours": 1.0}, extra={"kernel_isa": "portable"})]

    env = bench.run((96,), available={96: bench.BenchCase(96, "isa", "", rows)})["environment"]
    assert env["isa"] == "portable" and env["cpu_isa"] == bench.widest_isa(bench.cpu_info()[1])
    env = bench.run((97,), available={97: CASE})["environment"]  # no kernel path reported: the CPU's widest
    assert env["isa"] == bench.widest_isa(bench.cpu_info()[1]) and "cpu_isa" not in env


def test_widest_isa():
    assert bench.widest_isa({"avx512f", "avx512bw", "avx512vl", "avx2", "fma"}) == "avx512"
    assert bench.widest_isa({"avx512f", "avx2", "fma"}) == "avx2"
    assert bench.widest_isa({"asimd"}) == "neon" and bench.widest_isa(set()) == "generic"


def test_record_stores_a_bench_record_with_its_machine_apart_from_recipe_runs(tmp_path):
    result = bench.run((97,), quick=True, threads=1, available={97: CASE})
    with Registry(f"sqlite:///{tmp_path}/r.db") as reg:
        recipe_run = reg.create_run(recipe_name="t", recipe_hash=None, recipe_text=None, recipe_json=None,
                                    overrides=None, model="m", data="d", seed=0, output_dir=None, workdir=None)
        run_id = bench.record(reg, json.loads(json.dumps(result)), tmp_path / "b.json")  # as read back from --json
        rec = reg.get_run(run_id)
        assert rec.kind == "bench" and rec.status == "finished" and rec.recipe_name == "bench"
        assert (rec.model, rec.data) == (None, None)  # the machine has fields of its own
        env = result["environment"]
        mc = rec.machine
        assert (mc.isa, mc.isa_flags, mc.threads, mc.cpus, mc.torch_version, mc.cpu_model, mc.quick) == (
            env["isa"], env["isa_flags"], 1, env["cpus"], env["torch"], env["cpu_model"], True)
        assert [(s.name, s.method, s.status) for s in rec.stages] == [("case 97", "toy sums", "completed")]
        values = {m.name: m.value for m in rec.metrics}
        (row,) = result["rows"]
        assert values["n=200 ours speedup"] == pytest.approx(row["ratio"]["ours"])
        assert values["n=200 dense ms"] == pytest.approx(row["dense_ms"])
        assert values["n=200 quick"] == 1.0 and "n=200 note" not in values
        assert rec.artifacts[0].kind == "bench_json"
        assert [r.id for r in reg.find_runs(kinds=["recipe"])] == [recipe_run]
        assert [r.id for r in reg.find_runs(kinds=["bench"])] == [run_id]
        assert reg.get_run(recipe_run).kind == "recipe" and reg.get_run(recipe_run).machine is None
        capped = json.loads(json.dumps(result))  # as `bench --isa avx2` on an AVX-512 CPU records it
        capped["environment"].update(isa="avx2", dense_isa="AVX2", dense_env={"ATEN_CPU_CAPABILITY": "avx2"})
        assert reg.get_run(bench.record(reg, capped)).machine.isa == "avx2 (dense torch AVX2)"
        text = Console(width=200, record=True, file=open(tmp_path / "show.txt", "w"))
        show_run(rec, text)
        shown = text.export_text()
        assert "n=200 ours speedup" in shown and f"{env['isa']}, 1 thread" in shown and "machine" in shown


def test_cli_bench_refuses_an_unknown_case(workdir):
    bad = sparsify_here("bench", "--case", "98", "--quick", cwd=workdir)  # refused before anything runs
    assert bad.returncode == 1 and "unknown case(s) [98]" in bad.stderr


@pytest.mark.skipif(not __import__("sparsify_kernels.ffn").ffn.cpu_kernel_available(),
                    reason="no C++ compiler: native kernels unavailable")
def test_cli_bench_record_then_runs_and_show(workdir):
    """End to end with a built-in case: the table, --json, --record, then `runs` and `show` list the machine."""
    proc = sparsify("bench", "--case", "1", "--quick", "--threads", "1", "--record", "--json", "b.json",
                    cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "s=90%" in proc.stdout and "1 thread," in proc.stdout
    run_id = proc.stderr.split("recorded as ")[1].split(";")[0].strip()
    assert json.loads((workdir / "b.json").read_text())["rows"]
    # The record read back in this process: only the bench itself needed a process of its own (--threads).
    listed = sparsify_here("runs", cwd=workdir)
    assert listed.returncode == 0, listed.stderr
    assert run_id in listed.stdout and "bench" in listed.stdout and "1 thread" in listed.stdout
    shown = sparsify_here("show", run_id, cwd=workdir)
    assert shown.returncode == 0, shown.stderr
    assert "case 1" in shown.stdout and "speedup" in shown.stdout and "machine" in shown.stdout
    resume = sparsify_here("run", "--resume", run_id, cwd=workdir)
    assert resume.returncode == 1 and "not a recipe run" in resume.stderr


def test_compare_puts_saved_results_side_by_side(tmp_path):
    """``--compare``: each result's machine in its column, configurations matched by (case, config), ``-`` where
    one result lacks it; bad files are one-line errors; nothing runs."""
    one = bench.run((97,), available={97: CASE})
    two = json.loads(json.dumps(one))  # as read back from --json
    two["environment"].update(cpu_model="Other CPU", isa="avx512", threads=4)
    two["rows"][0].update(best_ratio=3.5, dense_ms=2.0)
    two["rows"].append(dict(two["rows"][0], case=98, config="only here"))
    rows = bench.compare_results([one, two])
    assert rows[0][:2] == ["97", "n=200"] and rows[0][3] == "ours 3.50x (2 ms)"
    assert rows[0][2] == f"ours {one['rows'][0]['best_ratio']:.2f}x ({one['rows'][0]['dense_ms']:.3g} ms)"
    assert rows[1] == ["98", "only here", "-", "ours 3.50x (2 ms)"]
    assert bench.describe_machine(two["environment"]).startswith("Other CPU, avx512, 4 threads, torch ")

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(one))
    b.write_text(json.dumps(two))
    proc = sparsify_here("bench", "--compare", a, "--compare", b)
    assert proc.returncode == 0, proc.stderr
    assert "Other CPU, avx512, 4 threads" in proc.stdout and "only here" in proc.stdout
    (tmp_path / "c.json").write_text("{}")
    for args, message in ((("--compare", tmp_path / "c.json"), "not a `sparsify bench --json` result"),
                          (("--compare", tmp_path / "none.json"), "none.json"),
                          (("--compare", a, "--case", "1"), "runs nothing")):
        proc = sparsify_here("bench", *args)
        assert proc.returncode == 1 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            proc.stderr


def test_dense_isa_is_recorded_and_a_capped_dense_side_is_described():
    env = bench.run((97,), available={97: CASE})["environment"]
    assert env["dense_isa"] == __import__("torch").backends.cpu.get_cpu_capability()
    capped = dict(env, isa="avx2", cpu_isa="avx512", dense_isa="AVX2", dense_env={"ATEN_CPU_CAPABILITY": "avx2"})
    assert "avx2 (dense torch AVX2; CPU avx512)" in bench.describe_machine(capped)
    if not env["dense_env"] and "cpu_isa" not in env:
        assert "dense torch" not in bench.describe_machine(env)


def test_check_dense_isa_refuses_a_process_whose_torch_runs_another_isa():
    got = __import__("torch").backends.cpu.get_cpu_capability()
    for name, want in bench.DENSE_CAPABILITY.items():
        if got == want:
            bench.check_dense_isa(name)
        else:
            with pytest.raises(SparsifyError, match=f"--isa {name}: dense torch already runs {got}.*ATEN_CPU"):
                bench.check_dense_isa(name)
    bench.check_dense_isa("avx512")  # caps nothing


@pytest.mark.skipif(not __import__("sparsify_kernels.ffn").ffn.cpu_kernel_available(),
                    reason="no C++ compiler: native kernels unavailable")
@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_cli_bench_isa_caps_dense_torch_and_forces_the_kernel_build(workdir, isa, monkeypatch):
    """``--isa``: the kernels' build and dense torch's ISA both follow it, and the JSON says so."""
    from sparsify_kernels import native
    if isa not in native.supported_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # inherited caps give way to --isa's
    proc = sparsify("bench", "--case", "3", "--quick", "--threads", "1", "--isa", isa, "--json", "b.json",
                    cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    env = json.loads((workdir / "b.json").read_text())["environment"]
    assert env["isa"] == isa and env["dense_isa"] == bench.DENSE_CAPABILITY[isa]
    assert env["dense_env"] == bench.DENSE_ISA_ENV[isa]
    assert f"{isa}, dense torch {bench.DENSE_CAPABILITY[isa]}" in proc.stdout.replace("\n", " ")


def test_runnable_isas():
    from sparsify_core.dense_isa import runnable
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx2", "fma"}
    assert all(runnable(n, avx512) for n in ("avx512", "avx2", "portable"))
    assert runnable("avx2", {"avx2", "fma"}) and not runnable("avx512", {"avx2", "fma"})
    assert runnable("portable", {"asimd"}) and not runnable("avx2", {"asimd"}) and not runnable("avx2", set())


def test_cli_bench_isa_refuses_unknown_names_and_compare(workdir, tmp_path, monkeypatch):
    import os

    from sparsify_core import dense_isa
    with monkeypatch.context() as m:  # an AVX2 CPU: refused before anything is set or loaded
        m.setattr(dense_isa, "cpu_info", lambda: ("AVX2 CPU", frozenset({"avx2", "fma"})))
        before = dict(os.environ)
        proc = sparsify_here("bench", "--isa", "avx512", cwd=workdir)
        assert proc.returncode == 1 and "--isa avx512: this CPU cannot run it (its widest vector ISA is avx2)" \
            in proc.stderr and dict(os.environ) == before
    for args, message in ((("--isa", "avx9"), "--isa avx9: choose one of avx512, avx2, portable"),
                          (("--isa", "avx2", "--compare", tmp_path / "a.json"), "leave out --isa")):
        proc = sparsify_here("bench", *args, cwd=workdir)
        assert proc.returncode == 1 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            proc.stderr
