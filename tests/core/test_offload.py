"""model.offload: one-shot methods on layers kept off the device give the in-memory results, holding less there."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_ctx, tiny_recipe, write

from sparsify_core.calibration import DevicePeak
from sparsify_core.errors import RecipeError
from sparsify_core.offload import Offload, device_bytes, map_safetensors
from sparsify_plugins.sources.models import Tiny

CPU = torch.device("cpu")
METHODS = {"wanda": {"sparsity": 0.5}, "sparsegpt": {"sparsity": 0.5, "block_size": 16},
           "wanda-2:4": {"pattern": "2:4"}}


def _model(layers=4):
    p = Tiny.Params(arch="llama", hidden_size=32, intermediate_size=64, layers=layers, heads=4)
    return Tiny().load(p, device=CPU, dtype=torch.float32).model


def _prune(tmp_path, model, method, offload=None):
    from sparsify_core.plugin_manager import catalog

    name = method.split("-")[0]
    cls = catalog().methods[("prune", name)]
    ctx = make_ctx(tmp_path, model, samples=8, seq_len=16)
    ctx.offload, ctx.stage_name, ctx.stage_index = offload, name, 0
    cls().apply(ctx, cls.Params.model_validate(METHODS[method]))
    ctx.masks.apply(ctx.model)
    return ctx


@pytest.mark.parametrize("mode", ["cpu", "disk"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_offloaded_pruning_equals_in_memory_with_a_lower_device_peak(tmp_path, method, mode):
    ref = _prune(tmp_path / "ref", _model(), method)
    model = _model()
    offload = Offload(model, CPU, mode, tmp_path / "off")
    got = _prune(tmp_path / "off", model, method, offload)
    assert len(ref.masks) == len(got.masks) == 4 * 7
    for name, keep in ref.masks.items():
        assert torch.equal(keep, got.masks.get(name)), name
    weights = dict(got.model.named_parameters())
    for name, p in ref.model.named_parameters():
        assert torch.equal(p, weights[name]), name
    # at rest every layer weight is its host (or file) tensor: nothing of the layers counts as on the device
    on_device = device_bytes(model, CPU, offload)
    outside = sum(p.numel() * 4 for n, p in model.named_parameters() if ".layers." not in n)
    assert on_device <= outside + 1024  # plus the rotary buffer
    assert 0 < got.device_peak.bytes < ref.device_peak.bytes
    if mode == "disk":  # the pruned weights went back into the mapped file
        mapped = map_safetensors(offload.file)
        assert torch.equal(mapped["model.layers.1.mlp.up_proj.weight"], weights["model.layers.1.mlp.up_proj.weight"])
    # a plain forward streams the layers through the device and gives the in-memory logits
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref.model(ids).logits, rtol=0, atol=0)
    assert device_bytes(model, CPU, offload) == on_device  # every layer went back after its forward


def test_device_peak_counts_one_layer_not_all():
    """The probe's numbers: in memory every weight is on the device; offloaded, one layer at most."""
    model = _model(layers=6)
    total = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert device_bytes(model, CPU) == total
    ref = copy.deepcopy(model)
    offload = Offload(model, CPU, "cpu")
    layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    from sparsify_core.calibration import calibrate_layerwise

    peaks = {}
    for key, m, off in (("memory", ref, None), ("offload", model, offload)):
        peaks[key] = DevicePeak()
        calibrate_layerwise(m, ids, lambda layer: None, batch_size=2, offload=off, peak=peaks[key])
    hidden = 4 * 16 * 32 * 4
    assert peaks["memory"].bytes >= total + hidden
    assert peaks["offload"].bytes <= total - 5 * layer + 64 * 1024  # one layer, embeddings, small arguments
    assert peaks["offload"].bytes >= layer + hidden


def test_map_safetensors_views_write_through(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).view(2, 3)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    mapped = map_safetensors(tmp_path / "t.safetensors")
    for k, t in tensors.items():
        assert mapped[k].dtype == t.dtype and torch.equal(mapped[k], t)
    mapped["a"][0].zero_()
    del mapped
    assert torch.all(load_file(str(tmp_path / "t.safetensors"))["a"][0] == 0)


def test_recipe_offload_runs_and_records_the_device_peak(workdir, mode="disk"):
    """Through the runner (cpu and disk take the same path there; the unit tests above sweep both)."""
    from sparsify_core.recipe import load_recipe
    from sparsify_core.registry import Registry
    from sparsify_core.runner import Runner

    stage = "  - kind: prune\n    method: sparsegpt\n    params: {sparsity: 0.5, block_size: 16}\n"
    registry = Registry(f"sqlite:///{workdir}/registry.db")
    peaks, ppl = {}, {}
    for offload in ("none", mode):
        text = tiny_recipe(stage, name=f"off-{offload}", model={"layers": 4},
                           evaluate={"metrics": ["perplexity"], "after": "all"}, output={"save": False})
        text = text.replace("  source: tiny\n", f"  source: tiny\n  offload: {offload}\n")
        run = registry.get_run(Runner(load_recipe(write(workdir / f"{offload}.yaml", text)), registry,
                                      runs_dir=workdir / "runs").run())
        value = {(m.stage, m.name): m.value for m in run.metrics if m.layer is None and m.step is None}
        peaks[offload], ppl[offload] = value[("sparsegpt", "device_memory_mb")], value[("sparsegpt", "perplexity")]
        assert not (workdir / "runs" / run.id / "offload").exists()  # the mapped copy goes with the run
    assert ppl["none"] == ppl[mode]
    assert 0 < peaks[mode] < peaks["none"]


def test_offload_refuses_stages_that_train(tmp_path):
    from sparsify_core.recipe import load_recipe

    text = tiny_recipe("  - kind: train\n    method: finetune\n    params: {train: {steps: 1}}\n")
    text = text.replace("  source: tiny\n", "  source: tiny\n  offload: cpu\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path / "r.yaml", text))
    assert exc.value.field == "model.offload"
    assert exc.value.line == text.splitlines().index("  offload: cpu") + 1
    assert "stage 'finetune' (train/finetune) trains" in str(exc.value)


ONE_SHOT = {  # every family of one-shot stage: layer-wise pruning, OWL profiles, threshold calibration, MoEfication,
    # expert pruning
    "owl": [("prune", "wanda", {"sparsity": 0.5, "profile": "owl", "owl_lambda": 0.1})],
    "cats": [("substitute_activation", "cats", {"target_sparsity": 0.8})],
    "fatrelu": [("substitute_activation", "relu", {}), ("substitute_activation", "fatrelu", {"target_sparsity": 0.8})],
    "moefication": [("substitute_activation", "relu", {}),
                    ("moeify", "param_cluster", {"expert_size": 16, "router": "mlp", "selection": "top_k",
                                                 "expert_fraction": 0.5, "fit": {"epochs": 2, "batch_size": 64}})],
    "reap": [("moeify", "param_cluster", {"expert_size": 16, "router": "lte", "fit": {"epochs": 2}}),
             ("moeify", "reap", {"prune_experts": 1})],
}


def _apply_all(tmp_path, model, stages, offload=None):
    from sparsify_core.plugin_manager import catalog

    ctx = make_ctx(tmp_path, model, samples=8, seq_len=16)
    ctx.offload = offload
    for i, (kind, method, params) in enumerate(stages):
        cls = catalog().methods[(kind, method)]
        ctx.stage_name, ctx.stage_index = method, i
        torch.manual_seed(0)
        cls().apply(ctx, cls.Params.model_validate(params))
        ctx.masks.apply(ctx.model)
    return ctx


@pytest.mark.parametrize("name", sorted(ONE_SHOT))
def test_every_one_shot_family_gives_the_in_memory_model_when_offloaded(tmp_path, name):
    """Stages that swap modules inside the layers (activations, experts) too: the new modules go home with them."""
    ref = _apply_all(tmp_path / "ref", _model(layers=2), ONE_SHOT[name])
    model = _model(layers=2)
    offload = Offload(model, CPU, "cpu")
    _apply_all(tmp_path / "off", model, ONE_SHOT[name], offload)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref.model(ids).logits, rtol=0, atol=1e-6)
    at_rest = device_bytes(model, CPU, offload)
    outside = sum(p.numel() * 4 for n, p in model.named_parameters() if ".layers." not in n)
    assert at_rest <= outside + 1024  # every layer tensor, new modules' included, is back home
