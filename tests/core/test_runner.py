"""The engine end to end on a tiny model, through the CLI as a user runs it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import RECIPES, TINY_RECIPE, plugin_env, sparsify, sparsify_here, write

from sparsify_core import load_output
from sparsify_core.method import STAGE_METRICS
from sparsify_core.metric import MetricInfo
from sparsify_core.registry import Registry, final_evaluation, stage_values


def _registry(workdir) -> Registry:
    return Registry(f"sqlite:///{workdir}/registry.db")


def _metrics(run, stage):
    return {m.name: m.value for m in run.metrics if m.stage == stage and m.layer is None and m.step is None}


def test_quickstart_end_to_end(workdir):
    proc = sparsify("run", RECIPES / "quickstart.yaml", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    reg = _registry(workdir)
    (run,) = reg.find_runs()
    assert run.status == "finished" and [s.status for s in run.stages] == ["completed", "completed"]
    dense, relu, pruned = _metrics(run, "dense"), _metrics(run, "relu"), _metrics(run, "magnitude")
    for name in ("perplexity", "kl_divergence", "activation_sparsity", "weight_sparsity", "parameters",
                 "nonzero_parameters", "ffn_flops_per_token"):
        assert name in dense and name in pruned, name
    assert dense["kl_divergence"] == pytest.approx(0, abs=1e-6)
    assert dense["activation_sparsity"] == 0 and relu["activation_sparsity"] > 0.2
    assert pruned["weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert pruned["kl_divergence"] > 0
    assert "stage_seconds" in relu and "peak_memory_mb" in relu

    # Evaluations are records of their own; the stages' own numbers are not evaluation values.
    assert [(e.stage_idx, e.stage, e.kind, e.status) for e in run.evaluations] == [
        (-1, "dense", "reference", "completed"), (0, "relu", "stage", "completed"),
        (1, "magnitude", "stage", "completed")]
    assert all(e.split == "eval" and e.tokens == e.sequences * 128 > 0 for e in run.evaluations)
    final = final_evaluation(run)
    assert final.stage == "magnitude" and "stage_seconds" not in final.values
    assert final.values["weight_sparsity"] == pruned["weight_sparsity"]
    assert set(stage_values(run)[1]) >= {"stage_seconds", "peak_memory_mb", "sparsity"}
    assert run.metric_info["kl_divergence"] == MetricInfo(higher_is_better=False, unit="nats")
    assert run.metric_info["stage_seconds"] == STAGE_METRICS["stage_seconds"]
    assert run.metric_info["sparsity"].fraction  # declared by the magnitude method

    # The output is compressed (it has masks): sparsify loads it, plain transformers refuses it clearly;
    # exported dense, plain transformers loads it too.
    (art,) = [a for a in run.artifacts if a.kind == "output"]
    out = load_output(art.path)
    assert out.manifest["run_id"] == run.id and len(out.masks) > 0
    assert out.manifest["storage"]["form"] == "compressed"
    from transformers import AutoModelForCausalLM
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(art.path)
    from sparsify_core.output import export_output
    plain = AutoModelForCausalLM.from_pretrained(export_output(art.path, workdir / "dense", "dense"))
    assert plain.config.hidden_act == "relu"
    ids = torch.randint(0, 200, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, out.model(ids).logits)
    for name, keep in out.masks.items():
        w = dict(out.model.named_parameters())[name]
        assert torch.all(w[~keep] == 0)

    # show and compare read it back (in this process: the run above is the one `sparsify` subprocess needed).
    shown = sparsify_here("show", run.id[:8], cwd=workdir)
    assert shown.returncode == 0 and "magnitude" in shown.stdout, shown.stderr
    cmp = sparsify_here("compare", "--format", "json", "--plot", workdir / "cmp.png", cwd=workdir)
    assert cmp.returncode == 0, cmp.stderr
    rows = json.loads(cmp.stdout)
    assert len(rows) == 2  # dense baseline + final point
    assert (workdir / "cmp.png").read_bytes()[:4] == b"\x89PNG"


def test_failure_is_recorded_and_one_line(workdir, test_stages):
    recipe = write(workdir / "r.yaml", TINY_RECIPE.replace(
        "evaluate:", "  - kind: test\n    method: fail\n    params: {message: kaput}\nevaluate:"))
    proc = sparsify_here("run", recipe, cwd=workdir)  # cli.main in this process: its exit code and one line
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: run ")
    assert "kaput" in proc.stderr
    (run,) = _registry(workdir).find_runs()
    assert run.status == "failed" and "kaput" in run.reason
    assert [s.status for s in run.stages] == ["completed", "completed", "failed"]
    assert not any(a.kind == "output" for a in run.artifacts)


def _start_waiting_run(workdir, factor=2.0):
    started, release = workdir / "started", workdir / "release"
    recipe = TINY_RECIPE.replace("  - kind: prune", f"""  - kind: test
    method: wait_for_file
    params: {{started: {started}, release: {release}, factor: {factor}}}
  - kind: prune""")
    path = write(workdir / "r.yaml", recipe)
    env = dict(os.environ, **plugin_env(workdir))
    # A test runner started in the background (`cmd &` in a script) inherits SIGINT ignored, and so would the
    # child; give it the default disposition, as an interactive `sparsify run` has.
    proc = subprocess.Popen([sys.executable, "-m", "sparsify_core.cli", "run", str(path)], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not started.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.05)
    return proc, release


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "interrupted")])
def test_signals_mark_the_run_interrupted(workdir, sig, status):
    proc, _ = _start_waiting_run(workdir)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    (run,) = _registry(workdir).find_runs()
    assert run.status == status
    assert [s.status for s in run.stages] == ["completed", "interrupted"]


def test_sigkill_then_resume_finishes_one_run(workdir, test_stages):
    proc, release = _start_waiting_run(workdir, factor=2.0)
    proc.kill()
    proc.wait(timeout=30)
    reg = _registry(workdir)
    reg.reconcile()
    (run,) = reg.find_runs()
    assert run.status == "interrupted"
    assert not any(s.status == "running" for s in run.stages)
    release.write_text("go")
    done = sparsify_here("run", "--resume", run.id, cwd=workdir)  # the kill needed a process; the resume does not
    assert done.returncode == 0, done.stderr
    assert "resuming after stage 1" in done.stderr
    (run,) = reg.find_runs()
    assert run.status == "finished" and run.attempts == 2
    assert [s.status for s in run.stages] == ["completed", "completed", "completed"]
    # Resumed from the ReLU checkpoint: the model is still a ReLU model and the
    # waiting stage's change was applied once.
    out = load_output(next(a.path for a in run.artifacts if a.kind == "output"))
    assert out.model.config.hidden_act == "relu"
    assert _metrics(run, "magnitude")["weight_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_resume_refuses_finished_and_unknown(workdir):
    from sparsify_core.recipe import load_recipe
    from sparsify_core.runner import Runner

    # A finished run, made in this process (the refusals below are what is tested, not the run itself).
    recipe = write(workdir / "r.yaml", TINY_RECIPE.replace("  after: all", "  after: last\n  metrics: [perplexity]"))
    run_id = Runner(load_recipe(recipe), _registry(workdir), runs_dir=workdir / "runs").run()
    assert _registry(workdir).get_run(run_id).status == "finished"
    proc = sparsify_here("run", "--resume", run_id, cwd=workdir)
    assert proc.returncode == 1 and "already finished" in proc.stderr
    proc = sparsify_here("run", "--resume", "nope", cwd=workdir)
    assert proc.returncode == 1 and "no run" in proc.stderr


N_CONCURRENT_RUNS = 4  # more than the 2 cores CI has; 8 concurrent writers are tested in test_registry


def test_concurrent_runs_are_all_recorded(workdir):
    recipe = write(workdir / "r.yaml", TINY_RECIPE.replace("  after: all", "  after: last\n  metrics: [perplexity]"))
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-m", "sparsify_core.cli", "run", str(recipe), "--set", f"seed={i}"],
                              cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(N_CONCURRENT_RUNS)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    runs = _registry(workdir).find_runs()
    assert len(runs) == N_CONCURRENT_RUNS and {r.status for r in runs} == {"finished"}
    assert sorted(r.seed for r in runs) == list(range(N_CONCURRENT_RUNS))


def test_recipe_errors_leave_no_run(workdir):
    bad = write(workdir / "bad.yaml", TINY_RECIPE.replace("kind: prune", "kind: prun"))
    proc = sparsify_here("run", bad, cwd=workdir)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert _registry(workdir).find_runs() == []
