"""How an output's weights lie on disk: ``dense`` (plain transformers) or ``compressed`` (sparsify only).

Pure functions on tensors and on the weight files of a folder; they know no
method, layout or model class.

- ``dense``: ``model.safetensors`` (or transformers' shards) written by
  ``save_pretrained``: every tensor as the model holds it, masks in
  ``sparsify/masks.safetensors`` as one uint8 per weight. Plain
  ``transformers`` loads it: modules stages swapped are written in their
  plain form (``plain``; the manifest's ``storage.plain`` lists them).
- ``compressed``: one file, ``model.sparsify.safetensors``, and no
  ``model.safetensors``: plain ``transformers`` fails clearly on the folder
  ("no file named model.safetensors") instead of loading garbage. A sparse
  tensor (a masked weight, or any float tensor whose zeros make it smaller)
  is stored as ``NAME::bits`` (its kept and non-zero entries, packed 8 per
  byte, little bit order as ``numpy.packbits(..., bitorder="little")``) plus
  ``NAME::values`` (those entries in row-major order) and, when some of the
  zeros are -0.0, ``NAME::zsign`` (their sign bits); everything else under
  its own name. Weights that a stage moved
  into a layout (``SparseLinear``'s ``crow``/``col``/``val``, ``val``/``idx``
  ...) are already compact and are stored as the layout holds them, so a
  third-party layout stores itself. Masks are no separate file: a mask equal
  to its weight's bits costs nothing more, another is ``NAME::keep`` bits.

Why one bitmask for unstructured, n:m and n:m:g masks alike: at 1 bit per
weight it is as small as the n:m packed form (2:4 needs 2 bits per kept
weight, i.e. 1 bit per weight) and smaller than the layouts' in-memory
index tensors (uint8 per kept weight for ``nm``, int16 per vector for
``nmg``), and it keeps the mask exact even where a kept weight is zero.

Both forms are exact: every tensor, -0.0 and NaN bits included, and every
mask come back bit for bit (``decode_tensor``). ``sparsify.json`` describes
the storage under ``"storage"`` (``{"form", "version", "tensors", "masks"}``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

STORAGES = ("dense", "compressed")
STORAGE_VERSION = 1
COMPRESSED_FILE = "model.sparsify.safetensors"
DENSE_MASKS = "sparsify/masks.safetensors"
#: Tensors smaller than this stay dense: norms and biases gain nothing worth an entry.
MIN_NUMEL = 1024

_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --------------------------------------------------------------------------- bits


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor of any shape as uint8 ``[ceil(numel / 8)]``, 8 entries per byte, little bit order."""
    flat = mask.detach().reshape(-1).to(torch.bool).cpu().numpy()
    return torch.from_numpy(np.packbits(flat, bitorder="little"))


def unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    """The bool tensor of ``shape`` that ``pack_bits`` packed (``ValueError`` if ``bits`` is too short)."""
    numel = int(np.prod(shape)) if len(shape) else 1
    if bits.numel() * 8 < numel:
        raise ValueError(f"{bits.numel()} bytes of bits cannot hold {numel} entries")
    flat = np.unpackbits(bits.cpu().numpy(), count=numel, bitorder="little").view(bool)  # 0/1 bytes: no copy
    return torch.from_numpy(flat).reshape(tuple(shape))


# --------------------------------------------------------------------------- tensors


def encode_tensor(name: str, t: torch.Tensor, keep: torch.Tensor | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The stored tensors of ``t`` and its manifest entry (``None``: stored densely under ``name``).

    A float tensor is stored as bits plus values when it has a mask ``keep``
    (bool, ``t``'s shape) or when that is smaller than dense: ``NAME::bits``
    marks the stored entries (``keep`` and any non-zero outside it),
    ``NAME::values`` holds them; the others are zeros, and ``NAME::zsign``
    (only if one is -0.0, as ``w * mask`` leaves negative pruned weights)
    packs their sign bits. A ``keep`` that differs from the bits is stored
    as ``NAME::keep``."""
    t = t.detach().cpu().contiguous()
    if keep is None and (not t.is_floating_point() or t.numel() < MIN_NUMEL):
        return {name: t}, None
    if not t.is_floating_point():  # a masked integer tensor: as it is, and its mask alone
        return {name: t, f"{name}::keep": pack_bits(keep)}, None
    sel = t != 0  # NaN included
    if keep is not None:
        sel |= keep.to(torch.bool)
    nnz = int(sel.sum())
    if keep is None and nnz * t.element_size() + t.numel() / 4 >= 0.9 * t.numel() * t.element_size():
        return {name: t}, None
    out = {f"{name}::bits": pack_bits(sel), f"{name}::values": t[sel].contiguous()}
    signs = torch.signbit(t[~sel])
    if bool(signs.any()):
        out[f"{name}::zsign"] = pack_bits(signs)
    entry = {"form": "bitmask", "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if keep is not None and not torch.equal(keep.to(torch.bool), sel):
        out[f"{name}::keep"] = pack_bits(keep)
    return out, entry


def decode_tensor(name: str, entry: dict | None, get, has=lambda key: False) -> torch.Tensor:
    """Tensor ``name`` back, bit for bit, from ``get(key)`` (a stored tensor) and its entry.

    ``has(key)`` says whether an optional stored tensor (``::zsign``) exists.
    Raises ``ValueError`` for an unknown form (an output written by a newer sparsify)."""
    if entry is None:
        return get(name)
    if entry.get("form") != "bitmask":
        raise ValueError(f"{name}: unknown storage form {entry.get('form')!r} (written by a newer sparsify?)")
    sel = unpack_bits(get(f"{name}::bits"), entry["shape"])
    out = torch.zeros(entry["shape"], dtype=getattr(torch, entry["dtype"]))
    # masked_scatter_ fills in row-major order without the int64 indices that out[sel] = ... would build
    out.masked_scatter_(sel, get(f"{name}::values"))
    if has(f"{name}::zsign"):
        rest = ~sel
        signs = unpack_bits(get(f"{name}::zsign"), (int(rest.sum()),))
        out.masked_scatter_(rest, torch.zeros(signs.shape, dtype=out.dtype).masked_fill_(signs, -0.0))
    return out


def mask_key(name: str, entry: dict) -> str:
    """The stored key of tensor ``name``'s mask bits: its own ``::keep``, else its stored entries' ``::bits``."""
    return f"{name}::keep" if entry.get("keep") else f"{name}::bits"


def decode_mask(name: str, entry: dict, get) -> torch.Tensor:
    """The bool mask of tensor ``name`` (its entry in the manifest's ``masks``), from ``get(key)``."""
    return unpack_bits(get(mask_key(name, entry)), entry["shape"])


# --------------------------------------------------------------------------- folders


def storage_of(manifest: dict) -> dict:
    """The manifest's storage block; outputs from before it existed are dense."""
    return manifest.get("storage") or {"form": "dense", "version": STORAGE_VERSION}


def dense_files(folder: Path) -> list[Path]:
    """The top-level dense weight files (``model.safetensors`` or its shards)."""
    return sorted(p for p in Path(folder).glob("*.safetensors") if p.name != COMPRESSED_FILE)


def iter_tensors(folder: Path, manifest: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the model's state dict, decoded one at a time (dense form, bit for bit).

    One tensor at a time, so a load holds at most one decoded tensor besides
    the model. Raises ``ValueError`` on an unknown storage form or version."""
    st = storage_of(manifest)
    form = st.get("form")
    if form == "dense":
        for f in dense_files(folder):
            with safe_open(f, framework="pt") as fh:
                for key in fh.keys():
                    yield key, fh.get_tensor(key)
        return
    if form != "compressed":
        raise ValueError(f"unknown storage {form!r} (this sparsify knows {', '.join(STORAGES)})")
    if int(st.get("version", 0)) > STORAGE_VERSION:
        raise ValueError(f"storage version {st.get('version')} is newer than this sparsify's ({STORAGE_VERSION}); "
                         "upgrade sparsify")
    entries = st.get("tensors", {})
    with _Reader(Path(folder) / COMPRESSED_FILE) as fh:
        for key in fh.keys():
            name, _, part = key.partition("::")
            if part and part != "bits":
                continue  # values, signs and keep bits are read with their name's bits
            yield name, decode_tensor(name, entries.get(name) if part else None, fh.get_tensor, fh.has)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class _Reader:
    """Reads tensors of a safetensors file one at a time with plain reads, not a memory map.

    A compressed tensor is decoded into a new one, so its stored bytes are
    needed only for a moment: read through a memory map, every page read
    would stay resident (and counted) until the file closes, doubling the
    load's peak memory. Raises ``ValueError`` on a dtype it does not know."""

    def __init__(self, path: Path):
        self._f = open(path, "rb")
        n = int.from_bytes(self._f.read(8), "little")
        header = json.loads(self._f.read(n))
        header.pop("__metadata__", None)
        self._start = 8 + n
        self._header = header

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def keys(self) -> list[str]:
        return sorted(self._header, key=lambda k: self._header[k]["data_offsets"][0])  # file order

    def has(self, key: str) -> bool:
        return key in self._header

    def get_tensor(self, key: str) -> torch.Tensor:
        info = self._header[key]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{key}: unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self._f.seek(self._start + begin)
        self._f.readinto(memoryview(buf.numpy()))
        return buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def iter_masks(folder: Path, manifest: dict) -> Iterator[tuple[str, torch.Tensor, tuple[int, ...]]]:
    """The output's masks one at a time, packed: ``(parameter name, uint8 bits in pack_bits order, shape)``.

    A compressed output stores them packed already (no bool tensor is made);
    the dense form's 0/1 bytes are packed one tensor at a time."""
    st = storage_of(manifest)
    if st.get("form") == "compressed":
        with _Reader(Path(folder) / COMPRESSED_FILE) as fh:
            for name, entry in st.get("masks", {}).items():
                key = mask_key(name, entry)
                bits, shape = fh.get_tensor(key), tuple(entry["shape"])
                numel = int(np.prod(shape)) if len(shape) else 1
                if bits.numel() != (numel + 7) // 8:
                    raise ValueError(f"{key}: {bits.numel()} bytes of bits for {numel} entries")
                yield name, bits, shape
        return
    path = Path(folder) / DENSE_MASKS
    if path.exists():
        with safe_open(path, framework="pt") as fh:
            for key in fh.keys():
                keep = fh.get_tensor(key)
                yield key, pack_bits(keep), tuple(keep.shape)


def read_masks(folder: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The output's masks (bool, by parameter name), from either storage form."""
    return {name: unpack_bits(bits, shape) for name, bits, shape in iter_masks(folder, manifest)}


def write_storage(folder: Path, tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], storage: str) -> dict:
    """Write a state dict and its masks into ``folder`` in ``storage`` form; returns the manifest's storage block.

    ``dense`` writes ``model.safetensors`` (one file) and ``sparsify/masks.safetensors``;
    ``compressed`` writes ``model.sparsify.safetensors``. Raises
    ``ValueError`` for an unknown storage or a mask of a tensor not in ``tensors``."""
    folder = Path(folder)
    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}: choose dense or compressed")
    missing = [m for m in masks if m not in tensors]
    if missing:
        raise ValueError(f"mask of {missing[0]!r}, which the model's weights do not hold")
    if storage == "dense":
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
        if masks:
            (folder / "sparsify").mkdir(exist_ok=True)
            save_file({k: m.to(torch.uint8).contiguous() for k, m in masks.items()}, folder / DENSE_MASKS)
        return {"form": "dense", "version": STORAGE_VERSION}
    out: dict[str, torch.Tensor] = {}
    entries, mask_entries = {}, {}
    for name, t in tensors.items():
        stored, entry = encode_tensor(name, t, masks.get(name))
        out.update(stored)
        if entry is not None:
            entries[name] = entry
        if name in masks:
            mask_entries[name] = {"shape": list(t.shape), "keep": f"{name}::keep" in stored}
    save_file(out, folder / COMPRESSED_FILE, metadata={"format": "sparsify-compressed",
                                                       "storage_version": str(STORAGE_VERSION)})
    return {"form": "compressed", "version": STORAGE_VERSION, "tensors": entries, "masks": mask_entries}


def folder_bytes(folder: Path) -> int:
    """Bytes of the weight files and masks of an output folder (what storage changes)."""
    folder = Path(folder)
    files = dense_files(folder) + [folder / COMPRESSED_FILE, folder / DENSE_MASKS]
    return sum(f.stat().st_size for f in files if f.exists())


def manifest_of(folder: Path) -> dict:
    """``sparsify.json`` of an output folder (``FileNotFoundError`` when it is not one)."""
    return json.loads((Path(folder) / "sparsify.json").read_text())
