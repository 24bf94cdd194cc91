"""Checkpoints between stages and the saved output folder, both written atomically.

A checkpoint (``<workdir>/checkpoint``) holds the model's weights, the masks,
and every completed stage's ``StageResult`` state and info; resuming loads the
model from its source, lets each completed stage ``rebuild`` its structural
changes, then loads the weights. The output folder is a transformers folder
(``config.json``, safetensors, tokenizer) plus ``sparsify.json`` (the
manifest), ``recipe.yaml`` and a ``sparsify/`` folder with masks and stage
states; ``load_output`` rebuilds any modified modules the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .errors import SparsifyError
from .fsutil import replace_dir, tmp_for
from .masks import MaskSet
from .method import StageResult

MANIFEST = "sparsify.json"
FORMAT_VERSION = 1


def _save_results(folder: Path, results: dict[int, StageResult]) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for idx, res in sorted(results.items()):
        if res.state:
            save_file({k: v.detach().cpu().contiguous() for k, v in res.state.items()}, folder / f"stage-{idx}.safetensors")
        entries.append({"index": idx, "metrics": res.metrics, "info": res.info, "has_state": bool(res.state)})
    return entries


def _load_results(folder: Path, entries: list[dict]) -> dict[int, StageResult]:
    out = {}
    for e in entries:
        state = load_file(folder / f"stage-{e['index']}.safetensors") if e.get("has_state") else {}
        out[e["index"]] = StageResult(metrics=e.get("metrics", {}), state=state, info=e.get("info", {}))
    return out


# --------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """What a run had finished when its last checkpoint was written."""

    completed: int  # number of completed stages
    results: dict[int, StageResult]
    extra: dict[str, Any] = field(default_factory=dict)


def write_checkpoint(workdir: Path, model: torch.nn.Module, masks: MaskSet, completed: int,
                     results: dict[int, StageResult], extra: dict[str, Any] | None = None) -> Path:
    """Write ``<workdir>/checkpoint`` atomically (temp folder, then rename)."""
    final = Path(workdir) / "checkpoint"
    tmp = tmp_for(final)
    save_model(model, str(tmp / "model.safetensors"))
    if len(masks):
        save_file(masks.state_dict(), tmp / "masks.safetensors")
    entries = _save_results(tmp / "stages", results)
    meta = {"format": FORMAT_VERSION, "completed": completed, "stages": entries, "extra": extra or {}}
    (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=1))
    replace_dir(tmp, final)
    return final


def read_checkpoint(workdir: Path) -> Checkpoint | None:
    """The last complete checkpoint of a run, or ``None``."""
    final = Path(workdir) / "checkpoint"
    if not (final / "checkpoint.json").exists():
        old = final.with_name("checkpoint.old")  # killed between the two renames
        if not (old / "checkpoint.json").exists():
            return None
        final = old
    meta = json.loads((final / "checkpoint.json").read_text())
    return Checkpoint(completed=meta["completed"], results=_load_results(final / "stages", meta["stages"]),
                      extra=meta.get("extra", {}) | {"path": str(final)})


def restore_weights(checkpoint: Checkpoint, model: torch.nn.Module, masks: MaskSet) -> None:
    """Load a checkpoint's weights and masks into a model already rebuilt to its structure."""
    path = Path(checkpoint.extra["path"])
    load_model(model, str(path / "model.safetensors"), strict=True)
    if (path / "masks.safetensors").exists():
        masks.load_state_dict(load_file(path / "masks.safetensors"))


# --------------------------------------------------------------------------- outputs


def save_output(folder: Path, model, tokenizer, masks: MaskSet, manifest: dict, recipe_text: str,
                results: dict[int, StageResult]) -> Path:
    """Write the output folder atomically; returns its path."""
    folder = Path(folder)
    tmp = tmp_for(folder)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    extra = tmp / "sparsify"
    extra.mkdir()
    if len(masks):
        save_file(masks.state_dict(), extra / "masks.safetensors")
    manifest = dict(manifest, format=FORMAT_VERSION, stage_results=_save_results(extra, results))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    (tmp / "recipe.yaml").write_text(recipe_text)
    replace_dir(tmp, folder)
    return folder


@dataclass
class LoadedOutput:
    """A sparsify output loaded back."""

    model: torch.nn.Module
    tokenizer: Any
    manifest: dict
    masks: MaskSet


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SparsifyError(f"{folder}: no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def load_output(path, device="cpu") -> LoadedOutput:
    """Load any sparsify output folder: architecture, stage rebuilds, weights, masks.

    Works for outputs whose modules were modified by stages (their methods'
    ``rebuild`` redoes the structure) as long as the plugins that made them are
    installed.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .context import RunContext
    from .plugin_manager import catalog

    folder = Path(path)
    if not (folder / MANIFEST).exists():
        raise SparsifyError(f"{folder}: not a sparsify output (no {MANIFEST})")
    manifest = json.loads((folder / MANIFEST).read_text())
    config = AutoConfig.from_pretrained(folder)
    auto = AutoModelForCausalLM if manifest.get("task", "causal_lm") == "causal_lm" else AutoModel
    model = auto.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    results = _load_results(folder / "sparsify", manifest.get("stage_results", []))
    ctx = RunContext(run_id=manifest.get("run_id", "?"), model=model, tokenizer=tokenizer,
                     task=manifest.get("task", "causal_lm"), data={}, device=torch.device(device),
                     dtype=next(model.parameters()).dtype, seed=manifest.get("seed", 0), workdir=folder)
    cat = catalog()
    for st in manifest.get("stages", []):
        if not st.get("rebuild", True):
            continue
        cls = cat.methods.get((st["kind"], st["method"]))
        if cls is None:
            raise SparsifyError(f"{folder}: stage {st['name']!r} used {st['kind']}/{st['method']}, "
                                "which no installed plugin provides; install the plugin that provides it")
        ctx.stage_name, ctx.stage_index = st["name"], st["index"]
        cls().rebuild(ctx, cls.Params.model_validate(st["params"]), results.get(st["index"], StageResult()))
    missing, unexpected = model.load_state_dict(_weights(folder), strict=False)
    model.tie_weights()
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise SparsifyError(f"{folder}: weights do not match the rebuilt model "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    masks = MaskSet()
    if (folder / "sparsify" / "masks.safetensors").exists():
        masks.load_state_dict(load_file(folder / "sparsify" / "masks.safetensors"))
    return LoadedOutput(model=model.to(device).eval(), tokenizer=tokenizer, manifest=manifest, masks=masks)
