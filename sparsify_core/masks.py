"""Weight masks that survive every later stage, checkpoints and saved outputs."""
from __future__ import annotations

import torch


class MaskSet:
    """Boolean keep-masks by parameter name (``True`` = weight kept).

    Pruning methods ``set`` masks; the engine re-applies them after every
    stage, the shared training loop after every optimizer step, so pruned
    weights stay exactly zero. A new mask for a parameter is intersected with
    the old one: once pruned, a weight stays pruned.
    """

    def __init__(self) -> None:
        self._masks: dict[str, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._masks

    def __len__(self) -> int:
        return len(self._masks)

    def items(self):
        return self._masks.items()

    def get(self, name: str) -> torch.Tensor | None:
        return self._masks.get(name)

    def set(self, name: str, keep: torch.Tensor) -> None:
        keep = keep.detach().to(torch.bool).cpu()
        old = self._masks.get(name)
        self._masks[name] = keep if old is None else (old & keep)

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
            p.mul_(keep.to(device=p.device, dtype=p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Masks as uint8 tensors (safetensors has no bool on every version)."""
        return {name: m.to(torch.uint8).contiguous() for name, m in self._masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._masks = {name: t.to(torch.bool) for name, t in state.items()}
