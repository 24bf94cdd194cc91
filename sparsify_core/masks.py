"""Weight masks that survive every later stage, checkpoints and saved outputs."""
from __future__ import annotations

import math

import torch

from .storage import pack_bits, unpack_bits


class MaskSet:
    """Boolean keep-masks by parameter name (``True`` = weight kept).

    Pruning methods ``set`` masks; the engine re-applies them after every
    stage, the shared training loop after every optimizer step, so pruned
    weights stay exactly zero. A new mask for a parameter is intersected with
    the old one: once pruned, a weight stays pruned. For a parameter FSDP
    shards, ``apply`` zeroes this rank's shard with its slice of the mask.

    Masks are held on the CPU as packed bits (``storage.pack_bits``: one bit
    per weight, 1/32 of an fp32 weight's bytes) and unpacked one tensor at a
    time where they are used: a bool per weight would hold 101 MB for a
    pruned SmolLM2-135M, a fifth of its weights' memory, for the life of a
    run or a loaded output. ``get`` and ``items`` return fresh bool tensors
    (changing one does not change the set).
    """

    def __init__(self) -> None:
        self._bits: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}  # name -> (uint8 bits, shape)
        self._shards: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (its bits, the local shard)

    def __contains__(self, name: str) -> bool:
        return name in self._bits

    def __len__(self) -> int:
        return len(self._bits)

    def items(self):
        """``(name, bool mask)`` pairs, each mask unpacked when reached (the set may change meanwhile)."""
        for name in list(self._bits):
            keep = self.get(name)
            if keep is not None:
                yield name, keep

    def get(self, name: str) -> torch.Tensor | None:
        """The bool mask of ``name`` (a new CPU tensor), or ``None``."""
        entry = self._bits.get(name)
        return None if entry is None else unpack_bits(*entry)

    def packed(self, name: str) -> tuple[torch.Tensor, tuple[int, ...]] | None:
        """The mask of ``name`` as stored: (uint8 bits in ``storage.pack_bits`` order, shape), or ``None``."""
        return self._bits.get(name)

    def set_packed(self, name: str, bits: torch.Tensor, shape) -> None:
        """Take a mask already packed (``storage.pack_bits`` order), as a compressed output stores it; replaces
        any mask of ``name``. ``ValueError`` if ``bits`` cannot hold ``shape``."""
        shape = tuple(int(n) for n in shape)
        numel = math.prod(shape)
        bits = bits.detach().reshape(-1).to(torch.uint8).cpu()
        if bits.numel() != (numel + 7) // 8:
            raise ValueError(f"mask for {name!r}: {bits.numel()} bytes of bits for {numel} entries")
        self._bits[name] = (bits, shape)
        self._shards.pop(name, None)

    def _store(self, name: str, keep: torch.Tensor) -> None:
        self._bits[name] = (pack_bits(keep), tuple(keep.shape))
        self._shards.pop(name, None)

    def set(self, name: str, keep: torch.Tensor) -> None:
        """Prune more: the mask of ``name`` becomes ``old & keep`` (``keep`` alone if it had none)."""
        keep = keep.detach().to(torch.bool).cpu()
        old = self._bits.get(name)
        if old is not None and old[1] != tuple(keep.shape):
            raise ValueError(f"mask for {name!r}: shape {tuple(keep.shape)} does not match the recorded {old[1]}")
        self._store(name, keep if old is None else unpack_bits(*old) & keep)

    def replace(self, name: str, keep: torch.Tensor) -> None:
        """Move a mask with its weight (a permutation, a transpose): no intersection with the old mask.

        Only for stages that *rearrange* a weight; the number of pruned entries
        must not change (``ValueError`` otherwise), so no pruned weight is lost.
        """
        keep = keep.detach().to(torch.bool).cpu()
        old = self.get(name)
        if old is not None and int((~old).sum()) != int((~keep).sum()):
            raise ValueError(f"mask for {name!r}: a rearranged mask must prune as many entries as before "
                             f"({int((~keep).sum())} != {int((~old).sum())})")
        self._store(name, keep)

    def select(self, name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        """Cut the mask of ``name`` as a structured pruning cut its weight: keep ``rows`` and ``cols`` (int indices).

        For stages that remove whole rows/columns of a weight (the weight
        shrinks with them): the entries that remain keep their masks, so a
        weight pruned before stays pruned. ``None`` keeps every row (column).
        No mask for ``name``: nothing to do.
        """
        keep = self.get(name)
        if keep is None:
            return
        if rows is not None:
            keep = keep.index_select(0, rows.cpu().long())
        if cols is not None:
            keep = keep.index_select(1, cols.cpu().long())
        self._store(name, keep.contiguous())

    def drop(self, name: str) -> None:
        """Forget the mask of ``name``: only when its zeros are now held by the structure (a sparse layout)."""
        self._bits.pop(name, None)
        self._shards.pop(name, None)

    def check(self, model: torch.nn.Module, where: str = "the model") -> None:
        """Raise ``ValueError`` naming the first mask whose parameter is missing from ``model`` or has another shape."""
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, (_, shape) in self._bits.items():
            p = params.get(name)
            if p is None:
                raise ValueError(f"mask for {name!r} but {where} has no such parameter")
            if tuple(p.shape) != shape:
                raise ValueError(f"mask for {name!r} has shape {shape}, the parameter in {where} {tuple(p.shape)}")

    def pruned(self) -> int:
        """Number of masked (pruned) entries over all masks."""
        return sum(int((~keep).sum()) for _, keep in self.items())

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        """Zero every masked weight of ``model`` in place (``KeyError`` for a mask of a parameter it lacks)."""
        if not self._bits:
            return
        params = dict(model.named_parameters(remove_duplicate=False))
        for name in list(self._bits):
            p = params.get(name)
            if p is None:
                raise KeyError(f"mask for {name!r} but the model has no such parameter")
            p.mul_(self._beside(name, p))

    def _beside(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """The mask of ``name`` as a multiplier laid out like ``p``: for a parameter sharded by FSDP (a DTensor),
        this rank's slice of it, cut locally (every rank holds the same whole mask) and kept until the mask changes."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        bits, shape = self._bits[name]
        if not isinstance(p, DTensor):
            return unpack_bits(bits, shape).to(device=p.device, dtype=p.dtype)
        cached = self._shards.get(name)
        if cached is None or cached[0] is not bits or cached[1].placements != p.placements:
            local = distribute_tensor(unpack_bits(bits, shape).to(device=p.device, dtype=p.dtype), p.device_mesh,
                                      p.placements, src_data_rank=None)
            self._shards[name] = cached = (bits, local)
        return cached[1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Masks as uint8 tensors of their parameters' shapes, 0/1 (safetensors has no bool on every version)."""
        return {name: keep.to(torch.uint8).contiguous() for name, keep in self.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace every mask with ``state``'s (any dtype: non-zero = kept), as ``state_dict`` writes them."""
        self._bits, self._shards = {}, {}
        for name, t in state.items():
            self._store(name, t.to(torch.bool))


@torch.no_grad()
def masks_from_zeros(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Keep-masks (``True`` = kept) of the named parameters from their exact zeros, for those that have any.

    Used when a model pruned elsewhere (no saved masks) starts a run: its zeros
    are taken as the pruning, so later stages keep them.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for name in names:
        keep = params[name].detach() != 0
        if not bool(keep.all()):
            out[name] = keep.cpu()
    return out
