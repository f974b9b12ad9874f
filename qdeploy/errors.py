"""Every error qdeploy raises on purpose, in one place.

Each message names what was asked, what is wrong and how to fix it; the CLI prints the message alone (no
traceback) and exits with :attr:`QDeployError.exit_code`.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class QDeployError(Exception):
    """Base class: a problem the user can fix. The CLI exits with ``exit_code``."""

    exit_code = 2


class SpecError(QDeployError):
    """A quantization spec field is unknown or has a bad value."""


class ProfileError(QDeployError):
    """A hardware profile is unknown or malformed."""


class ModelError(QDeployError):
    """The model file or factory cannot be loaded or exported."""


class DataError(QDeployError):
    """Calibration or validation data is missing, empty, non-finite or does not match the model."""


class PluginError(QDeployError):
    """A plugin failed to load, or two plugins registered the same name."""


class BundleError(QDeployError):
    """A bundle is missing, tampered with, or of an unknown schema version."""


class IntegrityError(BundleError):
    """A bundle's files do not match its manifest (modified, missing, or a path outside it): a failed check,
    not bad input, so the exit code is 1 (a typo'd path or a folder that is no bundle stays 2)."""

    exit_code = 1


class BackendError(QDeployError):
    """A backend was asked for something it cannot do (raised inside backends, caught by the pipeline)."""

    def __init__(self, message: str, code: str = "BUILD_FAILED") -> None:
        super().__init__(message)
        self.code = code


class BudgetNotMet(QDeployError):
    """The accuracy budget was not met and the policy is ``strict``."""

    exit_code = 1


class StrictPolicyError(QDeployError):
    """A backend failed to build, load or run and the policy is ``strict``: no fallback to the next backend."""

    exit_code = 1


class NothingBuilt(QDeployError):
    """Every backend entry of the profile refused the model or failed to build, load or run it here; the
    events say why for each. Not bad input (the input may be fine for another target): a failed check."""

    exit_code = 1


def suggest(value: str, allowed: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when ``value`` is close to one of ``allowed``, else an empty string."""
    match = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def bad_value(field: str, value: object, allowed: Iterable[object]) -> SpecError:
    allowed = list(allowed)
    return SpecError(
        f"{field}: {value!r} is not allowed{suggest(str(value), map(str, allowed))}; "
        f"allowed: {', '.join(repr(a) for a in allowed)}"
    )
