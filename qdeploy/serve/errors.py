"""The serving errors: each carries the HTTP status it maps to, so the server and the in-process API raise the
same exceptions and a client mistake is never reported as a server failure (a 4xx, never a 500)."""
from __future__ import annotations

from ..errors import QDeployError


class ServeError(QDeployError):
    """Base class of serving errors; ``status`` is the HTTP status the server answers with."""

    status = 500


class RequestError(ServeError):
    """The request is malformed or does not match the model (wrong input name, shape, datatype, body)."""

    status = 400


class ModelNotFound(ServeError):
    """The request names a model this server does not serve."""

    status = 404


class BodyTooLarge(ServeError):
    """The request body is larger than the configured limit."""

    status = 413


class UnsupportedEncoding(ServeError):
    """The request body uses a content encoding the server does not decode."""

    status = 415


class NotReady(ServeError):
    """No artifact is ready: still warming up, or every artifact failed (the message says which)."""

    status = 503


class InferenceFailed(ServeError):
    """Every artifact that could answer failed at run time (or the ``strict`` policy forbids trying the next)."""

    status = 500


class NothingServes(ServeError):
    """No artifact of the bundle loaded and warmed up on this host; the CLI exits with 1."""

    exit_code = 1
