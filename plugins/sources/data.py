"""Data sources: the Python docs' prose (built in), local text and JSON-lines files, and HF datasets."""
from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path

from pydantic import Field

from sparsify_core import hookimpl
from sparsify_core.errors import SparsifyError
from sparsify_core.method import Params as BaseParams
from sparsify_core.sources import DataSource

# --------------------------------------------------------------------------- pydoc


def overlap_groups(docs: dict[str, str], min_line: int = 40) -> list[list[str]]:
    """Group documents that share any line of at least ``min_line`` characters (whitespace-normalised).

    pydoc topics copy text from each other (``compound`` holds ``if``, ``for``,
    ``try``...; ``specialnames`` holds ``customization``...), so a split by
    topic alone would train on eval text. Groups are sorted, largest text first.
    """
    parent = {name: name for name in docs}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    first_owner: dict[str, str] = {}
    for name in sorted(docs):
        for line in docs[name].splitlines():
            line = " ".join(line.split())
            if len(line) < min_line:
                continue
            other = first_owner.setdefault(line, name)
            if other != name:
                parent[root(name)] = root(other)
    groups: dict[str, list[str]] = {}
    for name in sorted(docs):
        groups.setdefault(root(name), []).append(name)
    return sorted(groups.values(), key=lambda g: (-sum(len(docs[n]) for n in g), g))


def split_by_group(docs: dict[str, str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministically split document names into (train, eval), keeping overlapping documents together.

    Groups are visited in an order fixed by a hash of ``seed`` and their names;
    each is added to eval if eval stays within ``eval_fraction`` of the
    characters. Eval gets at least one group and train keeps the rest; both are
    returned sorted.
    """
    groups = overlap_groups(docs)
    if len(groups) < 2:
        raise ValueError("needs at least two independent documents to split")
    size = {tuple(g): sum(len(docs[n]) for n in g) for g in groups}
    budget = eval_fraction * sum(size.values())

    def order(g: list[str]) -> str:
        return hashlib.sha256(f"{seed}:{','.join(g)}".encode()).hexdigest()

    eval_groups, used = [], 0
    for g in sorted(groups, key=order):
        if used + size[tuple(g)] <= budget:
            eval_groups.append(g)
            used += size[tuple(g)]
    if not eval_groups:  # a budget smaller than any group: take the smallest
        eval_groups = [min(groups, key=lambda g: (size[tuple(g)], g))]
    eval_names = sorted(n for g in eval_groups for n in g)
    train_names = sorted(set(docs) - set(eval_names))
    return train_names, eval_names


class PyDoc(DataSource):
    """English prose from Python's own docs (pydoc_data.topics), split by topic into train and eval."""

    name = "pydoc"

    class Params(BaseParams):
        eval_fraction: float = Field(0.1, gt=0, le=0.5, description="share of the characters held out for eval")
        seed: int = Field(0, description="picks a different deterministic split")

    def texts(self, params: Params) -> dict[str, list[str]]:
        from pydoc_data.topics import topics

        train, held_out = split_by_group(topics, params.eval_fraction, params.seed)
        return {"train": [topics[n] for n in train], "eval": [topics[n] for n in held_out]}


# --------------------------------------------------------------------------- local files


def expand_paths(patterns: list[str] | str, *, source: str, partition: str) -> list[Path]:
    """Files named by paths or globs, in the given order (each glob's matches sorted), without repeats."""
    found: list[Path] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise SparsifyError(f"{source} data: {partition}: no file matches {pattern}")
        else:
            if not os.path.isfile(pattern):
                raise SparsifyError(f"{source} data: {partition}: no such file: {pattern}")
            matches = [Path(pattern)]
        found += [p for p in matches if p not in found]
    return found


def read_text(path: Path, source: str) -> str:
    """A file's text as UTF-8, or a one-line error naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SparsifyError(f"{source} data: {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise SparsifyError(f"{source} data: {path}: {exc.strerror or exc}") from None


def _partitions(source: str, params, read) -> dict[str, list[str]]:
    """Read the train and eval files with ``read(path) -> documents``; refuses shared files and empty partitions."""
    files = {part: expand_paths(getattr(params, part), source=source, partition=part) for part in ("train", "eval")}
    shared = {p.resolve() for p in files["train"]} & {p.resolve() for p in files["eval"]}
    if shared:
        raise SparsifyError(f"{source} data: {sorted(shared)[0]} is in both train and eval; "
                            f"the partitions must be disjoint")
    out = {}
    for part, paths in files.items():
        out[part] = [doc for path in paths for doc in read(path)]
        if not out[part]:
            raise SparsifyError(f"{source} data: {part}: no text in {', '.join(map(str, paths))}")
    return out


class TextFiles(DataSource):
    """Local text files (paths or globs): each file is a document, or each paragraph."""

    name = "text"

    class Params(BaseParams):
        train: list[str] | str
        eval: list[str] | str
        split_paragraphs: bool = Field(False, description="a document per blank-line separated paragraph")

    def texts(self, params: Params) -> dict[str, list[str]]:
        def read(path: Path) -> list[str]:
            text = read_text(path, self.name)
            if not params.split_paragraphs:
                return [text] if text.strip() else []
            paragraphs, current = [], []
            for line in text.splitlines():
                if line.strip():
                    current.append(line)
                elif current:
                    paragraphs.append("\n".join(current))
                    current = []
            return paragraphs + (["\n".join(current)] if current else [])

        return _partitions(self.name, params, read)


class JsonLines(DataSource):
    """Local JSON-lines files (paths or globs): one document per line's text field."""

    name = "jsonl"

    class Params(BaseParams):
        train: list[str] | str
        eval: list[str] | str
        field: str = "text"

    def texts(self, params: Params) -> dict[str, list[str]]:
        def read(path: Path) -> list[str]:
            docs = []
            for number, line in enumerate(read_text(path, self.name).splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SparsifyError(f"jsonl data: {path}:{number}: not valid JSON ({exc.msg})") from None
                value = record.get(params.field) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    raise SparsifyError(f"jsonl data: {path}:{number}: no string field {params.field!r}")
                if value.strip():
                    docs.append(value)
            return docs

        return _partitions(self.name, params, read)


# --------------------------------------------------------------------------- hf datasets


class HFDataset(DataSource):
    """A Hugging Face dataset available locally (needs: pip install datasets)."""

    name = "hf"

    class Params(BaseParams):
        path: str = Field(description="dataset id, or a local folder/script")
        name: str | None = Field(None, description="configuration name")
        train_split: str = "train"
        eval_split: str = "validation"
        field: str = "text"

    def texts(self, params: Params) -> dict[str, list[str]]:
        try:
            import datasets
        except ImportError:
            raise SparsifyError("the hf data source needs the 'datasets' package: pip install datasets") from None
        if params.train_split == params.eval_split:
            raise SparsifyError(f"hf data: train_split and eval_split are both {params.train_split!r}; "
                                f"the partitions must be disjoint")
        out = {}
        for part, split in (("train", params.train_split), ("eval", params.eval_split)):
            try:  # datasets itself honours HF_DATASETS_OFFLINE and its local cache
                ds = datasets.load_dataset(params.path, params.name, split=split)
            except Exception as exc:  # datasets raises many types; the user needs one line
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise SparsifyError(f"hf data: cannot load {params.path!r} split {split!r}: {first}") from None
            if params.field not in ds.column_names:
                raise SparsifyError(f"hf data: {params.path!r} split {split!r} has no column {params.field!r} "
                                    f"(columns: {', '.join(ds.column_names)})")
            out[part] = [t for t in ds[params.field] if isinstance(t, str) and t.strip()]
            if not out[part]:
                raise SparsifyError(f"hf data: {params.path!r} split {split!r} holds no text in {params.field!r}")
        return out


@hookimpl
def sparsify_data_sources():
    """The built-in data sources."""
    return [PyDoc, TextFiles, JsonLines, HFDataset]
