"""Quantization-aware training (qdeploy_torch.qat): the straight-through gradient, BatchNorm freezing, the
converted model's scales in ONNX Q/DQ form, the digits recovery acceptance, and the ``qdeploy qat`` command."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")
qat = pytest.importorskip("qdeploy_torch.qat")

import qdeploy  # noqa: E402
from qdeploy.errors import ModelError  # noqa: E402
from qdeploy.simulate import fake_quant  # noqa: E402
from qdeploy.spec import ActivationSpec, Budget, PerChannel, QuantSpec, WeightSpec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


class ConvBN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _input_fake_quant(model: qat.QATModel):
    """The fake quantizer on the model input (the first activation fake quantizer in graph order)."""
    from torchao.quantization.pt2e import FakeQuantizeBase

    gm = model.graph_module
    x = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.users)
    return next(getattr(gm, u.target) for u in x.users
                if u.op == "call_module" and isinstance(getattr(gm, u.target), FakeQuantizeBase))


def test_straight_through_gradient():
    """Forward = the spec's quantize-dequantize; backward = 1 inside the quantization range, 0 where it clips,
    checked element by element against the analytic STE and against a finite difference of the surrogate."""
    model = qat.prepare(ConvBN(), QuantSpec(activations=ActivationSpec(method="minmax")), input_shape=(4, 3, 6, 6),
                        calib=np.linspace(-1, 1, 4 * 3 * 36, dtype=np.float32).reshape(4, 3, 6, 6), verbose=False)
    model.freeze_observers()  # the range stays the calibrated one while we probe beyond it
    fq = _input_fake_quant(model)
    scale, zp = (t.detach() for t in fq.calculate_qparams())
    s, z = float(scale), int(zp)
    x = (torch.linspace(-2, 2, 401)).requires_grad_(True)  # beyond the calibrated [-1, 1] on both sides
    y = fq(x)
    expected = fake_quant(x.detach().numpy(), np.float32(s), np.float32(z), 0, 255)
    np.testing.assert_allclose(y.detach().numpy(), expected, atol=1e-6)
    y.sum().backward()
    # the STE passes the gradient where round(x / s) + z lies in [0, 255], i.e. x in [lo, hi] below, and blocks
    # it where the value clips; points within float rounding of the two edges are left out
    lo, hi = (0 - z - 0.5) * s, (255 - z + 0.5) * s
    xd = x.detach()
    eps = 1e-3
    away = ((xd - lo).abs() > 2 * eps) & ((xd - hi).abs() > 2 * eps)
    inside = ((xd >= lo) & (xd <= hi)).float()
    np.testing.assert_array_equal(x.grad[away].numpy(), inside[away].numpy())
    assert 0 < inside[away].sum() < int(away.sum())  # both cases were exercised
    # numerically: the STE is the derivative of the clipped identity clamp(x, lo, hi)
    fd = (torch.clamp(xd + eps, lo, hi) - torch.clamp(xd - eps, lo, hi)) / (2 * eps)
    np.testing.assert_allclose(x.grad[away].numpy(), fd[away].numpy(), atol=1e-3)


def test_weights_get_gradients_through_fake_quant():
    model = qat.prepare(ConvBN(), None, input_shape=(4, 3, 6, 6), verbose=False)
    out = model(torch.randn(4, 3, 6, 6))
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "weight" in n)


def test_freeze_batchnorm():
    model = qat.prepare(ConvBN(), None, input_shape=(4, 3, 6, 6), verbose=False)

    def running_mean():
        return next(b for n, b in model.named_buffers() if n.endswith("running_mean")).clone()

    before = running_mean()
    model.train()
    model(torch.randn(8, 3, 6, 6) + 3)
    moved = running_mean()
    assert not torch.allclose(before, moved)  # training updates BN statistics
    model.freeze_batchnorm()
    model(torch.randn(8, 3, 6, 6) - 5)
    assert torch.equal(moved, running_mean())  # frozen
    model.train()  # stays frozen across train()/eval() switches
    model(torch.randn(8, 3, 6, 6) - 5)
    assert torch.equal(moved, running_mean())


def test_learned_scales_are_parameters():
    model = qat.prepare(ConvBN(), None, input_shape=(4, 3, 6, 6), learn_scales=True, verbose=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("scale")]
    assert names
    model(torch.randn(4, 3, 6, 6)).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in names)


def test_bad_inputs():
    with pytest.raises(ModelError, match="takes a torch.nn.Module"):
        qat.prepare("model.onnx", None, input_shape=(1, 3))
    with pytest.raises(ModelError, match="needs example_inputs or input_shape"):
        qat.prepare(ConvBN(), None)
    with pytest.raises(ModelError, match="fails on example inputs"):
        qat.prepare(ConvBN(), None, input_shape=(1, 3, 9, 9))
    with pytest.raises(ModelError, match="takes the model qat.prepare returned"):
        qat.convert(ConvBN())
    with pytest.raises(ModelError, match="QAT trains static quantization"):
        qat.prepare(ConvBN(), {"activations": {"mode": "dynamic"}}, input_shape=(1, 3, 6, 6))


def test_converted_model_exports_learned_scales_as_qdq(tmp_path):
    """The converted model's scales and zero points are the QuantizeLinear/DequantizeLinear of its ONNX form."""
    import onnx
    from onnx import numpy_helper

    from qdeploy.model import load_model

    model = qat.prepare(ConvBN(), None, input_shape=(4, 3, 6, 6), verbose=False)
    model.eval()
    converted = qat.convert(model)
    handle = load_model(converted, tmp_path / "ref.onnx", (1, 3, 6, 6))
    proto = onnx.load(str(handle.onnx_path))
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    fq = _input_fake_quant(model)
    scale = float(fq.calculate_qparams()[0])
    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    q_first = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    assert float(consts[q_first.input[1]]) == pytest.approx(scale, rel=1e-6)


@pytest.mark.slow
def test_qat_recovers_ptq_loss_and_deploys_through_onnxruntime(tmp_path):
    """Acceptance. The sensitive digits model (an outlier channel after conv1) with a per-tensor activation
    range: PTQ loses points; 6 epochs (20% of the original 30) of QAT at 10% of the learning rate, with learned
    activation scales (LSQ), recover at least half of them; the QAT model deployed through ONNX Runtime keeps
    the torch artifact's accuracy within 0.5 point. With observed (min/max) scales and 5 epochs the recovery
    ranged from 0% to 78% over four trainings of the FP32 model; with learned scales, 64% to 95%."""
    import digits

    data = digits.prepare(tmp_path / "data")
    calib, val = data / "calib.npz", data / "val.npz"
    x, y, _, _ = digits.load_digits_split()
    spec = QuantSpec(weights=WeightSpec(bits=8, granularity=PerChannel()), activations=ActivationSpec(method="minmax"),
                     budget=Budget(metric="top1_accuracy", mode="relative", threshold=0.01))
    spec = spec.replace(fallback=spec.fallback.__class__(policy="auto", max_trials=0))  # PTQ as is, no promotion
    fp32 = digits.build_sensitive_model()
    ptq = qdeploy.deploy(fp32, target="x86-avx512-vnni", spec=spec, calib=calib, val=val, input_shape="1x1x8x8",
                         backends=["torch"], output=tmp_path / "ptq")
    fp32_acc = ptq.manifest["reference"]["metrics"]["top1_accuracy"]
    ptq_acc = ptq.manifest["artifacts"][0]["metrics"]["top1_accuracy"]

    torch.manual_seed(0)
    model = qat.prepare(digits.build_sensitive_model(), spec, input_shape=(1, 1, 8, 8), calib=x[:300], verbose=False,
                        learn_scales=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)  # 10% of the 3e-3 the model was trained with
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):  # 6 of the original 30 epochs
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    qat_bundle = qdeploy.deploy(qat.convert(model), target="x86-avx512-vnni", spec=spec, calib=calib, val=val,
                                input_shape="1x1x8x8", backends=["torch", "onnxruntime"], output=tmp_path / "qat")
    arts = {a["backend"]: a for a in qat_bundle.manifest["artifacts"]}
    assert arts["onnxruntime"]["meta"]["format"] == "qdq-prequantized"
    assert arts["torch"]["meta"]["path"] == "prequantized"
    torch_acc = arts["torch"]["metrics"]["top1_accuracy"]
    ort_acc = arts["onnxruntime"]["metrics"]["top1_accuracy"]
    print(f"FP32 {fp32_acc:.4f}  PTQ {ptq_acc:.4f}  QAT torch {torch_acc:.4f}  QAT onnxruntime {ort_acc:.4f}")
    lost = fp32_acc - ptq_acc
    assert lost >= 0.01, "the aggressive spec should cost PTQ at least a point"
    assert torch_acc - ptq_acc >= lost / 2 - 1e-9  # at least half (exactly half counts: 3 of 6 images)
    assert abs(ort_acc - torch_acc) <= 0.005


@pytest.mark.slow
def test_qat_command(tmp_path):
    """``qdeploy qat`` writes a .pt2 that ``deploy`` takes like any model."""
    import digits

    data = digits.prepare(tmp_path / "data")
    train = tmp_path / "train.py"
    train.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT / 'examples')!r})\n"
        "import digits\n"
        "def loop(model):\n"
        "    x, y, _, _ = digits.load_digits_split()\n"
        "    opt = torch.optim.Adam(model.parameters(), lr=3e-4)\n"
        "    for idx in torch.arange(len(x)).split(64):\n"
        "        opt.zero_grad()\n"
        "        torch.nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])).backward()\n"
        "        opt.step()\n"
        "    model.freeze_batchnorm()\n")
    out = tmp_path / "qat.pt2"
    qdeploy_bin = Path(sys.executable).parent / "qdeploy"
    res = subprocess.run([str(qdeploy_bin), "qat", f"{ROOT / 'examples' / 'digits.py'}:build_model", "--input-shape",
                          "1x1x8x8", "--train", f"{train}:loop", "--calib", str(data / "calib.npz"), "-o", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1-10% of the original learning rate" in res.stderr and out.is_file()
    b = qdeploy.deploy(out, target="x86-avx512-vnni", calib=data / "calib.npz", val=data / "val.npz",
                       spec={"budget": {"metric": "top1_accuracy", "mode": "relative", "threshold": 0.01}},
                       input_shape="1x1x8x8", backends=["onnxruntime"], output=tmp_path / "b")
    art = b.manifest["artifacts"][0]
    assert art["meta"]["format"] == "qdq-prequantized" and art["metrics"]["top1_accuracy"] > 0.95


def test_cli_bad_train_argument(tmp_path):
    qdeploy_bin = Path(sys.executable).parent / "qdeploy"
    res = subprocess.run([str(qdeploy_bin), "qat", f"{ROOT / 'examples' / 'digits.py'}:build_model", "--input-shape",
                          "1x1x8x8", "--train", "nothere.py:loop"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "nothere.py does not exist" in res.stderr
    assert "Traceback" not in res.stderr
