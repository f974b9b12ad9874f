"""The manifest's typed records: what a bundle says about itself, as dataclasses with ``to_json``/``from_json``.

:class:`Manifest` is the whole ``manifest.json``; :class:`ArtifactRecord` one artifact of it; :class:`LayerMove`
one layer a backend built in another precision than the plan asked (with the backend's reason). The bundle
(:mod:`qdeploy.bundle`) is their only writer; loading parses them, so a manifest of the wrong shape is refused
as damaged (:class:`~qdeploy.errors.IntegrityError`) instead of failing later in a reader.

Schema versions: 2 (this one) adds ``moved_layers`` to every artifact. Version 1 manifests are still read: their
``moved_layers`` are recovered from the ``PRECISION_UNSUPPORTED`` events the deploy recorded. Keys a record does
not know (a plugin's own, such as TensorRT's ``engine``) are kept as they are, in ``extra``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .errors import BundleError, IntegrityError

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)


def _need(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise IntegrityError(f"{where}: the manifest has no {key!r}; the bundle is damaged: deploy again")
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                               else (kind,)):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise IntegrityError(f"{where}: the manifest's {key!r} is a {type(value).__name__}, not {names}; the "
                             f"bundle is damaged: deploy again")
    return value


@dataclass(frozen=True)
class LayerMove:
    """A layer built in another precision than the plan asked: ``requested`` -> ``built``, and why."""

    layer: str
    requested: str
    built: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"layer": self.layer, "requested": self.requested, "built": self.built, "reason": self.reason}

    @classmethod
    def from_json(cls, d: Any, where: str = "manifest") -> LayerMove:
        return cls(*(str(_need(d, k, str, where)) for k in ("layer", "requested", "built", "reason")))


_OPTIONAL_NUMBER = (int, float, type(None))


class _Record:
    """``to_json`` and the shared half of ``from_json`` for the dataclasses below: declared fields in order
    (``_OMIT_NONE`` ones left out while None, ``_NESTED`` lists of records serialised), then ``extra``."""

    _REQUIRED: ClassVar[dict[str, type | tuple[type, ...]]] = {}
    _OMIT_NONE: ClassVar[tuple[str, ...]] = ()
    _NESTED: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]  # every subclass is a dataclass
            value = getattr(self, f.name)
            if f.name == "extra" or f.name in self._OMIT_NONE and value is None:
                continue
            d[f.name] = [v.to_json() for v in value] if f.name in self._NESTED else value
        d.update(getattr(self, "extra"))
        return d

    @classmethod
    def _parse(cls, d: Any, where: str) -> dict[str, Any]:
        """The required fields, type-checked, and ``extra``: the keys no field declares."""
        kw = {k: _need(d, k, kind, where) for k, kind in cls._REQUIRED.items()}
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        kw["extra"] = {k: v for k, v in d.items() if k not in known}
        return kw


@dataclass
class ArtifactRecord(_Record):
    """One artifact of a bundle: what it is, where it was verified and how well, how fast and big it is, and
    why it sits where it does in the serving chain."""

    id: str
    backend: str
    target: str
    precision: str
    path: str
    sha256: str
    size_bytes: int
    verified_on: str
    verification: dict[str, Any]
    metrics: dict[str, Any]
    metrics_per_output: dict[str, Any]
    budget: dict[str, Any]
    layer_precisions: dict[str, str]
    spec: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    moved_layers: list[LayerMove] = field(default_factory=list)
    latency_ms: float | None = None
    latency_vs_fp32: float | None = None
    latency: dict[str, Any] | None = None
    size_vs_fp32: float | None = None
    chain_reason: str = ""
    trials: int = 1
    sensitivity: Any = None
    transforms: Any = None
    front: dict[str, Any] | None = None
    error_per_sample: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _REQUIRED: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "id": str, "backend": str, "target": str, "precision": str, "path": str, "sha256": str, "size_bytes": int,
        "verified_on": str, "verification": dict, "metrics": dict, "metrics_per_output": dict, "budget": dict,
        "layer_precisions": dict, "spec": dict}
    _OPTIONAL: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "meta": dict, "latency_ms": _OPTIONAL_NUMBER, "latency_vs_fp32": _OPTIONAL_NUMBER,
        "latency": (dict, type(None)), "size_vs_fp32": _OPTIONAL_NUMBER, "chain_reason": str, "trials": int,
        "front": (dict, type(None)), "error_per_sample": (dict, type(None))}
    _OMIT_NONE = ("latency", "front", "error_per_sample")  # absent, as before: a simulated artifact has no timing
    _NESTED = ("moved_layers",)

    @property
    def passed(self) -> bool:
        return bool(self.budget.get("passed"))

    @classmethod
    def from_json(cls, d: Any, where: str = "manifest") -> ArtifactRecord:
        ident = d.get("id", "?") if isinstance(d, dict) else "?"
        at = f"{where}: artifact {ident}"
        kw = cls._parse(d, at)
        for k, kind in cls._OPTIONAL.items():
            if k in d:
                kw[k] = _need(d, k, kind, at)
        for k in ("sensitivity", "transforms"):
            if k in d:
                kw[k] = d[k]
        moves = d.get("moved_layers", [])
        if not isinstance(moves, list):
            raise IntegrityError(f"{at}: 'moved_layers' is not a list; the bundle is damaged: deploy again")
        kw["moved_layers"] = [LayerMove.from_json(m, at) for m in moves]
        return cls(**kw)


@dataclass
class Manifest(_Record):
    """A whole ``manifest.json``. ``files`` (the integrity map) and ``schema_version`` are filled by the
    writer."""

    qdeploy_version: str
    created: str
    model: dict[str, Any]
    spec: dict[str, Any]
    profile: dict[str, Any]
    calibration: dict[str, Any]
    validation: dict[str, Any]
    reference: dict[str, Any]
    latency_measured_on: dict[str, Any]
    budget_output: str
    artifacts: list[ArtifactRecord]
    events: list[dict[str, Any]] = field(default_factory=list)
    samples: str = "samples.npz"
    files: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    _REQUIRED = {"qdeploy_version": str, "created": str, "model": dict, "spec": dict, "profile": dict,
                 "calibration": dict, "validation": dict, "reference": dict, "latency_measured_on": dict,
                 "budget_output": str, "artifacts": list}
    _NESTED = ("artifacts",)

    @classmethod
    def from_json(cls, d: Any, where: str = "manifest") -> Manifest:
        """Parse a manifest of any readable schema version (a version 1 manifest is upgraded)."""
        version = d.get("schema_version") if isinstance(d, dict) else None
        if version not in READABLE_SCHEMAS:  # another qdeploy's bundle, not a damaged one
            raise BundleError(f"{where}: bundle schema version {version!r} is unknown; this qdeploy reads "
                              f"versions {', '.join(map(str, READABLE_SCHEMAS))}: deploy again with this version")
        kw = cls._parse(d, where)
        events = d.get("events", [])
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise IntegrityError(f"{where}: the manifest's 'events' is not a list of records; the bundle is damaged")
        arts = [ArtifactRecord.from_json(a, where) for a in kw["artifacts"]]
        if version == 1:
            for a in arts:
                a.moved_layers = moves_from_events(events, a.target)
        kw.update(artifacts=arts, events=events, samples=str(d.get("samples", "samples.npz")),
                  files=dict(d.get("files") or {}), schema_version=SCHEMA_VERSION)
        return cls(**kw)


def moves_from_events(events: list[dict[str, Any]], target: str) -> list[LayerMove]:
    """The layer moves a deploy recorded as ``PRECISION_UNSUPPORTED`` events of one profile entry (how a
    version 1 manifest said them)."""
    moves: dict[str, LayerMove] = {}
    for e in events:
        if e.get("code") == "PRECISION_UNSUPPORTED" and e.get("target") == target and e.get("layer"):
            reason = str(e.get("message", "")).split(": ", 1)[-1].rsplit("; built in", 1)[0]
            moves[e["layer"]] = LayerMove(e["layer"], str(e.get("requested", "")), str(e.get("resolved", "")), reason)
    return list(moves.values())
