"""PyTorch -> .tflite bytes with litert-torch, for each kind of artifact this backend builds.

``static``: PT2E full-integer INT8. litert-torch's ``PT2EQuantizer`` annotates the ops TFLite runs in INT8; its
activation observers are replaced by :class:`qdeploy observers <qdeploy.calibration.Observer>` (the spec's
method) fed with qdeploy's calibration batches; float layers get no annotation. ``dynamic``: the PT2E dynamic
recipe (INT8 weights, activations quantized per call by the kernels). ``fp16``: FP32 conversion, then float16
weights with ai-edge-quantizer's float casting. ``fp32``: plain conversion.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from qdeploy.backend import Plan
from qdeploy.errors import BackendError


def sample_inputs(plan: Plan, batch: int = 1) -> tuple[Any, ...]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn((batch,) + tuple(d or 1 for d in i.shape[1:]), generator=gen) for i in plan.model.inputs)


def convert(plan: Plan, kind: str) -> bytes:
    import litert_torch

    module = plan.model.torch_module.eval()
    sample = sample_inputs(plan)
    if kind == "fp32":
        return bytes(litert_torch.convert(module, sample).model_content())
    if kind == "fp16":
        return fp16_weights(bytes(litert_torch.convert(module, sample).model_content()))
    return _pt2e(plan, module, sample, dynamic=kind == "dynamic")


def fp16_weights(model: bytes) -> bytes:
    """Store the weights of every supported op as float16 (dequantized to float32 when the model loads)."""
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer

    qt = quantizer.Quantizer(bytearray(model))
    qt.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                              algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING)
    return bytes(qt.quantize().quantized_model)


def quantizer_for(plan: Plan, dynamic: bool) -> Any:
    """litert-torch's PT2E quantizer set up from the resolved spec and the float layers of the plan."""
    import torch
    from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    spec = plan.spec
    per_channel = spec.weights.granularity.type == "per_channel"
    config = get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=dynamic)
    if not dynamic:
        act = spec.activations
        qspec = QuantizationSpec(
            dtype=torch.int8, quant_min=-128, quant_max=127,
            qscheme=torch.per_tensor_symmetric if act.symmetric else torch.per_tensor_affine, is_dynamic=False,
            observer_or_fake_quant_ctr=observer_class().with_args(act=act, eps=2 ** -12))
        config = dataclasses.replace(config, input_activation=qspec, output_activation=qspec)
    quantizer = layer_quantizer_class()().set_global(config)
    quantizer.float_modules = tuple(plan.state["float_modules"])
    return quantizer


def _pt2e(plan: Plan, module: Any, sample: tuple[Any, ...], dynamic: bool) -> bytes:
    import litert_torch
    import torch
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = quantizer_for(plan, dynamic)
    batch = torch.export.Dim("batch")
    try:  # a dynamic batch lets calibration run whole batches
        two = tuple(torch.cat([s, s]) for s in sample)
        exported = torch.export.export(module, two, dynamic_shapes=tuple({0: batch} for _ in two)).module()
        per_sample = False
    except Exception:  # noqa: BLE001 - models with a fixed batch: calibrate one sample at a time
        exported = torch.export.export(module, sample).module()
        per_sample = True
    prepared = prepare_pt2e(exported, quantizer)
    names = [i.name for i in plan.model.inputs]
    if dynamic or plan.state.get("data") is None:
        with torch.no_grad():
            prepared(*sample)  # weight observers only
    else:
        from qdeploy.backend import calibrate_observers

        def batches() -> Any:
            for x, _ in plan.state["data"].batches():
                tensors = [torch.from_numpy(x[n]) for n in names]
                if per_sample:
                    yield from (tuple(t[i:i + 1] for t in tensors) for i in range(len(tensors[0])))
                else:
                    yield tuple(tensors)

        # the core's calibrated ranges wherever an observer's tensor is found in the reference
        _, report = calibrate_observers(prepared, batches(), names, plan.model.onnx_path,
                              plan.ranges.ranges if plan.ranges is not None else None)
        plan.state["ranges_report"] = report
    converted = convert_pt2e(prepared, fold_quantize=False)
    converted.training = False  # exported from the eval-mode module; the flag only drives a converter warning
    edge = litert_torch.convert(converted, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    return bytes(edge.model_content())


_QUANTIZER: Any = None
_OBSERVER: Any = None


def layer_quantizer_class() -> Any:
    """litert-torch's PT2EQuantizer that leaves the ops of ``float_modules`` (module paths) unannotated.

    Its own ``set_module_name`` refuses "no quantization" and its module filter does not parse the
    ``nn_module_stack`` keys torch 2.13 writes, so the filter here reads the module paths themselves."""
    global _QUANTIZER
    if _QUANTIZER is not None:
        return _QUANTIZER
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer
    from litert_torch.quantize.pt2e_quantizer_utils import propagate_annotation

    class LayerQuantizer(PT2EQuantizer):
        float_modules: tuple[str, ...] = ()

        def annotate(self, model: Any) -> Any:
            floats = self.float_modules

            def quantize_node(node: Any) -> bool:
                for path, _ in (node.meta.get("nn_module_stack") or {}).values():
                    path = str(path).removeprefix("L['self'].")
                    if any(path == m or path.startswith(m + ".") for m in floats):
                        return False
                return True

            config = self.global_config
            if config.input_activation is None:
                self._annotate_all_dynamic_patterns(model, config, quantize_node)
            else:
                _annotate_clamped_outputs(model, config, quantize_node)
                self._annotate_all_static_patterns(model, config, quantize_node)
                _annotate_adds(model, config, quantize_node)
            propagate_annotation(model)
            return model

    _QUANTIZER = LayerQuantizer
    return _QUANTIZER




TFLITE_CLAMPS = ((0.0, 6.0), (-1.0, 1.0))
"""The ``hardtanh`` bounds TFLite fuses into a convolution or fully connected op (RELU6, RELU_N1_TO_1)."""


def _annotate_clamped_outputs(model: Any, config: Any, quantize_node: Any) -> None:
    """Conv/Linear followed by ReLU6 (``hardtanh``, ``relu6``) as one quantized unit, as litert-torch already does for
    ReLU: no observer between the two, the output observed after the clamp. litert-torch alone shares one
    observer across the pair (``hardtanh`` is a shared-observer op), so the [0, 6] output gets the scale of the
    unclamped convolution's range. Measured on EfficientNet-Lite0 (ReLU6 after 33 convolutions), 64 real photo
    crops, full INT8 on LiteRT: cosine to FP32 0.886 shared, 0.993 fused; the converter fuses the pair into one
    INT8 op with a RELU6 activation either way."""
    import torch
    from litert_torch.quantize import pt2e_quantizer_utils as utils
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    producers = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default,
                 torch.ops.aten.linear.default)
    hardtanh = (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default)
    for clamp in model.graph.nodes:
        if clamp.op != "call_function" or clamp.target not in (*hardtanh, torch.ops.aten.relu6.default):
            continue
        bounds = tuple(float(b) for b in (list(clamp.args[1:3]) + [-1.0, 1.0][len(clamp.args) - 1:])) \
            if clamp.target in hardtanh else (0.0, 6.0)
        if bounds not in TFLITE_CLAMPS:
            continue  # a clamp TFLite has no fused activation for stays a shared-observer op
        layer = clamp.args[0]
        if not isinstance(layer, torch.fx.Node) or layer.target not in producers or len(layer.users) != 1:
            continue
        inputs = {layer.args[0]: utils.get_input_act_qspec(config), layer.args[1]: utils.get_weight_qspec(config)}
        partition = [clamp, layer, layer.args[1]]
        bias = layer.args[2] if len(layer.args) > 2 else None
        if isinstance(bias, torch.fx.Node):
            inputs[bias] = utils.get_bias_qspec(config)
            partition.append(bias)
        if utils._is_annotated(partition) or not all(quantize_node(n) for n in partition):
            continue
        layer.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=inputs, _annotated=True)
        clamp.meta["quantization_annotation"] = QuantizationAnnotation(
            output_qspec=utils.get_output_act_qspec(config), _annotated=True)
        utils._mark_nodes_as_annotated(partition)


def _annotate_adds(model: Any, config: Any, quantize_node: Any) -> None:
    """Every tensor + tensor ``add`` the source-partition annotator missed, as an INT8 add. litert-torch finds
    adds by ``source_fn_stack``, which ``torch.export`` leaves empty here: an add then became INT8 only when both
    inputs and its output happened to be quantized for their other readers, and a residual chain (a block's add
    reading the previous block's add) ran as float ADDs between DEQUANTIZE/QUANTIZE ops -- 7 of EfficientNet-
    Lite0's 9."""
    import torch
    from litert_torch.quantize import pt2e_quantizer_utils as utils
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor):
            continue
        inputs = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        if len(inputs) != 2 or utils._is_annotated([node]) or not quantize_node(node):
            continue
        if any(not (isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].is_floating_point())
               for a in inputs):
            continue
        node.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map={a: utils.get_input_act_qspec(config) for a in inputs},
            output_qspec=utils.get_output_act_qspec(config), _annotated=True)


def observer_class() -> Any:
    """A torchao observer whose range comes from a qdeploy observer (the spec's calibration method)."""
    global _OBSERVER
    if _OBSERVER is not None:
        return _OBSERVER
    import numpy as np
    import torch
    from torchao.quantization.pt2e.observer import MinMaxObserver

    from qdeploy.backend import make_observer

    class QDeployObserver(MinMaxObserver):
        """Feeds every observed batch to ``qdeploy.backend.make_observer(act)``; its ``(lo, hi)`` range
        becomes this observer's min/max, from which torchao computes scale and zero point."""

        def __init__(self, act: Any = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            if act is None:
                raise BackendError("QDeployObserver needs the spec's activation settings", "BUILD_FAILED")
            self.act = act
            self.observer = make_observer(act)

        def forward(self, x_orig: Any) -> Any:
            if x_orig.numel() == 0:
                return x_orig
            x = x_orig.detach().to(torch.float32).cpu().numpy()
            self.observer.update(np.asarray(x))
            lo, hi = self.observer.range()
            self.min_val = torch.tensor(float(lo))
            self.max_val = torch.tensor(float(hi))
            return x_orig

    _OBSERVER = QDeployObserver
    return _OBSERVER
