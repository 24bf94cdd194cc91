"""The engine: runs a validated recipe's stages on a model and records everything.

Data flows one way: LoadedRecipe -> Runner -> each stage's method -> metrics ->
registry. The runner knows no method by name; it calls plugins through the
catalog and the lifecycle hooks.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from . import progress
from .calibration import DevicePeak
from .context import RunContext
from .errors import RunInterrupted, SparsifyError
from .errors import one_line as _one_line
from .masks import MaskSet
from .metric import MetricInfo
from .method import STAGE_METRICS, StageResult
from .output import read_checkpoint, restore_weights, save_output, write_checkpoint
from .plugin_manager import catalog, hooks
from .recipe import LoadedRecipe, check_model
from .registry import reference_evaluation
from .sources import TokenSplit, pack_texts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SparsifyError(f"model.device is {spec!r} but CUDA is not available here")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def _peak_memory(device: torch.device):
    """Measure the peak memory (MiB) of the enclosed work: CUDA allocator peak, or sampled process RSS."""
    box = {"peak": 0.0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield box
        box["peak"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    import psutil

    proc, stop = psutil.Process(), threading.Event()

    def sample():
        while not stop.is_set():
            box["peak"] = max(box["peak"], proc.memory_info().rss / 2**20)
            stop.wait(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield box
    finally:
        stop.set()
        t.join()
        box["peak"] = max(box["peak"], proc.memory_info().rss / 2**20)


@contextmanager
def _signals_as_interrupts():
    """SIGTERM (and SIGHUP) end the run like Ctrl-C, so the registry learns why it stopped."""
    def handler(signum, _frame):
        raise RunInterrupted(f"stopped by {signal.Signals(signum).name}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Runner:
    """Runs one recipe (fresh, or resuming ``resume_id``) against a registry."""

    def __init__(self, loaded: LoadedRecipe, registry, *, resume_id: str | None = None,
                 runs_dir: str | Path = "runs", sweep_id: str | None = None, sweep_point: str | None = None,
                 reuse: "tuple[str, Path] | None" = None):
        """``reuse=(run_id, workdir)``: a fresh run starts from that run's checkpoint (its completed stages
        must be this recipe's first stages, as ``search`` makes them): after the dense baseline, those
        stages are rebuilt and their weights and masks restored instead of run again, and recorded as
        completed here with a note of where they came from."""
        self.reuse = reuse
        self.loaded = loaded
        self.sweep_id, self.sweep_point = sweep_id, sweep_point  # set for the runs of a sweep
        self.recipe = loaded.recipe
        self.registry = registry
        self.resume_id = resume_id
        self.runs_dir = Path(runs_dir)
        self.catalog = catalog()
        self.hooks = hooks()
        # transformers' own per-load bars ("Loading weights", "Writing model shards")
        # would interleave with ours; sources print their own status lines.
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()

    # -- setup -----------------------------------------------------------------

    def _load_model(self, device, dtype):
        src = self.catalog.model_sources[self.recipe.model.source]()
        return src.load(self.loaded.model_params, device=device, dtype=dtype)

    def _load_offloaded(self, device, dtype, mode: str, folder: Path | None = None):
        """The model with its layers offloaded (``model.offload``): loaded on the CPU, then split by ``Offload``."""
        from .offload import Offload

        loaded = self._load_model(torch.device("cpu"), dtype)
        return loaded, Offload(loaded.model, device, mode, folder)  # its forward hooks keep it alive

    def _load_data(self, tokenizer) -> dict[str, TokenSplit]:
        d = self.recipe.data
        src = self.catalog.data_sources[d.source]()
        progress.info(f"data: {d.source} -> " + ", ".join(f"{n} {s.samples}x{s.seq_len or d.seq_len}"
                                                           for n, s in d.splits.items()))
        texts = src.texts(self.loaded.data_params)
        out = {}
        for name, spec in d.splits.items():
            part = spec.partition or ("eval" if name == "eval" else "train")
            if part not in texts:
                raise SparsifyError(f"data split {name!r} wants partition {part!r}; the {d.source!r} source "
                                    f"has: {', '.join(sorted(texts))}")
            try:
                ids = pack_texts(tokenizer, texts[part], spec.seq_len or d.seq_len, spec.samples, offset=spec.offset)
            except ValueError as exc:
                raise SparsifyError(f"data split {name!r} (partition {part!r}): {exc}") from None
            out[name] = TokenSplit(name, ids)
        return out

    def _metrics(self):
        table = self.catalog.metrics
        if self.loaded.metrics is None:  # metrics: all
            return [table[n]() for n in sorted(table) if table[n].in_all]
        return [table[n](params) for n, params in self.loaded.metrics]

    def _evaluate_after(self, index: int) -> bool:
        after = self.recipe.evaluate.after
        n = len(self.recipe.stages)
        if after == "none":
            return False
        if after == "all":
            return True
        if after == "last":
            return index == n - 1
        return self.recipe.stages[index].name in after

    # -- the run ---------------------------------------------------------------

    def run(self) -> str:
        """Run (or resume) the recipe; returns the run id. Raises on failure after recording it.

        A recipe the model's structure cannot take (``check_model``) raises
        ``RecipeError`` first: nothing is loaded and no run is recorded. Once
        the run is recorded, every path (success, failure in or outside a
        stage, Ctrl-C/SIGTERM/SIGHUP) keeps the lifecycle hooks' contract
        (``hookspecs``): each started stage and the run itself are reported
        finished once, with their status, before the error is raised
        (``SparsifyError`` for a failure, ``RunInterrupted`` for an interrupt).
        """
        check_model(self.loaded)
        rec = self.recipe
        self.device = dist.init(resolve_device(rec.model.device))
        if not dist.is_main():  # under torchrun only rank 0 records; the others follow its run id
            self.registry, self.hooks = _Silent(), _Silent()
        dense_done = False
        if dist.is_main():
            dense_done = self._open_run()
        if dist.world_size() > 1:
            self.run_id, self.workdir, dense_done = dist.broadcast(
                (getattr(self, "run_id", None), getattr(self, "workdir", None), dense_done))
        run_id = self.run_id
        if dist.is_main():
            progress.info(f"run {run_id}: {rec.name} ({'resumed' if self.resume_id else 'new'})"
                          + (f", {dist.world_size()} processes" if dist.world_size() > 1 else ""))
        self._current = None  # index of the stage under way, for failure records
        self._stage_t0 = 0.0  # when it started (perf_counter)
        try:
            with _signals_as_interrupts():
                self.hooks.sparsify_run_started(run_id=run_id, recipe=rec, resumed=bool(self.resume_id))
                self.workdir.mkdir(parents=True, exist_ok=True)
                self._execute(dense_done)
        except (KeyboardInterrupt, RunInterrupted) as exc:
            reason = str(exc) or "interrupted (Ctrl-C)"
            self._end("interrupted", reason)
            raise RunInterrupted(f"{reason}; continue with `sparsify run --resume {run_id}`") from None
        except Exception as exc:
            reason = _one_line(exc) if not isinstance(exc, SparsifyError) else str(exc)
            current = self._current
            where = f" in stage {rec.stages[current].name!r}" if current is not None else ""
            self._end("failed", reason)
            raise SparsifyError(f"run {run_id} failed{where}: {reason}") from exc
        self.registry.set_run_status(run_id, "finished")
        self.hooks.sparsify_run_finished(run_id=run_id, status="finished", reason=None)
        dist.barrier()
        return run_id

    def _open_run(self) -> bool:
        """Create the run (or reopen it to resume) in the registry; True if its dense baseline is recorded."""
        rec = self.recipe
        if self.resume_id:
            run = self.registry.get_run(self.resume_id)
            if run.status == "finished":
                raise SparsifyError(f"run {run.id} is already finished")
            if run.status == "running":
                raise SparsifyError(f"run {run.id} is still running (pid {run.pid} on {run.host})")
            self.registry.resume_run(run.id)
            self.run_id, self.workdir = run.id, Path(run.workdir)
            return reference_evaluation(run) is not None
        else:
            self.run_id = self.registry.create_run(
                recipe_name=rec.name, recipe_hash=self.loaded.hash, recipe_text=self.loaded.text,
                recipe_json=self.loaded.effective_json, overrides=self.loaded.overrides,
                model=f"{rec.model.source}", data=f"{rec.data.source}", seed=rec.seed,
                output_dir=None, workdir=None, recipe_path=self.loaded.path, sweep_id=self.sweep_id,
                sweep_point=self.sweep_point)
            self.workdir = (self.runs_dir / self.run_id).resolve()
            out = Path(rec.output.dir.format(name=rec.name, run_id=self.run_id)).resolve()
            self.registry.set_run_paths(self.run_id, workdir=str(self.workdir),
                                        output_dir=str(out) if rec.output.save else None)
        return False

    def _end(self, status: str, reason: str) -> None:
        """Record a run that ended ``failed`` or ``interrupted``: the stage under way (if any), then the run."""
        i = self._current
        if i is not None:
            seconds = time.perf_counter() - self._stage_t0
            self.registry.finish_stage(self.run_id, i, status, reason=reason)
            self._current = None
            self.hooks.sparsify_stage_finished(run_id=self.run_id, index=i, stage=self.recipe.stages[i],
                                               status=status, metrics={"stage_seconds": seconds})
        self.registry.set_run_status(self.run_id, status, reason)
        self.hooks.sparsify_run_finished(run_id=self.run_id, status=status, reason=reason)

    def _log(self, stage: str, index: int):
        def log(stage_name, step, values):
            self.registry.log_metrics(self.run_id, stage_name, index, values, step=step)
            self.hooks.sparsify_metrics_logged(run_id=self.run_id, stage=stage_name, step=step, metrics=values)
        return log

    def _execute(self, dense_done: bool):
        rec = self.recipe
        seed_everything(rec.seed)
        device, dtype = self.device, DTYPES[rec.model.dtype]
        offload = None
        if rec.model.offload == "none":
            progress.info(f"model: {rec.model.source} on {device} ({rec.model.dtype})")
            loaded = self._load_model(device, dtype)
            reference_loader = lambda: self._load_model(device, dtype).model  # noqa: E731
        else:
            where = "host memory" if rec.model.offload == "cpu" else "a memory-mapped file"
            progress.info(f"model: {rec.model.source} ({rec.model.dtype}), layers in {where}, one at a time on "
                          f"{device}")
            loaded, offload = self._load_offloaded(device, dtype, rec.model.offload, self.workdir / "offload")
            # the dense reference (metrics that compare to it) streams its layers from host memory too
            reference_loader = lambda: self._load_offloaded(device, dtype, "cpu")[0].model  # noqa: E731
        data = self._load_data(loaded.tokenizer)
        ctx = RunContext(run_id=self.run_id, model=loaded.model, tokenizer=loaded.tokenizer, task=loaded.task,
                         data=data, device=device, dtype=dtype, seed=rec.seed, workdir=self.workdir,
                         masks=MaskSet(), reference_loader=reference_loader, offload=offload)
        if loaded.masks:  # pruned before this run: those zeros hold through every stage here too
            ctx.masks.load_state_dict(loaded.masks)
            ctx.masks.apply(ctx.model)
            progress.info(f"masks: {loaded.masks_origin}; every stage keeps them zero")
        metrics = self._metrics()
        results: dict[int, StageResult] = {}
        start = 0
        ckpt = read_checkpoint(self.workdir) if self.resume_id else None
        if ckpt is not None:
            results = ckpt.results
            for stage in self.loaded.stages[:ckpt.completed]:
                i, method = stage.index, stage.method_cls()
                ctx.stage_name, ctx.stage_index = stage.name, i
                method.rebuild(ctx, stage.params, results.get(i, StageResult()))
            restore_weights(ckpt, ctx.model, ctx.masks)
            start = ckpt.completed
            progress.info(f"resuming after stage {start} of {len(rec.stages)} (checkpoint {ckpt.extra['path']})")
        if self.resume_id:  # the stage under way when the run stopped continues from its mid-stage checkpoint
            ctx.resume_stage = start
        if not dense_done:
            self._evaluate(ctx, metrics, "dense", -1, is_reference=True)
        if self.reuse is not None and ckpt is None:
            results, start = self._reuse_stages(ctx)

        for stage in self.loaded.stages[start:]:
            i, st, params, method = stage.index, stage.spec, stage.params, stage.method_cls()
            ctx.stage_name, ctx.stage_index = st.name, i
            ctx.log_callback = self._log(st.name, i) if dist.is_main() else None
            self.registry.start_stage(self.run_id, i, name=st.name, kind=st.kind, method=st.method,
                                      params=params.model_dump(mode="json"))
            self._current, self._stage_t0 = i, time.perf_counter()
            self.hooks.sparsify_stage_started(run_id=self.run_id, index=i, stage=st)
            progress.info(f"stage {i + 1}/{len(rec.stages)}: {st.name} ({st.kind}/{st.method})")
            t0 = time.perf_counter()
            ctx.device_peak = DevicePeak()
            with _peak_memory(device) as mem:
                result = method.apply(ctx, params) or StageResult()
                ctx.masks.apply(ctx.model)  # pruned weights stay zero whatever the stage did
            seconds = time.perf_counter() - t0
            results[i] = result
            stage_metrics = dict(result.metrics, stage_seconds=seconds, peak_memory_mb=mem["peak"])
            if ctx.device_peak.bytes:  # the stage calibrated layer by layer
                stage_metrics["device_memory_mb"] = ctx.device_peak.mib
            self.registry.log_metrics(self.run_id, st.name, i, stage_metrics, origin="stage",
                                      info={**result.recorded_info(), **STAGE_METRICS})
            if dist.is_main():
                write_checkpoint(self.workdir, ctx.model, ctx.masks, i + 1, results)
                shutil.rmtree(self.workdir / f"train-stage-{i}", ignore_errors=True)  # superseded
            dist.barrier()
            self.registry.finish_stage(self.run_id, i, "completed", duration_s=seconds, peak_memory_mb=mem["peak"])
            self._current = None
            self.hooks.sparsify_stage_finished(run_id=self.run_id, index=i, stage=st, status="completed",
                                               metrics=stage_metrics)
            if self._evaluate_after(i):
                self._evaluate(ctx, metrics, st.name, i)
        ctx.stage_name, ctx.stage_index = "output", len(rec.stages)
        if rec.output.save and dist.is_main():
            self._save(ctx, results)
        if offload is not None and offload.file is not None:  # the live weights of this run only: saved above
            offload.close()
            shutil.rmtree(offload.file.parent, ignore_errors=True)
        dist.barrier()

    def _reuse_stages(self, ctx: RunContext) -> tuple[dict[int, StageResult], int]:
        """Start from the checkpoint of ``self.reuse``: its completed stages rebuilt, restored and recorded."""
        source, workdir = self.reuse
        ckpt = read_checkpoint(Path(workdir))
        if ckpt is None:
            raise SparsifyError(f"run {source} left no checkpoint in {workdir} to start from")
        for stage in self.loaded.stages[:ckpt.completed]:
            i, method = stage.index, stage.method_cls()
            ctx.stage_name, ctx.stage_index = stage.name, i
            method.rebuild(ctx, stage.params, ckpt.results.get(i, StageResult()))
        restore_weights(ckpt, ctx.model, ctx.masks)
        for stage in self.loaded.stages[:ckpt.completed]:
            st = stage.spec
            self.registry.start_stage(self.run_id, stage.index, name=st.name, kind=st.kind, method=st.method,
                                      params=stage.params.model_dump(mode="json"))
            self.registry.finish_stage(self.run_id, stage.index, "completed", duration_s=0.0)
        progress.info(f"stages 1-{ckpt.completed} reused from run {source} (its checkpoint {ckpt.extra['path']})")
        return dict(ckpt.results), ckpt.completed

    def _evaluate(self, ctx: RunContext, metrics, stage: str, index: int, *, is_reference: bool = False) -> None:
        from .evaluation import evaluate

        if not dist.is_main():  # rank 0 evaluates and records; the others wait for it
            dist.barrier()
            return
        saved = ctx.stage_name
        ctx.stage_name = stage
        split = ctx.split(self.recipe.evaluate.split)
        # recorded before it starts, so an evaluation cut short shows as interrupted/failed with the run
        self.registry.start_evaluation(self.run_id, index, stage=stage, kind="reference" if is_reference else "stage",
                                       split=split.name, sequences=len(split), tokens=split.tokens)
        values = evaluate(ctx, metrics, split, batch_size=self.recipe.evaluate.batch_size, is_reference=is_reference)
        ctx.stage_name = saved
        owner = {name: m for m in metrics for name in m.value_info()}
        owner.update({m.name: m for m in metrics})
        info = {}
        for v in values:  # names a metric makes up as it goes start with its own (lm_eval/<task>/acc ...)
            m = owner.get(v.name) or owner.get(v.name.split("/")[0])
            info[v.name] = m.info_of(v.name) if m is not None else MetricInfo()
        self.registry.log_metrics(self.run_id, stage, index, values, origin="evaluation", info=info)
        self.registry.finish_evaluation(self.run_id, index, "completed")
        for v in values:  # recorded as failed; the run goes on
            if v.error is not None:
                progress.info(f"  warning: metric {v.name} failed after {stage}: {v.error}")
        summary = {v.name: v.value for v in values if v.layer is None and v.error is None}
        self.hooks.sparsify_metrics_logged(run_id=self.run_id, stage=stage, step=None, metrics=summary)
        progress.info(f"  eval after {stage}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
        dist.barrier()

    def _save(self, ctx: RunContext, results: dict[int, StageResult]) -> None:
        rec = self.recipe
        folder = Path(rec.output.dir.format(name=rec.name, run_id=self.run_id))
        stages = [{"index": s.index, "name": s.name, "kind": s.spec.kind, "method": s.spec.method,
                   "params": s.params.model_dump(mode="json"),
                   # Only stages that change the structure (beyond what config.json records) are needed to
                   # load the output back.
                   "rebuild": s.method_cls().needs_rebuild(s.params, results.get(s.index, StageResult()))}
                  for s in self.loaded.stages]
        manifest = {"sparsify": _version(), "run_id": self.run_id, "recipe": rec.name, "task": ctx.task,
                    "seed": rec.seed, "model": rec.model.model_dump(mode="json"), "stages": stages}
        with ctx.progress("save output"):
            path = save_output(folder, ctx.model, ctx.tokenizer, ctx.masks, manifest, self.loaded.text, results,
                               storage=rec.output.storage)
        self.registry.add_artifact(self.run_id, "output", str(path.resolve()))
        progress.info(f"saved {path}")


class _Silent:
    """Stands in for the registry and hooks on ranks other than 0: records nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _version() -> str:
    from . import __version__
    return __version__


def default_runs_dir() -> Path:
    """Where run work folders (checkpoints) live: ``SPARSIFY_RUNS_DIR`` or ./runs."""
    return Path(os.environ.get("SPARSIFY_RUNS_DIR", "runs"))
