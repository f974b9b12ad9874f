"""Quantization-aware training that every backend can deploy.

    from qdeploy_torch.qat import prepare, convert
    qat_model = prepare(model, spec, input_shape=(1, 1, 8, 8), calib=x_calib)  # fake quant in forward, STE back
    ...the user's own training loop on qat_model, at 1-10% of the original learning rate, 10-20% of the epochs...
    qat_model.freeze_batchnorm()        # after a few epochs: BN statistics frozen, fake quantization trains on
    bundle = qdeploy.deploy(convert(qat_model), target=..., spec=spec, ...)

``prepare`` exports the model and inserts fake quantization with torchao's ``prepare_qat_pt2e`` and the
X86InductorQuantizer configured from the spec (weights: bits, symmetric, per-tensor/per-channel; activations:
8-bit uint8, full range). The forward pass fake-quantizes (``torch.fake_quantize_per_*_affine``); the backward
pass is the straight-through estimator: gradient 1 inside the quantization range, 0 where values clip.
Scales are observed (moving-average min/max, ``momentum`` from the spec) or, with ``learn_scales=True``,
learned for activations (LSQ, ``LearnableFakeQuantize``). Conv+BatchNorm pairs train with BN folded into the
fake-quantized weights.

``convert`` returns a torch module whose graph holds the learned scales and zero points as
quantize/dequantize ops. The torch backend deploys it as is (``.pt2``, Inductor INT8 kernels); its ONNX export
carries them as QuantizeLinear/DequantizeLinear nodes, which the ONNX Runtime backend deploys without
re-quantizing, so both run the numerics QAT learned.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from qdeploy.errors import BackendError, ModelError

GUIDANCE = (
    "QAT guidance: fine-tune from the trained FP32 weights with 1-10% of the original learning rate for about "
    "10-20% of the original epochs; call model.freeze_batchnorm() after a few epochs (BN statistics frozen, "
    "fake quantization keeps training); optionally model.freeze_observers() for the last epoch; learn the "
    "activation scales (learn_scales=True) when activations have outliers; then "
    "convert(model) and deploy the result with any backend.")


def _target() -> Any:
    from qdeploy.backend import BackendTarget

    return BackendTarget("torch", ("int8", "fp32"), activation_dtype="uint8")


def _batches(calib: Any, batch: int = 32):
    if calib is None:
        return
    if isinstance(calib, (np.ndarray, torch.Tensor)):
        x = torch.as_tensor(np.asarray(calib, dtype=np.float32) if isinstance(calib, np.ndarray) else calib)
        for i in range(0, len(x), batch):
            yield (x[i:i + batch],)
        return
    for item in calib:
        items = item if isinstance(item, (tuple, list)) else (item,)
        yield tuple(torch.as_tensor(np.asarray(t, dtype=np.float32)) if isinstance(t, np.ndarray) else t
                    for t in items)


class QATModel(torch.nn.Module):
    """A model prepared for QAT: call it like the original; ``train()``/``eval()`` work as usual."""

    def __init__(self, graph: torch.fx.GraphModule, spec: Any, example: tuple, learn_scales: bool) -> None:
        super().__init__()
        self.graph_module = graph
        self.spec, self.example, self.learn_scales = spec, example, learn_scales
        self.bn_frozen = False

    def forward(self, *args: Any) -> Any:
        return self.graph_module(*args)

    def train(self, mode: bool = True) -> QATModel:
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
        from torchao.quantization.pt2e.export_utils import _replace_batchnorm

        if mode:
            move_exported_model_to_train(self.graph_module)
            if self.bn_frozen:
                _replace_batchnorm(self.graph_module, train_to_eval=True)
        else:
            move_exported_model_to_eval(self.graph_module)
        self.training = mode
        return self

    def freeze_batchnorm(self) -> QATModel:
        """Stop updating BatchNorm running statistics (normalise with them instead), keep training the rest."""
        self.bn_frozen = True
        return self.train(self.training)

    def freeze_observers(self) -> QATModel:
        """Fix the observed quantization ranges (fake quantization stays on)."""
        from torchao.quantization.pt2e import disable_observer

        self.graph_module.apply(disable_observer)
        return self

    def fake_quantizers(self) -> dict[str, Any]:
        from torchao.quantization.pt2e import FakeQuantizeBase

        return {n: m for n, m in self.graph_module.named_modules() if isinstance(m, FakeQuantizeBase)}


def prepare(model: torch.nn.Module, spec: Any = None, example_inputs: tuple | None = None,
            input_shape: tuple[int, ...] | None = None, calib: Any = None, learn_scales: bool = False,
            verbose: bool = True) -> QATModel:
    """``model`` with fake quantization per ``spec``, ready for the user's training loop.

    ``calib`` (an array, or an iterable of batches) initialises the ranges before training starts;
    without it they start from the first training batches. ``learn_scales`` learns activation scales by
    gradient (LSQ) instead of tracking them with a moving average.
    """
    from qdeploy.spec import load_spec
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    from .build import quiet
    from .quantize import export_for_quantization, pt2e_config

    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"qat.prepare takes a torch.nn.Module, not a {type(model).__name__}")
    spec = load_spec(spec)
    if spec.activations.mode not in ("static", "auto"):  # auto: QAT trains calibrated (static) ranges
        raise ModelError(f"QAT trains static quantization; the spec has activations.mode = "
                         f"{spec.activations.mode!r}")
    if example_inputs is None:
        if input_shape is None:
            raise ModelError("qat.prepare needs example_inputs or input_shape (with the batch dimension)")
        example_inputs = (torch.randn(*((max(2, input_shape[0]),) + tuple(input_shape[1:]))),)
    float_model = copy.deepcopy(model).train()
    try:
        with torch.no_grad():
            float_model(*example_inputs)
    except Exception as exc:
        raise ModelError(f"the model fails on example inputs of shape "
                         f"{[tuple(x.shape) for x in example_inputs]}: {type(exc).__name__}: {exc}") from None
    with quiet():
        try:
            gm = export_for_quantization(float_model, example_inputs, "the model for QAT")
        except BackendError as exc:
            raise ModelError(str(exc)) from None
        quantizer = X86InductorQuantizer().set_global(pt2e_config(spec, _target(), is_qat=True,
                                                                  learn_scales=learn_scales))
        prepared = prepare_qat_pt2e(gm, quantizer)
    qat = QATModel(prepared, spec, example_inputs, learn_scales)
    qat.eval()  # initialise the ranges without touching BatchNorm statistics
    with torch.no_grad():
        seen = 0
        for xs in _batches(calib):
            qat(*xs)
            seen += 1
        if not seen:
            qat(*example_inputs)
    if learn_scales:
        from torchao.quantization.pt2e import LearnableFakeQuantize

        for m in qat.fake_quantizers().values():
            if isinstance(m, LearnableFakeQuantize):
                m.enable_range_learning()
    qat.train()
    if verbose:
        print(GUIDANCE)
    return qat


def convert(qat_model: QATModel) -> torch.fx.GraphModule:
    """The trained model with its learned scales and zero points as quantize/dequantize ops (eval mode)."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval, move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from .build import prune_unused, quiet

    if not isinstance(qat_model, QATModel):
        raise ModelError(f"qat.convert takes the model qat.prepare returned, not a {type(qat_model).__name__}")
    gm = copy.deepcopy(qat_model.graph_module)
    move_exported_model_to_eval(gm)
    with quiet():
        converted = convert_pt2e(gm)
    prune_unused(converted)
    allow_exported_model_train_eval(converted)
    converted._qdeploy_prequantized = True
    return converted


def save(converted: torch.fx.GraphModule, path: Any) -> Any:
    """Save a converted model (what :func:`convert` returned) as a ``torch.export`` program with a dynamic
    batch dimension."""
    from pathlib import Path

    from .build import quiet
    from .quantize import export

    example = next(iter([a for a in getattr(converted, "_qdeploy_example", ())]), None)
    placeholders = [n for n in converted.graph.nodes if n.op == "placeholder"]
    shapes = [tuple(n.meta["val"].shape) for n in placeholders if "val" in n.meta]
    if len(shapes) != len(placeholders):
        raise ModelError("cannot save this converted model: its input shapes are unknown")
    example = tuple(torch.randn(*((2,) + tuple(int(d) if isinstance(d, int) else 2 for d in s[1:])))
                    for s in shapes)
    with quiet():
        ep = export(converted, example, "the converted QAT model", dynamic_batch=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(path))
    return path
