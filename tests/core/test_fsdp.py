"""FSDP2 in the shared training loop: the choice of parallelism, and 2 gloo processes on loopback that must
give the single-process result (uninterrupted, and after kill -9 of one rank and ``--resume``).

Data sharding rule: ``train.batch_size`` is per process and rank r takes rows
``[r*b, (r+1)*b)`` of each global batch (``training.batch_indices``), so 2
ranks at ``batch_size: 2`` see exactly the batches of 1 process at
``batch_size: 4``; gradients are averaged across ranks, so the two runs agree
to float rounding (measured: max |diff| of saved weights ~2e-7, masks equal).
"""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import tiny_model, tiny_recipe, write

from sparsify_core import distributed as dist
from sparsify_core import training
from sparsify_core.errors import SparsifyError
from sparsify_core.registry import Registry

GIB = 2 ** 30


# --------------------------------------------------------------------------- choosing ddp or fsdp (no processes)


@pytest.mark.parametrize("requested, world, n_params, memory, expected", [
    ("auto", 1, 10 ** 9, GIB, "none"),  # one process: nothing to parallelise, whatever is asked
    ("fsdp", 1, 10, 80 * GIB, "none"),
    ("ddp", 2, 10 ** 9, GIB, "ddp"),  # asked for: kept even where it will not fit
    ("fsdp", 2, 10, 80 * GIB, "fsdp"),
    ("auto", 2, 10, 80 * GIB, "ddp"),
    ("auto", 8, 7 * 10 ** 9, 80 * GIB, "fsdp"),  # 7B: 112 GB of weights, grads and Adam > 40 GB
    ("auto", 2, 2 * 10 ** 9, 80 * GIB, "ddp"),  # 32 GB fits half of 80 GiB
    ("auto", 2, 3 * 10 ** 9, 80 * GIB, "fsdp"),  # 48 GB does not
])
def test_choose_parallel(requested, world, n_params, memory, expected):
    choice, why = dist.choose_parallel(requested, world, n_params, memory)
    assert choice == expected
    if requested == "auto" and world > 1:
        assert "GiB" in why and f"{dist.FSDP_AUTO_FRACTION:.0%}" in why  # the log shows the numbers it used


def test_transformer_blocks_come_from_no_split_modules():
    for arch, cls in (("llama", "LlamaDecoderLayer"), ("gpt2", "GPT2Block")):
        model = tiny_model(arch)
        blocks = dist.transformer_blocks(model)
        assert [type(b).__name__ for b in blocks] == [cls] * model.config.num_hidden_layers
    assert dist.transformer_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


class _Structural(training.TrainCallback):
    shardable = False


@pytest.mark.parametrize("parallel, expected", [("auto", "ddp"), ("ddp", "ddp"), ("fsdp", None)])
def test_a_callback_that_cannot_run_sharded(monkeypatch, tmp_path, parallel, expected):
    from helpers import make_ctx

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "broadcast", lambda obj: obj)
    ctx = make_ctx(tmp_path, tiny_model())
    cfg = training.TrainConfig(steps=1, parallel=parallel)
    if expected is None:
        with pytest.raises(SparsifyError, match="fsdp is not supported by _Structural"):
            training._choose_parallel(ctx, cfg, ctx.model, [_Structural()])
    else:
        assert training._choose_parallel(ctx, cfg, ctx.model, [_Structural()]) == expected


# --------------------------------------------------------------------------- 2 gloo processes

L1 = """\
  - kind: substitute_activation
    method: relu
  - kind: regularize
    method: progressive_l1
    params:
      schedule: [{{lambda: 0.0, steps: 2}}, {{lambda: 0.5, steps: 6}}]
      train: {{steps: 8, batch_size: {batch}, lr: 1.0e-3, kd_weight: 1.0, lm_weight: 0.5, checkpoint_every: 0,
               parallel: fsdp, freeze: [embed_tokens]}}
"""
GMP = """\
  - kind: prune
    method: gmp
    params:
      sparsity: 0.5
      every: 1
      start: 0.0
      end: 0.5
      train: {{steps: 8, batch_size: {batch}, lr: 1.0e-3, checkpoint_every: {every}, parallel: fsdp,
               gradient_checkpointing: {gc}}}
"""


def _recipe(workdir, stages: str, name: str):
    # evaluated after the last stage: rank 0 alone runs the model, which must be whole and unhooked again
    return write(workdir / f"{name}.yaml", tiny_recipe(stages, name=name, evaluate={"after": "last"},
                                                       output={"dir": str(workdir / "out" / "{name}")}))


def _single_process(workdir, stages: str):
    """The same stages in this process at twice the per-process batch; returns the saved tensors."""
    from sparsify_core.recipe import load_recipe
    from sparsify_core.runner import Runner

    path = _recipe(workdir, stages.format(batch=4, every=0, gc="false"), "single")
    Runner(load_recipe(path), Registry(f"sqlite:///{workdir}/single.db"), runs_dir=workdir / "single-runs").run()
    return _saved(workdir / "out" / "single")


def _saved(folder):
    from safetensors.torch import load_file

    (file,) = folder.glob("*.safetensors")  # one ordinary HF folder, whichever storage it chose
    return load_file(str(file))


def _assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].shape == t.shape, name
        if t.is_floating_point():
            torch.testing.assert_close(got[name], t, atol=1e-5, rtol=1e-4, msg=name)
        else:  # masks and packed indices: exactly
            assert torch.equal(got[name], t), name


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "sparsify_core.cli", "run", *map(str, args)]


ENV = dict(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")


def test_fsdp_gives_the_single_process_result_and_resumes_after_kill_of_one_rank(workdir, one_thread):
    """The acceptance recipe: `train: {parallel: fsdp}` under torchrun; progressive_l1 (with a freeze list)
    then gmp, whose masks change mid-stage, with activation checkpointing per block. kill -9 of rank 1 once gmp
    wrote its first sharded checkpoint; `--resume` finishes the stage from it, and the saved model is the
    single-process result. One launch (and one resume) covers both: each torchrun start costs ~10 s of imports."""
    import psutil

    stages = L1 + GMP
    recipe = _recipe(workdir, stages.format(batch=2, every=2, gc="true"), "fsdp")
    env = dict(os.environ, **ENV)
    proc = subprocess.Popen(_torchrun(recipe), cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        victim, deadline = None, time.monotonic() + 500
        # gmp is stage 2 (relu, progressive_l1, gmp); progressive_l1 writes no mid-stage checkpoint (every: 0)
        while not glob.glob(str(workdir / "runs" / "*" / "train-stage-2" / "loop.json")):
            assert proc.poll() is None, "the run ended before gmp's first mid-stage checkpoint"
            assert time.monotonic() < deadline
            if victim is None:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        if child.environ().get("RANK") == "1":
                            victim = child
                    except psutil.Error:
                        pass
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert err.count("fsdp (train.parallel is fsdp)") == 2, err[-3000:]  # both training stages, logged by rank 0
    assert "2 blocks and the root sharded across 2 ranks" in err
    (run,) = Registry(f"sqlite:///{workdir}/registry.db").find_runs()
    assert run.status in ("interrupted", "failed"), err[-2000:]
    ckpt = workdir / "runs" / run.id / "train-stage-2"
    assert sorted(p.name for p in (ckpt / "state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    resumed = subprocess.run(_torchrun("--resume", run.id), cwd=workdir, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming training at step" in resumed.stderr
    (run,) = Registry(f"sqlite:///{workdir}/registry.db").find_runs()
    assert run.status == "finished"
    final = {m.name: m.value for m in run.metrics if m.stage == "gmp" and m.step is None}
    assert final["replica_max_abs_diff"] == 0.0 and final["sparsity"] == pytest.approx(0.5, abs=1e-3)
    _assert_same(_saved(workdir / "out" / "fsdp"), _single_process(workdir, stages))
