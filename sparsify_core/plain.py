"""The plain form of a model: the modules a plain ``transformers`` model of the same config has, same function.

A ``dense`` output is a folder plain ``transformers.from_pretrained`` loads
and computes the same logits from. Stages leave modules that transformers
does not know (a weight held in a layout, a projection stored transposed, an
FFN that skips inactive neurons); most of them are only another *storage* of
the same function, and can be written back as the modules a fresh model of
the config has (its *skeleton*: ``skeleton(config, task)``), weights densified
exactly. Others change the function (experts and a router, a thresholded
activation, an activation predictor): those have no plain form, and a dense
export refuses them with one line naming the module.

The *plain-form protocol* (duck-typed, like the stored-linear protocol of
``ffn``; plugins implement it on their modules, the engine never imports them):

- ``plain_module(like) -> nn.Module``: a module of ``type(like)`` (``like`` is
  the skeleton's module at the same path, on the meta device: copy it, never
  change it) computing what this module computes, holding its tensors
  exactly, its children already in plain form (``to_plain`` converts
  children first). Raises ``ValueError`` (one phrase: why) when there is none.
- ``load_plain(plain)``: the inverse, in place: fill this module's own tensors
  (not its children's) from ``plain``, a module of the skeleton's type
  holding real tensors. Needed only by modules that own tensors.
- ``plain_transposed(like) -> bool`` (optional, default ``False``): whether
  the plain module holds this module's ``weight`` transposed, so that its
  mask turns with it.

A module whose type and ``extra_repr`` equal the skeleton's is plain already.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import SparsifyError


def skeleton(config, task: str = "causal_lm") -> nn.Module:
    """A fresh model of ``config`` with every parameter on the meta device (what ``from_pretrained`` builds)."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModel
    with init_empty_weights(include_buffers=False):
        return auto.from_config(copy.deepcopy(config))


def _same(a: nn.Module, b: nn.Module) -> bool:
    return type(a) is type(b) and a.extra_repr() == b.extra_repr()


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def no_plain_form(path: str, module: nn.Module, like: nn.Module) -> str:
    """The one-line refusal for a module with no plain form."""
    return (f"{path or 'the model'}: a {type(module).__name__} where plain transformers has a {type(like).__name__}, "
            "with no plain form (the architecture changed); keep the output compressed")


def differing(model: nn.Module, plain: nn.Module) -> list[str]:
    """Paths of ``model``'s modules that are not as in ``plain`` (a skeleton), children before parents.

    A module ``model`` has and ``plain`` lacks is left to its nearest
    ancestor that ``plain`` has, which must have a plain form (it answers
    for it, e.g. by refusing); ``SparsifyError`` names that ancestor
    otherwise, or a module ``plain`` has and ``model`` lacks."""
    ours = dict(model.named_modules())
    theirs = dict(plain.named_modules())
    out = []
    for path in reversed(list(ours)):  # named_modules lists parents first
        if path in theirs:
            if not _same(ours[path], theirs[path]):
                out.append(path)
            continue
        owner = path
        while owner not in theirs:
            owner = owner.rpartition(".")[0]
        if not callable(getattr(ours[owner], "plain_module", None)):
            raise SparsifyError(no_plain_form(owner, ours[owner], theirs[owner]))
    missing = [p for p in theirs if p not in ours]
    if missing:
        raise SparsifyError(f"{missing[0]}: a plain transformers model of this config has a module there and "
                            "this model has none (the architecture changed)")
    return out


def to_plain(model: nn.Module, masks: dict[str, torch.Tensor], plain: nn.Module
             ) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    """Swap, in place, every module of ``model`` that differs from skeleton ``plain`` for its plain form.

    ``masks`` (bool, by parameter name) is not changed: the masks in the
    plain modules' orientation are returned with the modules swapped out,
    by path (children before parents; ``restore`` puts them back). Raises
    ``SparsifyError`` (one line: the module, its type and why) when a module
    has no exact plain form; nothing is swapped then."""
    paths = differing(model, plain)
    for path in paths:  # check all before changing anything
        module = model.get_submodule(path)
        if not callable(getattr(module, "plain_module", None)):
            raise SparsifyError(no_plain_form(path, module, plain.get_submodule(path)))
    state = dict(masks)
    originals: dict[str, nn.Module] = {}
    try:
        for path in paths:
            module, like = model.get_submodule(path), plain.get_submodule(path)
            try:
                new = module.plain_module(like)
            except ValueError as exc:
                raise SparsifyError(f"{path}: a {type(module).__name__} with no plain form: {exc}") from None
            key = f"{path}.weight"
            if key in state and getattr(module, "plain_transposed", lambda _like: False)(like):
                state[key] = state[key].t().contiguous()
            _set(model, path, new)
            originals[path] = module
        left = differing(model, plain)
        if left:
            raise SparsifyError(f"{left[0]}: a {type(model.get_submodule(left[0])).__name__} after conversion, "
                                f"where plain transformers has a {type(plain.get_submodule(left[0])).__name__}")
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
        if ours != theirs:
            bad = sorted(set(ours.items()) ^ set(theirs.items()))[0][0]
            raise SparsifyError(f"{bad}: the plain form's tensors differ from plain transformers' (name or shape)")
    except BaseException:
        restore(model, originals)
        raise
    return originals, state


def restore(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put back the modules ``to_plain`` swapped out (parents before children)."""
    for path in reversed(list(originals)):
        _set(model, path, originals[path])


def load_plain(model: nn.Module, paths: list[str], plain: nn.Module, state: dict[str, torch.Tensor],
               masks: dict[str, torch.Tensor]) -> None:
    """Fill the modules at ``paths`` of ``model`` (rebuilt by the stages) from plain-form tensors, in place.

    ``state`` maps plain parameter names to tensors; the entries of these
    modules are taken out of it (the rest load as they are). ``masks`` (in
    the plain orientation) are turned back in place for weights the modules
    hold transposed. Raises ``SparsifyError`` when a module cannot take its
    plain form back or a tensor is missing."""
    for path in paths:
        module, like = model.get_submodule(path), plain.get_submodule(path)
        own = [k for k, _ in like.named_parameters(recurse=False)]
        own += [k for k, _ in like.named_buffers(recurse=False) if k not in like._non_persistent_buffers_set]
        if not own and not list(module.parameters(recurse=False)) and not list(module.buffers(recurse=False)):
            continue  # a container: its children are filled on their own
        if not callable(getattr(module, "load_plain", None)):
            raise SparsifyError(f"{path}: a {type(module).__name__} cannot load its plain form back")
        missing = [f"{path}.{k}" for k in own if f"{path}.{k}" not in state]
        if missing:
            raise SparsifyError(f"{missing[0]}: missing from the stored weights")
        filled = copy.deepcopy(like)
        filled._modules.clear()  # only its own tensors are filled here
        filled.load_state_dict({k: state.pop(f"{path}.{k}") for k in own}, strict=False, assign=True)
        key = f"{path}.weight"
        if key in masks and getattr(module, "plain_transposed", lambda _like: False)(like):
            masks[key] = masks[key].t().contiguous()
        try:
            module.load_plain(filled)
        except ValueError as exc:
            raise SparsifyError(f"{path}: {exc}") from None
