"""Engine building and running with TensorRT's Python API, and the equivalent ``trtexec`` command line.

Everything here imports ``tensorrt`` inside functions: ``import qdeploy_tensorrt`` never needs TensorRT.
The calls follow the TensorRT 8.6-10.x Python API (``tensorrt.Builder``, ``OnnxParser``, ``IBuilderConfig``,
``Runtime.deserialize_cuda_engine``, ``IExecutionContext.execute_async_v3``); device memory comes from the CUDA
runtime library through ctypes (libcudart ships with TensorRT's wheels and with every CUDA install), so no
other Python package is needed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qdeploy.backend import Runner, gpu_compute_capability
from qdeploy.errors import BackendError

ENGINE = "engine.plan"
TIMING_CACHE = "timing.cache"
BUILD_CONFIG = "build_config.json"
TRTEXEC = "trtexec.txt"
BUILD_SCRIPT = "build_engine.sh"
DEFAULT_WORKSPACE_MB = 1024

# The precisions each NVIDIA compute capability runs fast (tensor cores): INT8 from Turing sm_75, BF16 from
# Ampere sm_80, FP8 (E4M3) from Ada/Hopper sm_89; FP16 from sm_53 (tensor cores from sm_70).
MIN_CC = {"int8": (7, 5), "fp16": (5, 3), "bf16": (8, 0), "fp8": (8, 9), "fp32": (0, 0)}
BUILDER_FLAGS = {"int8": "INT8", "fp16": "FP16", "bf16": "BF16", "fp8": "FP8"}
TRT_TYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_cc(text: str) -> tuple[int, int] | None:
    """``"8.7"`` -> ``(8, 7)``; None when empty or malformed."""
    try:
        major, minor = (int(x) for x in str(text).strip().split(".")[:2])
    except ValueError:
        return None
    return major, minor


def fast_precisions(cc: str) -> tuple[str, ...]:
    """Precisions with fast kernels on compute capability ``cc`` (int8/fp16/fp32 when it is unknown)."""
    parsed = parse_cc(cc)
    if parsed is None:
        return ("int8", "fp16", "fp32")
    return tuple(p for p, need in MIN_CC.items() if parsed >= need)


@functools.lru_cache(maxsize=1)
def tensorrt_status() -> tuple[bool, str, str, str]:
    """``(usable, reason, tensorrt version, "GPU name (sm_XY)")``: whether an engine can be built here, and why
    not. Cached: importing TensorRT and asking nvidia-smi cost about a second."""
    try:
        import tensorrt as trt
        version = str(trt.__version__)
    except Exception as exc:  # the PyPI placeholder packages raise at import, not only ImportError
        return False, f"tensorrt is not importable here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", "", ""
    gpu = gpu_compute_capability()
    if gpu is None:
        return False, f"TensorRT {version} is installed but no NVIDIA GPU is visible (nvidia-smi)", version, ""
    return True, "", version, f"{gpu[0]} (sm_{gpu[1].replace('.', '')})"


def shapes_for(inputs: list[Mapping[str, Any]], opt_batch: int, max_batch: int,
               data_shapes: Mapping[str, list[int]] | None = None) -> dict[str, dict[str, list[int]]]:
    """The optimization profile: min/opt/max shape per input; a dynamic (None) dimension 0 is the batch. A
    dynamic dimension beyond the batch takes the size the calibration data has there (``data_shapes``: one
    sample's shape per input); the engine then runs that size only."""
    out = {}
    for info in inputs:
        shape = list(info["shape"])
        sample = list((data_shapes or {}).get(info["name"], []))
        if any(d is None for d in shape[1:]):
            if len(sample) != len(shape) - 1:
                raise BackendError(f"input {info['name']!r} has dynamic dimensions beyond the batch ({shape}) and "
                                   f"no calibration data fixes them; TensorRT needs their range: pass --calib, or "
                                   f"export the model with fixed non-batch dimensions", "BUILD_FAILED")
            shape = [shape[0], *(s if d is None else d for d, s in zip(shape[1:], sample))]
        if shape and shape[0] is None:
            rest = [int(d) for d in shape[1:]]
            out[info["name"]] = {"min": [1, *rest], "opt": [opt_batch, *rest], "max": [max_batch, *rest]}
        else:
            fixed = [int(d) for d in shape]
            out[info["name"]] = {"min": fixed, "opt": fixed, "max": fixed}
    return out


def trtexec_command(config: Mapping[str, Any]) -> str:
    """The ``trtexec`` line equivalent to :func:`build_engine` with ``config`` (run it in the artifact folder)."""
    args = ["trtexec", f"--onnx={config['onnx']}", f"--saveEngine={ENGINE}", f"--timingCacheFile={TIMING_CACHE}",
            f"--memPoolSize=workspace:{config['workspace_mb']}"]
    args += [f"--{flag.lower()}" for flag in config["builder_flags"]]
    cons = config["precision_constraints"]
    if cons:
        spec = ",".join(f"{c['node']}:{c['precision']}" for c in cons)
        args += ["--precisionConstraints=obey", f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]
    dynamic = {n: s for n, s in config["shapes"].items() if s["min"] != s["max"]}
    for key in ("min", "opt", "max"):
        if dynamic:
            args.append(f"--{key}Shapes=" + ",".join(f"{n}:{'x'.join(map(str, s[key]))}" for n, s in dynamic.items()))
    return " ".join(shlex.quote(a) for a in args)


def build_engine(folder: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """Build ``folder/engine.plan`` from ``folder/<config['onnx']>`` with the TensorRT Python builder; reuses and
    updates ``folder/timing.cache``. Returns what the manifest records (TensorRT version, GPU, layer matches)."""
    import tensorrt as trt

    usable, reason, version, gpu = tensorrt_status()
    if not usable:
        raise BackendError(reason, "BACKEND_UNAVAILABLE")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(version.split(".")[0]) < 10:  # explicit batch is the only mode from TensorRT 10 on
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(folder / config["onnx"])):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT's ONNX parser rejected {config['onnx']}: {errors}", "BUILD_FAILED")
    bconf = builder.create_builder_config()
    bconf.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config["workspace_mb"]) << 20)
    for flag in config["builder_flags"]:
        if not hasattr(trt.BuilderFlag, flag):
            raise BackendError(f"TensorRT {version} has no builder flag {flag}; it needs a newer TensorRT",
                               "PRECISION_UNSUPPORTED")
        bconf.set_flag(getattr(trt.BuilderFlag, flag))
    matched = _apply_constraints(trt, network, config["precision_constraints"])
    if config["precision_constraints"]:
        bconf.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        s = config["shapes"][name]
        profile.set_shape(name, s["min"], s["opt"], s["max"])
    bconf.add_optimization_profile(profile)
    cache_path = folder / TIMING_CACHE
    cache = bconf.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    bconf.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, bconf)
    if serialized is None:
        raise BackendError("TensorRT's builder returned no engine (see the TensorRT log above)", "BUILD_FAILED")
    tmp = folder / (ENGINE + ".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(folder / ENGINE)
    cache_path.write_bytes(bytes(bconf.get_timing_cache().serialize()))
    return {"engine": ENGINE, "tensorrt_version": version, "gpu": gpu, "timing_cache": TIMING_CACHE,
            "constrained_layers": matched}


def _apply_constraints(trt: Any, network: Any, constraints: list[Mapping[str, str]]) -> dict[str, list[str]]:
    """Pin the precision of the TensorRT layer the ONNX parser made from each constrained ONNX node (the parser
    gives a node's main layer the node's name; exact matches only, so ``conv`` never pins ``conv_1``)."""
    wanted = {c["node"]: c["precision"] for c in constraints}
    matched: dict[str, list[str]] = {n: [] for n in wanted}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        node = layer.name if layer.name in wanted else None
        if node is None or layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE):
            continue
        dtype = getattr(trt, TRT_TYPES[wanted[node]])
        layer.precision = dtype
        for j in range(layer.num_outputs):
            layer.set_output_type(j, dtype)
        matched[node].append(layer.name)
    missing = [n for n, layers in matched.items() if not layers]
    if missing:
        raise BackendError(f"no TensorRT layer carries the name of ONNX node(s) {missing}; cannot pin their "
                           f"precision", "BUILD_FAILED")
    return matched


class _Cuda:
    """The few CUDA runtime calls the runner needs, through ctypes."""

    H2D, D2H = 1, 2

    def __init__(self) -> None:
        self.lib = _load_cudart()
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed: {self.lib.cudaGetErrorString(status).decode()} (CUDA error {status})")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc")
        if ptr.value is None:
            raise RuntimeError("cudaMalloc succeeded but returned a null pointer")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                                            kind, ctypes.c_void_p(stream)), "cudaMemcpyAsync")

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(s)), "cudaStreamCreate")
        return int(s.value or 0)

    def sync(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def destroy(self, stream: int) -> None:
        self.lib.cudaStreamDestroy(ctypes.c_void_p(stream))


def _load_cudart() -> ctypes.CDLL:
    names = [ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.13", "libcudart.so.12",
             "libcudart.so.11.0", "cudart64_12.dll", "cudart64_110.dll"]
    try:  # the nvidia-cuda-runtime wheel that TensorRT's wheels depend on
        import nvidia.cuda_runtime as ncr
        names += [str(p) for d in ncr.__path__ for p in sorted(Path(d).glob("lib/libcudart.so*"))]
    except ImportError:
        pass
    for name in filter(None, names):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise BackendError("the CUDA runtime library (libcudart) is not found; install the CUDA runtime that matches "
                       "TensorRT", "LOAD_FAILED")


class TrtRunner(Runner):
    """Runs a serialized TensorRT engine (``engine.plan``) on the GPU."""

    def __init__(self, plan: Path) -> None:
        import tensorrt as trt

        self.trt = trt
        self.cuda = _Cuda()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {plan} (built by another TensorRT version or for "
                               f"another GPU?): rebuild it with `qdeploy build-engine`", "LOAD_FAILED")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        max_shape = self.engine.get_tensor_profile_shape(self.input_names[0], 0)[2]
        self.max_batch = int(max_shape[0]) if len(max_shape) else None
        self.stream = self.cuda.stream()

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cuda = self.trt, self.cuda
        buffers: list[int] = []
        try:
            for name in self.input_names:
                arr = np.ascontiguousarray(feed[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                self.context.set_input_shape(name, arr.shape)
                ptr = cuda.malloc(arr.nbytes)
                buffers.append(ptr)
                cuda.copy(ptr, arr.ctypes.data, arr.nbytes, cuda.H2D, self.stream)
                self.context.set_tensor_address(name, ptr)
            outs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                outs[name] = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                ptr = cuda.malloc(outs[name].nbytes)
                buffers.append(ptr)
                self.context.set_tensor_address(name, ptr)
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execute_async_v3 reported failure")
            for name, ptr in zip(self.output_names, buffers[len(self.input_names):]):
                cuda.copy(outs[name].ctypes.data, ptr, outs[name].nbytes, cuda.D2H, self.stream)
            cuda.sync(self.stream)
            return outs
        finally:
            for ptr in buffers:
                cuda.free(ptr)

    def close(self) -> None:
        if getattr(self, "stream", None):
            self.cuda.destroy(self.stream)
            self.stream = 0
        self.context = self.engine = None
