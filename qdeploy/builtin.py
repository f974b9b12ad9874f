"""The built-in plugin: the hardware profiles shipped with qdeploy, and the `reference` backend."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pluggy

from .profiles import builtin_profile_dir

hookimpl = pluggy.HookimplMarker("qdeploy")


@hookimpl
def qdeploy_register_profiles(register: Callable[[Path], None]) -> None:
    register(builtin_profile_dir())


@hookimpl
def qdeploy_register_backends(register: Callable[[Any], None]) -> None:
    from .reference import ReferenceBackend

    register(ReferenceBackend())
