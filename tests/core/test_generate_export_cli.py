"""`sparsify generate` and `sparsify export`: one subprocess run for the real entry point, the rest in process."""
from __future__ import annotations

import re

import pytest
import torch

from helpers import make_output, sparsify, sparsify_here
from sparsify_core.generation import greedy_generate, timed_generate
from sparsify_core.output import load_output

RELU_PRUNED = [("substitute_activation", "relu", {}), ("prune", "magnitude", {"sparsity": 0.5})]
NUMBERS = re.compile(r"^prefill \d+\.\d tok/s \(\d+ tokens\), decode (\d+\.\d|nan) tok/s \(\d+ tokens\)")


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """A tiny LLaMA with ReLU FFNs, 50% pruned, saved compressed (the default)."""
    folder = tmp_path_factory.mktemp("gen") / "out"
    make_output(folder, "llama", RELU_PRUNED)
    return folder


def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in this process as a user would: (exit status, stdout, stderr)."""
    proc = sparsify_here(*args)
    return proc.returncode, proc.stdout, proc.stderr


def test_generate_subprocess_streams_tokens_and_ends_with_numbers(output):
    proc = sparsify("generate", output, "--prompt", "The cat", "--max-new-tokens", "6", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.rstrip("\n").splitlines()
    assert lines[0].startswith("The cat") and len("".join(lines[:-1])) > len("The cat")  # tokens printed
    assert NUMBERS.match(lines[-1]), lines[-1]
    assert "activation-sparse FFN in 2 blocks" in proc.stderr


def test_generate_compare_dense_same_tokens_and_speedup(output, monkeypatch, capsys):
    code, out, err = _cli(monkeypatch, capsys, "generate", output, "--prompt", "abc", "--max-new-tokens", "5",
                          "--compare-dense", "--device", "cpu")
    assert code == 0, err
    last = out.rstrip("\n").splitlines()[-1]
    assert NUMBERS.match(last) and re.search(r"decode speed-up \d+\.\d\dx; tokens identical$", last), last


def test_generate_prompt_file_and_chat(output, tmp_path, monkeypatch, capsys):
    (tmp_path / "p.txt").write_text("from a file")
    code, out, err = _cli(monkeypatch, capsys, "generate", output, "--prompt-file", tmp_path / "p.txt",
                          "--max-new-tokens", "3", "--device", "cpu")
    assert code == 0 and out.startswith("from a file"), err
    # the tiny model's byte tokenizer has no chat template: a one-line error, not a traceback
    code, out, err = _cli(monkeypatch, capsys, "generate", output, "--prompt", "hi", "--chat", "--device", "cpu")
    assert code == 1 and err.strip() == f"error: {output}: --chat, but the tokenizer has no chat template"


@pytest.mark.parametrize("args,message", [
    ((), "give the prompt as --prompt TEXT or --prompt-file FILE (one of them)"),
    (("--prompt", "a", "--prompt-file", "p.txt"), "give the prompt as --prompt TEXT or --prompt-file FILE"),
    (("--prompt-file", "missing.txt"), "--prompt-file missing.txt: No such file or directory"),
])
def test_generate_bad_prompt_options_are_one_line(output, monkeypatch, capsys, args, message):
    code, _, err = _cli(monkeypatch, capsys, "generate", output, *args)
    assert code == 1 and len(err.strip().splitlines()) == 1 and message in err, err


def test_generate_and_export_refuse_a_folder_that_is_not_an_output(tmp_path, monkeypatch, capsys):
    code, _, err = _cli(monkeypatch, capsys, "generate", tmp_path, "--prompt", "x")
    assert code == 1 and err.strip() == f"error: {tmp_path}: not a sparsify output (no sparsify.json)"
    code, _, err = _cli(monkeypatch, capsys, "export", tmp_path, tmp_path / "d", "--storage", "dense")
    assert code == 1 and err.strip() == f"error: {tmp_path}: not a sparsify output (no sparsify.json)"


def test_export_both_ways(output, tmp_path, monkeypatch, capsys):
    code, _, err = _cli(monkeypatch, capsys, "export", output, tmp_path / "dense", "--storage", "dense")
    assert code == 0 and "(dense)" in err and (tmp_path / "dense" / "model.safetensors").exists(), err
    code, _, err = _cli(monkeypatch, capsys, "export", tmp_path / "dense", tmp_path / "comp", "--storage", "compressed")
    assert code == 0 and (tmp_path / "comp" / "model.sparsify.safetensors").exists(), err
    a, b = load_output(output).model.state_dict(), load_output(tmp_path / "comp").model.state_dict()
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a if a[k].is_floating_point())
    code, _, err = _cli(monkeypatch, capsys, "export", output, tmp_path / "x", "--storage", "zip")
    assert code == 1 and err.strip() == "error: unknown storage 'zip': choose dense or compressed"


def test_timed_generate_matches_greedy_generate(output):
    """The streamed, timed call and the bench's call give the same tokens."""
    loaded = load_output(output, fast=True)
    ids = loaded.tokenizer("xyz", return_tensors="pt").input_ids
    pieces = []
    stats = timed_generate(loaded.model, ids, 4, loaded.tokenizer, write=pieces.append, min_new_tokens=4)
    assert stats.new_tokens == 4 and stats.prompt_tokens == ids.shape[1] and stats.prefill_s > 0
    assert torch.equal(stats.ids, greedy_generate(loaded.model, ids, 4, loaded.tokenizer, min_new_tokens=4))
    assert "".join(pieces).strip() == loaded.tokenizer.decode(stats.ids[0, ids.shape[1]:],
                                                              skip_special_tokens=True).strip()
    assert stats.path.startswith("lean native (") or stats.path.startswith("lean torch (")
    # a batch decodes on the lean path; HF generate (the fallback) takes one prompt at a time
    assert timed_generate(loaded.model, ids.repeat(2, 1), 2, loaded.tokenizer).ids.shape == (2, ids.shape[1] + 2)
    with pytest.raises(ValueError, match="one prompt at a time"):
        timed_generate(loaded.model, ids.repeat(2, 1), 2, loaded.tokenizer, path="hf")


def test_recipe_storage_field_is_validated(tmp_path):
    from sparsify_core.errors import RecipeError
    from sparsify_core.recipe import load_recipe

    text = "name: r\nstages: []\noutput:\n  storage: zip\n"
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"r\.yaml:4: output\.storage: Input should be .dense. or .compressed."):
        load_recipe(tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml", ["output.storage=dense"]).recipe.output.storage == "dense"


def test_generate_names_the_decode_path_and_compare_dense_uses_it_too(output, monkeypatch, capsys):
    code, out, err = _cli(monkeypatch, capsys, "generate", output, "--prompt", "abc", "--max-new-tokens", "4",
                          "--compare-dense", "--device", "cpu", "--decode-path", "hf")
    assert code == 0 and "decode path: hf generate (asked for)" in err, err
    assert out.rstrip("\n").splitlines()[-1].endswith("tokens identical")
    code, out, err = _cli(monkeypatch, capsys, "generate", output, "--prompt", "abc", "--max-new-tokens", "2",
                          "--device", "cpu")
    assert code == 0 and "decode path: lean" in err
    code, out, err = _cli(monkeypatch, capsys, "generate", output, "--prompt", "abc", "--decode-path", "fast")
    assert code == 1 and err.strip() == "error: --decode-path fast: choose auto, lean, lean-torch, hf"
    code, out, err = _cli(monkeypatch, capsys, "generate", output, "--prompt", "abc", "--max-new-tokens", "2",
                          "--device", "cpu", "--decode-path", "lean-torch")
    assert code == 0 and "decode path: lean torch (asked for)" in err
