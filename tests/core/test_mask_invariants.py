"""Issue 11, kind 1: the zeros a pruning stage made stay zero through everything after it.

Every installed prune method x every installed later stage method, through the
real engine (``Runner``, in process): a witness metric (registered as an
in-process plugin) snapshots which logical weights are zero after every stage;
after the pruning, each later point must keep every pruned position zero
(mapped through the neuron permutations the stages report as ``perm.<block>``
state, and the rows/columns a structured pruning kept, ``rows.<module>``/
``cols.<module>``) and no module may lose zeros. The saved output loads back with
the same zeros, and a *new* run starting from the pruned output through the
``hf`` source (the field case) keeps them too.

Issue 15: every run here also checks that each stage declared every number it
reported (``StageResult.metric_info``: the registry holds a declaration for it),
and the chains run cover every built-in method.
"""
from __future__ import annotations

import pytest
import torch
from helpers import tiny_recipe, write

from sparsify_core import Metric, MetricValue, hookimpl, load_output
from sparsify_core.ffn import find_ffn_blocks, is_linear, weight_out_in
from sparsify_core.method import STAGE_METRICS
from sparsify_core.errors import RecipeError, SparsifyError
from sparsify_core.output import export_output, read_checkpoint
from sparsify_core.plugin_manager import catalog, register, unregister
from sparsify_core.recipe import load_recipe
from sparsify_core.registry import Registry, stage_values
from sparsify_core.runner import Runner

T = "{steps: 3, batch_size: 2, lr: 1.0e-2, checkpoint_every: 0}"
RELU = "{kind: substitute_activation, method: relu}"
MOE = "{kind: moeify, method: param_cluster, params: {expert_size: 8, router: lte, fit: {epochs: 2}}}"

# The stages each later method needs before it. Every installed method must be
# here: test_every_installed_method_is_swept fails when a new one lands without joining the sweep.
LATER: dict[str, list[str]] = {
    "substitute_activation/relu": [RELU],
    "substitute_activation/fatrelu": ["{kind: substitute_activation, method: fatrelu, params: {threshold: 0.05}}"],
    "substitute_activation/cats": ["{kind: substitute_activation, method: cats, params: {target_sparsity: 0.5}}"],
    "substitute_activation/drelu": ["{kind: substitute_activation, method: drelu}"],
    "substitute_activation/teal": ["{kind: substitute_activation, method: teal, params: {sparsity: 0.4, step: 0.2, "
                                   "error_samples: 2}}"],
    "regularize/progressive_l1": [RELU, "{kind: regularize, method: progressive_l1, params: "
                                        "{schedule: [{lambda: 0.01, steps: 3}], train: %s}}" % T],
    "regularize/blockwise_l1": [RELU, "{kind: regularize, method: blockwise_l1, params: "
                                      "{l1: 1.0, steps: 3, tokens_per_step: 32}}"],
    "regularize/lte": [MOE, "{kind: regularize, method: lte, params: {stage1_steps: 2, train: %s}}" % T],
    "moeify/param_cluster": [MOE],
    "moeify/coactivation": [RELU, "{kind: moeify, method: coactivation, params: "
                                  "{expert_size: 8, top_k: 2, fit: {epochs: 2}}}"],
    "moeify/routing": [MOE, "{kind: moeify, method: routing, params: {routing: top_k, expert_fraction: 0.5}}"],
    "moeify/reap": [MOE, "{kind: moeify, method: reap, params: {experts_keep: 0.75, batch_size: 2}}"],
    "prune/magnitude": ["{kind: prune, method: magnitude, params: {sparsity: 0.7}}"],
    "prune/wanda": ["{kind: prune, method: wanda, params: {sparsity: 0.7}}"],
    "prune/sparsegpt": ["{kind: prune, method: sparsegpt, params: {sparsity: 0.7}}"],
    "prune/gmp": ["{kind: prune, method: gmp, params: {sparsity: 0.7, start: 0.0, end: 0.5, every: 1, train: %s}}" % T],
    "prune/nmg": ["{kind: prune, method: nmg, params: {n: 2, m: 4, g: 1}}"],
    # learned 2:4 after the 50% unstructured pruning: groups there break 2:4 (refused), so the LM head (tied)
    "prune/maskllm": ["{kind: prune, method: maskllm, params: {prior: magnitude, targets: [lm_head], exclude: [], "
                      "train: %s}}" % T],
    "prune/width": ["{kind: prune, method: width, params: {ffn_keep: 0.5, heads_keep: 0.5}}"],
    "train/finetune": ["{kind: train, method: finetune, params: {train: %s}}" % T],
    "train/ssd": ["{kind: train, method: ssd, params: {monitor: {every: 1, threshold: 0.01, patience: 1, "
                  "samples: 2}, min_dense: 0.25, max_dense: null, final_dense: 0.25, "
                  "experts: {expert_size: 8, router: mlp, top_k: 2, fit: {epochs: 2}}, "
                  "train: {steps: 4, batch_size: 2, lr: 1.0e-2, checkpoint_every: 0}}}"],
    "layout_convert/weight": ["{kind: layout_convert, method: weight, params: {layout: bsr, block: [4, 4]}}"],
    "layout_convert/csr": ["{kind: layout_convert, method: csr}"],
    "layout_convert/bsr": ["{kind: layout_convert, method: bsr, params: {block: [4, 4]}}"],
    "layout_convert/nm": ["{kind: layout_convert, method: nm, params: {n: 2, m: 4}}"],
    "layout_convert/nmg": ["{kind: prune, method: nmg, params: {n: 2, m: 4, g: 1}}",
                           "{kind: layout_convert, method: nmg, params: {n: 2, m: 4, g: 1}}"],
    "layout_convert/activation_sparse_ffn": [RELU, "{kind: layout_convert, method: activation_sparse_ffn}"],
    "layout_convert/activation_sparse_ffn+predictor": [
        RELU, "{kind: layout_convert, method: activation_sparse_ffn, params: {predictor: {rank: 4, recall: 0.9}}}"],
    "layout_convert/moe_ffn": [MOE, "{kind: layout_convert, method: moe_ffn}"],
}
NEEDS_NM = {"layout_convert/nm"}  # the pruning before it must be 2:4 for the layout to hold it exactly


def _prune_stages(method: str, nm: bool) -> list[str]:
    """The pruning stage(s) of ``method`` at 50% (or 2:4); gmp prunes while it trains."""
    what = "pattern: '2:4'" if nm else "sparsity: 0.5"
    if method == "gmp":
        return ["{kind: prune, method: gmp, params: {%s, start: 0.0, end: 0.5, every: 1, train: %s}}" % (what, T)]
    if method == "nmg":
        return ["{kind: prune, method: nmg, params: {n: 2, m: 4, g: 1}}"]
    if method == "maskllm":  # learned 2:4 (50%) whichever is asked
        return ["{kind: prune, method: maskllm, params: {pattern: '2:4', prior: magnitude, train: %s}}" % T]
    return ["{kind: prune, method: %s, params: {%s}}" % (method, what)]


PRUNE_METHODS = ["magnitude", "wanda", "sparsegpt", "gmp", "nmg", "maskllm"]
# Prune methods that mask nothing: they cut whole rows/columns out of the weights (the model shrinks), so they
# sweep as later stages (masks of earlier pruning are cut with the weights), not as the pruning first.
STRUCTURED = ["width"]


def _pruning(stages: list[str]) -> set[int]:
    """Indices of the stages that may add zeros: the prune stages."""
    return {i for i, s in enumerate(stages) if "kind: prune" in s}


# -- the witness ---------------------------------------------------------------------------------

def logical_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every linear-like module's weight as the dense ``[out, in]`` matrix it computes with, by module path.

    Plain Linear/Conv1D, ``TransposedLinear`` (stored ``[in, out]``) and modules that hold their weight in a
    layout (``dense_weight()``, see ``sparsify_core.ffn.weight_out_in``): so a weight keeps its identity when
    a stage changes how it is stored.
    """
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "TransposedLinear":
            out[name] = module.weight.detach().t()
        elif is_linear(module):
            out[name] = weight_out_in(module).detach()
    return out


POINTS: list[dict] = []


class ZeroWitness(Metric):
    """Test-only metric: records the zero pattern of every weight at each evaluation point."""

    name = "zero_witness"

    def finish(self, ctx):
        zeros = {n: (w == 0).cpu() for n, w in logical_weights(ctx.model).items()}
        try:
            blocks = {b.name: dict(b.module_names) for b in find_ffn_blocks(ctx.model)}
        except Exception:  # noqa: BLE001 - a model without FFN blocks has no neurons to permute
            blocks = {}
        masked_nonzero = 0
        params = dict(ctx.model.named_parameters(remove_duplicate=False))
        for pname, keep in ctx.masks.items():
            p = params.get(pname)
            if p is not None:
                masked_nonzero += int((p.detach().cpu()[~keep] != 0).sum())
        POINTS.append({"index": ctx.stage_index, "zeros": zeros, "blocks": blocks, "masked_nonzero": masked_nonzero,
                       "masked": {n.removesuffix(".weight") for n, _ in ctx.masks.items()}})
        return [MetricValue(self.name, float(sum(int(z.sum()) for z in zeros.values())))]


class _WitnessPlugin:
    @hookimpl
    def sparsify_metrics(self):
        return [ZeroWitness]


@pytest.fixture
def witness(workdir, one_thread):
    plugin = _WitnessPlugin()
    register(plugin, name="zero-witness")
    POINTS.clear()
    yield POINTS
    unregister(plugin)


def _recipe(stages: list[str], *, model: dict | None = None, source: dict | None = None, out: str | None,
            dtype: str = "float32", storage: str | None = None) -> str:
    text = tiny_recipe("".join(f"  - {s}\n" for s in stages), model=model, seq_len=16,
                       splits={"calibration": {"samples": 4}, "train": {"samples": 4, "offset": 4},
                               "eval": {"samples": 1}},
                       evaluate={"metrics": ["zero_witness"], "after": "all", "batch_size": 1},
                       output=({"dir": out, "save": True} | ({"storage": storage} if storage else {})) if out
                       else {"save": False})
    if source is not None:  # a model source other than tiny
        lines = text.splitlines()
        i = lines.index("  source: tiny")
        lines[i:i + 2] = [f"  source: {source['source']}", f"  params: {{path: {source['path']}}}"]
        text = "\n".join(lines) + "\n"
    return text.replace("data:\n", f"  dtype: {dtype}\ndata:\n", 1)


def _run(workdir, text: str, name: str) -> str:
    path = write(workdir / f"{name}.yaml", text)
    registry = Registry(f"sqlite:///{workdir}/registry.db")
    run_id = Runner(load_recipe(path), registry, runs_dir=workdir / "runs").run()
    _check_declared(registry, run_id)
    return run_id


def _check_declared(registry: Registry, run_id: str) -> None:
    """Every number a stage of the run reported has a declaration recorded with the run (issue 15).

    The engine records only what ``StageResult.metric_info`` declares (and its own ``STAGE_METRICS``), so a
    name without a row here is one the method left undeclared, shown without unit or direction.
    """
    record = registry.get_run(run_id)
    methods = {s.idx: f"{s.kind}/{s.method}" for s in record.stages}
    for idx, values in stage_values(record).items():
        undeclared = sorted(n for n in values if n not in record.metric_info and n not in STAGE_METRICS)
        assert not undeclared, f"{methods[idx]} reports numbers it does not declare: {undeclared}"


def _permute(zeros: dict[str, torch.Tensor], blocks: dict[str, dict[str, str]],
             perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move weights as a stage reported: FFN neuron j after is neuron ``perm[j]`` before (``perm.<block>``);
    row (column) i of a module's ``[out, in]`` weight after is row ``rows[i]`` before (``rows.<module>``,
    ``cols.<module>``: a structured pruning that removed the others)."""
    out = dict(zeros)
    for key, index in perms.items():
        if key.startswith(("rows.", "cols.")):
            axis, path = key.split(".", 1)
            if path in out:
                out[path] = out[path][index] if axis == "rows" else out[path][:, index]
            continue
        for role, path in blocks[key].items():
            if path in out:
                out[path] = out[path][:, index] if role == "down" else out[path][index]
    return out


def _perms(workdir, run_id: str) -> dict[int, dict[str, torch.Tensor]]:
    ckpt = read_checkpoint(workdir / "runs" / run_id)
    return {i: {k.removeprefix("perm."): v for k, v in r.state.items() if k.startswith(("perm.", "rows.", "cols."))}
            for i, r in ckpt.results.items()}


def _check_points(points: list[dict], pruned_at: int, perms: dict[int, dict[str, torch.Tensor]],
                  prunes: set[int] = frozenset()) -> dict:
    """The zeros after ``pruned_at`` stay zero at every later point; returns them (mapped to the last point).

    Stages whose index is not in ``prunes`` must also keep each pruned module's zero *count*: a stage
    that only moves, stores or trains weights neither loses nor adds zeros there.
    """
    by_index = {p["index"]: p for p in points}
    ref = by_index[pruned_at]
    # the pruned modules: those with masks (an embedding's padding row is zero too, but nobody pruned it)
    want = {n: z for n, z in ref["zeros"].items() if n in ref["masked"]}
    assert want and all(bool(z.any()) for z in want.values()), "the pruning stage zeroed nothing"
    blocks = ref["blocks"]
    for p in points:
        assert p["masked_nonzero"] == 0, f"after stage {p['index']}: weights non-zero where the masks prune"
        if p["index"] <= pruned_at:
            continue
        want = _permute(want, blocks, perms.get(p["index"], {}))
        blocks = p["blocks"] or blocks
        for name, z in want.items():
            assert name in p["zeros"], f"after stage {p['index']}: {name} is gone"
            got = p["zeros"][name]
            lost = int((z & ~got).sum())
            assert lost == 0, f"after stage {p['index']}: {lost} pruned weights of {name} are non-zero"
            if p["index"] not in prunes:
                assert int(got.sum()) == int(z.sum()), (
                    f"after stage {p['index']}: {name} has {int(got.sum())} zeros, {int(z.sum())} before")
        want = {n: p["zeros"][n] for n in want}  # what the next stage must keep
    return want


# One method of each later stage *kind* (the layouts twice: any pattern, and n:m after an n:m pruning) for
# every prune method; every later *method* after magnitude pruning. Keeps the sweep at ~60 runs, not ~130.
BY_KIND = {"substitute_activation": "substitute_activation/fatrelu", "regularize": "regularize/progressive_l1",
           "moeify": "moeify/param_cluster", "prune": "prune/magnitude", "train": "train/ssd",
           "layout_convert": "layout_convert/csr"}
PAIRS = sorted({("magnitude", later) for later in LATER}
               | {(prune, later) for prune in PRUNE_METHODS for later in [*BY_KIND.values(), "layout_convert/nm"]})


@pytest.mark.parametrize("prune,later", PAIRS)
def test_pruned_zeros_survive_every_later_stage_and_reload(witness, workdir, prune, later):
    first = _prune_stages(prune, later in NEEDS_NM)
    stages = first + LATER[later]
    run_id = _run(workdir, _recipe(stages, out="out"), "chain")
    want = _check_points(witness, len(first) - 1, _perms(workdir, run_id), _pruning(stages))

    # The saved output loads back with the very same zeros (its masks included).
    loaded = load_output(workdir / "out")
    final = logical_weights(loaded.model)
    for name, z in want.items():
        assert int((z & (final[name] != 0)).sum()) == 0, f"reloaded {name} lost pruned weights"
    # ... and masks for every pruned weight still held as a parameter (a layout holds its zeros itself)
    params = dict(loaded.model.named_parameters())
    unmasked = [n for n in want if f"{n}.weight" in params and f"{n}.weight" not in loaded.masks]
    assert not unmasked, f"pruned weights saved without their masks: {unmasked}"
    if prune == "magnitude":  # every later method once
        _check_plain_form(workdir, stages)


def _check_plain_form(workdir, stages: list[str]) -> None:
    """What validation says of ``output.storage: dense`` (each stage's ``Method.plain_form``) agrees with what a
    dense export of the saved output does: refused before any weight loads, in one line naming the field,
    exactly when the export finds a module with no plain transformers form."""
    path = write(workdir / "dense.yaml", _recipe(stages, out="dense-out", storage="dense"))
    try:
        load_recipe(path)
        refused = None
    except RecipeError as exc:
        refused = str(exc)
        assert "output.storage" in refused and "\n" not in refused, refused
    try:
        export_output(workdir / "out", workdir / "dense", "dense")
        exported = None
    except SparsifyError as exc:
        exported = str(exc)
        assert "no plain form" in exported and not (workdir / "dense").exists(), exported
    assert (refused is None) == (exported is None), (
        f"validation: {refused or 'accepted'}; dense export: {exported or 'written'}")


@pytest.fixture(scope="module")
def pruned_output(tmp_path_factory):
    """Field case 01, step 1 (once for the module): a tiny LLaMA pruned 50% by magnitude, saved."""
    folder = tmp_path_factory.mktemp("pruned")
    text = _recipe(_prune_stages("magnitude", False), out=str(folder / "out")).replace("[zero_witness]",
                                                                                    "[weight_sparsity]")
    path = write(folder / "prune.yaml", text)
    registry = Registry(f"sqlite:///{folder}/registry.db")
    _check_declared(registry, Runner(load_recipe(path), registry, runs_dir=folder / "runs").run())
    return folder / "out"


@pytest.mark.parametrize("later", sorted(k for k in LATER if k not in NEEDS_NM))
def test_a_new_run_from_a_pruned_output_keeps_its_zeros(witness, workdir, pruned_output, later):
    """The field case: start a second recipe from a pruned output (hf source) with each later stage."""
    run_id = _run(workdir, _recipe(LATER[later], source={"source": "hf", "path": str(pruned_output)},
                                   out=None), "second")
    # index -1: the baseline of the second run is the pruned model as loaded
    _check_points(witness, -1, _perms(workdir, run_id), _pruning(LATER[later]))


def test_every_installed_method_is_swept():
    installed = {f"{k}/{n}" for k, n in catalog().methods}
    later_kinds = {k for k, _ in catalog().methods} - {"test"}
    assert later_kinds <= set(BY_KIND), f"stage kinds missing from the sweep: {sorted(later_kinds - set(BY_KIND))}"
    swept = {k.split("+")[0] for k in LATER}
    assert installed <= swept, f"methods missing from the mask sweep: {sorted(installed - swept)}"
    assert {n for k, n in catalog().methods if k == "prune"} <= set(PRUNE_METHODS) | set(STRUCTURED)


def test_the_chains_run_here_cover_every_built_in_method():
    """Every built-in method runs in some chain of ``LATER`` (each chain runs through ``_run``, which checks
    the declarations), so a new built-in method that reports an undeclared number fails here."""
    built_in = {f"{k}/{n}" for (k, n), cls in catalog().methods.items()
                if cls.__module__.startswith("sparsify_plugins.")}
    covered = {m for stages in LATER.values() for m in _methods(stages)}
    assert covered == built_in


class _FailOnce:
    """Test-only method ``test/fail_once``: fails while its flag file exists (and removes it)."""

    @hookimpl
    def sparsify_methods(self):
        from pathlib import Path

        from sparsify_core import Method, Params as BaseParams

        class FailOnce(Method):
            """Fail the first time, as a crash between stages would."""

            kind, name = "test", "fail_once"

            class Params(BaseParams):
                flag: str

            def apply(self, ctx, params):
                flag = Path(params.flag)
                if flag.exists():
                    flag.unlink()
                    raise RuntimeError("crash (test)")

        return [FailOnce]


def test_resume_after_a_crash_keeps_the_zeros(witness, workdir):
    """Checkpoint and resume: masks, permuted neurons and rebuilt experts come back together."""
    plugin = _FailOnce()
    register(plugin, name="fail-once")
    try:
        flag = workdir / "flag"
        flag.write_text("1")
        stages = (_prune_stages("magnitude", False) + LATER["moeify/param_cluster"]
                  + ["{kind: test, method: fail_once, params: {flag: %s}}" % flag]
                  + ["{kind: train, method: finetune, params: {train: %s}}" % T])
        path = write(workdir / "r.yaml", _recipe(stages, out="out"))
        registry = Registry(f"sqlite:///{workdir}/registry.db")
        with pytest.raises(Exception, match="crash"):
            Runner(load_recipe(path), registry, runs_dir=workdir / "runs").run()
        (run,) = registry.find_runs()
        run_id = Runner(load_recipe(path), registry, resume_id=run.id, runs_dir=workdir / "runs").run()
        _check_declared(registry, run_id)  # a resumed run's stages are recorded the same way
    finally:
        unregister(plugin)
    assert [p["index"] for p in witness] == [-1, 0, 1, 2, 3]  # the resumed run evaluated stages 2 and 3
    want = _check_points(witness, 0, _perms(workdir, run_id), _pruning(stages))
    final = logical_weights(load_output(workdir / "out").model)
    assert all(int((z & (final[n] != 0)).sum()) == 0 for n, z in want.items())


def _trains(stages: list[str]) -> bool:
    """True when a stage updates weights with an optimizer (what float16 cannot do)."""
    return any(catalog().methods[tuple(k.split("/"))].uses_optimizer() for k in _methods(stages))


def _methods(stages: list[str]) -> list[str]:
    import re
    return [f"{m.group(1)}/{m.group(2)}" for s in stages for m in [re.search(r"kind: (\w+), method: (\w+)", s)]]


@pytest.mark.parametrize("later", sorted(LATER))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_keeps_the_zeros_or_is_refused(witness, workdir, dtype, later):
    """Every dtype a recipe accepts: the same invariant in bfloat16 and float16 (training in float16 is refused
    before anything loads: AdamW's moments underflow there)."""
    from sparsify_core.errors import RecipeError

    first = _prune_stages("magnitude", later in NEEDS_NM)
    stages = first + LATER[later]
    text = _recipe(stages, out="out", dtype=dtype)
    if dtype == "float16" and _trains(stages):
        with pytest.raises(RecipeError, match="bfloat16"):
            load_recipe(write(workdir / "h.yaml", text))
        return
    run_id = _run(workdir, text, "half")
    want = _check_points(witness, len(first) - 1, _perms(workdir, run_id), _pruning(stages))
    final = logical_weights(load_output(workdir / "out").model)
    assert all(int((z & (final[n] != 0)).sum()) == 0 for n, z in want.items())
