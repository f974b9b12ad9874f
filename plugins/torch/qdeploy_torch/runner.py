"""The runner of every torch artifact: a ``torch.export`` program (``.pt2``) compiled by Inductor, or a
TorchScript file (``.ts``) for the FX/dynamic paths. Neither needs the model's Python source, and neither
loads pickles: ``torch.export.load`` reads a zip of JSON and raw tensors, ``torch.jit.load`` TorchScript.

Compiled artifacts run with Inductor freezing on: freezing folds the INT8 weights into prepacked oneDNN
kernels. It is a global Inductor setting read at every (re)compile: the runner turns it on for the process
and, should anything have turned it off since, runs the call under ``torch._inductor.config.patch(freezing=True)``;
without it a recompile would silently fall back to the slow reference quantize/dequantize code. Shapes are static (``dynamic=False``; dynamic-shape compiles of the
quantized convolutions fail in torch 2.13): batches are padded to ``max_batch``, so one graph serves all.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qdeploy.backend import Runner, threads_of
from qdeploy.errors import BackendError, DataError


def load_program(path: Path, device: str = "cpu") -> Any:
    import torch

    try:
        import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops, if missing)
    except ImportError:
        pass
    try:
        module = torch.export.load(str(path)).module()
    except Exception as exc:
        raise BackendError(f"cannot load {path.name}: {type(exc).__name__}: {exc}", "LOAD_FAILED") from None
    return module


class TorchRunner(Runner):
    max_batch: int  # always set: the artifact's one static batch size, which smaller batches are padded to

    def __init__(self, path: Path, meta: Mapping[str, Any]) -> None:
        import torch

        self.torch = torch
        self.meta = dict(meta)
        self.exact = bool(meta.get("exact", False))
        self.device = meta.get("device", "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BackendError("this artifact runs on CUDA and no GPU is visible here", "LOAD_FAILED")
        self.input_names = list(meta["input_names"])
        self.output_names = list(meta["output_names"])
        self.max_batch = int(meta["batch"])
        engine = meta.get("engine")
        if engine and meta.get("quantized_engine", False):
            if engine not in torch.backends.quantized.supported_engines:
                raise BackendError(f"quantized engine {engine} is not in this torch build (has "
                                   f"{torch.backends.quantized.supported_engines})", "LOAD_FAILED")
            torch.backends.quantized.engine = engine
        if meta["format"] == "torchscript":
            try:
                self.module = torch.jit.load(str(path), map_location=self.device)
            except Exception as exc:
                raise BackendError(f"cannot load {Path(path).name}: {exc}", "LOAD_FAILED") from None
            self.fn = self.module
        else:
            self.module = load_program(Path(path))
            if meta.get("compile", True):
                import torch._inductor.config as inductor_config

                if not self.exact:
                    inductor_config.freezing = True  # for this process: compiled INT8 needs it at every compile
                # compile forward itself: the exported module's __call__ hooks re-check the input structure
                # in Python on every call (about 0.1 ms); the runner checks shapes itself
                self.fn = torch.compile(self.module.forward, dynamic=False)
            else:
                self.fn = self.module
        self.sample_shapes = {k: tuple(v) for k, v in meta.get("sample_shapes", {}).items()}
        # "exact": compiled without freezing, Inductor runs the program's quantize/dequantize as float arithmetic
        # (exact int32 accumulation up to float rounding) instead of lowering it to the host's INT8 kernels
        # torch's intra-op thread count is process-wide: it is set around each call and put back after, so
        # this runner uses what it was asked for and leaves every other runner (and the caller) theirs
        self.threads = threads_of(meta)

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        import torch._inductor.config as inductor_config

        n = len(feed[self.input_names[0]])
        args = []
        for name in self.input_names:
            x = feed[name]
            want = self.sample_shapes.get(name)
            if want is not None and tuple(x.shape[1:]) != want:
                raise DataError(f"input {name!r} has samples of shape {'x'.join(map(str, x.shape[1:]))}; this "
                                f"artifact takes {'x'.join(map(str, want))}")
            if n < self.max_batch:  # one static shape: pad, run, cut
                x = np.concatenate([x, np.zeros((self.max_batch - n,) + x.shape[1:], x.dtype)])
            t = torch.from_numpy(np.ascontiguousarray(x))
            args.append(t if self.device == "cpu" else t.to(self.device))
        # freezing is read at every (re)compile: patch it back on if anything turned it off since __init__
        # (off for the exact form)
        freeze = not self.exact
        ctx = contextlib.nullcontext() if inductor_config.freezing == freeze else inductor_config.patch(freezing=freeze)
        before = torch.get_num_threads()
        if self.threads and self.threads != before:
            torch.set_num_threads(self.threads)
        try:
            with torch.no_grad(), ctx:
                out = self.fn(*args)
        finally:
            if self.threads and self.threads != before:
                torch.set_num_threads(before)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        result = {}
        for k, v in zip(self.output_names, outs):
            if n < self.max_batch:
                v = v[:n]
            if v.dtype != torch.float32 or v.device.type != "cpu":
                v = v.float().cpu()
            result[k] = v.numpy()
        return result

    def close(self) -> None:
        self.fn = self.module = None
