"""From the neutral spec to PyTorch quantization: observers, quantizer configs, and the export helpers.

Calibration method -> observer (the spec's method is always honoured, never swapped for another):

============== =======================================================================================
spec method    observer
============== =======================================================================================
minmax         ``MinMaxObserver`` (torchao PT2E / ``torch.ao`` for FX)
moving_average ``MovingAverageMinMaxObserver`` with ``averaging_constant = 1 - momentum`` (the core's
               ``r = momentum * r + (1 - momentum) * batch``)
mse            ``HistogramObserver``: searches the clipping range that minimises the L2 quantization
               error over a running histogram, which is the MSE criterion
percentile     the core's :class:`qdeploy.calibration.PercentileObserver`, wrapped as a torch observer
entropy        the core's :class:`qdeploy.calibration.EntropyObserver` (KL threshold), wrapped
============== =======================================================================================

Weights: ``bits`` b gives the signed range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` for symmetric weights (the
restricted range of the spec's reference numerics, :func:`qdeploy.simulate.qparams`), stored as int8, so the
int8 kernels run any 2-8 bit spec. Per-tensor weights are expressed as per-channel scales that are all equal
(the same numbers, and the kernels' fast per-channel path). Asymmetric weights are refused
(``GRANULARITY_UNSUPPORTED``): the oneDNN/fbgemm/qnnpack INT8 kernels take weight zero point 0.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from qdeploy.errors import BackendError

# The x86 engine runs PT2E + Inductor (oneDNN INT8 kernels); the others run FX graph mode on torch's
# quantized engines, saved as TorchScript.
ENGINES = ("x86", "onednn", "fbgemm", "qnnpack")
PT2E_ENGINES = ("x86",)


def weight_range(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def check_weights(spec: Any) -> None:
    if not spec.weights.symmetric:
        raise BackendError("asymmetric INT8 weights: the torch INT8 kernels (oneDNN, fbgemm, qnnpack) take weight "
                           "zero point 0; use symmetric weights or another backend", "GRANULARITY_UNSUPPORTED")


def _core_observer_class(base: type[Any]) -> type[Any]:
    """A torch observer (subclass of ``base``, a MinMaxObserver) whose range comes from one of the core's
    observers, so qdeploy's percentile/entropy calibration runs unchanged inside PT2E or FX."""

    class CoreRangeObserver(base):
        def __init__(self, method: str = "percentile", percentile: float = 99.99, momentum: float = 0.9,
                     **kwargs: Any) -> None:
            super().__init__(**kwargs)
            from qdeploy.backend import make_observer
            from qdeploy.spec import ActivationSpec

            self.core = make_observer(ActivationSpec(method=method, percentile=percentile, momentum=momentum))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.numel() == 0:
                return x
            self.core.update(x.detach().float().cpu().numpy())
            lo, hi = self.core.range()
            self.min_val.copy_(torch.tensor(lo))
            self.max_val.copy_(torch.tensor(hi))
            return x

    CoreRangeObserver.__name__ = f"CoreRange{base.__name__}"
    return CoreRangeObserver


def _uniform_per_channel_class(base: type[Any]) -> type[Any]:
    """Per-tensor weight numerics on the per-channel kernels: every channel gets the whole tensor's range."""

    class UniformPerChannelObserver(base):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            self.min_val.copy_(torch.full_like(self.min_val, float(self.min_val.min())))
            self.max_val.copy_(torch.full_like(self.max_val, float(self.max_val.max())))
            return out

    return UniformPerChannelObserver


def observers(flavour: str) -> Any:
    """The observer module of ``flavour``: ``"pt2e"`` (torchao) or ``"fx"`` (torch.ao)."""
    if flavour == "pt2e":
        from torchao.quantization.pt2e import observer as obs
    else:
        from torch.ao.quantization import observer as obs
    return obs


def activation_observer(act: Any, flavour: str) -> tuple[type[Any], dict[str, Any]]:
    """(observer class, its arguments) for the spec's calibration method (flat: torchao inspects the class)."""
    obs = observers(flavour)
    if act.method == "minmax":
        return obs.MinMaxObserver, {}
    if act.method == "moving_average":
        return obs.MovingAverageMinMaxObserver, {"averaging_constant": 1.0 - act.momentum}
    if act.method == "mse":
        return obs.HistogramObserver, {}
    if act.method in ("percentile", "entropy"):
        return _core_observer_class(obs.MinMaxObserver), {"method": act.method, "percentile": act.percentile,
                                                           "momentum": act.momentum}
    raise BackendError(f"calibration method {act.method!r} has no torch observer", "BUILD_FAILED")


def weight_observer(w: Any, flavour: str, moving: bool = False) -> type[Any]:
    obs = observers(flavour)
    per_channel = obs.MovingAveragePerChannelMinMaxObserver if moving else obs.PerChannelMinMaxObserver
    if w.granularity.type == "per_tensor":
        return _uniform_per_channel_class(per_channel)
    return per_channel


def activation_qrange(target: Any) -> tuple[int, int]:
    if target.activation_dtype not in ("uint8", ""):
        raise BackendError(f"{target.activation_dtype} activations: the torch INT8 kernels take uint8 activations",
                           "PRECISION_UNSUPPORTED")
    return 0, 127 if target.option("reduce_range", False) else 255


def pt2e_config(spec: Any, target: Any, is_qat: bool = False, learn_scales: bool = False) -> Any:
    """A torchao ``QuantizationConfig`` for the X86InductorQuantizer that says what the spec says.

    QAT: activations fake-quantized with a moving-average min/max observer (``minmax`` keeps plain min/max),
    or learned (LSQ) with ``learn_scales``; weights with a per-channel moving-average observer."""
    from torchao.quantization.pt2e import FakeQuantize, LearnableFakeQuantize
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec

    check_weights(spec)
    act, w = spec.activations, spec.weights
    qmin, qmax = activation_qrange(target)
    eps = {"eps": 2 ** -12}
    if is_qat:
        obs = observers("pt2e")
        a_obs = obs.MinMaxObserver if act.method == "minmax" else \
            obs.MovingAverageMinMaxObserver.with_args(averaging_constant=1.0 - act.momentum)
        a_ctr = (LearnableFakeQuantize if learn_scales else FakeQuantize).with_args(observer=a_obs, **eps)
        w_ctr = FakeQuantize.with_args(observer=weight_observer(w, "pt2e", moving=True), **eps)
    else:
        a_cls, a_kw = activation_observer(act, "pt2e")
        a_ctr = a_cls.with_args(**a_kw, **eps)
        w_ctr = weight_observer(w, "pt2e").with_args(**eps)
    a_qscheme = torch.per_tensor_symmetric if act.symmetric else torch.per_tensor_affine
    act_spec = QuantizationSpec(dtype=torch.uint8, quant_min=qmin, quant_max=qmax, qscheme=a_qscheme,
                                is_dynamic=False, observer_or_fake_quant_ctr=a_ctr)
    wmin, wmax = weight_range(w.bits, True)
    w_spec = QuantizationSpec(dtype=torch.int8, quant_min=wmin, quant_max=wmax, qscheme=torch.per_channel_symmetric,
                              ch_axis=0, is_dynamic=False, observer_or_fake_quant_ctr=w_ctr)
    return QuantizationConfig(act_spec, act_spec, w_spec, None, is_qat)


def fx_qconfig(spec: Any, target: Any) -> Any:
    """A ``torch.ao.quantization.QConfig`` for FX graph mode on fbgemm/onednn/qnnpack."""
    from torch.ao.quantization import QConfig

    check_weights(spec)
    act, w = spec.activations, spec.weights
    qmin, qmax = activation_qrange(target)
    wmin, wmax = weight_range(w.bits, True)
    a_qscheme = torch.per_tensor_symmetric if act.symmetric else torch.per_tensor_affine
    a_cls, a_kw = activation_observer(act, "fx")
    return QConfig(
        activation=a_cls.with_args(**a_kw, dtype=torch.quint8, qscheme=a_qscheme, quant_min=qmin, quant_max=qmax),
        weight=weight_observer(w, "fx").with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                  quant_min=wmin, quant_max=wmax))


# --- export --------------------------------------------------------------------------------------------------
def module_names(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return dict(module.named_modules())


def torch_layer(name: str, modules: dict[str, torch.nn.Module]) -> str | None:
    """The module path of a layer-map name (``conv1``, ``conv1#2`` for its second call), or None."""
    base = name.split("#", 1)[0]
    return base if base in modules and base else None


def tag_module_calls(gm: torch.fx.GraphModule, root: torch.nn.Module) -> None:
    """Give every call of a leaf module its own partition.

    Non-strict ``torch.export`` records only the module path of each node, so three calls of one shared
    ``nn.ReLU`` look like one partition with three outputs and the PT2E quantizers reject the model. Each
    run of consecutive nodes from the same module becomes one call, tagged like strict export would.
    """
    modules = module_names(root)
    counts: dict[str, int] = {}
    prev = None
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.meta.get("source_fn_stack"):
            prev = None
            continue
        stack = node.meta.get("nn_module_stack")
        if not stack:
            prev = None
            continue
        fqn, _ = list(stack.values())[-1]
        mod = modules.get(fqn)
        if mod is None or fqn == "":
            prev = None
            continue
        if fqn != prev:
            counts[fqn] = counts.get(fqn, -1) + 1
        prev = fqn
        tag = fqn.replace(".", "_") + (f"_{counts[fqn]}" if counts[fqn] else "")
        node.meta["source_fn_stack"] = [(tag, _matched_type(node, mod))]


_LAYER_OPS = {"aten.conv1d.default": torch.nn.Conv1d, "aten.conv2d.default": torch.nn.Conv2d,
              "aten.conv3d.default": torch.nn.Conv3d, "aten.linear.default": torch.nn.Linear}


def _matched_type(node: torch.fx.Node, mod: torch.nn.Module) -> type:
    """The type a quantizer matches a node's partition by: a subclass of ``nn.Conv2d``/``nn.Linear`` (e.g. a
    same-padding convolution) counts as the class itself for its convolution/linear node, which the quantizers
    look up by exact type (EfficientNet-Lite0's 49 convolutions were left float by the x86 quantizer); its
    other nodes keep the subclass, so they never join that partition."""
    base = _LAYER_OPS.get(str(node.target))
    return base if base is not None and isinstance(mod, base) else type(mod)


def export(module: torch.nn.Module, example: tuple[torch.Tensor, ...], what: str, dynamic_batch: bool = False) -> Any:
    """``torch.export`` with a clear error (the model's own message) when the module cannot be exported."""
    shapes = tuple({0: torch.export.Dim.AUTO} for _ in example) if dynamic_batch else None
    try:
        return torch.export.export(module, example, dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"torch.export cannot capture {what}: {type(exc).__name__}: {first}",
                           "OP_UNSUPPORTED") from None


def export_for_quantization(module: torch.nn.Module, example: tuple[torch.Tensor, ...], what: str) -> Any:
    gm = export(module, example, what, dynamic_batch=True).module()  # calibration batches vary in size
    tag_module_calls(gm, module)
    return gm


class Cast(torch.nn.Module):
    """Runs ``inner`` in ``dtype`` (fp16/bf16) inside an FP32 model: casts in, computes, casts back."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = copy.deepcopy(inner).to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).to(torch.float32)


FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def fold_functional_batchnorm(module: torch.nn.Module) -> int:
    """Fold each BatchNorm that follows a convolution FX traces as a function call (a ``Conv2d`` subclass that
    pads in its own ``forward``, as TF-ported models do) into that convolution's weight and bias, in place, and
    replace the BatchNorm by ``Identity``. FX fuses Conv+BN only for plain ``Conv2d`` modules; left apart, the
    convolution's output is quantized per tensor *before* BatchNorm rescales each channel, and INT8 runs an
    unfused ``quantized::batch_norm2d``. Returns the number folded."""
    import torch.nn.functional as F
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - FX cannot trace it: prepare_fx will say so
        return 0
    modules = dict(module.named_modules())
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), torch.nn.BatchNorm2d):
            continue
        conv = node.args[0]
        if not (isinstance(conv, torch.fx.Node) and conv.op == "call_function" and conv.target is F.conv2d
                and len(conv.users) == 1 and isinstance(conv.args[1], torch.fx.Node) and conv.args[1].op == "get_attr"):
            continue
        path, _, attr = str(conv.args[1].target).rpartition(".")
        owner = modules.get(path)
        bias = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
        if not isinstance(owner, torch.nn.Conv2d) or attr != "weight" or not (
                bias is None or (isinstance(bias, torch.fx.Node) and bias.target == f"{path}.bias")):
            continue
        bn = modules[node.target]
        if bn.training or not bn.track_running_stats or bn.running_mean is None:
            continue
        w, b = fuse_conv_bn_weights(owner.weight, owner.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                    bn.bias)
        owner.weight, owner.bias = w, b
        parent, _, name = str(node.target).rpartition(".")
        setattr(modules[parent] if parent else module, name, torch.nn.Identity())
        folded += 1
    return folded


RANGE_KEEPING_MODULES = (torch.nn.AdaptiveAvgPool2d, torch.nn.AvgPool2d, torch.nn.MaxPool2d, torch.nn.Flatten,
                         torch.nn.Dropout, torch.nn.Identity)
"""Modules whose output lies within their input's range: an observer they share may see the clamped range."""


def observe_after_clamps(prepared: torch.fx.GraphModule) -> int:
    """Where a ReLU6/hardtanh follows a quantized op's output observer, that observer sees the clamped values:
    the INT8 output then spans [0, 6] (the quantizer's saturation does the clamp) instead of sharing the
    unclamped range, as onnxruntime folds Clip into its Q/DQ pair. FX alone shares one observer across the clamp,
    so a ReLU6 after a convolution with outputs in +-30 kept a few dozen levels of its [0, 6]. Returns the
    number of observers changed."""
    import torch.nn.functional as F
    from torch.ao.quantization import ObserverBase

    def module(target: Any) -> Any:  # get_submodule: named_modules() lists an observer shared by two names once
        try:
            return prepared.get_submodule(str(target))
        except AttributeError:
            return None

    uses: dict[int, set[str]] = {}  # observer instance -> the names it is called under
    for n in prepared.graph.nodes:
        if n.op == "call_module":
            uses.setdefault(id(module(n.target)), set()).add(n.target)
    changed = 0
    for node in prepared.graph.nodes:
        if node.op == "call_function" and node.target is F.relu6:
            lo, hi = 0.0, 6.0
        elif node.op == "call_function" and node.target is F.hardtanh:
            lo, hi = (list(node.args[1:3]) + [node.kwargs.get("min_val", -1.0), node.kwargs.get("max_val", 1.0)]
                      [len(node.args) - 1:])[:2]
        elif node.op == "call_module" and isinstance(module(node.target), torch.nn.Hardtanh):
            lo, hi = module(node.target).min_val, module(node.target).max_val  # ReLU6 is a Hardtanh(0, 6)
        else:
            continue
        # back through the observers and Identity (a folded BatchNorm) between the clamp and the op before it
        chain, prev = [], node.args[0]
        while isinstance(prev, torch.fx.Node) and prev.op == "call_module" and len(prev.users) == 1 and \
                isinstance(module(prev.target), (ObserverBase, torch.nn.Identity)):
            chain.append(prev)
            prev = prev.args[0]
        # ... and the observers after it, through ops that keep values within the bounds (pools, flatten): often
        # the same instance, shared
        names = {n.target for n in chain}
        todo = list(node.users)
        while todo:
            u = todo.pop()
            if u.op == "call_module" and isinstance(module(u.target), (ObserverBase,) + RANGE_KEEPING_MODULES):
                names.add(u.target)
                todo.extend(u.users)
            elif u.op == "call_function" and u.target in (torch.flatten, torch.Tensor.view, torch.Tensor.reshape):
                todo.extend(u.users)
            elif u.op == "call_method" and u.target in ("flatten", "view", "reshape", "squeeze"):
                todo.extend(u.users)
        for obs in {id(module(n.target)): module(n.target) for n in chain}.values():
            if isinstance(obs, ObserverBase) and not getattr(obs, "qdeploy_clamp", None) and \
                    uses[id(obs)] <= names:  # an observer shared with a tensor outside the chain is left alone
                observe = obs.forward

                def clamped(x: torch.Tensor, observe: Any = observe, lo: float = float(lo),
                            hi: float = float(hi)) -> Any:
                    observe(x.clamp(lo, hi))
                    return x

                # an instance attribute: the module call (and convert_fx's qparams) stay the observer's own
                object.__setattr__(obs, "forward", clamped)
                object.__setattr__(obs, "qdeploy_clamp", (float(lo), float(hi)))
                changed += 1
    return changed


def with_float_layers(module: torch.nn.Module, layers: dict[str, str]) -> torch.nn.Module:
    """A copy of ``module`` whose ``layers`` (module path -> fp16/bf16) run in that precision."""
    out = copy.deepcopy(module)
    for path, prec in layers.items():
        parent_path, _, attr = path.rpartition(".")
        parent = out.get_submodule(parent_path) if parent_path else out
        setattr(parent, attr, Cast(getattr(parent, attr), FLOAT_DTYPES[prec]))
    return out


def is_prequantized(module: Any) -> bool:
    """True for a module that already carries its quantization (a converted QAT/PT2E graph)."""
    if getattr(module, "_qdeploy_prequantized", False):
        return True
    graph = getattr(module, "graph", None)
    if graph is None:
        return False
    return any(n.op == "call_function" and "quantized_decomposed" in str(n.target) for n in graph.nodes)
