"""Parameter types shared by methods, sources and metrics: the ``Params`` base and its field helpers.

A leaf module (it imports nothing else of the engine), so that anything
declaring parameters can import it without pulling in methods or training.
"""
from __future__ import annotations

from typing import Annotated, Any, Iterator

from pydantic import AfterValidator, BaseModel, ConfigDict


def check_regexes(patterns: list[str] | None) -> list[str] | None:
    """A params validator body: every pattern compiles, else a ValueError naming it."""
    import re

    for p in patterns or []:
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"invalid regex {p!r}: {exc}") from None
    return patterns


def check_layers(layers: list[int] | None) -> list[int] | None:
    """A params validator body: FFN layer indices a stage applies to are omitted (all) or non-empty and 0-based."""
    if layers is not None and (not layers or any(i < 0 for i in layers)):
        raise ValueError("layers must be a non-empty list of 0-based layer indices (or omitted for all)")
    return layers


#: The type of a params ``layers`` field (which FFN layers a stage applies to; ``None``: all of them).
LayerIndices = Annotated[list[int] | None, AfterValidator(check_layers)]


def param_fields(params: BaseModel, path: tuple = ()) -> Iterator[tuple[tuple, Any, Any]]:
    """Every field of validated ``params``, nested models and lists of models included.

    Yields ``(path, value, FieldInfo)``; ``path`` is relative to ``params``
    (``("train", "split")``, ``("schedule", 0, "until")``). Fields holding
    ``None`` (an absent optional block) are yielded but not entered.
    """
    for name, info in type(params).model_fields.items():
        value = getattr(params, name)
        here = path + (name,)
        yield here, value, info
        if isinstance(value, BaseModel):
            yield from param_fields(value, here)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from param_fields(item, here + (i,))


def is_layer_indices(info) -> bool:
    """True for a field declared as ``LayerIndices`` (it carries ``check_layers``)."""
    return any(getattr(m, "func", None) is check_layers for m in info.metadata)


class Params(BaseModel):
    """Base of every method's, source's and metric's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
