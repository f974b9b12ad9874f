"""A zoo of real public models with real data, for the test suite and the benchmarks. Nothing downloads:
the pretrained models ship inside PyPI packages (see requirements-nodeps.txt), the data are real images and
text that ship with scikit-image and CPython, text rendered with Pillow's embedded font, or synthesized audio;
the one model trained here (a small BERT sentence encoder) is trained on CPython's own documentation and cached.

    python examples/zoo.py list
    python examples/zoo.py prepare ppocr-det build/zoo/ppocr-det 64 32   # calib.npz, val.npz (no labels)
    python examples/zoo.py check ppocr-det build/zoo/ppocr-det           # FP32 outputs on val.npz, one thread

Each entry carries a trap (its ``description``): an old opset, weights held in Constant nodes, zero-size
Resize Constants, a recurrent layer, a model that is already INT8, the same model as ONNX and TFLite, or the
-inf arithmetic of an sdpa attention mask. Arrays are keyed by the model's ONNX input names.
"""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("QDEPLOY_CACHE", HERE.parent / "build" / "cache"))
PPOCR_MEAN = PPOCR_STD = 0.5     # rapidocr's Det/Cls/Rec preprocessing: (x / 255 - 0.5) / 0.5 on BGR images
DET_SIZE, CLS_SHAPE, REC_SHAPE = 256, (48, 192), (48, 320)
DDDD_SHAPE = (64, 192)           # ddddocr: height 64, grayscale, x / 255; the width is ours (3:1 captchas)
AUDIO_RATE, AUDIO_SAMPLES = 22050, 43844  # basic-pitch's fixed window: 43844 samples (~1.99 s) at 22.05 kHz
BERT_VERSION, BERT_LEN = "v1", 64


@dataclass(frozen=True)
class ZooModel:
    name: str
    fmt: str                                    # "onnx" | "torch" | "tflite"
    description: str                            # what it is and the trap it carries
    metric: str                                 # "cosine" or "top1_agreement"
    input_shape: str | None                     # "1x3x224x224" for torch factories, None otherwise
    model_path: Callable[[], str]               # .onnx / .tflite path, or "file.py:factory"
    prepare: Callable[[Path, int, int], Path]   # writes out_dir/calib.npz and out_dir/val.npz
    already_quantized: bool = False


def _pkg_file(package: str, relative: str) -> str:
    """A file shipped inside an installed package (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: pip install --no-deps -r requirements-nodeps.txt")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r}")
    return str(path)


# --- real text and text images --------------------------------------------------------------------------
@lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
    """English paragraphs of CPython's documentation (``pydoc_data.topics``), whitespace-normalised, in a fixed
    order; paragraphs with fewer than 6 words (headings, code fragments) are dropped."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            words = para.split()
            if len(words) >= 6:
                out.append(" ".join(words))
    return tuple(out)


def _split_paragraphs(val: bool) -> tuple[str, ...]:
    """Calibration takes the even paragraphs, validation the odd ones: disjoint text."""
    return paragraphs()[int(val)::2]


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's embedded TrueType font: the same glyphs on every machine


def _snippet(rng: np.random.Generator, texts: tuple[str, ...], lo: int, hi: int) -> str:
    """A run of real words with ``lo``..``hi`` characters (or fewer, if the paragraph is short)."""
    words = texts[rng.integers(len(texts))].split()
    start, out = int(rng.integers(len(words))), ""
    target = int(rng.integers(lo, hi + 1))
    for w in words[start:] + words[:start]:
        if len(out) + len(w) + 1 > target and out:
            break
        out = f"{out} {w}".strip()
    return out[:hi]


def _rgb(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(lo, hi, 3))
    return r, g, b


def _colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(ink, paper): mostly dark on light, sometimes light on dark, with a random tint."""
    dark, light = _rgb(rng, 0, 90), _rgb(rng, 170, 256)
    return (light, dark) if rng.random() < 0.2 else (dark, light)


@lru_cache(maxsize=1)
def _scan_lines() -> tuple[np.ndarray, ...]:
    """The text lines of scikit-image's scanned page (``data.page()``), found by row projection, as RGB."""
    import skimage.data
    from skimage.filters import threshold_sauvola

    page = skimage.data.page()
    ink = (page < threshold_sauvola(page, window_size=25)).mean(1) > 0.05
    lines, start = [], None
    for y, on in enumerate(np.append(ink, False)):
        if on and start is None:
            start = y
        elif not on and start is not None:
            if y - start >= 8:
                lines.append(np.repeat(page[max(0, start - 2):y + 2, :, None], 3, axis=2))
            start = None
    return tuple(lines)


def _line_image(rng: np.random.Generator, texts: tuple[str, ...], lo: int, hi: int) -> np.ndarray:
    """A text line, HxWx3 uint8: a quarter are windows of the real scanned page, the rest real text rendered
    tightly (as a detector would crop it), some blurred, with pixel noise."""
    from PIL import Image, ImageDraw, ImageFilter

    if rng.random() < 0.25:
        line = _scan_lines()[rng.integers(len(_scan_lines()))]
        width = int(min(line.shape[1], line.shape[0] * rng.uniform(3, 8)))
        x = int(rng.integers(0, line.shape[1] - width + 1))
        return line[:, x:x + width]
    text, font, (ink, paper) = _snippet(rng, texts, lo, hi), _font(int(rng.integers(18, 40))), _colours(rng)
    x0, y0, x1, y1 = font.getbbox(text)
    pad = int(rng.integers(2, 12))
    img = Image.new("RGB", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), paper)
    ImageDraw.Draw(img).text((pad - x0, pad - y0), text, font=font, fill=ink)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    arr = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(0, 8), (img.height, img.width, 1))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _ppocr_line(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """rapidocr's cls/rec ``resize_norm_img``: keep the aspect ratio at ``height`` (squeezed if wider than
    ``width``), BGR, (x / 255 - 0.5) / 0.5, zero-padded on the right; returns 3 x height x width."""
    from PIL import Image

    w = min(width, int(math.ceil(height * img.shape[1] / img.shape[0])))
    resized = np.asarray(Image.fromarray(img).resize((w, height), Image.BILINEAR), np.float32)[:, :, ::-1]
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :w] = (resized.transpose(2, 0, 1) / 255.0 - PPOCR_MEAN) / PPOCR_STD
    return out


def _lines(n: int, seed: int, shape: tuple[int, int], lo: int, hi: int, flip: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    texts = _split_paragraphs(val=seed % 2 == 0)
    out = np.empty((n, 3, *shape), np.float32)
    for i in range(n):
        img = _line_image(rng, texts, lo, hi)
        if flip and i % 2:                  # the direction classifier's other class: the line upside down
            img = img[::-1, ::-1]
        out[i] = _ppocr_line(np.ascontiguousarray(img), *shape)
    return out


def _text_page(rng: np.random.Generator, texts: tuple[str, ...], size: int) -> np.ndarray:
    """A size x size RGB page: paragraphs of real text rendered in lines at one random font size."""
    from PIL import Image, ImageDraw

    ink, paper = _colours(rng)
    img = Image.new("RGB", (size, size), paper)
    draw, font_size = ImageDraw.Draw(img), int(rng.integers(10, 30))
    font, y = _font(font_size), int(rng.integers(-font_size, size // 4))
    while y < size:
        x = int(rng.integers(-size // 4, size // 4))
        draw.text((x, y), _snippet(rng, texts, 10, 60), font=font, fill=ink)
        y += int(font_size * rng.uniform(1.2, 2.5))
    return np.asarray(img)


def _det_images(n: int, seed: int, size: int = DET_SIZE) -> np.ndarray:
    """Text images for the detector: a third are square crops of scikit-image's scanned page and photographed
    text (upscaled), the rest rendered pages; rapidocr's det normalisation on BGR, N x 3 x size x size."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    scans = [skimage.data.page(), skimage.data.text()]
    texts = _split_paragraphs(val=seed % 2 == 0)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        if i % 3 == 0:
            scan = scans[rng.integers(len(scans))]
            side = int(rng.uniform(0.6, 1.0) * min(scan.shape))
            y, x = rng.integers(0, scan.shape[0] - side + 1), rng.integers(0, scan.shape[1] - side + 1)
            crop = Image.fromarray(scan[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
            img = np.repeat(np.asarray(crop)[:, :, None], 3, axis=2)
        else:
            img = _text_page(rng, texts, size)
        out[i] = (img[:, :, ::-1].transpose(2, 0, 1) / np.float32(255.0) - PPOCR_MEAN) / PPOCR_STD
    return out


def _captchas(n: int, seed: int) -> np.ndarray:
    """Captcha-like images (4-6 characters, jittered and coloured, noise lines and dots) preprocessed as ddddocr
    does: resized to height 64 (LANCZOS), grayscale, x / 255; N x 1 x 64 x 192."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    alphabet = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    height, width = DDDD_SHAPE
    out = np.empty((n, 1, height, width), np.float32)
    for i in range(n):
        img = Image.new("RGB", (150, 50), _rgb(rng, 180, 256))   # 3:1, so that height 64 gives width 192
        draw, x = ImageDraw.Draw(img), int(rng.integers(4, 14))
        for c in rng.choice(list(alphabet), int(rng.integers(4, 7))):
            font = _font(int(rng.integers(26, 38)))
            draw.text((x, int(rng.integers(-4, 7))), c, font=font, fill=_rgb(rng, 0, 120))
            x += int(font.getlength(c) + rng.integers(-2, 5))
        for _ in range(int(rng.integers(1, 5))):
            xy = [int(v) for v in rng.integers(0, (150, 50, 150, 50))]
            draw.line(xy, fill=_rgb(rng, 0, 200), width=int(rng.integers(1, 3)))
        for _ in range(int(rng.integers(0, 120))):
            draw.point((int(rng.integers(150)), int(rng.integers(50))), fill=_rgb(rng, 0, 256))
        gray = img.resize((width, height), Image.LANCZOS).convert("L")
        out[i, 0] = np.asarray(gray, np.float32) / 255.0
    return out


# --- audio -------------------------------------------------------------------------------------------------
def synth_audio(n: int, seed: int, samples: int = AUDIO_SAMPLES, rate: int = AUDIO_RATE) -> np.ndarray:
    """Musical audio: notes and chords of harmonic tones (random MIDI pitches 36-88, 1/k^a partials, attack and
    exponential decay) plus a little noise, peak 0.3-0.9; N x samples x 1 float32, deterministic by seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    phase = np.arange(4096) / 4096
    out = np.empty((n, samples, 1), np.float32)
    for i in range(n):
        x = np.zeros(samples)
        for _ in range(int(rng.integers(2, 9))):                       # note events, some of them chords
            onset = rng.uniform(-0.2, t[-1] - 0.1)
            root = int(rng.integers(36, 80))
            chord = [0] if rng.random() < 0.5 else [0, int(rng.choice([3, 4])), 7]
            tau, attack, tilt = rng.uniform(0.15, 1.2), rng.uniform(0.003, 0.03), rng.uniform(0.8, 2.0)
            dt = t - onset
            env = np.where(dt < 0, 0.0, np.minimum(dt / attack, 1.0) * np.exp(-np.maximum(dt, 0) / tau))
            for step in chord:                                          # one period of the tone, then looked up
                f0 = 440.0 * 2 ** ((root + step - 69) / 12)
                k = np.arange(1, 1 + min(8, int(rate / 2 / f0)))[:, None]
                period = (rng.uniform(0.5, 1.0, k.shape) / k ** tilt
                          * np.sin(2 * np.pi * k * phase[None] + rng.uniform(0, 2 * np.pi, k.shape))).sum(0)
                x += env * period[(f0 * t * len(phase)).astype(np.int64) % len(phase)]
        x += rng.normal(0, 10 ** rng.uniform(-3.5, -2), samples)
        out[i, :, 0] = x / max(np.abs(x).max(), 1e-9) * rng.uniform(0.3, 0.9)
    return out


# --- a small BERT sentence encoder, trained here -----------------------------------------------------------
def wordpiece_vocab(size: int = 6000) -> dict[str, int]:
    """A WordPiece vocabulary of ``paragraphs()``, deterministic (the ``tokenizers`` trainer breaks ties in hash
    order, so it differs from run to run): special tokens, every character alone and as ``##c``, then the most
    frequent words (up to 60 % of ``size``), then the most frequent word prefixes and ``##`` suffixes (2-8 chars)."""
    from collections import Counter

    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    norm, pre = BertNormalizer(lowercase=True), BertPreTokenizer()
    words = Counter(w for p in paragraphs() for w, _ in pre.pre_tokenize_str(norm.normalize_str(p)))
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars]
    ranked = sorted((w for w, c in words.items() if c >= 2 and len(w) > 1), key=lambda w: (-words[w], w))
    vocab += ranked[: int(size * 0.6) - len(vocab)]
    pieces: Counter[str] = Counter()
    for w, c in words.items():
        if w not in vocab:
            for k in range(2, min(8, len(w) - 1) + 1):
                pieces[w[:k]] += c
                pieces[f"##{w[-k:]}"] += c
    known = set(vocab)
    vocab += [p for p, _ in sorted(pieces.items(), key=lambda pc: (-pc[1], pc[0])) if p not in known][: size - len(vocab)]
    return {t: i for i, t in enumerate(vocab)}


def _train_bert(dest: Path, seed: int = 0, steps: int = 300, batch: int = 32) -> dict:
    """Build the tokenizer, train a 2-layer BERT (masked LM) on ``paragraphs()`` on one thread, seeded and
    deterministic, and export the encoder to ``dest`` (bert_encoder.onnx: dynamo=False; *_dynamo.onnx: dynamo=True)."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForMaskedLM

    t0 = time.perf_counter()
    tok = BertWordPieceTokenizer(wordpiece_vocab(), lowercase=True)
    tok.save(str(dest / "tokenizer.json"))
    ids = np.concatenate([tok.encode(p, add_special_tokens=False).ids for p in paragraphs()])
    blocks = torch.from_numpy(ids[: len(ids) // (BERT_LEN - 2) * (BERT_LEN - 2)].reshape(-1, BERT_LEN - 2))
    cls, sep, mask_id = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]"))
    blocks = torch.cat([torch.full((len(blocks), 1), cls), blocks, torch.full((len(blocks), 1), sep)], 1)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=512, max_position_embeddings=128, attn_implementation="sdpa")
        mlm = BertForMaskedLM(config)
        opt = torch.optim.AdamW(mlm.parameters(), lr=2e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
        gen, losses = torch.Generator().manual_seed(seed), []
        mlm.train()
        for _ in range(steps):
            x = blocks[torch.randint(len(blocks), (batch,), generator=gen)].clone()
            picked = (torch.rand(x.shape, generator=gen) < 0.15) & (x != cls) & (x != sep)
            target = x[picked]
            x[picked & (torch.rand(x.shape, generator=gen) < 0.8)] = mask_id
            hidden = mlm.bert(input_ids=x).last_hidden_state[picked]   # the LM head on masked positions only
            loss = torch.nn.functional.cross_entropy(mlm.cls(hidden), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        encoder = sentence_encoder(mlm.bert.eval())
        torch.save(mlm.bert.state_dict(), dest / "bert.pt")
        config.save_pretrained(dest)
        _export_bert(encoder, dest)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return {"seconds": time.perf_counter() - t0, "loss_first10": float(np.mean(losses[:10])),
            "loss_last10": float(np.mean(losses[-10:])), "blocks": len(blocks), "vocab": tok.get_vocab_size()}


def sentence_encoder(bert):
    """``bert`` (a BertModel) -> mean of its last hidden state over the attention mask -> L2 normalised."""
    import torch

    class SentenceEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return SentenceEncoder().eval()


def _export_bert(encoder, dest: Path) -> None:
    import torch

    ids = torch.randint(5, 100, (2, BERT_LEN))
    mask = torch.ones(2, BERT_LEN, dtype=torch.int64)
    mask[1, 40:] = 0
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["embedding"])
    torch.onnx.export(encoder, (ids, mask), str(dest / "bert_encoder.onnx"), dynamo=False, opset_version=17,
                      dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "embedding": {0: "batch"}},
                      **names)
    # dynamo: torch.export names the word-embedding Gather "embedding", so output_names=["embedding"] would give
    # two values of that name (an invalid model); rename that value first, then the graph's output
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(encoder, (ids, mask), dynamo=True, input_names=names["input_names"],
                                dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}})
    for node in program.model.graph:
        for value in node.outputs:
            if value.name == "embedding":
                value.name = "word_embedding"
    program.model.graph.outputs[0].name = "embedding"
    program.save(str(dest / "bert_encoder_dynamo.onnx"), external_data=False)


def bert_dir() -> Path:
    """CACHE/bert_encoder/<version>/: tokenizer, weights and both ONNX exports; trained once (about a minute)."""
    final = CACHE / "bert_encoder" / BERT_VERSION
    if (final / "bert_encoder_dynamo.onnx").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BERT_VERSION}.tmp", dir=final.parent))
    try:
        log = _train_bert(tmp)
        (tmp / "train.log").write_text("".join(f"{k} = {v}\n" for k, v in log.items()))
        try:
            tmp.rename(final)
        except OSError:                     # another process finished first: keep its copy
            if not (final / "bert_encoder_dynamo.onnx").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def bert_encoder():
    """The cached encoder as a PyTorch module (inputs input_ids, attention_mask; output the embedding)."""
    import torch
    from transformers import BertConfig, BertModel

    d = bert_dir()
    bert = BertModel(BertConfig.from_pretrained(d), add_pooling_layer=False)
    bert.load_state_dict(torch.load(d / "bert.pt", weights_only=True))
    return sentence_encoder(bert.eval())


def _bert_tokens(n: int, seed: int) -> dict[str, np.ndarray]:
    """Pieces of real paragraphs (3-80 words), tokenised to 64 tokens with padding and truncation."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bert_dir() / "tokenizer.json"))
    tok.enable_padding(length=BERT_LEN)
    tok.enable_truncation(BERT_LEN)
    rng, texts = np.random.default_rng(seed), _split_paragraphs(val=seed % 2 == 0)
    pieces = []
    for _ in range(n):
        words = texts[rng.integers(len(texts))].split()
        k = int(rng.integers(3, 81))
        start = int(rng.integers(0, max(1, len(words) - k + 1)))
        pieces.append(" ".join(words[start:start + k]))
    enc = tok.encode_batch(pieces)
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}


# --- the zoo -----------------------------------------------------------------------------------------------
def _prep(key: str, make: Callable[[int, int], np.ndarray | dict]) -> Callable[[Path, int, int], Path]:
    """prepare(out, n_calib, n_val): calibration from seed 1, validation from seed 2 (disjoint paragraphs of
    text), each written before the next is made (memory); arrays keyed by ``key`` unless ``make`` gives a dict."""

    def prepare(out: Path, n_calib: int = 64, n_val: int = 32) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name, n, seed in (("calib", n_calib, 1), ("val", n_val, 2)):
            data = make(n, seed)
            np.savez(out / f"{name}.npz", **(data if isinstance(data, dict) else {key: data}))
            del data
        return out

    return prepare


def _efficientnet_crops(n: int, seed: int) -> np.ndarray:
    spec = importlib.util.spec_from_file_location("qdeploy_example_efficientnet", HERE / "efficientnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.crops(n, seed)


_RAPID, _DDDD, _BP = "rapidocr", "ddddocr", "basic_pitch"
_NMP = "saved_models/icassp_2022/nmp"
_AUDIO_KEY = "serving_default_input_2:0"
ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("ppocr-det", "onnx", "PP-OCRv6 small text detector (rapidocr), opset 11, dynamic NxCxHxW, "
             "147 Identity nodes and 6 zero-size Resize Constants; per-channel Q/DQ needs opset 13",
             "cosine", None, lambda: _pkg_file(_RAPID, "models/PP-OCRv6_det_small.onnx"),
             _prep("x", lambda n, s: _det_images(n, s))),
    ZooModel("ppocr-cls", "onnx", "PP-OCR mobile v2.0 text-direction classifier (0/180 deg), Paddle2ONNX: "
             "0 initializers, weights held in 308 Constant nodes; BatchNormalization, Clip",
             "top1_agreement", None, lambda: _pkg_file(_RAPID, "models/ch_ppocr_mobile_v2.0_cls_mobile.onnx"),
             _prep("x", lambda n, s: _lines(n, s, CLS_SHAPE, 6, 24, flip=True))),
    ZooModel("ppocr-rec", "onnx", "PP-OCRv6 small text recogniser (rapidocr), opset 11, 3x48x320 -> 18710-way "
             "CTC sequence; transformer-like MatMul/ReduceMean blocks inside a CNN",
             "cosine", None, lambda: _pkg_file(_RAPID, "models/PP-OCRv6_rec_small.onnx"),
             _prep("x", lambda n, s: _lines(n, s, REC_SHAPE, 10, 40, flip=False))),
    ZooModel("ddddocr", "onnx", "ddddocr captcha OCR (CNN + LSTM), opset 12, batch fixed to 1, 1x1x64xW gray; "
             "output: float CTC logits (W/8)x1x8210, sequence first, declared [1, seqlen] (wrong rank)",
             "cosine", None, lambda: _pkg_file(_DDDD, "common.onnx"), _prep("input1", _captchas)),
    ZooModel("ddddocr-old", "onnx", "ddddocr's default OCR model, already INT8 (DynamicQuantizeLinear, ConvInteger, "
             "MatMulInteger, com.microsoft DynamicQuantizeLSTM): deploy as is or refuse in one line",
             "cosine", None, lambda: _pkg_file(_DDDD, "common_old.onnx"), _prep("input1", _captchas), True),
    ZooModel("basic-pitch", "onnx", "Spotify basic-pitch audio -> note/onset/contour activations (tf2onnx, opset 15), "
             "Nx43844x1 at 22.05 kHz, three outputs; the same model as basic-pitch-tflite",
             "cosine", None, lambda: _pkg_file(_BP, f"{_NMP}.onnx"), _prep(_AUDIO_KEY, synth_audio)),
    ZooModel("basic-pitch-tflite", "tflite", "the same basic-pitch model as a FP32 .tflite (same tensor names "
             "and layouts as the ONNX file): one model, two formats",
             "cosine", None, lambda: _pkg_file(_BP, f"{_NMP}.tflite"), _prep(_AUDIO_KEY, synth_audio)),
    ZooModel("efficientnet-lite0", "torch", "ImageNet EfficientNet-Lite0 (PyTorch module, ReLU6, depthwise convs) "
             "on crops of real photos; the examples' larger model",
             "top1_agreement", "1x3x224x224", lambda: f"{HERE / 'efficientnet.py'}:build_model",
             _prep("input", _efficientnet_crops)),
    ZooModel("bert-encoder", "onnx", "2-layer BERT sentence encoder trained here on CPython's docs (sdpa attention, "
             "exported with dynamo=False): int64 inputs, -inf Constants in the attention-mask arithmetic",
             "cosine", None, lambda: str(bert_dir() / "bert_encoder.onnx"), _prep("input_ids", _bert_tokens)),
    ZooModel("bert-encoder-dynamo", "onnx", "the same BERT encoder exported with dynamo=True (opset 20, one file): "
             "a finfo(float32).min mask fill, Gelu, no Constant nodes: other patterns, same function",
             "cosine", None, lambda: str(bert_dir() / "bert_encoder_dynamo.onnx"), _prep("input_ids", _bert_tokens)),
)}


def get(name: str) -> ZooModel:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"no zoo model {name!r}; known: {', '.join(ZOO)}") from None


def check(name: str, data_dir: Path) -> dict[str, tuple]:
    """Run the FP32 ONNX model on ``data_dir/val.npz`` one sample at a time on one thread; returns per output
    (stacked shape, dtype, min, max, std, all finite) and the mean latency in ms under ``"latency_ms"``."""
    import onnxruntime as ort

    path = get(name).model_path()
    if not path.endswith(".onnx"):
        raise ValueError(f"{name}: check runs .onnx models only")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3             # ddddocr's declared output shape is wrong: one warning per run
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    with np.load(Path(data_dir) / "val.npz") as data:
        feeds = {k: data[k] for k in data.files}
    n = len(next(iter(feeds.values())))
    outs, t0 = [], time.perf_counter()
    for i in range(n):
        outs.append(sess.run(None, {k: v[i:i + 1] for k, v in feeds.items()}))
    latency = (time.perf_counter() - t0) / n * 1e3
    report: dict[str, tuple] = {"latency_ms": (round(latency, 2),)}
    for j, o in enumerate(sess.get_outputs()):
        y = np.stack([r[j] for r in outs])
        report[o.name] = (y.shape, str(y.dtype), float(y.min()), float(y.max()), float(y.std()), bool(np.isfinite(y).all()))
    return report


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["list"]:
        for m in ZOO.values():
            print(f"{m.name:20s} {m.fmt:6s} {m.metric:15s} {'INT8 ' if m.already_quantized else ''}{m.description}")
    elif args[:1] == ["prepare"] and len(args) in (3, 5):
        t = time.perf_counter()
        out = get(args[1]).prepare(Path(args[2]), *(int(a) for a in args[3:]))
        print(f"wrote {out}/calib.npz and {out}/val.npz in {time.perf_counter() - t:.1f} s")
    elif args[:1] == ["check"] and len(args) == 3:
        for key, value in check(args[1], Path(args[2])).items():
            print(f"{key}: {value}")
    else:
        sys.exit("usage: python examples/zoo.py list | prepare NAME OUT_DIR [n_calib n_val] | check NAME DATA_DIR")
