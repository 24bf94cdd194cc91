"""Models larger than the device: keep the transformer layers' weights off it, bring one layer at a time.

``model.offload`` in a recipe (``none | cpu | disk``) selects this. With
``cpu`` the layers' weights stay in host memory; with ``disk`` they are
written once to a safetensors file in the run's work folder and memory-mapped
from it (shared mapping: the kernel pages them in and out, and changes made
while pruning are written back to the file). Everything outside the layers
(embeddings, final norm, head: small next to the layers) stays on the device.

A layer's weights move to the compute device only while it runs:

- during layer-by-layer calibration (``calibration.calibrate_layerwise``) a
  layer is *held* on the device while it is visited (observed, pruned,
  re-run), then its weights are copied back to their host (or file) tensors;
- any other forward pass (evaluation, threshold calibration, MoEfication's
  statistics) goes through forward hooks on each layer that bring it on
  before it runs and send it back after.

Outside those moments every parameter of a layer *is* its host tensor (a
plain CPU tensor, or a view into the mapped file), so masks, checkpoints,
``state_dict`` and ``save_pretrained`` work on the model unchanged. The
device copy of a layer is a real copy even when the device is the CPU, so
the CPU path runs the same code a GPU does; copies back are skipped for
weights the layer's run did not change (their version counter says so).
"""
from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch import nn

from .ffn import transformer_layers

OffloadMode = Literal["none", "cpu", "disk"]

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a CPU tensor over its own shared, writable memory map of the file.

    Writing into a returned tensor writes the file (through the page cache).
    Each tensor has a storage of its own (one map each), so the model still
    saves with ``safetensors`` (which refuses tensors sharing a storage).
    Raises ``ValueError`` for a dtype outside ``_SAFETENSORS_DTYPES``.
    """
    import numpy as np

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which offload cannot map")
        begin, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        if end == begin:  # an empty tensor: nothing to map
            out[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        raw = np.memmap(path, dtype=np.uint8, mode="r+", offset=8 + n + begin, shape=(end - begin,))
        # safetensors stores wider dtypes first and pads the header to 8 bytes, so each view is aligned
        out[name] = torch.from_numpy(raw).view(dtype).view(info["shape"])
    return out


class Offload:
    """The transformer layers of ``model`` kept in host memory (``cpu``) or a mapped file (``disk``).

    ``model`` must be on the CPU when this is built; everything outside its
    layers is moved to ``device``. ``folder`` (needed for ``disk``) receives
    ``layers.safetensors``. Use ``held(name, layer)`` to keep one layer on
    the device for a while; plain forward passes bring layers on one at a time.
    """

    def __init__(self, model: nn.Module, device: torch.device, mode: OffloadMode, folder: Path | None = None):
        if mode not in ("cpu", "disk"):
            raise ValueError(f"offload mode must be cpu or disk, got {mode!r}")
        self.model, self.device, self.mode = model, torch.device(device), mode
        self.layers = transformer_layers(model)
        self._held: set[str] = set()
        self._on: dict[str, dict[str, tuple[torch.Tensor, int]]] = {}  # layer -> tensor -> (device copy, version)
        inside = {id(t) for _, layer in self.layers for t in _tensors(layer).values()}
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                if id(t) not in inside:
                    t.data = t.data.to(self.device)
        self.file: Path | None = None
        if mode == "disk":
            if folder is None:
                raise ValueError("offload: disk needs a folder for its file")
            self._to_file(Path(folder))
        # the host (or file) tensor of each layer tensor; a device copy replaces it only while the layer runs
        self._homes: dict[str, dict[str, torch.Tensor]] = {name: {k: t.data for k, t in _tensors(layer).items()}
                                                           for name, layer in self.layers}
        self._hooks = []
        for name, layer in self.layers:
            self._hooks.append(layer.register_forward_pre_hook(self._pre(name, layer)))
            self._hooks.append(layer.register_forward_hook(self._post(name, layer)))

    def _to_file(self, folder: Path) -> None:
        """Write every layer tensor to one safetensors file, then make each tensor a view into its mapping."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        self.file = folder / "layers.safetensors"
        flat = {f"{name}.{key}": t.data.contiguous() for name, layer in self.layers
                for key, t in _tensors(layer).items()}
        save_file(flat, str(self.file))
        del flat
        mapped = map_safetensors(self.file)
        for name, layer in self.layers:
            for key, t in _tensors(layer).items():
                t.data = mapped[f"{name}.{key}"]

    # -- moving layers -----------------------------------------------------------------

    @torch.no_grad()
    def onload(self, name: str, layer: nn.Module) -> None:
        """Copy the layer's weights and buffers to the device (a no-op when it is there already)."""
        if name in self._on:
            return
        copies = {}
        for key, t in _tensors(layer).items():
            if t.device == self.device and t.device.type != "cpu":
                continue  # created on the device (a swapped module): taken home by offload
            t.data = t.data.to(self.device, copy=True)
            copies[key] = (t.data, t._version)
        self._on[name] = copies

    @torch.no_grad()
    def offload(self, name: str, layer: nn.Module) -> None:
        """Send the layer back: weights it changed are copied into their host tensors (or new host tensors)."""
        copies = self._on.pop(name, None)
        if copies is None:
            return
        homes = self._homes.setdefault(name, {})
        tensors = _tensors(layer)
        for key in set(homes) - set(tensors):  # a swapped-out module's weights: let them go
            del homes[key]
        for key, t in tensors.items():
            home = homes.get(key)
            copy, version = copies.get(key, (None, None))
            if home is not None and home.shape == t.shape and home.dtype == t.dtype:
                unchanged = copy is not None and t.data.data_ptr() == copy.data_ptr() and t._version == version
                if not unchanged:
                    home.copy_(t.data)
                t.data = home
            else:  # a tensor the layer did not have (a swapped module): it lives in host memory from now on
                homes[key] = t.data = t.data.to("cpu", copy=True)

    @contextmanager
    def held(self, name: str, layer: nn.Module) -> Iterator[None]:
        """Keep the layer on the device for the duration (forward hooks leave it there), then send it back."""
        self.onload(name, layer)
        self._held.add(name)
        try:
            yield
        finally:
            self._held.discard(name)
            self.offload(name, layer)

    def release(self) -> None:
        """Send back every layer still on the device (after a forward pass that was cut short)."""
        for name, layer in self.layers:
            if name not in self._held:
                self.offload(name, layer)

    def _pre(self, name: str, layer: nn.Module):
        def hook(_module, _args):
            self.onload(name, layer)
        return hook

    def _post(self, name: str, layer: nn.Module):
        def hook(_module, _args, _output):
            if name not in self._held:
                self.offload(name, layer)
        return hook

    # -- accounting -----------------------------------------------------------------

    def host_pointers(self) -> set[int]:
        """Data pointers of the host (or file) tensors: what is *not* on the device even when the device is the CPU."""
        return {t.data_ptr() for homes in self._homes.values() for t in homes.values()}

    def close(self) -> None:
        """Remove the forward hooks (the layers stay where they are: at home)."""
        self.release()
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters and buffers by local name (each shared tensor once)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out[key] = t
    return out


def device_bytes(model: nn.Module, device: torch.device, offload: Offload | None = None) -> int:
    """Bytes of ``model``'s parameters and buffers on ``device`` (each storage once), not counting offloaded layers.

    The tensor-bytes probe behind ``device_memory_mb``: on the CPU, where no
    allocator counts device memory, it is how one tells the in-memory model
    (every weight counts) from an offloaded one (only what is on the device).
    """
    device = torch.device(device)
    host = offload.host_pointers() if offload is not None else set()
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != device.type:
            continue
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen or t.data_ptr() in host:
            continue
        seen.add(ptr)
        total += storage.nbytes()
    return total
