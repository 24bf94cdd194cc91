"""Checkpoints between stages and the saved output folder, both written atomically.

A checkpoint (``<workdir>/checkpoint``) holds the model's weights, the masks,
and every completed stage's ``StageResult`` state and info; resuming loads the
model from its source, lets each completed stage ``rebuild`` its structural
changes, then loads the weights. The output folder is a transformers folder
(``config.json``, safetensors, tokenizer) plus ``sparsify.json`` (the
manifest), ``recipe.yaml`` and a ``sparsify/`` folder with stage states;
its weights and masks are stored ``dense`` (plain transformers: every
module in its plain form, see ``plain``) or
``compressed`` (sparsify only; see ``storage``). ``load_output`` rebuilds any
modified modules the same way, on the meta device, and fills them from the
stored tensors one at a time, so no second copy of the weights exists during
a load; ``export_output`` converts between the two storages.
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
from . import plain as P
from . import storage as S

MANIFEST = "sparsify.json"
#: Version of the output folder's layout (``sparsify.json`` ``format``); 2 added ``storage``.
FORMAT_VERSION = 2
#: Version of a checkpoint folder (``checkpoint.json`` ``format``).
CHECKPOINT_VERSION = 1


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
    save_model(model, str(tmp / "model.safetensors"), force_contiguous=True)  # e.g. BSR tiles held by columns
    if len(masks):
        save_file(masks.state_dict(), tmp / "masks.safetensors")
    entries = _save_results(tmp / "stages", results)
    meta = {"format": CHECKPOINT_VERSION, "completed": completed, "stages": entries, "extra": extra or {}}
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


def default_storage(masks: MaskSet, manifest: dict) -> str:
    """``compressed`` when the model has masks or modules a stage swapped (plain transformers
    cannot load those as they are anyway), else ``dense``."""
    rebuilt = any(st.get("rebuild", True) for st in manifest.get("stages", []))
    return "compressed" if len(masks) or rebuilt else "dense"


def save_output(folder: Path, model, tokenizer, masks: MaskSet, manifest: dict, recipe_text: str,
                results: dict[int, StageResult], storage: str | None = None) -> Path:
    """Write the output folder atomically; returns its path.

    ``storage`` is ``dense`` or ``compressed`` (``storage`` module); ``None``
    picks ``default_storage``. ``dense`` writes every module in its plain
    form (``plain``: layouts densified, exactly), so plain transformers loads
    the folder and computes the same function; the storage block lists the
    modules written so (``"plain"``), for ``load_output`` to rebuild them. The
    model is left as it was. Raises ``SparsifyError`` for another value, and
    for ``dense`` when a module has no plain form (experts, a thresholded
    input or activation: the architecture changed), naming it."""
    folder = Path(folder)
    storage = storage or default_storage(masks, manifest)
    if storage not in S.STORAGES:
        raise SparsifyError(f"unknown output storage {storage!r}: choose dense or compressed")
    tmp = tmp_for(folder)
    plain, plain_masks = [], dict(masks.items()) if masks is not None else {}
    if storage == "dense":  # plain transformers loads it: modules in their plain form while it is written
        originals, plain_masks = P.to_plain(model, plain_masks, P.skeleton(model.config, manifest.get("task",
                                                                                                    "causal_lm")))
        plain = list(originals)
        try:
            model.save_pretrained(tmp, safe_serialization=True, **_own_names())
        finally:
            P.restore(model, originals)
    else:
        model.save_pretrained(tmp, safe_serialization=True, **_own_names())
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    extra = tmp / "sparsify"
    extra.mkdir()
    if storage == "dense":
        if plain_masks:
            save_file({k: m.to(torch.uint8).contiguous() for k, m in plain_masks.items()}, tmp / S.DENSE_MASKS)
        block = {"form": "dense", "version": S.STORAGE_VERSION, "plain": plain}
    else:  # the same tensors save_pretrained wrote (tied copies dropped), re-encoded
        block = _recompress(tmp, dict(masks.items()), model)
    manifest = dict(manifest, format=FORMAT_VERSION, storage=block, stage_results=_save_results(extra, results))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    (tmp / "recipe.yaml").write_text(recipe_text)
    replace_dir(tmp, folder)
    return folder


def _own_names() -> dict:
    """Keep the model's own tensor names in the saved weights (transformers >= 5 would otherwise rename some
    models' tensors back to their original checkpoint layout on save, e.g. Mixtral's packed experts into
    ``experts.<j>.w1``): the masks, the compressed storage and ``load_output`` all key tensors by those names,
    and transformers >= 5 loads them as they are."""
    import inspect

    from transformers import PreTrainedModel

    takes = "save_original_format" in inspect.signature(PreTrainedModel.save_pretrained).parameters
    return {"save_original_format": False} if takes else {}


def _saved_names(model, masks: dict[str, torch.Tensor], saved: set[str]) -> dict[str, torch.Tensor]:
    """``masks`` keyed by the names the saved weights hold: the mask of a tied parameter whose name
    ``save_pretrained`` dropped (a pruned ``lm_head.weight`` tied to the embedding) goes under the tied name it
    kept. The loaded model resolves either name to the one tensor, so the mask applies the same."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    aliases = {name: group for group in names.values() for name in group}
    out = {}
    for name, keep in masks.items():
        kept = next((a for a in aliases.get(name, [name]) if a in saved), name) if name not in saved else name
        out[kept] = keep if kept not in out else (out[kept] & keep)  # two names of one tensor: both prunings
    return out


def _recompress(folder: Path, masks: dict[str, torch.Tensor], model=None) -> dict:
    """Replace the dense weight files in ``folder`` by the compressed file; returns the storage block.

    ``model`` (the one just saved) resolves masks of tied parameters to the names saved (``_saved_names``)."""
    tensors = dict(S.iter_tensors(folder, {}))
    if model is not None:
        masks = _saved_names(model, masks, set(tensors))
    for f in S.dense_files(folder):
        f.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    return S.write_storage(folder, tensors, masks, "compressed")


def read_manifest(path) -> tuple[Path, dict]:
    """An output folder and its ``sparsify.json``; ``SparsifyError`` naming the folder when it is not one."""
    folder = Path(path)
    if not folder.is_dir():
        raise SparsifyError(f"{folder}: no such output folder")
    if not (folder / MANIFEST).exists():
        raise SparsifyError(f"{folder}: not a sparsify output (no {MANIFEST})")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except ValueError as exc:
        raise SparsifyError(f"{folder / MANIFEST}: not valid JSON ({exc})") from None
    form = S.storage_of(manifest).get("form")
    if form not in S.STORAGES:
        raise SparsifyError(f"{folder / MANIFEST}: storage.form: unknown storage {form!r} "
                            f"(this sparsify knows {', '.join(S.STORAGES)})")
    return folder, manifest


def export_output(src, dest, storage: str) -> Path:
    """Copy output ``src`` to ``dest`` with its weights and masks stored as ``storage``; returns ``dest``.

    Tensor by tensor, without building the model, so every weight and mask
    is bit-identical; except ``dense`` from an output whose stages swapped
    modules in sparsify's own form: the model is loaded and written in its
    plain form (``save_output``: weights densified from their layouts, bit
    for bit, so plain transformers loads it; ``SparsifyError`` naming a
    module with no plain form, e.g. experts). The rest of the folder (config, tokenizer, recipe,
    stage states) is copied as is. Written atomically (``dest`` appears
    complete or not at all; an existing ``dest`` is replaced). Raises
    ``SparsifyError`` when ``src`` is not an output, ``storage`` is unknown or
    ``dest`` is ``src``."""
    import shutil

    src, manifest = read_manifest(src)
    dest = Path(dest)
    if storage not in S.STORAGES:
        raise SparsifyError(f"unknown storage {storage!r}: choose dense or compressed")
    if dest.resolve() == src.resolve():
        raise SparsifyError(f"{dest}: export into a new folder, not onto the output itself")
    plain = S.storage_of(manifest).get("plain", [])
    rebuilt = any(st.get("rebuild", True) for st in manifest.get("stages", []))
    if storage == "dense" and rebuilt and "plain" not in S.storage_of(manifest):
        tensors, masks, plain = _plain_tensors(src)  # modules a stage swapped: their plain form
    else:  # plain already (or compressed, which stores any form): tensor by tensor
        try:
            tensors = dict(S.iter_tensors(src, manifest))
            masks = S.read_masks(src, manifest)
        except (ValueError, OSError) as exc:
            raise SparsifyError(f"{src}: {exc}") from None
    tmp = tmp_for(dest)
    weights = {p.name for p in S.dense_files(src)} | {S.COMPRESSED_FILE, "model.safetensors.index.json", MANIFEST}
    for p in src.iterdir():
        if p.name in weights:
            continue
        if p.is_dir():
            shutil.copytree(p, tmp / p.name, ignore=shutil.ignore_patterns(Path(S.DENSE_MASKS).name))
        else:
            shutil.copy2(p, tmp / p.name)
    block = S.write_storage(tmp, tensors, masks, storage) | ({"plain": plain} if plain or storage == "dense" else {})
    (tmp / MANIFEST).write_text(json.dumps(dict(manifest, format=FORMAT_VERSION, storage=block), indent=1,
                                           default=str))
    replace_dir(tmp, dest)
    return dest


def _plain_tensors(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """The state dict (tied copies dropped) and masks of output ``src`` with every module in its plain form,
    and the paths of the modules converted (``plain.to_plain``; ``SparsifyError`` naming one with none)."""
    loaded = load_output(src, fast=False)
    model = loaded.model
    originals, masks = P.to_plain(model, dict(loaded.masks.items()),
                                  P.skeleton(model.config, loaded.manifest.get("task", "causal_lm")))
    names = dict(model.named_parameters(remove_duplicate=False))
    tied = set(names) - {n for n, _ in model.named_parameters()}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    return tensors, masks, list(originals)


@dataclass
class LoadedOutput:
    """A sparsify output loaded back."""

    model: torch.nn.Module
    tokenizer: Any
    manifest: dict
    masks: MaskSet


#: What ``load_output(layouts=...)`` accepts: weight layouts chosen per Linear, or weights as saved.
LAYOUT_CHOICES = ("auto", "measure", "none")


def load_output(path, device="cpu", fast: bool = True, layouts: str = "auto") -> LoadedOutput:
    """Load any sparsify output folder, dense or compressed: architecture, stage rebuilds, weights, masks.

    Works for outputs whose modules were modified by stages (their methods'
    ``rebuild`` redoes the structure) as long as the plugins that made them are
    installed. The model is built on the meta device and takes the stored
    tensors as they are decoded, one at a time: no random initialisation and
    no second copy of the weights, and a layout's storage (``SparseLinear``)
    is never densified. Floating tensors keep the dtype the fresh model has
    (as ``load_state_dict`` would copy them).

    With ``fast`` (the default), the installed plugins then swap in the
    modules that compute fastest on ``device`` (``sparsify_fast_modules``:
    e.g. activation-sparse FFNs for ReLU/FATReLU FFNs, ``MoEFFN`` for FFNs
    split into experts), exactly; ``LoadedOutput.manifest["fast_modules"]``
    lists what changed. ``fast=False`` keeps the modules as saved (to train
    further, or to inspect the structure the stages left). ``layouts``
    (with ``fast``): ``"auto"`` (the default) lets the plugins also move
    pruned Linear weights into the layout their measured table rates fastest
    on this machine for decoding (one token), keeping dense where no layout
    wins, and say which; ``"measure"`` does the same after measuring the
    entries the table lacks for these weights (seconds per layout, shape and
    density, stored for the next load); ``"none"`` keeps every weight as saved.

    Raises ``SparsifyError`` (one line naming the folder) when ``path`` is not
    an output, its storage is unknown, a plugin it needs is missing, or its
    weights do not fit the rebuilt model; (one line) for a ``layouts`` not
    in ``LAYOUT_CHOICES``.
    """
    if layouts not in LAYOUT_CHOICES:
        raise SparsifyError(f"layouts {layouts!r}: choose {', '.join(LAYOUT_CHOICES[:-1])} or {LAYOUT_CHOICES[-1]}")
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .context import RunContext
    from .plugin_manager import catalog, plugin_manager

    folder, manifest = read_manifest(path)
    config = AutoConfig.from_pretrained(folder)
    auto = AutoModelForCausalLM if manifest.get("task", "causal_lm") == "causal_lm" else AutoModel
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    results = _load_results(folder / "sparsify", manifest.get("stage_results", []))
    # Parameters on the meta device (buffers real: rotary tables are computed, not stored).
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config)
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
    plain = S.storage_of(manifest).get("plain", [])
    stored = S.iter_tensors(folder, manifest)
    masks_state = None
    if plain:  # modules written in their plain form: take them back into the form the stages left
        try:
            stored = dict(stored)
            masks_state = S.read_masks(folder, manifest)
        except (ValueError, OSError) as exc:
            raise SparsifyError(f"{folder}: {exc}") from None
        P.load_plain(model, plain, P.skeleton(config, manifest.get("task", "causal_lm")), stored, masks_state)
        stored = stored.items()
    expected = model.state_dict()
    state, unexpected = {}, []
    try:
        for i, (name, t) in enumerate(stored):
            ref = expected.get(name)
            if ref is None:
                unexpected.append(name)
                continue
            state[name] = t.to(ref.dtype) if t.is_floating_point() and ref.is_floating_point() else t
            if i % 8 == 7:
                _release_freed_heap()  # as it goes: freed decode buffers otherwise pile up now and then (below)
        masks = MaskSet()
        if masks_state is None:  # packed as stored: no bool per weight, even for a moment
            for name, bits, shape in S.iter_masks(folder, manifest):
                masks.set_packed(name, bits, shape)
        else:
            masks.load_state_dict(masks_state)
        del masks_state
    except (ValueError, OSError) as exc:
        raise SparsifyError(f"{folder}: {exc}") from None
    if not state and not plain:
        raise SparsifyError(f"{folder}: no weights (no model.safetensors or {S.COMPRESSED_FILE})")
    model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [k for k in expected if k not in tied and _is_meta(model, k)]
    if missing or unexpected:
        raise SparsifyError(f"{folder}: weights do not match the rebuilt model "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    _release_freed_heap()
    model = model.to(device).eval()
    if fast:
        changed = []
        for done in plugin_manager()[0].hook.sparsify_fast_modules(model=model, masks=masks,
                                                                    device=torch.device(device), layouts=layouts):
            changed += done or []
        manifest = dict(manifest, fast_modules=changed)
    return LoadedOutput(model=model, tokenizer=tokenizer, manifest=manifest, masks=masks)


def _release_freed_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Decoding a compressed output frees many short-lived buffers (stored values,
    unpacked bits) across malloc arenas; left resident they put the load up to
    ~70 MB above a dense load of the same model (SmolLM2-135M,
    ``benchmarks/load_memory.py``), and trimmed only at the end they still
    piled up to a 130 MB higher peak in 2 of 10 loads; ``load_output`` trims
    every 8 tensors as well."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


def _is_meta(model: torch.nn.Module, key: str) -> bool:
    """Whether the parameter or buffer ``key`` of ``model`` was never filled (still on the meta device)."""
    owner, _, attr = key.rpartition(".")
    t = getattr(model.get_submodule(owner) if owner else model, attr, None)
    return t is None or t.is_meta
