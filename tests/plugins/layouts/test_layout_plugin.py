"""A layout from a third-party plugin works through the catalog: recipe, kernel, save and load back.

The layout is the example plugin's ``example_coo`` (tests/example_plugin), registered in-process.
"""
from __future__ import annotations

import pytest
import torch

from helpers import tiny_recipe, write
from sparsify_core import load_output
from sparsify_core.errors import RecipeError, SparsifyError


@pytest.fixture
def coo(example_plugin_module, monkeypatch):
    """The example plugin's ``example_coo`` layout, registered, with its kernel calls counted (``COO.kernel_calls``)."""
    from sparsify_example_plugin.layout import COO

    make = COO.kernel
    monkeypatch.setattr(COO, "kernel_calls", 0, raising=False)

    def counted(self, device, dtype):
        run = make(self, device, dtype)
        if run is None:
            return None

        def call(x, bias):
            COO.kernel_calls += 1
            return run(x, bias)
        return call

    monkeypatch.setattr(COO, "kernel", counted)
    return COO


def _sparse(shape, density=0.3, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < density)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,T", [((7, 12), 1), ((33, 64), 5), ((64, 40), 20)])
def test_example_layout_kernel_matches_its_reference(coo, shape, T, dtype):
    """The contract every layout meets, checked on the example layout: exact round trip, kernel == matmul."""
    w = _sparse(shape, dtype=dtype)
    for index_dtype in ("int32", "int64"):
        layout = coo.from_dense(w, coo.Params(index_dtype=index_dtype))
        assert torch.equal(layout.to_dense(), w) and layout.row.dtype == getattr(torch, index_dtype)
        x, b = torch.randn(2, T, shape[1], dtype=dtype), torch.randn(shape[0], dtype=dtype)
        torch.testing.assert_close(layout.matmul(x), x @ w.T)
        torch.testing.assert_close(layout.kernel(torch.device("cpu"), dtype)(x, b), layout.matmul(x) + b)
    assert layout.kernel(torch.device("cpu"), torch.bfloat16) is None


def test_sparse_linear_finds_a_plugin_layout_in_the_catalog(coo):
    from sparsify_plugins.layouts.modules import SparseLinear

    COO, COOParams = coo, coo.Params
    w = _sparse((9, 16))
    lin = SparseLinear(COO.from_dense(w), torch.randn(9), strict=True)
    spec = lin.storage_spec()
    assert spec["row"] == [[int((w != 0).sum())], "int64"]
    rebuilt = SparseLinear.empty("example_coo", COOParams(), (9, 16), spec, True, torch.float32, strict=True)
    assert rebuilt.layout_cls is COO
    rebuilt.load_state_dict(lin.state_dict())
    x = torch.randn(3, 16)
    before = COO.kernel_calls
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), x @ w.T + lin.bias)  # strict: the plugin's kernel, no fallback
    assert COO.kernel_calls == before + 1
    assert torch.equal(rebuilt.dense_weight(), w)
    with torch.no_grad(), pytest.raises(SparsifyError, match="strict"):
        rebuilt(x.to(torch.bfloat16))  # no kernel for bfloat16: strict mode refuses the dense fallback
    with pytest.raises(SparsifyError, match="no installed plugin provides the layout 'nope'"):
        SparseLinear.empty("nope", COOParams(), (9, 16), spec, True, torch.float32)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


PRUNE = """\
  - kind: prune
    method: magnitude
    params: {sparsity: 0.5}
"""


def test_recipe_converts_to_a_plugin_layout_saves_and_loads_back(workdir, coo):
    """``layout_convert`` with ``layout: example_coo`` on the pruned tiny model: same outputs, saved, loaded back."""
    from sparsify_core.recipe import load_recipe
    from sparsify_core.registry import Registry
    from sparsify_core.runner import Runner
    from sparsify_plugins.layouts.modules import SparseLinear

    def run(name, stages):
        path = write(workdir / f"{name}.yaml", tiny_recipe(
            stages, name=name, seq_len=16, splits={"eval": {"samples": 2}},
            evaluate={"metrics": ["perplexity"], "after": "last"}, output={"dir": str(workdir / name)}))
        Runner(load_recipe(path), Registry(f"sqlite:///{workdir}/registry.db"), runs_dir=workdir / "runs").run()
        return load_output(workdir / name)

    COO = coo
    before = COO.kernel_calls
    conv = run("coo", PRUNE + """\
  - kind: layout_convert
    method: weight
    params: {layout: example_coo, index_dtype: int32, strict: true, targets: ["mlp|self_attn"]}
""")
    assert COO.kernel_calls > before  # the run's evaluation computed with the plugin's kernel (strict: no fallback)
    plain = run("plain", PRUNE)
    stored = [m for m in conv.model.modules() if isinstance(m, SparseLinear)]
    assert len(stored) == 2 * 7 and all(m.layout_cls is COO for m in stored)  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(m.row.dtype == torch.int32 and m.layout_params == COO.Params(index_dtype="int32") for m in stored)
    ids = torch.randint(0, 200, (1, 12))
    calls = COO.kernel_calls
    torch.testing.assert_close(_logits(conv.model, ids), _logits(plain.model, ids), atol=1e-5, rtol=1e-5)
    assert COO.kernel_calls == calls + len(stored)


@pytest.mark.parametrize("params,match", [
    ({"layout": "example_coo", "index_dtype": "int16"}, "index_dtype"),
    ({"layout": "example_coo", "block": [4, 4]}, "block"),
    ({"layout": "nm", "n": 4, "m": 4}, "smaller than m"),
    ({"layout": "no_such_layout"}, "no installed plugin provides the layout 'no_such_layout'"),
])
def test_layout_params_are_validated_by_the_layout(workdir, coo, params, match):
    from sparsify_core.recipe import load_recipe

    flow = ", ".join(f"{k}: {v}" for k, v in params.items()).replace("'", "")
    path = write(workdir / "bad.yaml", tiny_recipe(f"""\
  - kind: layout_convert
    method: weight
    params: {{{flow}}}
"""))
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)


def test_builtin_names_are_the_generic_method_with_the_layout_fixed(tmp_path):
    """``method: nm`` and ``method: weight, layout: nm`` make the same modules."""
    from sparsify_core import RunContext
    from sparsify_plugins.layouts.convert import WeightConvert, weight_methods
    from sparsify_plugins.layouts.formats import nm_mask
    from helpers import tiny_model

    methods = {m.name: m for m in weight_methods()}
    assert methods["weight"] is WeightConvert and {"csr", "bsr", "nm", "nmg"} <= set(methods)
    out = []
    for method, params in ((methods["nm"], {"n": 2, "m": 4}), (WeightConvert, {"layout": "nm", "n": 2, "m": 4})):
        model = tiny_model("llama")
        with torch.no_grad():
            for m in model.model.layers.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.mul_(nm_mask(m.weight, 2, 4))
        ctx = RunContext(run_id="t", model=model, tokenizer=None, task="causal_lm", data={},
                         device=torch.device("cpu"), dtype=torch.float32, seed=0, workdir=tmp_path)
        res = method().apply(ctx, method.Params(**params))
        out.append((res.info, model.model.layers[0].mlp.up_proj))
    assert out[0][0] == out[1][0]
    assert out[0][1].layout_name == out[1][1].layout_name == "nm"
    assert out[0][1].layout_params == out[1][1].layout_params
    assert torch.equal(out[0][1].val, out[1][1].val) and torch.equal(out[0][1].idx, out[1][1].idx)


def test_storage_tensors_own_their_memory(coo):
    """Views of one tensor (``nonzero(as_tuple=True)``, slices) are copied: safetensors saves each storage tensor."""
    from safetensors.torch import load, save

    w = _sparse((8, 12))
    nnz = int((w != 0).sum())
    pairs = w.nonzero()  # [nnz, 2]: row and col below are views of it
    flat = torch.arange(3 * nnz, dtype=torch.float32)
    layout = coo(w.shape, coo.Params(), row=pairs[:, 0], col=pairs[:, 1], val=flat[nnz:2 * nnz])
    assert len({t.untyped_storage().data_ptr() for t in layout.tensors().values()}) == 3
    back = load(save(layout.tensors()))  # refuses tensors that share memory or cover part of it
    assert all(torch.equal(back[k], t) for k, t in layout.tensors().items())
    assert torch.equal(layout.val, flat[nnz:2 * nnz]) and torch.equal(layout.row, pairs[:, 0])
    own = coo.from_dense(w)  # int64 indices: from_dense hands over views of one nonzero() result
    assert torch.equal(coo.from_tensors(w.shape, coo.Params(), load(save(own.tensors()))).to_dense(), w)
