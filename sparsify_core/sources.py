"""Model and data sources, and the packing of texts into token splits."""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Literal

import torch

from .params import Params

Task = Literal["causal_lm", "encoder"]


@dataclass
class LoadedModel:
    """A model as a source hands it over.

    ``model`` is a transformers ``PreTrainedModel`` (or compatible nn.Module
    with ``save_pretrained``), ``tokenizer`` a transformers tokenizer, ``task``
    says how to evaluate it. ``masks`` are keep-masks (``True`` = kept, in
    each parameter's own shape) of a model that was pruned before this run,
    by parameter name: the engine loads them into the run's ``MaskSet``
    first, so every stage of the new run keeps those weights zero;
    ``masks_origin`` says where they came from (shown to the user).
    """

    model: torch.nn.Module
    tokenizer: Any
    task: Task
    description: str = ""
    masks: dict[str, torch.Tensor] | None = None
    masks_origin: str = ""


class ModelSource(ABC):
    """Loads a model. Subclass, set ``name`` and ``Params``, implement ``load``."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params

    @abstractmethod
    def load(self, params: Params, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        """Implemented by each subclass."""

    def skeleton(self, params: Params) -> torch.nn.Module | None:
        """The model ``load`` would return, built from its config alone on the meta device (default: unknown).

        No weights are read and no memory is allocated (build it under
        ``with torch.device("meta"):``), so it is cheap enough for ``sparsify
        validate``. The engine hands it to each stage's ``Method.check``
        before any weights load. Return ``None`` when the config cannot be had
        without loading (the structural checks are then skipped); raise
        ``SparsifyError`` for a model that ``load`` is sure to refuse.
        """
        return None

    @classmethod
    def describe(cls) -> str:
        return ((cls.__doc__ or "").strip().splitlines() or [""])[0]


#: Paths transformers gives learned absolute position embeddings (GPT-2's wpe, OPT, BERT and their kin).
_POSITION_EMBEDDINGS = re.compile(r"(^|\.)(wpe|embed_positions|position_embeddings)$")


def position_limit(model: torch.nn.Module) -> int | None:
    """The longest sequence a model with learned position embeddings takes; ``None`` without them (rotary).

    Longer inputs index past the embedding table (an IndexError on CPU, a
    device assert on CUDA), so this is checked against the recipe's ``seq_len``.
    OPT's table holds ``offset`` (2) extra rows.
    """
    limits = [m.num_embeddings - getattr(m, "offset", 0) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Embedding) and _POSITION_EMBEDDINGS.search(name)]
    return min(limits) if limits else None


class DataSource(ABC):
    """Provides raw text. Subclass, set ``name``/``Params``, implement ``texts``.

    ``texts`` returns documents per partition, e.g. ``{"train": [...], "eval":
    [...]}``. Partitions must be disjoint: the engine never mixes them, so text
    in ``eval`` is never trained on.
    """

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params

    @abstractmethod
    def texts(self, params: Params) -> dict[str, list[str]]:
        """Implemented by each subclass."""

    @classmethod
    def describe(cls) -> str:
        return ((cls.__doc__ or "").strip().splitlines() or [""])[0]


@dataclass
class TokenSplit:
    """Packed token sequences of one split: ``input_ids`` is ``[samples, seq_len]``."""

    name: str
    input_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[torch.Tensor]:
        """Yield ``[b, seq_len]`` batches; shuffled order is a function of ``seed`` only."""
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            yield self.input_ids[order[i:i + batch_size]]


def pack_texts(tokenizer, docs: list[str], seq_len: int, samples: int, *, offset: int = 0) -> torch.Tensor:
    """Tokenize ``docs``, join them with EOS, and cut ``samples`` rows of ``seq_len``.

    Rows start at sequence ``offset`` of the stream, so two splits drawn from
    the same partition with different offsets do not overlap. Raises
    ``ValueError`` when the partition holds fewer tokens than asked for.
    """
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    need = (offset + samples) * seq_len
    stream: list[int] = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
        if len(stream) >= need:
            break
    have = len(stream) // seq_len - offset
    if have < samples:
        raise ValueError(f"needs {samples} sequences of {seq_len} tokens from sequence {offset} on, "
                         f"but the text holds only {max(have, 0)}")
    start = offset * seq_len
    return torch.tensor(stream[start:start + samples * seq_len], dtype=torch.long).view(samples, seq_len)
