"""Helpers shared by tests (importable as ``helpers``: tests/ is on pytest's pythonpath)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def sparsify(*args, cwd=None, env=None, timeout=600, check=False):
    """Run the ``sparsify`` CLI in a subprocess, as a user would."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("COLUMNS", "200")
    proc = subprocess.run([sys.executable, "-m", "sparsify_core.cli", *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"sparsify {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stderr}")
    return proc


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_RECIPE = """\
name: t
seed: 0
model:
  source: tiny
  params: {arch: llama, hidden_size: 32, intermediate_size: 64, layers: 2, heads: 4}
data:
  source: pydoc
  seq_len: 32
  splits:
    calibration: {samples: 4}
    train: {samples: 8, offset: 4}
    eval: {samples: 4}
stages:
  - kind: substitute_activation
    method: relu
  - kind: prune
    method: magnitude
    params: {sparsity: 0.5}
evaluate:
  after: all
"""


FIXTURE_PLUGINS = Path(__file__).resolve().parent / "fixture_plugins"


def plugin_env(tmp_path: Path) -> dict:
    """Environment that makes ``tests/fixture_plugins`` an installed plugin for subprocesses.

    A minimal ``.dist-info`` folder with an entry point, on PYTHONPATH: the
    same discovery path a pip-installed plugin takes.
    """
    site = tmp_path / "site"
    info = site / "sparsify_test_stages-0.0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sparsify-test-stages\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text("[sparsify.plugins]\ntest-stages = sparsify_test_stages\n")
    path = os.pathsep.join([str(site), str(FIXTURE_PLUGINS), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path}


def tiny_model(arch: str = "llama", seed: int = 0):
    """A tiny randomly initialised transformers model (llama, gpt2 or bert)."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, vocab_size=100))
    if arch == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                              bos_token_id=0, eos_token_id=0, resid_pdrop=0, embd_pdrop=0,
                                              attn_pdrop=0))
    return T.BertModel(T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, vocab_size=100, max_position_embeddings=64))


def make_ctx(tmp_path, model, *, splits=None, samples=16, seq_len=16, reference=None, task="causal_lm"):
    """A RunContext over random token splits (calibration/train/eval) for unit tests."""
    import copy

    import torch

    from sparsify_core import RunContext, TokenSplit

    gen = torch.Generator().manual_seed(0)
    names = splits or ("calibration", "train", "eval")
    data = {n: TokenSplit(n, torch.randint(0, 100, (samples, seq_len), generator=gen)) for n in names}
    dense = reference if reference is not None else copy.deepcopy(model)
    return RunContext(run_id="t", model=model, tokenizer=None, task=task, data=data, device=torch.device("cpu"),
                      dtype=torch.float32, seed=0, workdir=tmp_path, reference_loader=lambda: dense)
