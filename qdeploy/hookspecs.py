"""The hooks a qdeploy plugin may implement. This module is the plugin contract.

Every hook is prefixed ``qdeploy_``. Hooks evolve only by gaining keyword arguments (pluggy lets an
implementation accept a subset), so plugins written today keep working.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import argparse

    from .backend import Backend
    from .profiles import Profile

hookspec = pluggy.HookspecMarker("qdeploy")


@hookspec
def qdeploy_register_backends(register: Callable[[Backend], None]) -> None:
    """Register backend instances.

    :param register: call ``register(backend)`` once per :class:`~qdeploy.backend.Backend`; a second backend
        with the same ``name`` raises :class:`~qdeploy.errors.PluginError`.
    """


@hookspec
def qdeploy_register_profiles(register: Callable[[Path | Profile], None]) -> None:
    """Register hardware profiles.

    :param register: call it with a folder of ``*.toml`` profiles, one ``.toml`` file, or a
        :class:`~qdeploy.profiles.Profile`; a duplicate profile name raises.
    """


@hookspec
def qdeploy_register_metrics(register: Callable[[str, Callable[..., float]], None]) -> None:
    """Register verification metrics usable as ``budget.metric``.

    :param register: call ``register(name, fn)``; ``fn(reference, candidate, labels)`` gets the FP32 and the
        artifact's output arrays for the budget output (and the labels or ``None``) and returns a float where
        higher is better.
    """


@hookspec
def qdeploy_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add sub-commands to the ``qdeploy`` CLI.

    :param subparsers: the argparse sub-parsers object; set ``func`` as the parser default to a callable
        taking the parsed namespace and returning the exit code.
    """


@hookspec
def qdeploy_on_event(event: dict[str, Any]) -> None:
    """Observe every fallback event as it happens (the same dict that goes into the manifest).

    :param event: ``{"code": ..., "backend": ..., "message": ..., ...}`` with the metric, value and budget
        for accuracy events.
    """


@hookspec
def qdeploy_on_report(manifest: dict[str, Any], bundle_dir: Path) -> None:
    """Observe a finished deployment, after the bundle is in place.

    :param manifest: the bundle's manifest as written.
    :param bundle_dir: the bundle folder.
    """
