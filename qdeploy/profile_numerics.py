"""One artifact, several hardware profiles: ``qdeploy verify BUNDLE --profiles a,b,c``.

The same INT8 artifact can score differently on two CPUs because their integer kernels differ. This module
verifies each artifact of a bundle under the numerics each profile implies, through the one verification path
(:func:`qdeploy.verify.verify_artifact` against the bundle's FP32 reference run), and says for every row where it
ran:

``runtime``
    The artifact's own runtime on this host, because this host matches the profile (same CPU architecture and
    the same integer accumulation; for a GPU profile, the profile :func:`~qdeploy.profiles.detect_profile_name`
    finds here).
``simulated``
    An emulation of the profile's integer kernels run here, named in ``numerics``. The one emulation is
    *exact int32 accumulation*: the artifact's Q/DQ graph run in onnxruntime with its basic graph optimisations
    only (:class:`ExactInt32Runner`), so each Q/DQ pair is the float arithmetic the ONNX standard defines --
    quantized values rounded exactly, their products summed in float32 -- instead of being fused into this CPU's
    integer kernels. That equals exact int32 accumulation up to float rounding (the requantization of a real
    integer kernel may land one step away on a rounding boundary). ``MatMulInteger`` (dynamic INT8) runs
    integer kernels at every optimisation level: it is rewritten to a float64 MatMul of the same integers first.
``not emulated`` / ``not applicable`` / ``not runnable``
    No number is invented: the reason is given (another backend's kernels, integer operators onnxruntime fuses
    at every level, a profile without that backend, a runtime missing here).

The numerics of each profile (:func:`profile_accumulation`), the known facts:

* x86 **without VNNI** (AVX2, and AVX-512 without VNNI): onnxruntime's u8 x s8 kernels multiply with
  ``vpmaddubsw``, which sums *pairs* of products into int16 with saturation: ``a1*w1 + a2*w2`` is clamped to
  [-32768, 32767]. With 7-bit weights (``reduce_range``, |w| <= 64) no pair can saturate (2 * 255 * 64 = 32640),
  which is why the x86-avx2 profile asks for them. u8 x u8 kernels are exact (measured here with MatMulInteger:
  64 products of 255 x 127 give 1,048,544 = 32 x 32767 instead of 2,072,640; 255 x 255 gives the exact sum).
* x86 **with VNNI** (AVX-512 VNNI, AVX-VNNI): ``vpdpbusd`` accumulates u8 x s8 products in int32, exactly.
* **arm64 NEON** (sdot/udot, or widening multiply-accumulate): int8 x int8 products accumulate in int32, exactly.
* GPU tensor cores and integer NPUs accumulate INT8 products in int32 (assumed for NPU/TPU profiles).

So on an AVX2 host the x86-avx2 rows are ``runtime`` and VNNI/ARM rows are simulated with exact int32
accumulation. On a host with exact accumulation (VNNI, ARM) the x86-avx2 saturation is *not* reproduced: an
artifact whose int8 weights all satisfy |w| <= 64 cannot saturate, so exact accumulation is its AVX2 numerics
and the row is simulated; an artifact with full 8-bit weights is ``not emulated`` (emulating it would mean
re-implementing MLAS's u8 x s8 GEMM in numpy with its exact K-pair order and int16 clamping, checked bit for bit
against onnxruntime on an AVX2 host).

The spread of an artifact is the largest minus the smallest value of the budget metric over its measured rows
(``runtime`` and ``simulated``); it is flagged when it exceeds one point (:func:`spread_threshold`): 0.01 for
metrics that are fractions in [0, 1] (top-1 accuracy and agreement, cosine), 1.0 in the metric's own unit for
the others (1 dB of SQNR). When the budget metric is not measured on the data at hand (a label metric without
labels, judged on the recorded outputs) the spread is taken on ``top1_agreement`` (``cosine`` for outputs that
are not class scores), and the table says so.
"""
from __future__ import annotations

import json
import platform
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .backend import OrtRunner, Runner, ort_disabled_optimizers
from .errors import DataError, QDeployError
from .profiles import Profile, cpu_flags, detect_profile_name
from .verify import Recorded, Reference, Verification, verify_artifact

if TYPE_CHECKING:
    from .bundle import Bundle
    from .spec import Budget

INT16_PAIRS = "int16-pairs"
INT32 = "int32"
UNKNOWN = "unknown"

SATURATION_SAFE_WEIGHT = 64
"""The largest |int8 weight| for which AVX2's u8 x s8 pair sums cannot saturate: 2 * 255 * 64 = 32640 <= 32767."""

FRACTION_METRICS = ("top1_accuracy", "top1_agreement", "cosine")
UNIT_METRICS = ("sqnr_db", "max_abs", "mean_abs")
POINT_FRACTION = 0.01
POINT_UNIT = 1.0

PRODUCT_INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm",
                       "QLinearConvTranspose", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention",
                       "DynamicQuantizeLSTM")
"""Operators that multiply and accumulate integers in this CPU's kernels whatever the optimisation level."""
EMULATED_INTEGER_OPS = ("MatMulInteger",)
"""Of those, the ones :func:`exact_integer_graph` rewrites into float64 arithmetic on the same integers."""

EXACT = "exact int32 accumulation"


# --- the numerics of a profile and of this host -------------------------------------------------------------------
@dataclass(frozen=True)
class Accumulation:
    """How a device sums INT8 products: ``kind`` is :data:`INT16_PAIRS`, :data:`INT32` or :data:`UNKNOWN`."""

    kind: str
    why: str


def accumulation_of(device: str, arch: str, flags: Iterable[str]) -> Accumulation:
    """The INT8 accumulation of a device class: CPU by architecture and flags, GPU/NPU/TPU in int32."""
    flags = set(flags)
    arch = arch.lower()
    if device == "gpu":
        return Accumulation(INT32, "GPU INT8 (tensor cores, dp4a) accumulates in int32")
    if device in ("npu", "tpu"):
        return Accumulation(INT32, f"{device.upper()} INT8 accumulates in int32 (assumed)")
    if arch in ("aarch64", "arm64") or "asimd" in flags:
        return Accumulation(INT32, "arm64 NEON (sdot/udot) accumulates int8 products in int32")
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return Accumulation(INT32, "x86 VNNI (vpdpbusd) accumulates u8 x s8 products in int32")
    if "avx2" in flags or "avx512bw" in flags:
        return Accumulation(INT16_PAIRS, "x86 without VNNI: u8 x s8 products summed in pairs into saturating "
                            "int16 (vpmaddubsw)")
    return Accumulation(UNKNOWN, f"no INT8 kernel model for {arch or 'this architecture'}")


def profile_accumulation(profile: Profile) -> Accumulation:
    return accumulation_of(profile.device, profile.arch, profile.cpu_flags)


@dataclass(frozen=True)
class Host:
    """This machine: the profile detected for it (GPU first), the CPU profile, its architecture, CPU flags and
    INT8 accumulation."""

    profile: str
    cpu_profile: str
    machine: str
    flags: frozenset[str]
    accumulation: Accumulation

    def matches(self, profile: Profile) -> bool:
        """Whether this host runs ``profile``'s numerics natively: a CPU profile of this architecture whose CPU
        flags this CPU has and whose INT8 accumulation is this CPU's (an AVX-VNNI host has the flags of x86-avx2
        but not its saturation: no match); a GPU/NPU/TPU profile only when it is the detected one."""
        if profile.device != "cpu":
            return bool(self.profile) and profile.name == self.profile
        kind = profile_accumulation(profile).kind
        return (_arch(profile.arch) in ("", self.machine) and set(profile.cpu_flags) <= self.flags
                and kind == self.accumulation.kind and kind != UNKNOWN)

    def describe(self) -> str:
        flags = sorted(f for f in self.flags if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimd",
                                                     "asimddp", "avx512_bf16"))
        return (f"{self.profile} ({self.machine}, {', '.join(flags) or 'no SIMD flags read'}; INT8: "
                f"{self.accumulation.why})")


def _arch(name: str) -> str:
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(name.lower(), name.lower())


def detect_host(flags: set[str] | None = None, machine: str | None = None,
                gpu: tuple[str, str] | None | Literal[False] = False) -> Host:
    """This host (or the one described by ``flags``/``machine``/``gpu``, as
    :func:`~qdeploy.profiles.detect_profile_name` takes them)."""
    flags = cpu_flags() if flags is None else set(flags)
    machine = _arch(machine or platform.machine())
    try:
        name = detect_profile_name(flags, machine, gpu)
        cpu = detect_profile_name(flags, machine, None)
    except QDeployError:
        name = cpu = ""
    return Host(name, cpu, machine, frozenset(flags), accumulation_of("cpu", machine, flags))


# --- what an ONNX artifact holds -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GraphInfo:
    """An ONNX graph's integer arithmetic: Q/DQ pairs, integer operators, and its largest |int8 weight|."""

    qdq: bool
    integer_ops: tuple[str, ...]
    s8_weight_max: int | None  # None: no int8 weight feeds a DequantizeLinear or an integer operator

    @property
    def quantized(self) -> bool:
        return self.qdq or bool(self.integer_ops)

    @property
    def blocking_ops(self) -> tuple[str, ...]:
        return tuple(op for op in self.integer_ops if op not in EMULATED_INTEGER_OPS)

    @property
    def saturation_safe(self) -> bool:
        """No u8 x s8 pair sum of AVX2 can saturate: every int8 weight has |w| <= 64 (or there is none)."""
        return self.s8_weight_max is None or self.s8_weight_max <= SATURATION_SAFE_WEIGHT


def inspect_onnx(path: str | Path) -> GraphInfo:
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper

    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    qdq = False
    ops: set[str] = set()
    weights: set[str] = set()
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            qdq = True
        if node.op_type in PRODUCT_INTEGER_OPS:
            ops.add(node.op_type)
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            weights.add(node.input[0])
        elif node.op_type in ("MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "QGemm"):
            index = 3 if node.op_type.startswith("Q") else 1
            if len(node.input) > index and node.input[index] in inits:
                weights.add(node.input[index])
    top = None
    for name in weights:
        if inits[name].data_type == TensorProto.INT8:
            arr = numpy_helper.to_array(inits[name])
            if arr.size:
                m = int(np.abs(arr.astype(np.int32)).max())
                top = m if top is None else max(top, m)
    return GraphInfo(qdq, tuple(sorted(ops)), top)


def exact_integer_graph(proto: Any) -> Any:
    """``proto`` with every ``MatMulInteger`` replaced by the same product in float64: both operands cast to
    double, their zero points subtracted, ``MatMul``, cast back to int32. Exact for any realistic inner dimension
    (sums of products below 2^53), whatever this CPU's integer kernels do. A per-row (1-D) activation zero point
    is refused (``DataError``): ORT's dynamic quantization writes a scalar one."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    out_nodes = []
    for i, node in enumerate(proto.graph.node):
        if node.op_type != "MatMulInteger" or node.domain not in ("", "ai.onnx"):
            out_nodes.append(node)
            continue
        tag = f"{node.name or node.output[0]}__exact{i}"
        a, b = node.input[0], node.input[1]
        azp = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        bzp = node.input[3] if len(node.input) > 3 and node.input[3] else ""
        if azp:
            scalar = (azp in inits and numpy_helper.to_array(inits[azp]).size == 1) or \
                (azp in producers and producers[azp].op_type == "DynamicQuantizeLinear")
            if not scalar:
                raise DataError(f"{node.name}: a per-row activation zero point of MatMulInteger is not emulated")

        def as_double(src: str, zp: str, role: str) -> str:
            out_nodes.append(helper.make_node("Cast", [src], [f"{tag}_{role}"], to=TensorProto.DOUBLE))
            if not zp:
                return f"{tag}_{role}"
            out_nodes.append(helper.make_node("Cast", [zp], [f"{tag}_{role}_zp"], to=TensorProto.DOUBLE))
            out_nodes.append(helper.make_node("Sub", [f"{tag}_{role}", f"{tag}_{role}_zp"], [f"{tag}_{role}_c"]))
            return f"{tag}_{role}_c"

        da, db = as_double(a, azp, "a"), as_double(b, bzp, "b")
        out_nodes.append(helper.make_node("MatMul", [da, db], [f"{tag}_mm"]))
        out_nodes.append(helper.make_node("Cast", [f"{tag}_mm"], [node.output[0]], to=TensorProto.INT32))
    del proto.graph.node[:]
    proto.graph.node.extend(out_nodes)
    return proto


class ExactInt32Runner(OrtRunner):
    """An ONNX artifact with exact int32 accumulation, here: onnxruntime's basic optimisations only (Q/DQ pairs
    stay float arithmetic, never this CPU's fused integer kernels), ``MatMulInteger`` rewritten to float64
    (:func:`exact_integer_graph`). Simulated: good for verification, never for serving."""

    simulated = True

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnx

        proto = onnx.load(str(path))
        disabled = ort_disabled_optimizers(proto)
        if not any(n.op_type == "MatMulInteger" for n in proto.graph.node):
            super().__init__(path, threads=threads, disabled_optimizers=disabled, basic_only=True)
            return
        with tempfile.TemporaryDirectory(prefix="qdeploy-exact-") as tmp:
            sim = Path(tmp) / "exact.onnx"
            onnx.save(exact_integer_graph(proto), str(sim))
            super().__init__(sim, threads=threads, disabled_optimizers=disabled, basic_only=True)


def emulated_numerics(profile: Profile, backend: str, host: Host | None = None) -> str:
    """The words for the exact int32 emulation a deploy to ``profile`` judges ``backend``'s INT8 accuracy with on
    this host, or ``""`` when it uses the runtime's own kernels (see :func:`target_emulation`; for ``check``,
    before any artifact exists)."""
    if backend != "onnxruntime":
        return ""
    return exact_numerics(profile, host)


def exact_numerics(profile: Profile, host: Host | None = None) -> str:
    """The words for judging ``profile``'s INT8 with exact int32 accumulation on this host, or ``""`` when this
    host's kernels already accumulate as the profile's CPU does (or the profile is not a CPU)."""
    if profile.device != "cpu":
        return ""
    acc = profile_accumulation(profile)
    host = host or detect_host()
    if acc.kind != INT32 or host.accumulation.kind == INT32:
        return ""
    return (f"{EXACT} as on {profile.name} ({acc.why}), emulated here: this host's INT8 kernels differ "
            f"({host.accumulation.why})")


def target_emulation(profile: Profile, backend: str, path: str | Path, host: Host | None = None) -> str:
    """How a deploy to ``profile`` verifies the accuracy of an artifact built here: ``""`` for its own runtime,
    else the numerics, in words, of the exact int32 emulation (:class:`ExactInt32Runner`) it is verified with.

    The emulation is used where the profile's CPU accumulates INT8 products exactly (VNNI, ARM) and this host does
    not (AVX2 saturates u8 x s8 pair sums in int16): the host's kernels would judge -- and make the fallback
    promote layers for -- an error the target never makes. Only onnxruntime's ONNX artifacts with Q/DQ pairs or
    ``MatMulInteger`` are emulated (other backends' kernels are theirs); latency is still measured on this host's
    own kernels, and says so."""
    words = emulated_numerics(profile, backend, host)
    if not words or Path(path).suffix != ".onnx":
        return ""
    info = inspect_onnx(path)
    return words if info.quantized and not info.blocking_ops else ""


def target_judge(profile: Profile, backend: str, path: str | Path, threads: int,
                 host: Host | None = None) -> tuple[Runner | None, str]:
    """``(runner, numerics)`` that judge an artifact's accuracy for ``profile`` on this host: the exact int32
    emulation and its words where :func:`target_emulation` says so, else ``(None, "")`` (its own runtime judges)."""
    words = target_emulation(profile, backend, path, host)
    return (ExactInt32Runner(path, threads), words) if words else (None, "")


# --- one row: an artifact under a profile ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RowPlan:
    """How one artifact is verified under one profile: ``where`` (runtime / simulated / not emulated / not
    applicable), ``numerics`` (what ran, in words), ``key`` (rows with the same key share one run) and
    ``make`` (the runner), or ``reason`` when nothing runs."""

    where: str
    numerics: str
    key: str = ""
    make: Callable[[], Runner] | None = field(default=None, repr=False)
    reason: str = ""
    note: str = ""


def _onnx_path(bundle: Bundle, art: Mapping[str, Any]) -> Path | None:
    path = bundle.path / art["path"]
    if path.is_file() and path.suffix == ".onnx":
        return path
    if path.is_dir():
        name = art.get("meta", {}).get("onnx") or "model_qdq.onnx"
        if (path / name).is_file():
            return path / name
    return None


def _runtime_version(backend: str) -> str:
    if backend != "onnxruntime":
        return backend
    try:
        import onnxruntime
        return f"onnxruntime {onnxruntime.__version__}"
    except ImportError:
        return backend


def plan_row(bundle: Bundle, art: Mapping[str, Any], profile: Profile, host: Host, threads: int,
             info: GraphInfo | None = None) -> RowPlan:
    """Decide how ``art`` is verified under ``profile`` on ``host`` (see the module's docstring)."""
    backend, label = art["backend"], art.get("target") or art["backend"]
    entries = [t for t in profile.backends if t.backend == backend]
    onnx_path = _onnx_path(bundle, art)
    if info is None and onnx_path is not None:
        info = inspect_onnx(onnx_path)
    weights = ""
    if info is not None and info.s8_weight_max is not None:
        weights = (f"int8 weights up to |{info.s8_weight_max}|: "
                   + ("AVX2's int16 pair sums cannot saturate" if info.saturation_safe
                      else "AVX2's int16 pair sums can saturate"))
    if not entries:
        return RowPlan("not applicable", "", reason=f"{profile.name} has no {backend} entry: the artifact does not run "
                       f"there")

    def native() -> Runner:
        return bundle.runner(art["id"], threads)

    if host.matches(profile):
        acc = profile_accumulation(profile)
        note = weights if info is not None and info.quantized and acc.kind == INT16_PAIRS else ""
        kernels = acc.why if backend == "onnxruntime" and info is not None and info.quantized else \
            f"{label}'s own kernels on this {profile.device.upper()}"
        return RowPlan("runtime", f"{_runtime_version(backend)} on this host ({kernels})", "native", native,
                       note=note)
    same = [t for t in entries if t.label == label] or entries  # its own entry when the profile has it
    if all(t.host_fallback for t in same):
        return RowPlan("not emulated", "", reason=f"on {profile.name}, {label} is a host_fallback entry: it runs on "
                       f"that machine's host CPU, which the profile does not name")
    acc = profile_accumulation(profile)
    if onnx_path is None or info is None:
        return RowPlan("not emulated", "", reason=f"{label} kernels for {profile.name} (no ONNX form of this "
                       f"{backend} artifact to emulate them with): verify on such a host")
    if not info.quantized:
        if art.get("precision") == "fp32":
            return RowPlan("simulated", "FP32 kernels of this host (no integer arithmetic; another CPU differs in "
                           "float summation order only)", "native", native)
        return RowPlan("not emulated", "", reason=f"{art.get('precision')} kernels for {profile.name}: float "
                       f"arithmetic below FP32 differs between CPUs and is not modelled")
    if info.blocking_ops:
        return RowPlan("not emulated", "", reason=f"the graph holds {', '.join(info.blocking_ops)}, which runs this "
                       f"host's integer kernels at every optimisation level")
    if acc.kind == UNKNOWN:
        return RowPlan("not emulated", "", reason=f"{acc.why} ({profile.name})")
    if acc.kind == INT16_PAIRS and not info.saturation_safe:
        return RowPlan("not emulated", "", reason=f"int8 weights up to |{info.s8_weight_max}| can saturate the int16 "
                       f"pair sums of {profile.name} (vpmaddubsw), which this host's INT8 kernels "
                       f"({host.accumulation.kind}) do not reproduce", note=weights)
    why = EXACT if acc.kind == INT32 else f"{EXACT}: {weights}, so it is {profile.name}'s arithmetic too"

    if backend == "tensorrt" and onnx_path.parent == bundle.path / art["path"]:
        def trt() -> Runner:  # the backend's own simulation (float Q/DQ, FP16 layer rounding); never a real engine
            runner = native()
            if getattr(runner, "simulated", False):
                return runner
            runner.close()
            return ExactInt32Runner(onnx_path, threads)

        return RowPlan("simulated", f"{why}; {backend}'s Q/DQ graph as float arithmetic", "exact", trt)
    return RowPlan("simulated", f"{why} (Q/DQ as float arithmetic: onnxruntime basic optimisations"
                   f"{', MatMulInteger in float64' if 'MatMulInteger' in info.integer_ops else ''})", "exact",
                   lambda: ExactInt32Runner(onnx_path, threads))


@dataclass
class Row:
    artifact: str
    backend: str
    precision: str
    profile: str
    where: str
    numerics: str = ""
    reason: str = ""
    note: str = ""
    verification: Verification | None = field(default=None, repr=False)
    error: str = ""

    @property
    def measured(self) -> bool:
        return self.verification is not None

    @property
    def passed(self) -> bool | None:
        """True/False when verified (False also for an error while verifying); None when nothing ran."""
        if self.error:
            return False
        return None if self.verification is None else self.verification.passed

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "-"}[self.passed]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"artifact": self.artifact, "backend": self.backend, "precision": self.precision,
                               "profile": self.profile, "where": self.where, "numerics": self.numerics,
                               "passed": self.passed}
        for key in ("reason", "note", "error"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        v = self.verification
        if v is not None:
            out.update({"budget": v.budget.as_dict(), "basis": v.basis, "metrics": dict(v.metrics[v.budget.output])})
            if v.detail:
                out["detail"] = v.detail
        return out


# --- the spread of one artifact over profiles ----------------------------------------------------------------------
def spread_threshold(metric: str, values: Iterable[float] = ()) -> float:
    """One point of ``metric``: 0.01 for a fraction in [0, 1] (top-1 accuracy and agreement, cosine; a plugin
    metric whose values all lie in [0, 1]), else 1.0 in the metric's own unit (1 dB of SQNR)."""
    if metric in FRACTION_METRICS:
        return POINT_FRACTION
    if metric in UNIT_METRICS:
        return POINT_UNIT
    vals = list(values)
    return POINT_FRACTION if vals and all(0.0 <= v <= 1.0 for v in vals) else POINT_UNIT


@dataclass(frozen=True)
class Spread:
    artifact: str
    metric: str
    values: Mapping[str, float]
    spread: float
    threshold: float
    flagged: bool
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = {"artifact": self.artifact, "metric": self.metric, "values": dict(self.values), "spread": self.spread,
               "threshold": self.threshold, "flagged": self.flagged}
        if self.note:
            out["note"] = self.note
        return out


def flag_spread(artifact: str, metric: str, values: Mapping[str, float], threshold: float | None = None,
                note: str = "") -> Spread:
    """The spread (max - min) of ``values`` (per profile), flagged when above ``threshold`` (default: one point
    of ``metric``, :func:`spread_threshold`)."""
    vals = list(values.values())
    spread = (max(vals) - min(vals)) if vals else 0.0
    limit = spread_threshold(metric, vals) if threshold is None else threshold
    return Spread(artifact, metric, dict(values), float(spread), float(limit), spread > limit + 1e-12, note)


def spread_of(artifact: str, rows: Sequence[Row], budget_metric: str, threshold: float | None = None) -> Spread | None:
    """The spread of one artifact's measured rows: on the budget metric when every row measured it, else on
    ``top1_agreement`` (``cosine`` for outputs that are not class scores). None with fewer than two rows."""
    done = [r for r in rows if r.verification is not None and not r.error]
    if len(done) < 2:
        return None
    vs = [r.verification for r in done if r.verification is not None]
    if all(v.basis == "measured" for v in vs):
        return flag_spread(artifact, budget_metric, {r.profile: v.budget.value for r, v in zip(done, vs)}, threshold)
    out = vs[0].budget.output
    metric = "top1_agreement" if all("top1_agreement" in v.metrics[out] for v in vs) else "cosine"
    return flag_spread(artifact, metric, {r.profile: v.metrics[out][metric] for r, v in zip(done, vs)}, threshold,
                       note=f"{budget_metric} is not measured on these samples (it needs labels: pass --val); "
                       f"spread on {metric}")


# --- the table ------------------------------------------------------------------------------------------------------
@dataclass
class ProfileTable:
    bundle: str
    host: Host
    profiles: list[str]
    budget_metric: str
    source: str
    samples: int
    rows: list[Row]
    spreads: dict[str, Spread]

    @property
    def failed(self) -> bool:
        return any(r.passed is False for r in self.rows) or any(s.flagged for s in self.spreads.values())

    def as_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "host": {"profile": self.host.profile, "cpu_profile": self.host.cpu_profile,
                                                "machine": self.host.machine,
                                                "int8_accumulation": self.host.accumulation.kind},
                "profiles": self.profiles, "budget_metric": self.budget_metric, "source": self.source,
                "samples": self.samples,
                "spread_rule": "max - min of the budget metric over an artifact's measured rows (runtime and "
                               "simulated), flagged above one point: 0.01 for fractions in [0, 1] (top1_accuracy, "
                               "top1_agreement, cosine), 1.0 in the metric's unit otherwise (sqnr_db: 1 dB)",
                "rows": [r.as_dict() for r in self.rows],
                "spreads": {k: s.as_dict() for k, s in self.spreads.items()}, "failed": self.failed}

    def text(self) -> str:
        from .report import text_table

        rows = []
        for r in self.rows:
            v = r.verification
            value = f"{v.budget.value:.4f}" if v is not None else ""
            if v is not None and v.basis == "recorded":
                value += " (recorded)"
            sp = self.spreads.get(r.artifact)
            spread = ""
            if sp is not None and r.profile in sp.values:
                spread = f"{sp.spread:.4f}{' FLAG' if sp.flagged else ''}"
            what = r.numerics if r.measured else (r.error or r.reason)
            rows.append([r.artifact, r.profile, r.where, value, r.verdict, spread, what])
        lines = [text_table(["artifact", "profile", "where", self.budget_metric, "verdict", "spread", "numerics"],
                            rows)]
        for r in self.rows:
            if r.verification is not None and r.verification.basis == "recorded":
                hint = "" if r.passed else (
                    " -- these numerics do not reproduce the outputs recorded when the artifact was verified, so "
                    "that verdict does not carry over: give --val with labels to measure the budget under this "
                    "profile")
                lines.append(f"  {r.artifact} on {r.profile}: {r.verification.describe()}{hint}")
            if r.note:
                lines.append(f"  {r.artifact} on {r.profile}: {r.note}")
        for s in self.spreads.values():
            state = "FLAGGED" if s.flagged else "ok"
            vals = ", ".join(f"{p} {v:.4f}" for p, v in s.values.items())
            lines.append(f"  spread of {s.artifact}: {s.metric} {s.spread:.4f} (limit {s.threshold:g}): {state} "
                         f"[{vals}]{f'; {s.note}' if s.note else ''}")
        return "\n".join(lines)


def verify_profiles(bundle: Bundle, profiles: Sequence[Profile], reference: Reference, budget: Budget,
                    output: str | None = None, threads: int = 1, host: Host | None = None,
                    recorded: Callable[[str], Recorded | None] | None = None,
                    threshold: float | None = None) -> ProfileTable:
    """Verify every artifact of ``bundle`` under each of ``profiles`` (see the module's docstring): one
    :class:`Row` per artifact x profile, rows that share an emulation share one run, and the spread per artifact.
    ``reference`` is the bundle's FP32 reference run on the verification data (:meth:`Bundle.reference_run`);
    ``recorded`` gives an artifact's recorded outputs for unlabelled data (default :meth:`Bundle.recorded`)."""
    host = host or detect_host()
    recorded = recorded or bundle.recorded
    output = output or bundle.budget_output
    rows: list[Row] = []
    for art in bundle.artifacts:
        onnx_path = _onnx_path(bundle, art)
        info = inspect_onnx(onnx_path) if onnx_path is not None else None
        done: dict[str, tuple[Verification | None, str, str]] = {}
        for profile in profiles:
            plan = plan_row(bundle, art, profile, host, threads, info)
            row = Row(art["id"], art["backend"], str(art.get("precision", "")), profile.name, plan.where,
                      plan.numerics, plan.reason, plan.note)
            if plan.make is not None:
                if plan.key not in done:
                    done[plan.key] = _run(plan, reference, budget, output, recorded(art["id"]))
                row.verification, row.error, unrunnable = done[plan.key]
                if unrunnable:
                    row.where, row.reason = "not runnable", unrunnable
                elif row.verification is not None and row.verification.verified_on.get("kind") == "simulated" \
                        and row.where == "runtime":
                    row.where = "simulated"  # the backend's own runner stands in for a runtime not here
                    sim = art.get("meta", {}).get("simulation") or "its runtime is not on this host"
                    row.numerics = f"{art['backend']}'s own simulation ({sim})"
            rows.append(row)
    spreads = {}
    for art in bundle.artifacts:
        sp = spread_of(art["id"], [r for r in rows if r.artifact == art["id"]], budget.metric, threshold)
        if sp is not None:
            spreads[art["id"]] = sp
    return ProfileTable(str(bundle.path), host, [p.name for p in profiles], budget.metric, reference.source,
                        reference.samples, rows, spreads)


def _run(plan: RowPlan, reference: Reference, budget: Budget, output: str,
         recorded: Recorded | None) -> tuple[Verification | None, str, str]:
    """``(verification, error, why not runnable)``: a DataError while verifying is an error (the row fails), a
    runner that cannot be made here is no verdict (as plain ``qdeploy verify`` reports it)."""
    assert plan.make is not None
    try:
        runner = plan.make()
    except Exception as exc:  # a runtime missing here is reported, not fatal
        return None, "", f"not runnable here: {exc}"
    try:
        where = {"kind": "simulated" if plan.where == "simulated" else "runtime", "numerics": plan.numerics}
        return verify_artifact(runner, reference, budget, output, where=where, recorded=recorded), "", ""
    except DataError as exc:  # the budget metric cannot be computed here, and nothing recorded to compare
        return None, str(exc), ""
    finally:
        runner.close()


def parse_profiles(text: str, resolve: Callable[[str], Profile]) -> list[Profile]:
    """``a,b,c`` (names or .toml paths; ``detect`` for this host's) as profiles, in order, without repeats."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise QDeployError("--profiles needs at least one profile name, e.g. x86-avx2,x86-avx512-vnni,arm64-neon")
    out: list[Profile] = []
    for name in names:
        prof = resolve(name)
        if prof.name not in [p.name for p in out]:
            out.append(prof)
    return out


def write_json(table: ProfileTable, path: str) -> None:
    text = json.dumps(table.as_dict(), indent=2) + "\n"
    if path == "-":
        print(text, end="")
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    except OSError as exc:
        raise QDeployError(f"cannot write {path}: {exc.strerror or exc}; choose a writable --json path") from None
