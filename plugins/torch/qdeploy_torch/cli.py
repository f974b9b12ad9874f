"""``qdeploy qat``: quantization-aware fine-tuning from the command line.

    qdeploy qat mynet.py:build_model --input-shape 1x3x32x32 --spec spec.toml --train train.py:loop \\
        --calib calib.npz -o qat.pt2

``--train`` names ``file.py:function``; the function gets the prepared model (a
:class:`qdeploy_torch.qat.QATModel`) and trains it in place with the user's own loop, calling
``model.freeze_batchnorm()`` after a few epochs. The converted model is saved as a ``torch.export`` program
that ``qdeploy deploy qat.pt2 ...`` deploys with any backend (its learned scales become ONNX Q/DQ nodes).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_qat_command(subparsers: Any) -> None:
    p = subparsers.add_parser("qat", help="quantization-aware fine-tuning (torch backend)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the FP32 model: file.py:factory, package.module:attr or a .pt2")
    p.add_argument("--input-shape", required=True, help="input shape with the batch dimension, e.g. 1x3x32x32")
    p.add_argument("--spec", help="quantization spec (TOML/YAML/JSON); default: INT8 per-channel")
    p.add_argument("--train", required=True, help="training loop as file.py:function(model)")
    p.add_argument("--calib", help="data to initialise the quantization ranges (.npz, .npy or a folder)")
    p.add_argument("--learn-scales", action="store_true", help="learn activation scales (LSQ) instead of "
                   "observing them with a moving average")
    p.add_argument("-o", "--output", default="qat.pt2", help="the converted model (.pt2)")
    p.set_defaults(func=cmd_qat)


def cmd_qat(args: argparse.Namespace) -> int:
    from qdeploy.backend import load_torch_module, parse_input_shape
    from qdeploy.errors import ModelError
    from qdeploy.spec import load_spec

    from .qat import GUIDANCE, convert, prepare, save

    shape = parse_input_shape(args.input_shape)
    model = load_torch_module(args.model)
    train = _load_factory_fn(args.train)
    calib = _load_calib(args.calib) if args.calib else None
    print(GUIDANCE, file=sys.stderr)
    qat_model = prepare(model, load_spec(args.spec), input_shape=shape, calib=calib, learn_scales=args.learn_scales,
                        verbose=False)
    try:
        result = train(qat_model)
    except Exception as exc:
        raise ModelError(f"the training loop {args.train} raised {type(exc).__name__}: {exc}") from None
    if result is not None and result is not qat_model:
        qat_model = result
    path = save(convert(qat_model), args.output)
    print(f"wrote {path}: deploy it with `qdeploy deploy {path} --input-shape {args.input_shape} ...`")
    return 0


def _load_factory_fn(text: str) -> Any:
    import importlib.util

    from qdeploy.errors import ModelError

    target, _, attr = text.rpartition(":")
    if not target.endswith(".py") or not attr:
        raise ModelError(f"--train {text!r}: write the training loop as file.py:function")
    path = Path(target)
    if not path.is_file():
        raise ModelError(f"--train: {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"qdeploy_user_train_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelError(f"cannot import {path}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ModelError(f"--train: {path} has no function {attr!r}")
    return fn


def _load_calib(text: str) -> Any:
    import numpy as np

    from qdeploy.errors import DataError

    path = Path(text)
    if not path.exists():
        raise DataError(f"--calib {path} does not exist")
    if path.suffix == ".npz":
        arrays = {k: v for k, v in np.load(path).items() if k != "y"}
        if len(arrays) != 1:
            raise DataError(f"--calib {path}: holds {sorted(arrays)}; QAT takes one input array (labels under 'y')")
        return next(iter(arrays.values()))
    if path.suffix == ".npy":
        return np.load(path)
    raise DataError(f"--calib {path}: use a .npz or .npy file")
