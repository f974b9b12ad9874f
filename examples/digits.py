"""The built-in example: a small CNN on scikit-learn's 1,797 handwritten 8x8 digits (shipped with
scikit-learn, no download), trained in seconds and cached, with a fixed train/validation split.

    python examples/digits.py prepare build/digits     # writes calib.npz and val.npz (labels under 'y')
    qdeploy deploy examples/digits.py:build_model --input-shape 1x1x8x8 --calib build/digits/calib.npz \
        --val build/digits/val.npz -o build/demo

``build_sensitive_model`` is the same network with one channel of the first layer's output scaled by 256
(and the next layer's weights by 1/256): the same function in FP32, but a per-tensor INT8 range that crushes
the other channels, which is what the fallback loop is for.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

SEED = 0
N_TRAIN = 1200
CACHE = Path(os.environ.get("QDEPLOY_CACHE", Path(__file__).resolve().parent.parent / "build" / "cache"))


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): images scaled to [0, 1], shape N x 1 x 8 x 8, fixed split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(SEED).permutation(len(x))
    tr, va = idx[:N_TRAIN], idx[N_TRAIN:]
    return x[tr], y[tr], x[va], y[va]


def _net():
    import torch.nn as nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
            self.fc1 = nn.Linear(32 * 4 * 4, 64)
            self.fc2 = nn.Linear(64, 10)
            self.relu = nn.ReLU()

        def forward(self, x):
            x = self.relu(self.conv1(x))
            x = self.pool(self.relu(self.conv2(x)))
            x = self.relu(self.conv3(x))
            x = self.relu(self.fc1(x.flatten(1)))
            return self.fc2(x)

    return DigitsCNN()


def build_model():
    """The trained DigitsCNN (trained once, about 4 s, then loaded from the cache)."""
    import torch

    path = CACHE / "digits_cnn.pt"
    if path.is_file():
        model = _net()
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    # reproducible: the weights are initialised from the seed too, on one thread with deterministic kernels,
    # so the same torch on the same kind of CPU trains the same model (CI included)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(SEED)
        model = _net()
        x, y, _, _ = load_digits_split()
        fit(model, x, y, epochs=30, lr=3e-3, seed=SEED)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model


def fit(model, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int = 0, batch: int = 64):
    """Train a classifier with Adam and cross-entropy, shuffling with its own seeded generator; returns it in
    eval mode. The examples and the benchmarks train their models with it."""
    import torch

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(batch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def build_sensitive_model(factor: float = 256.0):
    """Functionally the same network, with an outlier channel that per-tensor INT8 cannot represent."""
    import torch

    model = build_model()
    with torch.no_grad():
        model.conv1.weight[0] *= factor
        model.conv1.bias[0] *= factor
        model.conv2.weight[:, 0] /= factor
    return model


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def prepare(out: str | Path) -> Path:
    """Write ``calib.npz`` (the training split; qdeploy draws its balanced calibration set from it) and
    ``val.npz`` (the held-out split) with labels under ``y``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x, y, xv, yv = load_digits_split()
    np.savez(out / "calib.npz", input=x, y=y)
    np.savez(out / "val.npz", input=xv, y=yv)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "prepare":
        sys.exit("usage: python examples/digits.py prepare OUT_DIR")
    path = prepare(sys.argv[2])
    m = build_model()
    _, _, xv, yv = load_digits_split()
    print(f"wrote {path}/calib.npz and {path}/val.npz; FP32 validation top-1 = {accuracy(m, xv, yv):.4f}")
