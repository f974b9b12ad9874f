"""Plugin loading (fixed, visible order) and the registry of backends, profiles and metrics.

Order: the built-in plugin modules in :data:`BUILTIN_PLUGINS`, then third-party plugins from the ``qdeploy``
entry-point group, minus those named in ``QDEPLOY_DISABLED_PLUGINS`` (comma separated), then
``check_pending()``. ``QDEPLOY_TRACE_PLUGINS=1`` prints every hook call to stderr.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import pluggy

from . import hookspecs
from .errors import PluginError, ProfileError, suggest

BUILTIN_PLUGINS = ("qdeploy.builtin",)
ENTRY_POINT_GROUP = "qdeploy"
DISABLED_ENV = "QDEPLOY_DISABLED_PLUGINS"
TRACE_ENV = "QDEPLOY_TRACE_PLUGINS"

hookimpl = pluggy.HookimplMarker("qdeploy")


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("qdeploy")
    pm.add_hookspecs(hookspecs)
    for mod in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(mod), name=mod)
    if load_entry_points:
        disabled = {n.strip() for n in os.environ.get(DISABLED_ENV, "").split(",") if n.strip()}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in disabled or pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}; uninstall it or add it "
                                  f"to {DISABLED_ENV}") from None
            pm.register(plugin, name=ep.name)
    pm.check_pending()
    if os.environ.get(TRACE_ENV):
        pm.add_hookcall_monitoring(
            lambda name, impls, kw: print(f"[qdeploy-trace] {name} -> {[i.plugin_name for i in impls]}",
                                          file=sys.stderr),
            lambda outcome, name, impls, kw: None)
    return pm


@dataclass
class Registry:
    """Everything the plugins registered: backends, profiles and metrics, keyed by name."""

    pm: pluggy.PluginManager
    backends: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Callable[..., float]] = field(default_factory=dict)

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> Registry:
        from .profiles import Profile, load_profile_file

        reg = cls(pm)

        def add(kind: str, table: dict, name: str, obj: Any) -> None:
            if name in table:
                raise PluginError(f"two plugins registered the {kind} {name!r}; uninstall one or block it with "
                                  f"{DISABLED_ENV}")
            table[name] = obj

        def register_backend(backend: Any) -> None:
            add("backend", reg.backends, backend.name, backend)

        def register_profile(src: Path | Profile) -> None:
            if isinstance(src, Profile):
                add("hardware profile", reg.profiles, src.name, src)
                return
            src = Path(src)
            for path in sorted(src.glob("*.toml")) if src.is_dir() else [src]:
                prof = load_profile_file(path)
                add("hardware profile", reg.profiles, prof.name, prof)

        pm.hook.qdeploy_register_backends(register=register_backend)
        pm.hook.qdeploy_register_profiles(register=register_profile)
        pm.hook.qdeploy_register_metrics(register=lambda name, fn: add("metric", reg.metrics, name, fn))
        return reg

    def profile(self, name: str) -> Any:
        if name not in self.profiles:
            raise ProfileError(f"unknown hardware profile {name!r}{suggest(name, self.profiles)}; available: "
                               f"{', '.join(sorted(self.profiles))} (or 'detect')")
        return self.profiles[name]

    def emit(self, event: dict[str, Any]) -> None:
        self.pm.hook.qdeploy_on_event(event=event)


_registry: Registry | None = None


def quiet_frameworks() -> None:
    """Console output is for qdeploy's own lines, from the CLI and the Python API alike: frameworks' import-time
    notices, C++ INFO logs and Python warnings from torch, torchao and LiteRT are dropped (``QDEPLOY_DEBUG=1``
    keeps them). Runs before any plugin imports its framework (the C++ log levels are read at import)."""
    if os.environ.get("QDEPLOY_DEBUG"):
        return
    import logging
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # LiteRT / TensorFlow C++ INFO and WARNING lines
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch C++ TORCH_WARN lines (deprecations)
    for name in ("torchao", "torch.utils._pytree", "torch._inductor", "torch.onnx", "absl", "onnxruntime", "onnxscript",
                 "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(torch|torchao|litert_torch|ai_edge_\w+|onnxruntime)(\.|$)")


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    if _registry is None:
        quiet_frameworks()
        _registry = Registry.from_plugin_manager(make_plugin_manager())
    return _registry


def reset_registry(registry: Registry | None = None) -> None:
    """Drop (or replace) the cached registry: after registering a plugin by hand, or in tests."""
    global _registry
    _registry = registry
