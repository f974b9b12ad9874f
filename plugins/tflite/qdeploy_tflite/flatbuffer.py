"""Small edits and queries on a .tflite flatbuffer (LiteRT's own schema and object API).

:func:`float_io` gives a full-integer model float input and output: a QUANTIZE op in front of every INT8
input and a DEQUANTIZE op after every INT8 output, with the model's own scales (what the TFLite converter
does for ``inference_input_type=float32``). :func:`describe` lists the model's inputs, outputs and ops with
their dtypes and quantization, for the manifest and the full-integer check.
"""
from __future__ import annotations

from typing import Any

_INT_TYPES = ("INT8", "UINT8", "INT16")


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated as schema
    return schema


def read(data: bytes) -> Any:
    from ai_edge_litert.tools import flatbuffer_utils
    return flatbuffer_utils.convert_bytearray_to_object(bytearray(data))


def write(model: Any) -> bytes:
    from ai_edge_litert.tools import flatbuffer_utils
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _type_names() -> dict[int, str]:
    tt = _schema().TensorType
    return {v: k for k, v in vars(tt).items() if not k.startswith("_") and isinstance(v, int)}


def _opcode(model: Any, builtin: int, version: int) -> int:
    from ai_edge_litert.tools import flatbuffer_utils
    for i, oc in enumerate(model.operatorCodes):
        if flatbuffer_utils.get_builtin_code_from_operator_code(oc) == builtin:
            oc.version = max(oc.version, version)
            return i
    oc = _schema().OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = builtin, min(builtin, 127), version
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def _float_twin(sg: Any, idx: int) -> int:
    schema = _schema()
    old = sg.tensors[idx]
    new = schema.TensorT()
    new.shape, new.shapeSignature = old.shape, old.shapeSignature
    new.type, new.buffer, new.name = schema.TensorType.FLOAT32, 0, old.name
    old.name = (old.name.decode() if isinstance(old.name, bytes) else old.name) + "_int8"
    sg.tensors.append(new)
    return len(sg.tensors) - 1


def float_io(model: Any) -> None:
    """Give every INT8 model input and output of the main subgraph a float twin joined by (DE)QUANTIZE."""
    schema = _schema()
    sg = model.subgraphs[0]
    types = _type_names()
    remap: dict[int, int] = {}
    for pos, idx in enumerate(list(sg.inputs)):
        if types.get(sg.tensors[idx].type) in _INT_TYPES:
            new = _float_twin(sg, idx)
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = _opcode(model, schema.BuiltinOperator.QUANTIZE, 2), [new], [idx]
            sg.operators.insert(0, op)
            sg.inputs[pos] = remap[idx] = new
    for pos, idx in enumerate(list(sg.outputs)):
        if types.get(sg.tensors[idx].type) in _INT_TYPES:
            new = _float_twin(sg, idx)
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = _opcode(model, schema.BuiltinOperator.DEQUANTIZE, 2), [idx], [new]
            sg.operators.append(op)
            sg.outputs[pos] = remap[idx] = new
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex not in (0, None):
            continue
        for tm in list(sig.inputs or []) + list(sig.outputs or []):
            tm.tensorIndex = remap.get(tm.tensorIndex, tm.tensorIndex)


def describe(model: Any) -> dict[str, Any]:
    """Inputs, outputs (name, dtype, shape, scale, zero point) and ops (name, float or not) of subgraph 0."""
    from ai_edge_litert.tools import flatbuffer_utils

    sg = model.subgraphs[0]
    types = _type_names()
    ops_by_code = {v: k for k, v in vars(_schema().BuiltinOperator).items() if isinstance(v, int)}

    def tensor(idx: int) -> dict[str, Any]:
        t = sg.tensors[idx]
        q = t.quantization
        name = t.name.decode() if isinstance(t.name, bytes) else t.name
        out = {"name": name, "dtype": types.get(t.type, str(t.type)).lower(), "shape": [int(s) for s in t.shape]}
        if q is not None and q.scale is not None and len(q.scale):
            out["scale"] = float(q.scale[0])
            out["zero_point"] = int(q.zeroPoint[0]) if q.zeroPoint is not None and len(q.zeroPoint) else 0
        return out

    ops = []
    for op in sg.operators:
        code = flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])
        outs = [tensor(i)["dtype"] for i in (op.outputs if op.outputs is not None else []) if i >= 0]
        ops.append({"name": ops_by_code.get(code, str(code)), "float": any(d.startswith("float") for d in outs)})
    return {"inputs": [tensor(i) for i in sg.inputs], "outputs": [tensor(i) for i in sg.outputs], "ops": ops}
