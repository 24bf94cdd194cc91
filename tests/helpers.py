"""Helpers shared by tests (importable as ``helpers``: tests/ is on pytest's pythonpath)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
EXAMPLE_PLUGIN = REPO / "tests" / "example_plugin"  # an installable third-party plugin


def sparsify(*args, cwd=None, env=None, timeout=600, check=False):
    """Run the ``sparsify`` CLI in a subprocess, as a user would."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("COLUMNS", "200")
    proc = subprocess.run([sys.executable, "-m", "sparsify_core.cli", *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"sparsify {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stderr}")
    return proc


def sparsify_here(*args, cwd=None):
    """Run the ``sparsify`` CLI in this process through its console entry point (``cli.main``), as
    ``sparsify`` would, for commands that leave no process-wide state (validate, show, compare, runs,
    sweeps, fit): the same exit codes and one-line errors as a subprocess, without its ~5 s of imports.
    Returns a ``subprocess.CompletedProcess``."""
    import contextlib
    import io

    from sparsify_core import cli

    out, err, argv, here = io.StringIO(), io.StringIO(), sys.argv, os.getcwd()
    code = 0
    try:
        sys.argv = ["sparsify", *map(str, args)]
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(here)
    return subprocess.CompletedProcess(["sparsify", *map(str, args)], code, out.getvalue(), err.getvalue())


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_MODEL = {"arch": "llama", "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 4}
TINY_SPLITS = {"calibration": {"samples": 4}, "train": {"samples": 8, "offset": 4}, "eval": {"samples": 4}}


def _yaml(value) -> str:
    """``value`` as a one-line YAML (flow) value: dicts, lists, bools, numbers and strings."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and (not value or any(c in value for c in "{}[],:#'\" ")):
        return json.dumps(value)
    return str(value)


def tiny_recipe(stages: str, *, name: str = "t", seed: int | None = 0, model: dict | None = None,
                seq_len: int = 32, splits: dict | None = None, evaluate: dict | None = None,
                output: dict | None = None) -> str:
    """The text of a recipe on the tiny model and the pydoc data.

    ``stages`` is the YAML block of stage items, as it appears under ``stages:`` (items start with
    ``"  - kind:"``). ``model`` overrides some of :data:`TINY_MODEL`'s params; ``splits`` replaces
    :data:`TINY_SPLITS`; ``evaluate`` (default ``{after: all}``) and ``output`` (default: no section)
    are written one key a line. ``seed=None`` leaves the seed out.
    """
    lines = [f"name: {name}"] + ([f"seed: {seed}"] if seed is not None else [])
    lines += ["model:", "  source: tiny", f"  params: {_yaml({**TINY_MODEL, **(model or {})})}",
              "data:", "  source: pydoc", f"  seq_len: {seq_len}", "  splits:"]
    lines += [f"    {split}: {_yaml(spec)}" for split, spec in (TINY_SPLITS if splits is None else splits).items()]
    lines += ["stages:", stages.rstrip("\n")]
    for section, keys in (("evaluate", {"after": "all"} if evaluate is None else evaluate), ("output", output)):
        if keys is not None:
            lines += [f"{section}:"] + [f"  {k}: {_yaml(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


TINY_RECIPE = tiny_recipe("""\
  - kind: substitute_activation
    method: relu
  - kind: prune
    method: magnitude
    params: {sparsity: 0.5}
""")


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


def import_example_plugin():
    """The example plugin's module, imported from tests/example_plugin (where it is not pip-installed)."""
    import importlib

    if str(EXAMPLE_PLUGIN) not in sys.path:
        sys.path.insert(0, str(EXAMPLE_PLUGIN))
    return importlib.import_module("sparsify_example_plugin")


def make_output(folder, arch, stages, storage=None, hidden=32, ffn=64):
    """Run ``stages`` ((kind, method, params) triples) in process on a tiny model of ``arch`` and save it to
    ``folder`` as the runner does (``storage`` as ``output.storage``); returns (model, masks)."""
    import torch

    from sparsify_core.output import save_output
    from sparsify_core.plugin_manager import catalog
    from sparsify_plugins.sources.models import Tiny

    p = Tiny.Params(arch=arch, hidden_size=hidden, intermediate_size=ffn, layers=2, heads=4)
    loaded = Tiny().load(p, device=torch.device("cpu"), dtype=torch.float32)
    task = "encoder" if arch == "bert" else "causal_lm"
    ctx = make_ctx(folder.parent, loaded.model, samples=8, seq_len=8, task=task)
    results, recorded = {}, []
    for i, (kind, method, params) in enumerate(stages):
        cls = catalog().methods[(kind, method)]
        prm = cls.Params.model_validate(params)
        ctx.stage_name, ctx.stage_index = f"s{i}", i
        results[i] = cls().apply(ctx, prm)
        ctx.masks.apply(ctx.model)
        recorded.append({"index": i, "name": f"s{i}", "kind": kind, "method": method,
                         "params": prm.model_dump(mode="json"), "rebuild": cls.rebuild_on_load()})
    manifest = {"run_id": "t", "recipe": "t", "task": task, "seed": 0, "stages": recorded}
    save_output(folder, ctx.model, loaded.tokenizer, ctx.masks, manifest, "name: t\n", results, storage=storage)
    return ctx.model.eval(), ctx.masks
