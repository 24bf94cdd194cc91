"""Sparse storage layouts: *how* non-zeros are stored and computed.

Kept apart from *which* entries are zero (masks, sparsifiers, routers). A
layout converts a dense weight to its storage, back to dense exactly, and
multiplies with it; its ``matmul`` in plain torch is the reference that fast
kernels (``kernel``) are tested against.

A plugin adds a layout by subclassing ``Layout`` and returning the class from
its ``sparsify_layouts`` hook. Modules that hold a weight in a layout
(``SparseLinear``) and the ``layout_convert`` stage find it by name in the
plugin catalog (``find_layout``), so a recipe can use it with no edit to
sparsify.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch

from .errors import SparsifyError
from .method import Params

Kernel = Callable[[torch.Tensor, "torch.Tensor | None"], "torch.Tensor | None"]
"""A fast ``y = x @ W.T (+ b)``: ``kernel(x, bias)`` for ``x [..., in]`` and ``bias [out]`` or ``None``;
returns ``y [..., out]``, or ``None`` where it declines this input (a module then falls back)."""


class Layout(ABC):
    """A sparse weight layout for ``y = x @ W.T`` with ``W`` of shape ``[out, in]``.

    The storage is a flat dict of named tensors (``names``) plus the dense
    ``shape`` and the layout's validated ``params`` (an instance of
    ``Params``, a pydantic model), so that a module can hold it as buffers and
    an output can save it with safetensors and rebuild it from the recorded
    storage shapes (``from_tensors``).

    Subclasses set ``name`` (the catalog key recipes use), ``names`` and
    ``Params``, and implement ``from_dense``, ``to_dense`` and ``matmul``
    (plain torch: the reference). ``kernel`` is optional: without one, modules
    compute densely with a one-time warning (an error in strict mode).
    """

    name: ClassVar[str]
    names: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type[Params]] = Params

    def __init__(self, shape: tuple[int, int], params: Params, **tensors: torch.Tensor):
        """``shape`` is the dense ``(out, in)``; ``tensors`` holds exactly the tensors named in ``names``.

        A tensor that shares its memory with another one, or is a view of
        part of a larger tensor (``nonzero(as_tuple=True)`` gives both), is
        copied: safetensors refuses to save such tensors as separate
        entries, so every storage tensor owns its memory. Raises
        ``ValueError`` when a storage tensor is missing or unexpected.
        """
        if set(tensors) != set(self.names):
            raise ValueError(f"{self.name} layout stores {list(self.names)}, got {sorted(tensors)}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.params = params
        seen: set[int] = set()
        for k in self.names:
            t = tensors[k]
            if t.device.type != "meta" and t.numel():
                memory = t.untyped_storage()
                if memory.data_ptr() in seen or memory.nbytes() != t.numel() * t.element_size():
                    t = t.clone(memory_format=torch.contiguous_format)
                seen.add(t.untyped_storage().data_ptr())
            setattr(self, k, t)

    @classmethod
    @abstractmethod
    def from_dense(cls, weight: torch.Tensor, params: Params | None = None) -> "Layout":
        """Store a dense ``[out, in]`` weight exactly (its zeros define the sparsity).

        ``params`` defaults to ``cls.Params()``. Raises ``ValueError`` when the
        weight does not fit the layout (never prunes silently)."""

    @abstractmethod
    def to_dense(self) -> torch.Tensor:
        """The exact dense ``[out, in]`` weight back, bit for bit, in the storage's dtype."""

    @abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` of shape ``[..., in]`` (``[..., out]``): the plain-torch reference."""

    def kernel(self, device: torch.device, dtype: torch.dtype) -> Kernel | None:
        """A fast ``kernel(x, bias) -> x @ W.T + bias`` for inputs on ``device`` of ``dtype``, or ``None``.

        ``None`` (the default) when the layout has no fast kernel there; the
        caller then computes with the reference or densely. Called once per
        (device, dtype) by a module and cached until its storage changes, so
        packing the storage for the kernel belongs here. A kernel must match
        ``matmul`` (plus bias) to float tolerance."""
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The storage tensors by name (what a module registers as buffers)."""
        return {k: getattr(self, k) for k in self.names}

    @classmethod
    def from_tensors(cls, shape, params: Params, tensors: dict[str, torch.Tensor]) -> "Layout":
        """Rebuild from ``tensors()`` output (e.g. loaded from safetensors); extra entries are ignored."""
        return cls(shape, params, **{k: tensors[k] for k in cls.names})

    def nbytes(self) -> int:
        """Bytes of storage (values and indices)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @classmethod
    def describe(cls) -> str:
        """The first line of the class docstring."""
        return ((cls.__doc__ or "").strip().splitlines() or [""])[0]

    @classmethod
    def describe_kernels(cls) -> str:
        """Which fast kernels the layout has, per device and dtype: the first line of its ``kernel`` docstring.

        ``"none (dense fallback)"`` when the layout does not override ``kernel``.
        Read from the class alone: nothing is built or compiled (``sparsify plugins`` lists it).
        """
        if cls.kernel is Layout.kernel:
            return "none (dense fallback)"
        return ((cls.kernel.__doc__ or "").strip().splitlines() or ["undocumented"])[0]


def find_layout(name: str) -> type[Layout]:
    """The installed layout called ``name``, from the plugin catalog.

    Raises ``SparsifyError`` naming the installed layouts when none is called ``name``."""
    from .plugin_manager import catalog

    layouts = catalog().layouts
    if name not in layouts:
        raise SparsifyError(f"no installed plugin provides the layout {name!r} "
                            f"(installed: {', '.join(sorted(layouts)) or 'none'})")
    return layouts[name]
