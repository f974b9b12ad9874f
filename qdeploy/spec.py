"""The backend-neutral quantization spec: frozen, versioned dataclasses with a lossless round trip.

A spec says *what* quantization is wanted, never *how* a backend does it. Load it from TOML, YAML or JSON
(:func:`load_spec`), save it back (:func:`save_spec`); every unknown key or bad value raises a
:class:`~qdeploy.errors.SpecError` naming the field, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .errors import SpecError, bad_value, suggest

SPEC_VERSION = 1

PRECISIONS = ("int8", "fp8", "fp16", "bf16", "fp32")
"""Precisions in ladder order: a fallback step moves a layer to the right."""
QUANTIZED = ("int8", "fp8")
"""Precisions stored as 8-bit codes with a scale: weights and static activations need calibrated ranges."""
CALIBRATION_METHODS = ("minmax", "moving_average", "percentile", "entropy", "mse")
ACTIVATION_MODES = ("auto", "static", "dynamic", "none")
POLICIES = ("strict", "warn", "auto")
BUDGET_MODES = ("absolute", "relative")
HIGHER_IS_BETTER = {"cosine": True, "sqnr_db": True, "top1_agreement": True, "top1_accuracy": True,
                    "max_abs": False, "mean_abs": False}
"""Built-in metrics and their direction; user metrics registered by plugins are higher-is-better."""
BOUNDED_METRICS = {"cosine": (-1.0, 1.0), "top1_agreement": (0.0, 1.0), "top1_accuracy": (0.0, 1.0)}
"""The value range of the bounded built-in metrics (an absolute budget outside it can never be met)."""


def summarize_precision(layer_precisions: dict[str, str]) -> str:
    """One word for a layer -> precision map: ``int8``, or ``mixed int8/fp32`` (ladder order); ``fp32`` if empty."""
    used = sorted(set(layer_precisions.values()), key=PRECISIONS.index)
    return used[0] if len(used) == 1 else "mixed " + "/".join(used) if used else "fp32"


def _choices(*values: object, **kw: Any) -> Any:
    return field(metadata={"choices": values}, **kw)


# --- granularities (torchao style: one frozen dataclass each) -------------------------------------------
@dataclass(frozen=True)
class PerTensor:
    """One scale (and zero point) for the whole tensor."""

    type: str = "per_tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per slice along ``axis`` (the output-channel axis of conv/linear weights is 0)."""

    axis: int = 0
    type: str = "per_channel"


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``group_size`` consecutive elements along the input axis."""

    group_size: int = 128
    type: str = "per_group"


Granularity = Union[PerTensor, PerChannel, PerGroup]
GRANULARITIES: dict[str, type] = {"per_tensor": PerTensor, "per_channel": PerChannel, "per_group": PerGroup}


@dataclass(frozen=True)
class WeightSpec:
    """How weights are quantized: ``bits`` (2–8), symmetric or not, and the granularity."""

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = PerChannel()


@dataclass(frozen=True)
class ActivationSpec:
    """How activations are quantized.

    ``mode``: ``static`` (ranges calibrated ahead of time), ``dynamic`` (computed per batch at run time),
    ``none`` (weight-only) or ``auto``: dynamic for transformer-like graphs (no convolution; MatMul/Gemm layers
    and a Softmax) on a backend that runs dynamic INT8, static otherwise -- resolved per backend entry. ``method`` picks the calibration observer; ``momentum`` is for
    ``moving_average``, ``percentile`` (e.g. 99.99) for ``percentile``.
    """

    mode: str = _choices(*ACTIVATION_MODES, default="auto")
    symmetric: bool = False
    method: str = _choices(*CALIBRATION_METHODS, default="minmax")
    momentum: float = 0.9
    percentile: float = 99.99


@dataclass(frozen=True)
class LayerOverride:
    """Pin the precision of the layers whose name matches the glob ``match`` (and ``op_type``, if set).

    Later overrides win over earlier ones. ``op_type`` is the ONNX op type (``Conv``, ``Gemm``, ``MatMul``).
    """

    precision: str = _choices(*PRECISIONS, default="fp32")
    match: str = "*"
    op_type: str = ""


@dataclass(frozen=True)
class Budget:
    """The accuracy an artifact must keep against the FP32 reference.

    ``absolute``: the metric itself must be at least ``threshold`` (at most, for the error metrics
    ``max_abs``/``mean_abs``). ``relative``: the metric may lose at most ``threshold`` against the FP32
    reference's own value (1.0 for agreement and cosine; the reference accuracy for ``top1_accuracy``).
    ``output`` names the model output the budget is read on (default: the first).
    """

    metric: str = "cosine"
    threshold: float = 0.99
    mode: str = _choices(*BUDGET_MODES, default="absolute")
    output: str = ""


@dataclass(frozen=True)
class FallbackSpec:
    """What may happen when a check fails.

    ``ladder``: the precisions a layer climbs through (intersected with what the device runs fast).
    ``policy``: ``strict`` fails instead of falling back; ``auto`` falls back, recording and printing every
    event; ``warn`` does the same and also issues each event as a Python ``FallbackWarning`` (so library
    callers see it, or turn it into an error with a warnings filter).
    ``max_trials`` rebuilds and ``time_budget_s`` seconds bound the accuracy loop per backend.
    """

    ladder: tuple[str, ...] = ("int8", "fp16", "bf16", "fp32")
    policy: str = _choices(*POLICIES, default="auto")
    max_trials: int = 8
    time_budget_s: float = 600.0


@dataclass(frozen=True)
class CalibrationSpec:
    """How many calibration samples to use (300–1000 recommended), drawn with ``seed``; ``balanced`` draws
    the same number per class when the data has labels."""

    samples: int = 300
    seed: int = 0
    batch_size: int = 32
    balanced: bool = True


@dataclass(frozen=True)
class SmoothQuantSpec:
    """SmoothQuant's migration strength: ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` per input channel."""

    alpha: float = 0.5


@dataclass(frozen=True)
class AdaRoundSpec:
    """AdaRound (learned weight rounding, :mod:`qdeploy.adaround`), ``iterations`` optimisation steps per layer.
    The paper's 10000 steps ran on a GPU; here 500 steps over EfficientNet-Lite0's 50 layers took minutes on two
    CPU cores (see README)."""

    iterations: int = 1000


CLE_CHOICES = (True, False, "auto")
BIAS_CORRECTION_CHOICES = ("empirical", "analytic", False, "auto")


def _toml(v: object) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)


@dataclass(frozen=True)
class TransformsSpec:
    """Accuracy transforms applied once to the FP32 reference (BatchNorm folded first), before every backend.

    ``cross_layer_equalization``: true, false or ``"auto"`` (on for per-tensor weights or depthwise convs).
    ``bias_correction``: ``"empirical"`` (measured on calibration data, layer by layer), ``"analytic"``
    (closed form from the per-channel input means), false or ``"auto"`` (empirical on convolutional models).
    ``smoothquant``: false or a table ``{ alpha = 0.5 }`` (true means the default table).
    ``adaround``: false, ``"auto"`` (per-tensor weights of a convolutional model, when PyTorch is installed) or
    a table ``{ iterations = ... }`` (true means the default table).
    """

    cross_layer_equalization: Union[bool, str] = "auto"
    bias_correction: Union[bool, str] = "auto"
    smoothquant: Union[bool, SmoothQuantSpec] = False
    adaround: Union[bool, str, AdaRoundSpec] = "auto"

    def __post_init__(self) -> None:
        for name, allowed in (("cross_layer_equalization", CLE_CHOICES),
                              ("bias_correction", BIAS_CORRECTION_CHOICES)):
            v = getattr(self, name)
            if not any(type(v) is type(a) and v == a for a in allowed):
                hint = (' (true is ambiguous here: write "empirical" or "analytic")'
                        if name == "bias_correction" and v is True else suggest(str(v), [a for a in allowed if
                                                                                            isinstance(a, str)]))
                raise SpecError(f"transforms.{name}: {_toml(v) if isinstance(v, bool) else repr(v)} is not "
                                f"allowed{hint}; allowed: "
                                f"{', '.join(_toml(a) for a in allowed)}")
        for name, table in (("smoothquant", SmoothQuantSpec), ("adaround", AdaRoundSpec)):
            v = getattr(self, name)
            if name == "adaround" and v == "auto":
                continue
            if v is True:
                v = table()
            elif isinstance(v, dict):
                v = _from_dict(table, v, f"transforms.{name}")
            elif not (v is False or isinstance(v, table)):
                fields = ", ".join(f"{f.name} = {_toml(f.default)}" for f in dataclasses.fields(table))
                also = ', "auto"' if name == "adaround" else ""
                raise SpecError(f"transforms.{name}: expected false{also} or a table {{ {fields} }}, got {v!r}")
            object.__setattr__(self, name, v)
        if isinstance(self.smoothquant, SmoothQuantSpec) and not 0.0 <= self.smoothquant.alpha <= 1.0:
            raise SpecError(f"transforms.smoothquant.alpha: {self.smoothquant.alpha} must be between 0 and 1, "
                            f"e.g. 0.5 (0.75 for models with strong activation outliers)")
        if isinstance(self.adaround, AdaRoundSpec) and self.adaround.iterations < 1:
            raise SpecError(f"transforms.adaround.iterations: {self.adaround.iterations} must be a positive "
                            f"integer, e.g. 1000")


@dataclass(frozen=True)
class QuantSpec:
    """The whole spec. ``precision`` is the default for every quantizable layer."""

    version: int = SPEC_VERSION
    precision: str = _choices(*PRECISIONS, default="int8")
    weights: WeightSpec = WeightSpec()
    activations: ActivationSpec = ActivationSpec()
    overrides: tuple[LayerOverride, ...] = ()
    budget: Budget = Budget()
    fallback: FallbackSpec = FallbackSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    transforms: TransformsSpec = TransformsSpec()

    def __post_init__(self) -> None:
        _validate(self)

    def precision_for(self, layer: str, op_type: str) -> str:
        """The precision the spec asks for ``layer`` (the last matching override wins)."""
        chosen = self.precision
        for ov in self.overrides:
            if fnmatch.fnmatchcase(layer, ov.match) and (not ov.op_type or ov.op_type == op_type):
                chosen = ov.precision
        return chosen

    def unmatched_overrides(self, layers: Mapping[str, str]) -> list[str]:
        """The overrides that match none of ``layers`` (name -> ONNX op type), described for a warning: most
        often a typo in ``match`` or an op type written in another case (``conv`` for ``Conv``)."""
        out = []
        for i, ov in enumerate(self.overrides):
            if not any(fnmatch.fnmatchcase(n, ov.match) and (not ov.op_type or ov.op_type == t)
                       for n, t in layers.items()):
                ops = sorted(set(layers.values()))
                hint = suggest(ov.op_type, ops) if ov.op_type and ov.op_type not in ops else ""
                out.append(f"overrides[{i}] (match={ov.match!r}{f', op_type={ov.op_type!r}' if ov.op_type else ''})"
                           f" matches no layer of this model{hint}; layers: {', '.join(sorted(layers))}")
        return out

    @property
    def uses_quantized(self) -> bool:
        """True when the default precision or any override is a quantized type (INT8 or FP8): such a spec
        needs calibrated activation ranges and its weight/activation settings apply."""
        return self.precision in QUANTIZED or any(o.precision in QUANTIZED for o in self.overrides)

    def replace(self, **changes: Any) -> QuantSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        if not isinstance(data, dict):
            raise SpecError(f"spec: expected a table/mapping at the top level, got {type(data).__name__}")
        version = data.get("version", SPEC_VERSION)
        if isinstance(version, str) and version.strip().isdigit():
            raise SpecError(f"version: {version!r} is a string; write the number without quotes: version = "
                            f"{SPEC_VERSION}")
        if version != SPEC_VERSION:
            raise SpecError(f"version: spec version {version!r} is not supported; this qdeploy reads version "
                            f"{SPEC_VERSION}")
        return _from_dict(cls, data, "")


# --- validation ------------------------------------------------------------------------------------------
def _validate(spec: QuantSpec) -> None:
    w, a, b, f, c = spec.weights, spec.activations, spec.budget, spec.fallback, spec.calibration
    if not 2 <= w.bits <= 8:
        raise bad_value("weights.bits", w.bits, range(2, 9))
    if isinstance(w.granularity, PerGroup) and w.granularity.group_size <= 0:
        raise SpecError(f"weights.granularity.group_size: {w.granularity.group_size} must be a positive integer")
    if not 0.0 < a.momentum < 1.0:
        raise SpecError(f"activations.momentum: {a.momentum} must be between 0 and 1 (exclusive), e.g. 0.9")
    if not 50.0 < a.percentile <= 100.0:
        raise SpecError(f"activations.percentile: {a.percentile} must be in (50, 100], e.g. 99.99")
    known_metric = b.metric in HIGHER_IS_BETTER
    if not known_metric and not b.metric.isidentifier():
        raise bad_value("budget.metric", b.metric, HIGHER_IS_BETTER)
    if not math.isfinite(b.threshold):
        raise SpecError(f"budget.threshold: {b.threshold} must be a finite number")
    if b.mode == "relative" and b.threshold < 0:
        raise SpecError(f"budget.threshold: {b.threshold} is negative; a relative budget is the loss allowed "
                        f"against the FP32 reference, e.g. 0.01")
    if b.mode == "absolute" and b.metric in BOUNDED_METRICS:
        lo, hi = BOUNDED_METRICS[b.metric]
        if not lo <= b.threshold <= hi:
            raise SpecError(f"budget.threshold: {b.threshold} is outside the range of {b.metric} ({lo} to {hi}): "
                            f"no artifact could ever meet it")
    if b.mode == "absolute" and b.metric in ("max_abs", "mean_abs") and b.threshold < 0:
        raise SpecError(f"budget.threshold: {b.threshold} is negative; {b.metric} is an error, at least 0")
    for i, p in enumerate(f.ladder):
        if p not in PRECISIONS:
            raise bad_value(f"fallback.ladder[{i}]", p, PRECISIONS)
    if list(f.ladder) != sorted(f.ladder, key=PRECISIONS.index) or len(set(f.ladder)) != len(f.ladder):
        raise SpecError(f"fallback.ladder: {list(f.ladder)} must climb without repeats, in the order "
                        f"{list(PRECISIONS)}")
    if f.max_trials < 0 or f.time_budget_s <= 0:
        raise SpecError("fallback.max_trials must be >= 0 and fallback.time_budget_s > 0")
    if c.samples < 1 or c.batch_size < 1:
        raise SpecError(f"calibration.samples ({c.samples}) and calibration.batch_size ({c.batch_size}) must be >= 1")


# --- generic (de)serialization over the dataclass fields ----------------------------------------------------
def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_dict(v) for v in obj]
    return obj


def _from_dict(cls: type, data: Any, path: str) -> Any:
    where = path or "spec"
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a table/mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields or key == "type":
            if key == "type" and "type" in fields:
                continue
            raise SpecError(f"{path + '.' if path else ''}{key}: unknown field{suggest(key, fields)}; "
                            f"known fields of {where}: {', '.join(k for k in fields if k != 'type')}")
        name = f"{path}.{key}" if path else key
        kwargs[key] = _coerce(hints[key], value, name, fields[key].metadata.get("choices"))
    try:
        return cls(**kwargs)
    except SpecError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        raise SpecError(f"{where}: {exc}") from None


def _coerce(hint: Any, value: Any, name: str, choices: tuple | None) -> Any:
    origin = typing.get_origin(hint)
    if hint is Granularity or (origin is Union and PerTensor in typing.get_args(hint)):
        return _granularity(value, name)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, name)
    if origin is Union:  # a switch or a table (the transforms): its dataclass's __post_init__ checks the value
        return value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{name}: expected a list, got {value!r}")
        return tuple(_coerce(item, v, f"{name}[{i}]", None) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{name}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{name}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise SpecError(f"{name}: expected a string, got {value!r}")
        if choices and value not in choices:
            raise bad_value(name, value, choices)
        return value
    raise SpecError(f"{name}: unsupported field type {hint}")  # pragma: no cover


def _granularity(value: Any, name: str) -> Granularity:
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict) or "type" not in value:
        raise SpecError(f"{name}: expected 'per_tensor', 'per_channel', 'per_group' or a table with a 'type' "
                        f"key, got {value!r}")
    kind = value["type"]
    if kind not in GRANULARITIES:
        raise bad_value(f"{name}.type", kind, GRANULARITIES)
    return _from_dict(GRANULARITIES[kind], value, name)


# --- files --------------------------------------------------------------------------------------------------
FORMATS = (".toml", ".yaml", ".yml", ".json")


def load_spec(source: str | Path | dict[str, Any] | QuantSpec | None) -> QuantSpec:
    """A spec from a file path (TOML/YAML/JSON), a mapping, a QuantSpec, or the default for ``None``."""
    if source is None:
        return QuantSpec()
    if isinstance(source, QuantSpec):
        return source
    if isinstance(source, dict):
        return QuantSpec.from_dict(source)
    path = Path(source)
    if path.suffix.lower() not in FORMATS:
        raise SpecError(f"spec file {path}: unknown format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    if path.is_dir():
        raise SpecError(f"spec file {path} is a folder; give the spec file itself (.toml, .yaml or .json)")
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"spec file {path} cannot be read as UTF-8 text: {exc}") from None
    try:
        if path.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text) or {}
    except Exception as exc:  # each parser has its own exception type
        raise SpecError(f"spec file {path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    try:
        return QuantSpec.from_dict(data)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


def dumps_spec(spec: QuantSpec, fmt: str = ".toml") -> str:
    data = spec.to_dict()
    if fmt == ".toml":
        import tomli_w
        return tomli_w.dumps(data)
    if fmt == ".json":
        return json.dumps(data, indent=2) + "\n"
    if fmt in (".yaml", ".yml"):
        import yaml
        return yaml.safe_dump(data, sort_keys=False)
    raise SpecError(f"unknown spec format {fmt!r}; use one of {', '.join(FORMATS)}")


def save_spec(spec: QuantSpec, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(dumps_spec(spec, path.suffix.lower()), encoding="utf-8")
    return path
