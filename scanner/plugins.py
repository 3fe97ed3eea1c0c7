"""The one plugin manager: entry-point discovery, the ``SCANNER_LOAD_PLUGINS`` filter, and registries.

Plugins are found through the ``scanner`` entry-point group (``[project.entry-points."scanner"]`` in a
distribution's pyproject). Loading is lazy: nothing is imported until :func:`load_plugins` (or one of the
registry functions) is called. The core owns names and order: plugins call ``register(obj)`` and a
name registered twice is an error naming both plugins.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from scanner import hookspecs
from scanner.errors import ScannerError

if TYPE_CHECKING:
    from scanner.adapters import Adapter
    from scanner.report import ModelReport

ENTRY_POINT_GROUP = "scanner"
LOAD_ENV = "SCANNER_LOAD_PLUGINS"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class PluginError(ScannerError):
    """A plugin failed to import, implements an unknown hook, or registers a name that is taken."""

    category = "plugin"


@dataclass(frozen=True)
class PluginInfo:
    """What ``scanner plugins`` lists."""

    name: str  # the entry-point name (or the name given to ``pm.register``)
    distribution: str | None  # the installed distribution that declared the entry point
    version: str | None
    hooks: tuple[str, ...]  # hook names this plugin implements, sorted


pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
pm.add_hookspecs(hookspecs)

_dists: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version), entry-point plugins only
_loaded = False
_loaded_only: tuple[str, ...] | None = None  # the restriction the loaded set was made with
_lock = threading.RLock()  # the daemon's workers may trigger the first load concurrently


def parse_plugin_list(value: str) -> tuple[str, ...]:
    """``"a, b"`` -> ``("a", "b")``; an empty string means *no plugins*."""
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _entry_points() -> list[md.EntryPoint]:
    seen: set[tuple[str, str]] = set()
    out: list[md.EntryPoint] = []
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else ""
        # The same distribution can be visible twice on sys.path (editable + a copy); load it once.
        if (dist, ep.name) in seen:
            continue
        seen.add((dist, ep.name))
        out.append(ep)
    return sorted(out, key=lambda e: e.name)


def load_plugins(only: Sequence[str] | None = None) -> pluggy.PluginManager:
    """Import and register the installed plugins once per process; return the plugin manager.

    ``only`` restricts which plugins load, by entry-point or distribution name; ``None`` reads the
    ``SCANNER_LOAD_PLUGINS`` environment variable (comma list; empty string = none), and when that is
    unset every installed plugin loads. Call :func:`reset_plugins` first to load a different set.
    """
    with _lock:
        return _load_locked(only)


def _load_locked(only: Sequence[str] | None) -> pluggy.PluginManager:
    global _loaded, _loaded_only
    if _loaded and (only is None or tuple(only) == _loaded_only):
        return pm
    if _loaded:  # a different explicit restriction (e.g. the settings file's load_plugins)
        reset_plugins()
    if only is None and LOAD_ENV in os.environ:
        only = parse_plugin_list(os.environ[LOAD_ENV])
    eps = _entry_points()
    if only is not None:
        wanted = set(only)
        known = {e.name for e in eps} | {e.dist.name for e in eps if e.dist is not None}
        unknown = sorted(wanted - known)
        if unknown:
            raise PluginError(
                f"{LOAD_ENV}/load_plugins names {', '.join(unknown)} but no installed plugin has that name; "
                f"installed: {', '.join(sorted(known)) or 'none'}. Fix the list or install the plugin."
            )
        eps = [e for e in eps if e.name in wanted or (e.dist is not None and e.dist.name in wanted)]
    for ep in eps:
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        if pm.get_plugin(ep.name) is not None or ep.name in _dists:
            other = _dists.get(ep.name, ("another plugin", ""))[0]
            raise PluginError(
                f"two plugins use the entry-point name {ep.name!r}: {other} and {dist}; uninstall one of them"
            )
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party import must become a readable error
            raise PluginError(
                f"plugin {ep.name!r} ({dist} {version}) failed to import {ep.value}: "
                f"{type(exc).__name__}: {exc}; fix or uninstall it, or leave it out of {LOAD_ENV}"
            ) from exc
        try:
            pm.register(obj, name=ep.name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {ep.name!r} ({dist}) is invalid: {exc}") from exc
        _dists[ep.name] = (dist, version)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"a plugin implements a hook the scanner does not define: {exc}; known hooks: "
            f"{', '.join(sorted(_hook_names()))}"
        ) from exc
    _loaded, _loaded_only = True, (tuple(only) if only is not None else None)
    return pm


def reset_plugins() -> None:
    """Unregister every entry-point plugin so the next :func:`load_plugins` starts afresh."""
    global _loaded, _loaded_only
    with _lock:
        for name in list(_dists):
            plugin = pm.get_plugin(name)
            if plugin is not None:
                pm.unregister(plugin, name=name)
        _dists.clear()
        _loaded, _loaded_only = False, None


def _hook_names() -> list[str]:
    # pluggy marks each spec function with a ``<project>_spec`` attribute.
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), marker))


def plugin_infos() -> list[PluginInfo]:
    """The loaded plugins (entry-point and directly registered), sorted by name."""
    load_plugins()
    hooks_of: dict[str, set[str]] = {}
    for hook in _hook_names():
        for impl in getattr(pm.hook, hook).get_hookimpls():
            hooks_of.setdefault(impl.plugin_name, set()).add(hook)
    out = []
    for name, _plugin in pm.list_name_plugin():
        dist, version = _dists.get(name, (None, None))
        out.append(PluginInfo(name, dist, version, tuple(sorted(hooks_of.get(name, ())))))
    return sorted(out, key=lambda p: p.name)


def _collect(hook: str, kind: str, check: Callable[[Any], str | None]) -> dict[str, tuple[Any, str]]:
    """Call ``hook`` on each plugin (sorted by plugin name) with a ``register`` callback.

    Returns name -> (object, plugin name) in registration order; ``check(obj)`` returns an error text
    for objects that do not satisfy the contract.
    """
    load_plugins()
    registry: dict[str, tuple[Any, str]] = {}
    impls = sorted(getattr(pm.hook, hook).get_hookimpls(), key=lambda i: i.plugin_name)
    for impl in impls:
        plugin_name = impl.plugin_name

        def register(obj: Any, _plugin: str = plugin_name) -> None:
            problem = check(obj)
            if problem:
                raise PluginError(f"plugin {_plugin!r} registered an invalid {kind}: {problem}")
            name = str(obj.name)
            if name in registry:
                raise PluginError(
                    f"{kind} name {name!r} is registered by both plugin {registry[name][1]!r} and plugin "
                    f"{_plugin!r}; uninstall one of them or restrict {LOAD_ENV}"
                )
            registry[name] = (obj, _plugin)

        impl.function(*([register] if impl.argnames else []))
    return registry


def _check_named(obj: Any) -> str | None:
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return (
            f"{obj!r} needs a `name` attribute of lower-case letters, digits, '-', '_' or '.' "
            f"(found {name!r})"
        )
    return None


def _check_adapter(obj: Any) -> str | None:
    problem = _check_named(obj)
    if problem:
        return problem
    missing = [m for m in ("claims", "load") if not callable(getattr(obj, m, None))]
    if missing:
        return f"adapter {obj.name!r} lacks the method(s) {', '.join(missing)} of scanner.adapters.Adapter"
    return None


def adapters() -> list[Adapter]:
    """Registered adapters in the order the pipeline tries them."""
    return [obj for obj, _ in _collect("register_adapters", "adapter", _check_adapter).values()]


def adapter_owners() -> dict[str, str]:
    """Adapter name -> the plugin that registered it."""
    registry = _collect("register_adapters", "adapter", _check_adapter)
    return {name: plugin for name, (_, plugin) in registry.items()}


def attacks() -> dict[str, Any]:
    """Attacks registered by plugins, by name."""
    return {n: o for n, (o, _) in _collect("register_attacks", "attack", _check_named).items()}


def plugin_attacks() -> list[Any]:
    """Attacks registered by plugins (attack classes with a ``name``), in registration order."""
    return list(attacks().values())


def detectors() -> dict[str, Any]:
    """Extra detectors registered by plugins, by name."""
    return {n: o for n, (o, _) in _collect("register_detectors", "detector", _check_named).items()}


def notify_scan_completed(report: ModelReport, warn: Callable[[str], None] | None = None) -> None:
    """Run every ``scan_completed`` hook; a failing hook is reported through ``warn`` and skipped."""
    load_plugins()
    for impl in getattr(pm.hook, "scan_completed").get_hookimpls():  # noqa: B009 - typed as Any
        try:
            impl.function(*([report] if impl.argnames else []))
        except Exception as exc:  # a plugin bug must never change a verdict or stop a scan
            msg = (
                f"scanner: warning: plugin {impl.plugin_name!r} scan_completed failed: "
                f"{type(exc).__name__}: {exc}"
            )
            (warn or (lambda m: print(m, file=sys.stderr)))(msg)


def register_commands(cli: Any) -> None:
    """Let plugins attach sub-commands to the click group ``cli``."""
    load_plugins()
    pm.hook.register_commands(cli=cli)
