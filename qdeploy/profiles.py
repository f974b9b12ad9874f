"""Hardware profiles: data only (``hardware_profiles/*.toml``), loaded, validated and detected here.

A profile names a device class and lists, in preference order, the backends that can serve it with the
precisions each runs *fast* there (the fallback ladder climbs only through those), the ones that run but
slowly (``check`` warns), and the granularity and symmetry rules of the device.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ProfileError, suggest
from .spec import PRECISIONS

GRANULARITY_NAMES = ("per_tensor", "per_channel", "per_group")
DEVICES = ("cpu", "gpu", "npu", "tpu")


@dataclass(frozen=True)
class BackendTarget:
    """One entry of a profile's backend chain: a backend and what it may do on this device."""

    backend: str
    fast: tuple[str, ...]
    slow: tuple[str, ...] = ()
    granularities: tuple[str, ...] = ("per_tensor", "per_channel")
    weight_symmetric_only: bool = False
    activation_symmetric_only: bool = False
    full_integer_only: bool = False
    activation_dtype: str = "uint8"
    host_fallback: bool = False
    options: tuple[tuple[str, Any], ...] = ()
    compute_capability: str = ""  # the profile's (e.g. "7.5"), copied into each entry for GPU backends

    @property
    def label(self) -> str:
        """``backend`` or ``backend:variant`` (the provider/engine/device/delegate option), unique per profile."""
        opts = dict(self.options)
        for key in ("provider", "engine", "device", "delegate"):
            if key in opts:
                return f"{self.backend}:{opts[key]}"
        return self.backend

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    @property
    def supported(self) -> tuple[str, ...]:
        return tuple(p for p in PRECISIONS if p in self.fast or p in self.slow)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    device: str
    backends: tuple[BackendTarget, ...]
    arch: str = ""
    cpu_flags: tuple[str, ...] = ()
    compute_capability: str = ""
    notes: tuple[str, ...] = ()
    threads: int = 0  # intra-op threads for verification timing and serving; 0: DEFAULT_THREADS
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("source")
        for b in data["backends"]:
            b["options"] = dict(b["options"])
        return data

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


KNOWN_OPTIONS = ("provider", "device", "engine", "delegate", "io_dtype", "reduce_range", "workspace_mb",
                 "opt_batch", "max_batch", "batch", "threads")
"""Backend options the shipped plugins read (a plugin may read more; a near miss of these is refused)."""

_PROFILE_KEYS = {"name", "description", "device", "arch", "cpu_flags", "compute_capability", "notes", "backends",
                 "threads"}
DEFAULT_THREADS = 1
"""Intra-op threads when neither the caller nor the profile says: one, so a latency is one request's on one
core, comparable between runtimes and stable on a shared machine (each runtime's own default takes every core,
and two of them in one process oversubscribe)."""


def resolve_threads(asked: int | None, profile: Profile | None = None) -> int:
    """The intra-op thread count every runner of a deploy, a verification or a server uses: the caller's, else
    the profile's ``threads``, else :data:`DEFAULT_THREADS`."""
    if asked is not None:
        if isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
            raise ProfileError(f"threads must be a whole number >= 1, got {asked!r}")
        return asked
    return (profile.threads if profile else 0) or DEFAULT_THREADS
_TARGET_KEYS = {"backend", "fast", "slow", "granularities", "weight_symmetric_only", "activation_symmetric_only",
                "full_integer_only", "activation_dtype", "host_fallback", "options"}


def profile_from_dict(data: dict[str, Any], source: str = "") -> Profile:
    where = source or data.get("name", "profile")

    def check_keys(d: dict, allowed: set, ctx: str) -> None:
        for k in d:
            if k not in allowed:
                raise ProfileError(f"{where}: unknown key {ctx}{k!r}{suggest(k, allowed)}; known: "
                                   f"{', '.join(sorted(allowed))}")

    check_keys(data, _PROFILE_KEYS, "")
    for key in ("name", "description", "device", "backends"):
        if key not in data:
            raise ProfileError(f"{where}: missing required key {key!r}")
    for key in ("notes", "cpu_flags"):
        if key in data and (not isinstance(data[key], list) or not all(isinstance(v, str) for v in data[key])):
            raise ProfileError(f"{where}: {key} must be a list of strings, got {data[key]!r}")
    for key in ("name", "description", "device", "arch", "compute_capability"):
        if key in data and not isinstance(data[key], str):
            raise ProfileError(f"{where}: {key} must be a string, got {data[key]!r}")
    if "threads" in data and (isinstance(data["threads"], bool) or not isinstance(data["threads"], int)
                              or data["threads"] < 1):
        raise ProfileError(f"{where}: threads must be a whole number >= 1 (intra-op threads per runner), got "
                           f"{data['threads']!r}")
    if data["device"] not in DEVICES:
        raise ProfileError(f"{where}: device {data['device']!r} is not one of {', '.join(DEVICES)}")
    if not isinstance(data["backends"], list) or not all(isinstance(b, dict) for b in data["backends"]):
        raise ProfileError(f"{where}: 'backends' must be an array of tables, one [[backends]] section per backend")
    targets = []
    for i, b in enumerate(data["backends"]):
        check_keys(b, _TARGET_KEYS, f"backends[{i}].")
        for key in ("fast", "slow", "granularities"):
            if key in b and (not isinstance(b[key], list) or not all(isinstance(v, str) for v in b[key])):
                raise ProfileError(f"{where}: backends[{i}].{key} must be a list of names, e.g. [\"int8\", "
                                   f"\"fp32\"]; got {b[key]!r}")
        for key in ("weight_symmetric_only", "activation_symmetric_only", "full_integer_only", "host_fallback"):
            if key in b and not isinstance(b[key], bool):
                raise ProfileError(f"{where}: backends[{i}].{key} must be true or false, got {b[key]!r}")
        if "activation_dtype" in b and b["activation_dtype"] not in ("int8", "uint8"):
            raise ProfileError(f"{where}: backends[{i}].activation_dtype {b['activation_dtype']!r} is not one of "
                               f"int8, uint8")
        opts = b.get("options", {})
        if not isinstance(opts, dict):
            raise ProfileError(f"{where}: backends[{i}].options must be a table of key = value, e.g. "
                               f"options = {{ provider = \"cpu\" }}; got {opts!r}")
        for k in opts:  # plugins may read their own options; a near miss of a known one is a typo
            hint = suggest(k, KNOWN_OPTIONS) if k not in KNOWN_OPTIONS else ""
            if hint:
                raise ProfileError(f"{where}: unknown option backends[{i}].options.{k!r}{hint}")
        for key in ("fast", "slow"):
            for p in b.get(key, ()):
                if p not in PRECISIONS:
                    raise ProfileError(f"{where}: backends[{i}].{key}: {p!r} is not one of {', '.join(PRECISIONS)}")
        for g in b.get("granularities", ()):
            if g not in GRANULARITY_NAMES:
                raise ProfileError(f"{where}: backends[{i}].granularities: {g!r} is not one of "
                                   f"{', '.join(GRANULARITY_NAMES)}")
        if "backend" not in b or not b.get("fast"):
            raise ProfileError(f"{where}: backends[{i}] needs 'backend' and a non-empty 'fast' list")
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in b.items() if k != "options"}
        targets.append(BackendTarget(**kw, options=tuple(sorted(b.get("options", {}).items())),
                                     compute_capability=str(data.get("compute_capability", ""))))
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise ProfileError(f"{where}: backend entries must be unique, got {labels}")
    top: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "backends"}
    return Profile(**top, backends=tuple(targets), source=source)


def load_profile_file(path: str | Path) -> Profile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"cannot read hardware profile {path}: {exc}") from None
    return profile_from_dict(data, str(path))


def builtin_profile_dir() -> Path:
    """``hardware_profiles/`` shipped inside the wheel, or beside the package in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "hardware_profiles", here.parent / "hardware_profiles"):
        if candidate.is_dir():
            return candidate
    raise ProfileError("the built-in hardware_profiles folder is missing from this installation; reinstall qdeploy")


# --- detection ----------------------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def gpu_compute_capability() -> tuple[str, str] | None:
    """(GPU name, compute capability) of the first visible NVIDIA GPU, from nvidia-smi, or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    line = out.strip().splitlines()[0] if out.strip() else ""
    if "," not in line:
        return None
    name, cap = (s.strip() for s in line.split(",", 1))
    return name, cap


def detect_profile_name(flags: set[str] | None = None, machine: str | None = None,
                        gpu: tuple[str, str] | None | Literal[False] = False) -> str:
    """The built-in profile that best matches this host (GPU first, when one is visible)."""
    if gpu is False:
        gpu = gpu_compute_capability()
    if gpu:
        name, cap = gpu
        major_minor = tuple(int(x) for x in cap.split(".")[:2])
        if major_minor >= (9, 0):
            return "nvidia-h100"
        if major_minor == (8, 7):
            return "nvidia-jetson-orin"
        if major_minor >= (7, 5):
            return "nvidia-t4"
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return "arm64-neon"
    if "avx512_vnni" in flags and "avx512_bf16" in flags:
        return "x86-avx512-bf16"
    if "avx512_vnni" in flags:
        return "x86-avx512-vnni"
    if "avx2" in flags:
        return "x86-avx2"
    raise ProfileError(f"cannot detect a profile for this host ({machine}, no AVX2/NEON): pass --target NAME "
                       f"(see `qdeploy profiles list`)")
