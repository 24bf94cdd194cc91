"""The layouts plugin's ``sparsify bench`` cases, at smoke sizes (correctness of the plumbing, not timings)."""
from __future__ import annotations

import pytest

from helpers import sparsify_here
from sparsify_core import bench
from sparsify_kernels import ffn as K
from sparsify_plugins.layouts import bench as layout_bench

needs_native = pytest.mark.skipif(not K.cpu_kernel_available(), reason="no C++ compiler: native kernels unavailable")


@needs_native
def test_activation_sparse_case_reports_the_predictor_recall():
    result = bench.run((1,), quick=True, threads=1)
    assert result["rows"] and all(r["case"] == 1 for r in result["rows"])
    (pred,) = [r for r in result["rows"] if r["config"].endswith("predictor")]
    assert 0.9 <= pred["extra"]["recall"] <= 1 and pred["extra"]["held_out_computed_fraction"] < 0.5
    assert pred["extra"]["rel_err"] < 0.5  # approximate, but close to the exact FFN
    exact = [r for r in result["rows"] if not r["config"].endswith("predictor")]
    assert exact and all(r["extra"]["kernels"].startswith("native ") for r in exact)


def test_the_layouts_plugin_contributes_cases_1_to_4():
    found = bench.cases()
    assert {n: found[n].run for n in (1, 2, 3, 4)} == {c.number: c.run for c in layout_bench.CASES}
    assert [n for n in (1, 2, 3, 4) if found[n].default] == [1, 2, 3]  # decode loads a model: on request only


@needs_native
def test_moe_case_times_the_converted_module(monkeypatch):
    """Case 2 runs MoEFFN.forward (router, selection, kernel), selecting exactly the kept experts."""
    from sparsify_plugins.layouts.modules import MoEFFN
    calls = []
    forward = MoEFFN.forward
    monkeypatch.setattr(MoEFFN, "forward", lambda self, x: calls.append(1) or forward(self, x))
    (row,) = layout_bench.case_moe(skipped=(0.5,), d=96, dff=320, expert=32, repeats=3)
    assert row.extra["experts"] == "5/10" and row.extra["rel_err"] < 1e-5
    assert len(calls) >= 3 and row.ours_ms["ours"] > 0


def test_decode_case_runs_on_a_sparsify_output(workdir):
    """Case 4 on a saved ReLU model (as users pass their ProSparse output): same tokens, sparsity reported."""
    from helpers import make_output, sparsify_here

    # a tiny llama with ReLU FFNs (no pruning), saved as the runner saves outputs, in process
    make_output(workdir / "out", "llama", [("substitute_activation", "relu", {})])
    result = bench.run((4,), quick=True, threads=1, model_dir=workdir / "out")
    rows = {r["config"]: r for r in result["rows"]}
    row = rows["decode B=1, 4 tokens"]
    assert row["extra"]["identical_tokens"] is True and row["extra"]["identical_tokens_to_hf_generate"] is True
    paths = row["extra"]["path"]
    native = paths["dense"].startswith("lean native")
    from sparsify_kernels import native as kernels
    # the kernel build the step ran is the record's ISA (so `bench --isa avx2` on an AVX-512 CPU records avx2)
    assert row["extra"]["kernel_isa"] == (kernels.loaded_isa() or "torch") == result["environment"]["isa"]
    assert paths["ours"] == paths["dense"] and (native or paths["dense"].startswith("lean torch"))
    assert set(row["ratio"]) == ({"ours", "torch_step_dense", "torch_step_ours"} if native else {"ours"})
    if native:
        assert paths["torch_step_ours"] == "lean torch (asked for)"
        assert row["extra"]["identical_tokens_to_torch_step"] is True
    assert 0.3 < row["extra"]["activation_sparsity"] < 1 and "out" in row["extra"]["note"]
    # bytes per token: the sparse side reads less, and the bound is their ratio
    mb = row["extra"]["weight_MB_per_token"]
    assert mb["ours"] < mb["dense"] and row["bound"] == pytest.approx(mb["dense"] / mb["ours"])
    assert set(row["extra"]["profile_ms_per_token_ours"]) == {"attention", "ffn", "head", "rest"}
    assert set(rows["decode B=1 vs HF generate dense"]["ratio"]) == {"ours", "lean_dense"}
    assert any(c.startswith("prefill ") for c in rows)
    batch = rows["decode B=2 (ms per step)"]
    assert batch["extra"]["identical_tokens"] is True and 0 <= batch["extra"]["union_sparsity"] <= 1
    try:
        import llama_cpp  # noqa: F401
    except ImportError:  # the column is left out, and the row says how to get it
        assert "pip install 'sparsify[bench-llamacpp]'" in row["extra"]["llama_cpp"]
    else:  # (a developer machine with the extra) llama.cpp decodes the GGUF sparsify wrote, same tokens at f32
        ll = rows["decode B=1 vs llama.cpp f32"]
        assert ll["extra"]["identical_tokens_to_silu_twin"] is True and ll["ratio"]["ours"] > 0
    bad = sparsify_here("bench", "--case", "4", "--model", str(workdir), cwd=workdir)
    assert bad.returncode != 0 and "not a sparsify output folder" in bad.stderr


def test_union_sparsity_of_a_batch_is_at_most_each_sequence_s(one_thread):
    """A neuron idle for the batch is idle for every sequence: union <= each sequence's own sparsity."""
    import torch

    from helpers import tiny_model
    from sparsify_plugins.layouts.bench_decode import union_sparsity

    model = tiny_model("llama").eval()
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.ReLU()
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    u = union_sparsity(model, ids, 4)
    alone = [union_sparsity(model, ids[i:i + 1], 4) for i in range(3)]
    assert 0 < u <= min(alone) and max(alone) < 1
    # by hand for one sequence: zeros of the down projection's input over the decode positions 4..10
    zeros = []
    with torch.no_grad():
        from sparsify_core.ffn import capture_intermediates, find_ffn_blocks
        with capture_intermediates(find_ffn_blocks(model), lambda b, x1: zeros.append((x1[0, 4:11] == 0).float().mean())):
            model(ids[:1])
    assert alone[0] == pytest.approx(float(sum(zeros) / len(zeros)))


def test_decode_case_runs_an_moe_output_against_dense_and_plain_torch(workdir):
    """Case 4 on a saved MoE (as users pass their LTE output): MoEFFN reproduces the plain-torch MoE's tokens."""
    from helpers import run_here, tiny_recipe, write

    stages = ("  - kind: moeify\n    method: param_cluster\n"
              "    params: {expert_size: 8, router: lte, fit: {epochs: 2}}\n")
    write(workdir / "m.yaml", tiny_recipe(stages, output={"dir": "moe", "save": True}))
    run_here(workdir / "m.yaml")
    result = bench.run((4,), quick=True, threads=1, model_dir=workdir / "moe")
    row = result["rows"][0]
    assert set(row["ratio"]) == {"ours", "torch_moe"} and row["best"] == "ours"
    assert row["extra"]["identical_tokens"] is True and row["config"].endswith("(MoE)")
    assert 0.2 < row["extra"]["expert_sparsity"] < 0.9


class _FakeLlama:
    """llama-cpp-python 0.3's ``Llama`` as case 4 drives it (``reset``, ``eval``, ``n_vocab()``, ``ctx``; the
    last token's logits through the module's ``llama_get_logits_ith(ctx, -1)``; no ``scores``, which 0.3 fills
    only with ``logits_all``), computed by transformers' GGUF loader from the file sparsify wrote: the llama.cpp
    rows' plumbing without llama.cpp."""

    def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, n_batch, verbose):
        import numpy as np
        import torch
        import transformers as T
        from pathlib import Path

        p = Path(model_path)
        self.model = T.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
        self.ctx = np.zeros(self.model.config.vocab_size, dtype=np.float32)  # the context: its last logits
        self.tokens: list[int] = []

    def n_vocab(self):
        return self.model.config.vocab_size

    @property
    def n_tokens(self):
        return len(self.tokens)

    def reset(self):
        self.tokens = []

    def eval(self, tokens):
        import torch

        self.tokens += list(tokens)
        with torch.no_grad():
            self.ctx[:] = self.model(torch.tensor([self.tokens])).logits[0, -1].numpy()


def _fake_get_logits_ith(ctx, i):
    import ctypes

    assert i == -1
    return ctx.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def test_llamacpp_rows_decode_the_gguf_sparsify_wrote(monkeypatch, one_thread):
    import sys
    import types

    import torch

    from helpers import tiny_model
    from sparsify_plugins.layouts import bench_decode as D

    info = b"CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 0 | OPENMP = 1 | "
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=_FakeLlama,
                                                                      llama_get_logits_ith=_fake_get_logits_ith,
                                                                      llama_print_system_info=lambda: info))
    monkeypatch.setattr(D, "_llamacpp_probe", lambda path, threads: "")  # the child process has no fake
    model = tiny_model("llama").eval()
    for layer in model.model.layers:  # a ReLU model: llama.cpp's graph computes its SiLU twin
        layer.mlp.act_fn = torch.nn.ReLU()

    class Tok:
        pad_token_id, eos_token_id = 0, None

    ids = torch.tensor([[5, 6, 7, 8]])
    store: list = []
    rows, skipped = D._llamacpp_rows(model, Tok(), ids, 6, 2, D._timed(model, ids, 6, Tok(), "lean", store), store,
                                     threads=1, quick=True)
    assert skipped == "" and [r.config for r in rows] == ["decode B=1 vs llama.cpp f32"]
    # a file whose probe process fails is left out with its reason; the run goes on
    monkeypatch.setattr(D, "_llamacpp_probe", lambda path, threads: "llama.cpp column skipped: crashed")
    none, why = D._llamacpp_rows(model, Tok(), ids, 6, 2, D._timed(model, ids, 6, Tok(), "lean", store), store,
                                 threads=1, quick=True)
    assert none == [] and why == "f32: llama.cpp column skipped: crashed"
    (row,) = rows
    assert row.extra["identical_tokens_to_silu_twin"] is True and row.target == 1.3
    assert row.extra["llama_cpp_features"] == ["SSE3", "AVX2", "OPENMP"]  # what llama.cpp was compiled for
    assert row.ratio["ours"] == pytest.approx(row.dense_ms / row.ours_ms["ours"])


@pytest.mark.parametrize("code,expect", [
    ("import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n", "crashed with SIGILL in a probe process"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", "crashed with SIGSEGV in a probe process"),
    ("raise SystemExit('ggml: cannot load model')\n", "a probe process failed (ggml: cannot load model)"),
    ("pass\n", ""),
])
def test_llamacpp_probe_turns_a_crash_into_a_skip_line(monkeypatch, tmp_path, code, expect):
    """A llama.cpp build that dies (SIGILL from AMX a VM does not enable, seen on a Xeon) costs the case-4 run
    its llama.cpp column only, with a one-line reason and the rebuild command, never the whole process."""
    from sparsify_plugins.layouts import bench_decode as D

    monkeypatch.setattr(D, "_PROBE_CODE", code)
    why = D._llamacpp_probe(tmp_path / "f32.gguf", 1)
    if not expect:
        assert why == ""
        return
    assert why.startswith("llama.cpp column skipped: ") and expect in why and "\n" not in why
    if "SIG" in expect:
        assert "pip install --force-reinstall" in why and "GGML_NATIVE=OFF" in why
    if "SIGILL" in expect:
        assert "AMX" in why


@pytest.mark.parametrize("layout", ["csr", "bsr"])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.75, 0.9])
def test_case_3_weights_have_the_asked_sparsity(layout, s):
    """Case 3's weights (also ``kernel_ab``'s): the asked fraction of elements (csr) or 16 x 16 tiles (bsr)
    zero, 0 keeping every one (the kernels' rate against dense)."""
    import torch
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    ws, params = layout_bench._structured(w, layout, s)
    if layout == "bsr":
        assert params.block == (16, 16)
        tiles = (ws.reshape(4, 16, 6, 16) != 0).any(3).any(1)
        assert (tiles == 0).float().mean().item() == pytest.approx(s, abs=1 / 24)
        # a kept tile is kept whole, a dropped one is dropped whole
        assert torch.equal(ws != 0, tiles.repeat_interleave(16, 0).repeat_interleave(16, 1))
    else:
        assert (ws == 0).float().mean().item() == pytest.approx(s, abs=1 / w.numel())
    assert torch.equal(ws[ws != 0], w[ws != 0])
