"""Weight masks that survive every later stage, checkpoints and saved outputs."""
from __future__ import annotations

import torch


class MaskSet:
    """Boolean keep-masks by parameter name (``True`` = weight kept).

    Pruning methods ``set`` masks; the engine re-applies them after every
    stage, the shared training loop after every optimizer step, so pruned
    weights stay exactly zero. Masks are whole tensors on the CPU; for a
    parameter FSDP shards, ``apply`` zeroes this rank's shard with its slice
    of the mask. A new mask for a parameter is intersected with
    the old one: once pruned, a weight stays pruned.
    """

    def __init__(self) -> None:
        self._masks: dict[str, torch.Tensor] = {}
        self._shards: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (mask, its local shard)

    def __contains__(self, name: str) -> bool:
        return name in self._masks

    def __len__(self) -> int:
        return len(self._masks)

    def items(self):
        return self._masks.items()

    def get(self, name: str) -> torch.Tensor | None:
        return self._masks.get(name)

    def set(self, name: str, keep: torch.Tensor) -> None:
        """Prune more: the mask of ``name`` becomes ``old & keep`` (``keep`` alone if it had none)."""
        keep = keep.detach().to(torch.bool).cpu()
        old = self._masks.get(name)
        if old is not None and old.shape != keep.shape:
            raise ValueError(f"mask for {name!r}: shape {tuple(keep.shape)} does not match the recorded "
                             f"{tuple(old.shape)}")
        self._masks[name] = keep if old is None else (old & keep)

    def replace(self, name: str, keep: torch.Tensor) -> None:
        """Move a mask with its weight (a permutation, a transpose): no intersection with the old mask.

        Only for stages that *rearrange* a weight; the number of pruned entries
        must not change (``ValueError`` otherwise), so no pruned weight is lost.
        """
        keep = keep.detach().to(torch.bool).cpu()
        old = self._masks.get(name)
        if old is not None and int((~old).sum()) != int((~keep).sum()):
            raise ValueError(f"mask for {name!r}: a rearranged mask must prune as many entries as before "
                             f"({int((~keep).sum())} != {int((~old).sum())})")
        self._masks[name] = keep

    def select(self, name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        """Cut the mask of ``name`` as a structured pruning cut its weight: keep ``rows`` and ``cols`` (int indices).

        For stages that remove whole rows/columns of a weight (the weight
        shrinks with them): the entries that remain keep their masks, so a
        weight pruned before stays pruned. ``None`` keeps every row (column).
        No mask for ``name``: nothing to do.
        """
        keep = self._masks.get(name)
        if keep is None:
            return
        if rows is not None:
            keep = keep.index_select(0, rows.cpu().long())
        if cols is not None:
            keep = keep.index_select(1, cols.cpu().long())
        self._masks[name] = keep.contiguous()
        self._shards.pop(name, None)

    def drop(self, name: str) -> None:
        """Forget the mask of ``name``: only when its zeros are now held by the structure (a sparse layout)."""
        self._masks.pop(name, None)

    def check(self, model: torch.nn.Module, where: str = "the model") -> None:
        """Raise ``ValueError`` naming the first mask whose parameter is missing from ``model`` or has another shape."""
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, keep in self._masks.items():
            p = params.get(name)
            if p is None:
                raise ValueError(f"mask for {name!r} but {where} has no such parameter")
            if tuple(p.shape) != tuple(keep.shape):
                raise ValueError(f"mask for {name!r} has shape {tuple(keep.shape)}, the parameter in {where} "
                                 f"{tuple(p.shape)}")

    def pruned(self) -> int:
        """Number of masked (pruned) entries over all masks."""
        return sum(int((~keep).sum()) for keep in self._masks.values())

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        """Zero every masked weight of ``model`` in place."""
        if not self._masks:
            return
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, keep in self._masks.items():
            p = params.get(name)
            if p is None:
                raise KeyError(f"mask for {name!r} but the model has no such parameter")
            p.mul_(self._beside(name, keep, p))

    def _beside(self, name: str, keep: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``keep`` as a multiplier laid out like ``p``: for a parameter sharded by FSDP (a DTensor), this
        rank's slice of it, cut locally (every rank holds the same whole mask) and kept until the mask changes."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(p, DTensor):
            return keep.to(device=p.device, dtype=p.dtype)
        cached = self._shards.get(name)
        if cached is None or cached[0] is not keep or cached[1].placements != p.placements:
            local = distribute_tensor(keep.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements,
                                      src_data_rank=None)
            self._shards[name] = cached = (keep, local)
        return cached[1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Masks as uint8 tensors (safetensors has no bool on every version)."""
        return {name: m.to(torch.uint8).contiguous() for name, m in self._masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._masks = {name: t.to(torch.bool) for name, t in state.items()}


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
