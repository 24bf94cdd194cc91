"""Discovers plugins through the ``sparsify.plugins`` entry points and catalogs what they provide.

The core never imports a plugin by name: built-in plugins are entry points of
the ``sparsify`` distribution, third-party ones of theirs.
"""
from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass, field
from functools import lru_cache

import pluggy

from . import hookspecs
from .errors import SparsifyError

ENTRY_POINT_GROUP = "sparsify.plugins"


@dataclass
class Provided:
    """One thing a plugin provides, and where it comes from."""

    category: str  # method | model_source | data_source | metric | layout
    key: str  # "kind/name" for methods, else the name
    cls: type
    plugin: str  # entry-point name or module name
    distribution: str  # "name version"


@dataclass
class Catalog:
    """Everything the installed plugins provide, by category and key."""

    methods: dict[tuple[str, str], type] = field(default_factory=dict)
    model_sources: dict[str, type] = field(default_factory=dict)
    data_sources: dict[str, type] = field(default_factory=dict)
    metrics: dict[str, type] = field(default_factory=dict)
    layouts: dict[str, type] = field(default_factory=dict)
    entries: list[Provided] = field(default_factory=list)
    load_errors: list[str] = field(default_factory=list)

    @property
    def kinds(self) -> list[str]:
        return sorted({k for k, _ in self.methods})

    def methods_of_kind(self, kind: str) -> list[str]:
        return sorted(n for k, n in self.methods if k == kind)


_PROVIDER_HOOKS = {
    "sparsify_methods": "method",
    "sparsify_model_sources": "model_source",
    "sparsify_data_sources": "data_source",
    "sparsify_metrics": "metric",
    "sparsify_layouts": "layout",
}


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("sparsify")
    pm.add_hookspecs(hookspecs)
    return pm


@lru_cache(maxsize=1)
def plugin_manager() -> tuple[pluggy.PluginManager, dict[str, str], tuple[str, ...]]:
    """The process-wide plugin manager, its plugin->distribution map and load errors."""
    pm = _new_manager()
    dists: dict[str, str] = {}
    errors: list[str] = []
    seen: set[tuple[str, str]] = set()
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.dist.name if e.dist else "", e.name)):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "?"
        if (ep.name, ep.value) in seen:  # the same distribution seen twice on sys.path
            continue
        seen.add((ep.name, ep.value))
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must not take the tool down
            errors.append(f"plugin {ep.name!r} ({dist}) failed to load: {type(exc).__name__}: {exc}")
            continue
        if pm.is_registered(module):
            continue
        pm.register(module, name=f"{ep.name}")
        dists[ep.name] = dist
    return pm, dists, tuple(errors)


def register(plugin, name: str | None = None, distribution: str = "<in-process>") -> None:
    """Register a plugin object in this process (for tests and notebooks)."""
    pm, dists, _ = plugin_manager()
    pm.register(plugin, name=name)
    dists[pm.get_name(plugin)] = distribution
    catalog.cache_clear()


def unregister(plugin) -> None:
    """Remove a plugin object ``register`` added, and forget the catalog built with it."""
    plugin_manager()[0].unregister(plugin)
    catalog.cache_clear()


@lru_cache(maxsize=1)
def catalog() -> Catalog:
    """Collect every provider hook's classes, refusing duplicate keys."""
    pm, dists, errors = plugin_manager()
    cat = Catalog(load_errors=list(errors))
    targets = {"method": cat.methods, "model_source": cat.model_sources, "data_source": cat.data_sources,
               "metric": cat.metrics, "layout": cat.layouts}
    for hook_name, category in _PROVIDER_HOOKS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):  # registration order
            plugin_name = pm.get_name(impl.plugin)
            for cls in impl.function() or []:
                key = (cls.kind, cls.name) if category == "method" else cls.name
                table = targets[category]
                if key in table:
                    other = next(e for e in cat.entries if e.category == category and e.cls is table[key])
                    if other.cls is cls:
                        continue
                    label = "/".join(key) if isinstance(key, tuple) else key
                    raise SparsifyError(f"two plugins provide the {category.replace('_', ' ')} {label!r}: "
                                        f"{other.plugin} ({other.distribution}) and {plugin_name} "
                                        f"({dists.get(plugin_name, '?')}); uninstall one")
                table[key] = cls
                cat.entries.append(Provided(category, "/".join(key) if isinstance(key, tuple) else key, cls,
                                            plugin_name, dists.get(plugin_name, "<in-process>")))
    return cat


class Lifecycle:
    """Calls lifecycle hooks one implementation at a time, so that one that raises cannot end the run.

    ``Lifecycle(pm).sparsify_run_started(run_id=..., ...)`` calls every
    implementation in pluggy's order (last registered first, ``tryfirst`` /
    ``trylast`` honoured), each with the keyword arguments it names. An
    implementation that raises an ``Exception`` is reported by ``warn`` (a
    line on stderr by default) and the next one is called; ``KeyboardInterrupt``
    and other ``BaseException`` propagate (Ctrl-C during a hook still
    interrupts the run). Hook wrappers are skipped with a warning: an
    observer has no call of its own to wrap.
    """

    def __init__(self, pm: pluggy.PluginManager, warn=None):
        self._pm = pm
        self._warn = warn

    def __getattr__(self, name: str):
        if not name.startswith("sparsify_"):
            raise AttributeError(name)
        return lambda **kwargs: self._call(name, kwargs)

    def _call(self, name: str, kwargs: dict) -> None:
        for impl in reversed(getattr(self._pm.hook, name).get_hookimpls()):
            if impl.hookwrapper or impl.wrapper:
                self._report(name, impl, "hook wrappers are not supported for lifecycle hooks; skipped")
                continue
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception as exc:  # an observer's bug must not end (or hide the error of) the run
                self._report(name, impl, f"raised {type(exc).__name__}: {exc}")

    def _report(self, name: str, impl, what: str) -> None:
        message = f"warning: plugin {impl.plugin_name!r} {name} {what}"
        if self._warn is not None:
            self._warn(message)
        else:
            from . import progress
            progress.info(message)


def hooks() -> Lifecycle:
    """The caller of lifecycle hooks: ``hooks().sparsify_run_started(...)`` (see ``Lifecycle``)."""
    return Lifecycle(plugin_manager()[0])
