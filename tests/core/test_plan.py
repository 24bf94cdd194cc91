"""sparsify run --dry-run: the memory plan, its numbers against measured ones on the tiny model, and its refusals."""
from __future__ import annotations

import pytest
import torch
from helpers import RECIPES, sparsify_here, tiny_recipe, write

from sparsify_core.offload import device_bytes
from sparsify_core.plan import GiB, Devices, make_plan, model_shape, parse_memory, train_estimate
from sparsify_core.recipe import load_recipe
from sparsify_core.training import TrainConfig
from sparsify_plugins.sources.models import HFModel, Tiny

TINY = Tiny.Params(arch="llama", hidden_size=32, intermediate_size=64, layers=3, heads=4)


def test_parse_memory():
    assert parse_memory("80GB") == 80 * 2**30 == parse_memory("80 GiB") == parse_memory("80g")
    assert parse_memory("512MB") == 2**29 and parse_memory("1.5TB") == int(1.5 * 2**40) and parse_memory("100") == 100
    for bad in ("80 parsecs", "GB", "-1GB", ""):
        with pytest.raises(ValueError, match="not a memory size"):
            parse_memory(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_grads_and_adamw_state_match_what_torch_allocates(dtype):
    """Parameter bytes exact from the skeleton; grads and AdamW's moments as a real step allocates them."""
    skeleton = Tiny().skeleton(TINY)
    assert all(p.device.type == "meta" for p in skeleton.parameters())  # the plan reads no weights
    model = Tiny().load(TINY, device=torch.device("cpu"), dtype=dtype).model
    shape = model_shape(skeleton)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    cfg = TrainConfig(steps=1, batch_size=2, freeze=["embed_tokens"])
    est = train_estimate("t", shape, name, cfg, 16, Devices(1, GiB, "cpu"), "single")
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert est.weights == device_bytes(model, torch.device("cpu")) - buffers + shape.buffers * 4

    trainable = [p for n, p in model.named_parameters() if "embed_tokens" not in n]
    for n, p in model.named_parameters():
        p.requires_grad_("embed_tokens" not in n)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 100, (2, 16))
    model(input_ids=ids).logits.float().mean().backward()
    opt.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert est.grads == grads
    assert est.optimizer == moments == 2 * grads  # two moments in the parameters' dtype (fp32: 2 x fp32)
    fsdp = train_estimate("t", shape, name, cfg, 16, Devices(4, GiB), "fsdp")
    assert fsdp.optimizer == moments // 4 and fsdp.grads == grads // 4


def test_prosparse_7b_fits_8x80gb_with_fsdp_not_ddp():
    """The acceptance: from the packaged config of a model that is not on this machine, no weights read."""
    rec = RECIPES / "prosparse-llama2-7b.yaml"
    res = sparsify_here("run", rec, "--dry-run", "--nproc", "8", "--device-memory", "80GB")
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines() if line.strip().startswith("progressive_l1")]
    assert [(r[2], r[-1] if r[-1] != "chosen)" else r[-3]) for r in rows] == [("ddp", "NO"), ("fsdp", "yes")]
    assert "6.74B parameters" in res.stdout and res.stdout.rstrip().endswith("the plan fits")

    res = sparsify_here("run", rec, "--dry-run", "--nproc", "8", "--device-memory", "80GB",
                        "--set", "stages.1.params.train.parallel=ddp")
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1
    assert "stage 'progressive_l1' needs" in res.stderr and "with ddp on 8 x 80.0 GiB" in res.stderr
    assert "set stages.1.params.train.parallel: fsdp" in res.stderr

    skeleton = HFModel().skeleton(HFModel.Params(path="meta-llama/Llama-2-7b-hf"))
    assert sum(p.numel() for p in skeleton.parameters()) == 6_738_415_616


def test_one_shot_stage_that_does_not_fit_is_told_to_offload(tmp_path):
    text = tiny_recipe("  - kind: prune\n    method: wanda\n    params: {sparsity: 0.5}\n",
                       model={"layers": 6, "hidden_size": 64, "intermediate_size": 256},
                       evaluate={"metrics": ["perplexity"], "after": "none", "batch_size": 1})
    loaded = load_recipe(write(tmp_path / "r.yaml", text))
    skeleton = Tiny().skeleton(loaded.model_params)
    rows = {r.what: r for r in make_plan(loaded, skeleton, Devices(1, GiB, "cpu")).rows}
    off_text = text.replace("  source: tiny\n", "  source: tiny\n  offload: cpu\n")
    off = load_recipe(write(tmp_path / "off.yaml", off_text))
    off_rows = {r.what: r for r in make_plan(off, skeleton, Devices(1, GiB, "cpu")).rows}
    assert off_rows["calibrate"].weights < rows["calibrate"].weights / 3
    cap = max(off_rows["calibrate"].total, off_rows["evaluate"].total, rows["evaluate"].total) + 1
    assert cap < rows["calibrate"].total
    plan = make_plan(loaded, skeleton, Devices(1, cap, "cpu"))
    assert plan.problem.startswith("stage 'wanda' needs") and plan.problem.endswith(
        "set model.offload: cpu (one layer on the device at a time)")
    assert make_plan(off, skeleton, Devices(1, cap, "cpu")).fits()

    res = sparsify_here("run", tmp_path / "r.yaml", "--dry-run", "--device-memory", f"{cap}B")
    assert res.returncode == 1 and "set model.offload: cpu" in res.stderr
    assert sparsify_here("run", tmp_path / "off.yaml", "--dry-run", "--device-memory", f"{cap}B").returncode == 0


def test_dry_run_flag_errors(tmp_path):
    path = write(tmp_path / "r.yaml", tiny_recipe("  - kind: prune\n    method: magnitude\n    params: {sparsity: 0.5}\n"))
    res = sparsify_here("run", path, "--nproc", "2", cwd=tmp_path)
    assert res.returncode == 1 and "add --dry-run" in res.stderr
    res = sparsify_here("run", path, "--dry-run", "--device-memory", "lots", cwd=tmp_path)
    assert res.returncode == 1 and "--device-memory: 'lots' is not a memory size" in res.stderr
    assert sparsify_here("run", path, "--dry-run", cwd=tmp_path).returncode == 0
    assert not (tmp_path / "registry.db").exists() and not (tmp_path / "runs").exists()  # nothing ran
