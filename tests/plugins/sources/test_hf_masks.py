"""A pruned model used as the start of a new run keeps its zeros (issue 11, kind 1; field case 01).

The runs go through the Runner in this process, as ``sparsify run`` calls it: what is tested is the model source and
the masks, not the CLI (tests/core/test_runner.py runs that as a subprocess), and each subprocess costs ~5 s of
imports.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import run_here, tiny_recipe, write
from safetensors.torch import load_file, save_file

from sparsify_core.errors import SparsifyError
from sparsify_core.output import export_output
from sparsify_core.registry import Registry
from sparsify_core.storage import iter_tensors
from sparsify_plugins.sources.models import HFModel

SPLITS = {"calibration": {"samples": 4}, "train": {"samples": 16, "offset": 4}, "eval": {"samples": 4}}
MODEL = {"arch": "llama", "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 4}
TRAIN = "{steps: 8, batch_size: 2, lr: 1.0e-2, checkpoint_every: 0}"


def _from(folder, stages: str, *, out: str | None = None, masks: str | None = None) -> str:
    """A recipe whose model is the sparsify output ``folder`` (hf source)."""
    text = tiny_recipe(stages, name="second", splits=SPLITS, evaluate={"metrics": ["weight_sparsity"], "after": "all"},
                       output={"dir": out, "save": True} if out else {"save": False})
    extra = f", masks: {masks}" if masks else ""
    lines = text.splitlines()
    i = lines.index("  source: tiny")
    lines[i:i + 2] = ["  source: hf", f"  params: {{path: {folder}{extra}}}"]
    return "\n".join(lines) + "\n"


def _final(workdir, stage: str) -> float:
    """weight_sparsity measured after ``stage`` by the one run that has that stage."""
    (run,) = [r for r in Registry(f"sqlite:///{workdir}/registry.db").find_runs()
              if any(s.name == stage for s in r.stages)]
    return next(m.value for m in run.metrics
                if m.stage == stage and m.name == "weight_sparsity" and m.layer is None and m.step is None)


@pytest.fixture(scope="module")
def pruned_once(tmp_path_factory):
    """Field case 01, step 1 (once for the module): a tiny LLaMA pruned 50% by magnitude, saved."""
    folder = tmp_path_factory.mktemp("case01")
    write(folder / "p.yaml", tiny_recipe("  - {kind: prune, method: magnitude, params: {sparsity: 0.5}}\n",
                                         model=MODEL, splits=SPLITS, output={"dir": "pruned", "save": True}))
    run_here(folder / "p.yaml", cwd=folder, registry=f"sqlite:///{folder}/registry.db", runs_dir=folder / "runs")
    return folder / "pruned"


@pytest.fixture
def pruned(workdir, pruned_once):
    """This test's own copy of the pruned output (tests may edit it)."""
    shutil.copytree(pruned_once, workdir / "pruned")
    return workdir / "pruned"


def _zeros(folder) -> dict[str, torch.Tensor]:
    """Exact zeros of the saved projection weights, in either storage."""
    tensors = iter_tensors(folder, json.loads((folder / "sparsify.json").read_text()))
    return {n: w == 0 for n, w in tensors if ".layers." in n and n.endswith("proj.weight")}


def test_finetune_from_a_pruned_output_keeps_its_sparsity(workdir, pruned, capsys):
    write(workdir / "f.yaml", _from(pruned, "  - {kind: train, method: finetune, params: {train: %s}}\n" % TRAIN))
    run_here(workdir / "f.yaml")
    said = capsys.readouterr()
    assert "masks: 10,240 pruned weights in 14 matrices (50.0% of them) from" in said.err + said.out
    assert _final(workdir, "finetune") == pytest.approx(0.5, abs=1e-9)  # was 0.0 before the fix


def test_gmp_on_a_pruned_output_regrows_nothing(workdir, pruned):
    stages = "  - {kind: prune, method: gmp, params: {sparsity: 0.6, start: 0.5, end: 1.0, every: 1, train: %s}}\n" % TRAIN
    write(workdir / "g.yaml", _from(pruned, stages, out="gmp"))
    run_here(workdir / "g.yaml")
    before, after = _zeros(pruned), _zeros(workdir / "gmp")
    assert sum(int(z.sum()) for z in before.values()) == 10240
    regrown = sum(int((before[n] & ~after[n]).sum()) for n in before)
    assert regrown == 0  # 3,469 of 10,240 came back before the fix
    assert _final(workdir, "gmp") == pytest.approx(0.6, abs=1e-3)


def _load(folder, masks="auto"):
    return HFModel().load(HFModel.Params(path=str(folder), masks=masks), device=torch.device("cpu"),
                          dtype=torch.float32)


def test_mask_modes(workdir, pruned, capsys):
    # The output is compressed (the default with masks): its masks come from its compressed weights.
    compressed = _load(pruned)
    assert len(compressed.masks) == 14 and "its compressed weights" in compressed.masks_origin
    # The rest is about the dense storage's masks file.
    pruned = export_output(pruned, workdir / "pruned-dense", "dense")
    saved = _load(pruned)
    assert len(saved.masks) == 14 and "sparsify/masks.safetensors" in saved.masks_origin
    assert sum(int((~k).sum()) for k in saved.masks.values()) == 10240
    assert all(torch.equal(k, compressed.masks[n]) for n, k in saved.masks.items())

    # A folder pruned elsewhere (no masks file): auto takes the exact zeros as the mask.
    bare = workdir / "bare"
    shutil.copytree(pruned, bare)
    (bare / "sparsify" / "masks.safetensors").unlink()
    zeros = _load(bare)
    assert "exact zeros" in zeros.masks_origin
    assert {n: k.equal(saved.masks[n]) for n, k in zeros.masks.items()} == {n: True for n in saved.masks}
    with pytest.raises(SparsifyError, match="masks: saved, but there is no sparsify/masks.safetensors"):
        _load(bare, "saved")

    # none: no masks, but the user is told the model looks pruned.
    capsys.readouterr()
    assert _load(bare, "none").masks is None
    assert "masks: none" in capsys.readouterr().err

    # A masks file that does not fit the model is refused, naming the parameter.
    state = load_file(pruned / "sparsify" / "masks.safetensors")
    name = next(iter(state))
    state[name] = state[name][:, :3].contiguous()
    save_file(state, pruned / "sparsify" / "masks.safetensors")
    with pytest.raises(SparsifyError, match=f"does not fit the model: mask for '{name}' has shape"):
        _load(pruned)


def test_a_dense_model_gets_no_masks(workdir):
    """A trained dense model has no matrix that is 1% exact zeros: auto gives no masks (a mask is a byte a weight)."""
    from helpers import tiny_model

    from sparsify_plugins.sources._bytes_tokenizer import bytes_tokenizer

    tiny_model("llama").save_pretrained(workdir / "dense")
    bytes_tokenizer().save_pretrained(workdir / "dense")
    loaded = _load(workdir / "dense")
    assert loaded.masks is None and loaded.masks_origin == ""
