"""The sparsity asked for is the sparsity delivered, over exactly what was targeted (issue 11, kind 3).

Every prune method x scope x pattern x profile x targets/exclude restriction,
on tiny llama (Linear) and tiny gpt2 (Conv1D, weights stored [in, out]), run
in process on a RunContext. For each run:

- the fraction of the targeted weights that are zero equals the request:
  each matrix prunes ``round(s * numel)`` for its sparsity ``s`` (uniform:
  the request; a list: its layer's entry; owl: the profile the method
  reports, whose mean *weighted by targeted weights* must be the request),
  so the total is within half a weight per matrix of ``request * n``;
  n:m patterns hold in every group of m consecutive inputs;
- untargeted weights are untouched (no mask, same values);
- the stage's ``sparsity`` metric is the measured fraction.

Invalid combinations assert their validation error. A second sweep runs each
method after an earlier stage pruned some of the same weights: those stay
zero and count towards the request.
"""
from __future__ import annotations

import re

import pytest
import torch
from helpers import make_ctx, tiny_model
from pydantic import ValidationError

from sparsify_core import Method
from sparsify_core.errors import SparsifyError
from sparsify_core.ffn import prunable_modules, transformer_layers, weight_out_in
from sparsify_core.plugin_manager import catalog
from sparsify_core.training import TrainLoop
from sparsify_plugins.prune import GMP, Magnitude, PruneParams, ScorePruner, SparseGPT, Wanda
from sparsify_plugins.prune.masks import prune_count, structured_mask
from sparsify_plugins.prune.selection import assign_sparsities, prior_pruned, record_mask, select_targets, summary

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only waits on the first

REQUEST = 0.6
LIST = [0.35, 0.8]  # one sparsity per transformer layer (2 layers)

# targets / exclude restrictions: every layer with unequal sizes, one layer only, a target outside the layers
RESTRICTIONS = {
    "llama": {
        "default": {},
        "unequal": {"targets": [r"layers\.0\.mlp\.", r"layers\.1\.self_attn\."], "exclude": ["up_proj", "o_proj"]},
        "one_layer": {"targets": [r"layers\.1\."]},
        "lm_head": {"targets": [r"layers\.0\.mlp\.", "lm_head"], "exclude": []},
    },
    "gpt2": {
        "default": {},
        "unequal": {"targets": [r"h\.0\.mlp\.", r"h\.1\.attn\."], "exclude": [r"attn\.c_proj"]},
        "one_layer": {"targets": [r"h\.1\."]},
        "lm_head": {"targets": [r"h\.0\.mlp\.", "lm_head"], "exclude": []},
    },
}
class ScoredByHash(Method):
    """A third-party prune method written with the shared helpers only: scores are a fixed hash of positions.

    It owns nothing but its scores; the contract (profiles, targets, earlier
    masks, the reported sparsity) must come from ``selection`` and ``masks``.
    """

    kind = "prune"
    name = "scored_by_hash"
    Params = PruneParams

    def apply(self, ctx, params):
        targets = select_targets(ctx.model, params)
        per_layer = assign_sparsities(ctx, params, targets)
        for t in targets:
            out, inp = t.weight().shape
            scores = (torch.arange(out * inp).reshape(out, inp) * 2654435761 % 1000003).float()
            record_mask(ctx, t, structured_mask(scores, t.sparsity, params.nm, prior_pruned(ctx, t)))
        return summary(ctx, targets, per_layer)


class HashTemplate(ScorePruner):
    """The same criterion on the public template: it writes ``scores`` and nothing else (compared per row)."""

    name = "hash_template"
    group = "row"

    def scores(self, ctx, params, targets, layer=None):
        return {t.name: (torch.arange(t.weight().numel()).reshape(t.weight().shape) * 2654435761 % 1000003).float()
                for t in targets}


METHODS = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT, "gmp": GMP,
           "scored_by_hash": ScoredByHash, "hash_template": HashTemplate}
SCOPED = {"magnitude", "gmp"}  # methods with a scope parameter
LAYERWISE = {"wanda", "sparsegpt"}  # calibrate layer by layer: targets must sit inside the layers


def combos():
    for method in METHODS:
        for scope in (["per_layer", "global"] if method in SCOPED else ["per_layer"]):
            for pattern in ["unstructured", "2:4"]:
                for profile in ["uniform", "list", "owl"]:
                    for restriction in RESTRICTIONS["llama"]:
                        yield method, scope, pattern, profile, restriction


def build_params(method, scope, pattern, profile, restriction, arch):
    kw = dict(RESTRICTIONS[arch][restriction])
    if method in SCOPED:
        kw["scope"] = scope
    if method == "sparsegpt":
        kw["block_size"] = 16  # several blocks per matrix: the block budgets are exercised
    if method == "gmp":  # 4 steps: real training in one case, a stand-in loop otherwise (run_stage)
        kw.update(start=0.0, end=1.0, every=2,
                  train={"steps": 4, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 0, "log_every": 1})
    if pattern != "unstructured":
        kw["pattern"] = pattern
    else:
        kw["sparsity"] = REQUEST
    if profile == "list":
        kw["profile"] = LIST
    elif profile == "owl":
        kw.update(profile="owl", owl_lambda=0.15, owl_threshold=2.0)
    return METHODS[method].Params(**kw)


def expected_error(method, scope, pattern, profile, restriction, arch):
    """The validation error (``ValidationError``) or run error (``SparsifyError``) a combination must raise."""
    if pattern != "unstructured" and profile != "uniform":
        return ValidationError, "an n:m pattern prunes every layer alike: profile must be uniform"
    if scope == "global" and (pattern != "unstructured" or profile != "uniform"):
        return ValidationError, "scope global takes an unstructured pattern and the uniform profile"
    if method in LAYERWISE and restriction == "lm_head":
        return SparsifyError, "outside the transformer layers"
    return None


def _stand_in_loop(ctx, cfg, callbacks):
    """The shared loop stood in for (fast): between the schedule's steps the targeted weights are rescaled at
    random, as optimizer steps would move them, so masks chosen at different steps must still nest and add up."""
    (schedule,) = callbacks
    schedule.start(TrainLoop(ctx=ctx, cfg=cfg, model=ctx.model))  # the real loop state, untrained
    g = torch.Generator().manual_seed(0)
    for step in range(cfg.steps):
        with torch.no_grad():
            for t in schedule.targets:
                t.module.weight.mul_(1 + 0.5 * torch.randn(t.module.weight.shape, generator=g))
        ctx.masks.apply(ctx.model)  # as the loop does after every optimizer step
        schedule.after_step(step)
    schedule.stop()
    return {}


def run_stage(method, ctx, params, monkeypatch, *, real_training=False):
    """Run one prune stage in process; gmp prunes while it trains.

    For gmp, ``real_training`` runs the shared training loop; otherwise the
    loop is stood in for (``_stand_in_loop``).
    """
    if method == "gmp" and not real_training:
        monkeypatch.setattr("sparsify_plugins.prune.gmp.train", lambda ctx, cfg, callbacks: _stand_in_loop(
            ctx, cfg, callbacks))
    return METHODS[method]().apply(ctx, params)


def layer_of(model):
    layers = [name for name, _ in transformer_layers(model)]
    return lambda name: next((i for i, ln in enumerate(layers) if name.startswith(ln + ".")), None)


def check_nm(module, n, m):
    w = weight_out_in(module)  # groups run along the input dimension, also for Conv1D's [in, out] storage
    nonzero = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
    assert (nonzero == n).all(), "n:m pattern broken"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method,scope,pattern,profile,restriction", list(combos()))
def test_sparsity_delivered_over_targets(tmp_path, monkeypatch, method, scope, pattern, profile, restriction, arch):
    error = expected_error(method, scope, pattern, profile, restriction, arch)
    if error is not None and error[0] is ValidationError:
        with pytest.raises(ValidationError, match=error[1]):
            build_params(method, scope, pattern, profile, restriction, arch)
        return
    params = build_params(method, scope, pattern, profile, restriction, arch)
    model = tiny_model(arch)
    ctx = make_ctx(tmp_path, model, samples=4, seq_len=16)
    if error is not None:
        with pytest.raises(SparsifyError, match=error[1]):
            METHODS[method]().apply(ctx, params)
        return
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = run_stage(method, ctx, params, monkeypatch)

    layer = layer_of(model)
    targets = prunable_modules(model, params.targets, params.exclude)
    sizes = [0, 0]
    for name, module in targets:
        if layer(name) is not None:
            sizes[layer(name)] += module.weight.numel()

    # the sparsity each matrix is owed
    if pattern == "2:4":
        owed = {name: 0.5 for name, _ in targets}
    elif profile == "list":
        owed = {name: LIST[layer(name)] if layer(name) is not None else REQUEST for name, _ in targets}
    elif profile == "owl":
        per_layer = result.info["layer_sparsity"]
        assert [s is None for s in per_layer] == [n == 0 for n in sizes]  # layers without targets take no share
        # the profile varies, yet over the targeted weights it is the request (not merely its mean over layers)
        assert len({round(s, 6) for s in per_layer if s is not None}) == sum(n > 0 for n in sizes)
        weighted = sum(s * n for s, n in zip(per_layer, sizes) if n) / sum(sizes)
        assert weighted == pytest.approx(REQUEST, abs=1e-9)
        owed = {name: per_layer[layer(name)] if layer(name) is not None else REQUEST for name, _ in targets}
    else:
        owed = {name: REQUEST for name, _ in targets}

    zeros = {name: int((module.weight == 0).sum()) for name, module in targets}
    total = sum(module.weight.numel() for _, module in targets)
    if scope == "global":
        # one threshold across the targets: exact for all of them together
        assert sum(zeros.values()) == prune_count(total, REQUEST)
    else:
        for name, module in targets:
            assert zeros[name] == prune_count(module.weight.numel(), owed[name]), name
            if pattern == "2:4":
                check_nm(module, 2, 4)
    requested = sum(owed[name] * module.weight.numel() for name, module in targets)
    assert abs(sum(zeros.values()) - requested) <= 0.5 * len(targets) + 1e-6
    if profile != "list":
        assert abs(sum(zeros.values()) / total - (0.5 if pattern == "2:4" else REQUEST)) <= 0.5 * len(targets) / total

    for name, module in targets:
        keep = ctx.masks.get(f"{name}.weight")
        assert keep is not None and int((~keep).sum()) == zeros[name], name  # zeros = mask
    targeted_tensors = {id(module.weight) for _, module in targets}  # gpt2's lm_head is wte: one tensor
    for name, p in model.named_parameters():
        if id(p) not in targeted_tensors:
            assert name not in ctx.masks and torch.equal(p, before[name]), name

    measured = sum(zeros.values()) / total
    assert result.metrics["sparsity"] == pytest.approx(measured, abs=1e-12)
    assert result.metrics["weights_pruned"] == sum(zeros.values())
    if method == "gmp":
        assert result.metrics["target_sparsity"] == pytest.approx(requested / total, abs=1e-9)


# -- weights pruned by an earlier stage count towards the request ----------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method,scope,pattern", [
    ("magnitude", "per_layer", "unstructured"), ("magnitude", "global", "unstructured"),
    ("magnitude", "per_layer", "2:4"), ("wanda", "per_layer", "unstructured"), ("wanda", "per_layer", "2:4"),
    ("sparsegpt", "per_layer", "unstructured"), ("sparsegpt", "per_layer", "2:4"),
    ("gmp", "per_layer", "unstructured"), ("gmp", "global", "unstructured"), ("gmp", "per_layer", "2:4"),
    ("scored_by_hash", "per_layer", "unstructured"), ("scored_by_hash", "per_layer", "2:4"),
    ("hash_template", "per_layer", "unstructured"), ("hash_template", "per_layer", "2:4")])
def test_earlier_zeros_count_towards_the_request(tmp_path, monkeypatch, method, scope, pattern, arch):
    """An earlier stage pruned 25% (3:4 before 2:4, so the groups stay feasible); the stage asked for 60%
    (or 2:4) ends exactly there, the earlier zeros among its zeros, its metric the measured fraction."""
    model = tiny_model(arch)
    ctx = make_ctx(tmp_path, model, samples=4, seq_len=16)
    restriction = RESTRICTIONS[arch]["unequal"]
    earlier = dict(sparsity=0.25) if pattern == "unstructured" else dict(pattern="3:4")
    # the earlier stage prunes by a different criterion (Wanda) than magnitude, so its zeros are not simply the
    # smallest weights: a method that ignored them would prune elsewhere and overshoot through the mask AND
    Wanda().apply(ctx, Wanda.Params(**earlier, **restriction))
    pruned_before = {n: (p == 0).clone() for n, p in model.named_parameters() if n in ctx.masks}
    params = build_params(method, scope, pattern, "uniform", "unequal", arch)
    # one gmp case trains for real (the loop applies masks and the schedule); the rest stand the loop in
    real = method == "gmp" and scope == "per_layer" and pattern == "unstructured" and arch == "llama"
    result = run_stage(method, ctx, params, monkeypatch, real_training=real)
    targets = prunable_modules(model, params.targets, params.exclude)
    total = sum(m.weight.numel() for _, m in targets)
    zeros = 0
    for name, module in targets:
        w = module.weight
        assert torch.all(w[pruned_before[f"{name}.weight"]] == 0), name
        zeros += int((w == 0).sum())
        if scope != "global":
            assert int((w == 0).sum()) == prune_count(w.numel(), 0.5 if pattern == "2:4" else REQUEST), name
        if pattern == "2:4":
            check_nm(module, 2, 4)
    if scope == "global":
        assert zeros == prune_count(total, REQUEST)
    assert result.metrics["sparsity"] == pytest.approx(zeros / total, abs=1e-12)


def test_request_below_earlier_sparsity_keeps_the_masks(tmp_path):
    model = tiny_model("llama")
    ctx = make_ctx(tmp_path, model, samples=4, seq_len=16)
    Magnitude().apply(ctx, Magnitude.Params(sparsity=0.7))
    masks = {n: m.clone() for n, m in ctx.masks.items()}
    lines = []
    ctx.info = lines.append
    result = Wanda().apply(ctx, Wanda.Params(sparsity=0.5))
    assert all(torch.equal(ctx.masks.get(n), m) for n, m in masks.items())  # nothing more pruned, nothing back
    assert result.metrics["sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert any("already sparser than 0.5" in line for line in lines)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "gmp", "maskllm"])
def test_nm_refused_where_earlier_zeros_break_the_groups(tmp_path, method):
    ctx = make_ctx(tmp_path, tiny_model("gpt2"), samples=4, seq_len=16)
    Magnitude().apply(ctx, Magnitude.Params(sparsity=0.6))
    trains = {"train": {"steps": 2}} if method in ("gmp", "maskllm") else {}  # refused before it trains
    cls = catalog().methods[("prune", method)]
    with pytest.raises(SparsifyError, match=r"groups of 4 inputs already have more than 2 weights pruned"):
        cls().apply(ctx, cls.Params(pattern="2:4", **trains))


def test_tied_lm_head_is_pruned_with_its_embedding_and_said_so(tmp_path):
    model = tiny_model("gpt2")
    ctx = make_ctx(tmp_path, model, samples=4, seq_len=16)
    lines = []
    ctx.info = lines.append
    result = Magnitude().apply(ctx, Magnitude.Params(sparsity=0.5, targets=["lm_head"], exclude=[]))
    assert any("lm_head.weight is tied to transformer.wte.weight" in line for line in lines)
    wte = model.transformer.wte.weight
    assert int((wte == 0).sum()) == prune_count(wte.numel(), 0.5) and result.metrics["sparsity"] == 0.5
    assert not any("tied" in line for line in _info_lines(tmp_path, "llama", targets=["lm_head"], exclude=[]))


def _info_lines(tmp_path, arch, **kw):
    ctx = make_ctx(tmp_path, tiny_model(arch), samples=4, seq_len=16)
    lines = []
    ctx.info = lines.append
    Magnitude().apply(ctx, Magnitude.Params(sparsity=0.5, **kw))
    return lines


def test_profiles_need_targets_they_can_place(tmp_path):
    ctx = make_ctx(tmp_path, tiny_model("llama"), samples=4, seq_len=16)
    with pytest.raises(SparsifyError, match=re.escape("lm_head lie outside the transformer layers")):
        Magnitude().apply(ctx, Magnitude.Params(profile=LIST, targets=["mlp", "lm_head"], exclude=[]))
    with pytest.raises(SparsifyError, match="no target lies inside one: use profile: uniform"):
        Magnitude().apply(ctx, Magnitude.Params(sparsity=0.5, profile="owl", targets=["lm_head"], exclude=[]))
    assert not ctx.masks  # refused before anything was pruned


# -- every installed prune method is swept ----------------------------------------------------------

def test_every_installed_prune_method_is_swept():
    """A prune method added to the installed plugins must join this sweep (or get its own check below)."""
    installed = {e.key.split("/", 1)[1] for e in catalog().entries
                 if e.category == "method" and e.key.startswith("prune/") and e.distribution != "<in-process>"}
    own = {"nmg", "maskllm"}  # their own checks below: no sparsity, no profile
    own |= {"width"}  # structured (no mask, the model shrinks): tests/plugins/prune/test_width.py sweeps its shapes
    assert installed <= set(METHODS) | own, sorted(installed - set(METHODS) - own)


def _delivered_2of4(model, kw, result) -> set[str]:
    """Every targeted module is exactly 2:4 and the reported sparsity counts them; returns their weight names."""
    targets = prunable_modules(model, kw.get("targets"), kw.get("exclude", ["lm_head"]))
    for _, module in targets:
        check_nm(module, 2, 4)
    zeros = sum(int((m.weight == 0).sum()) for _, m in targets)
    total = sum(m.weight.numel() for _, m in targets)
    assert zeros * 2 == total and result.metrics["sparsity"] == pytest.approx(zeros / total, abs=1e-12)
    return {f"{name}.weight" for name, _ in targets}


def _nmg(ctx, **kw):
    cls = catalog().methods[("prune", "nmg")]
    return cls().apply(ctx, cls.Params(n=2, m=4, g=1, **kw))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("restriction", ["default", "unequal", "one_layer"])
def test_nmg_prunes_its_pattern_over_the_targets(tmp_path, arch, restriction):
    """prune/nmg (the layouts plugin's grouped n:m) has no sparsity parameter: its pattern fixes 1 - n/m."""
    model = tiny_model(arch)
    ctx = make_ctx(tmp_path, model, samples=4, seq_len=16)
    kw = RESTRICTIONS[arch][restriction]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = _nmg(ctx, **kw)
    targeted = _delivered_2of4(model, kw, result)
    for name, p in model.named_parameters():
        if name not in targeted:
            assert name not in ctx.masks and torch.equal(p, before[name]), name


def test_nmg_keeps_earlier_zeros_and_reports_what_it_delivers(tmp_path, capsys):
    """Grouped n:m uses each pattern g times per chunk, so it cannot place earlier zeros among its pruned
    positions in general: they stay pruned, the reported sparsity is the measured one, and a line says so."""
    model = tiny_model("llama")
    ctx = make_ctx(tmp_path, model, samples=4, seq_len=16)
    Wanda().apply(ctx, Wanda.Params(pattern="3:4"))
    earlier = {n: ~k for n, k in ctx.masks.items()}
    result = _nmg(ctx)
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in earlier)
    total = sum(params[n].numel() for n in earlier)
    assert all(bool((params[n][e] == 0).all()) for n, e in earlier.items())  # none regrown
    assert result.metrics["sparsity"] == pytest.approx(zeros / total, abs=1e-12)
    assert result.metrics["sparsity"] > 0.5
    assert "they stay pruned, so the grouped 2:4 leaves" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("restriction", ["default", "unequal", "one_layer", "lm_head"])
def test_maskllm_learns_its_pattern_over_exactly_the_targets(tmp_path, arch, restriction):
    """prune/maskllm (learned n:m) has no sparsity or profile: its pattern fixes 1 - n/m over the targets; the
    weights stay frozen (kept ones unchanged), untargeted ones untouched."""
    cls = catalog().methods[("prune", "maskllm")]
    model = tiny_model(arch)
    ctx = make_ctx(tmp_path, model, samples=4, seq_len=16)
    kw = RESTRICTIONS[arch][restriction]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    prior = "magnitude" if restriction == "lm_head" else "wanda"  # wanda calibrates inside the layers only
    result = cls().apply(ctx, cls.Params(prior=prior, train={"steps": 2, "batch_size": 2, "checkpoint_every": 0},
                                         **kw))
    targeted = _delivered_2of4(model, kw, result)
    tied = {"lm_head.weight", "model.embed_tokens.weight", "transformer.wte.weight"} if "lm_head" in kw.get(
        "targets", []) else set()
    for name, p in model.named_parameters():
        if name in targeted:
            keep = ctx.masks.get(name)
            assert torch.equal(p.detach(), before[name] * keep), name  # frozen: only the mask changed them
        elif name not in tied:
            assert name not in ctx.masks and torch.equal(p, before[name]), name
