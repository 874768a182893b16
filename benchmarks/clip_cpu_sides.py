"""The two sides of ``clip_cpu.py``: open_clip (PyTorch) and edgefm (ONNX Runtime), the same operations as
zero-argument callables, and the seeded photos both are timed on."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from common import timed

SHORT_PROMPT = "a photo of a dog."
CLASSNAME = "golden retriever"
MODEL = "ViT-B-32-quickgelu"
SEED = 0


def photo(seed: int, h: int, w: int) -> np.ndarray:
    """A photo-like HWC uint8 RGB picture: smooth gradients, a few shapes and sensor-like noise (so that
    JPEG decoding has real work to do)."""
    import cv2

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = [127.5 + 127.5 * np.sin(rng.uniform(0.002, 0.02) * x + rng.uniform(0.002, 0.02) * y
                                     + rng.uniform(0, 6.3)) for _ in range(3)]
    img = np.stack(chans, -1)
    for _ in range(6):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, centre, int(rng.integers(h // 20, h // 4)), rng.uniform(0, 255, 3).tolist(), -1)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_jpegs(folder: Path, n: int, seed: int = SEED) -> list[Path]:
    """``n`` JPEGs (quality 90) of camera-like sizes and aspect ratios, 480 to 1024 pixels wide."""
    import cv2

    sizes = [(480, 640), (768, 1024), (600, 800), (720, 540), (512, 512), (576, 1024)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:04d}.jpg"
        cv2.imwrite(str(path), photo(seed + i, *sizes[i % len(sizes)])[:, :, ::-1],
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


# --- the two sides: the same operations as zero-argument callables ---


def official_model(quick: bool):
    """open_clip's model (random weights), its eval transform and its tokenizer."""
    import open_clip
    import torch

    torch.manual_seed(SEED)
    if not quick:
        model, _, transform = open_clip.create_model_and_transforms(MODEL, pretrained=None)
        return model.eval(), transform, open_clip.get_tokenizer(MODEL)
    from edgefm.models.clip import CLIP_CONFIGS

    c = CLIP_CONFIGS["tiny-vit"]
    vision = dict(image_size=c.image_size, layers=c.vision_layers, width=c.vision_width,
                  patch_size=c.vision_patch_size)
    text = dict(context_length=c.context_length, vocab_size=c.vocab_size, width=c.text_width,
                heads=c.text_heads, layers=c.text_layers)
    model = open_clip.model.CLIP(c.embed_dim, vision, text, quick_gelu=True).eval()
    return model, open_clip.image_transform(c.image_size, is_train=False), open_clip.tokenize


class Official:
    """open_clip eager, fp32, under ``torch.inference_mode``."""

    def __init__(self, model, transform, tokenizer, inputs: dict[str, Any], threads: int) -> None:
        import torch
        import torch.nn.functional as F
        from PIL import Image

        torch.set_num_threads(threads)
        self.torch, self.model, self.transform = torch, model, transform
        px = {k: torch.from_numpy(inputs[k]) for k in ("pixels1", "pixels32")}
        tok = {k: tokenizer(inputs[k]) for k in ("prompt1", "prompts80")}
        self.tokens = tok
        m = model
        self.ops = {
            "image_b1": lambda: m.encode_image(px["pixels1"]),
            "image_b32": lambda: m.encode_image(px["pixels32"]),
            "image_e2e_b1": lambda: F.normalize(
                m.encode_image(transform(Image.fromarray(inputs["photo"])).unsqueeze(0)), dim=-1),
            "text_b1": lambda: m.encode_text(tok["prompt1"]),
            "text_b80": lambda: m.encode_text(tok["prompts80"]),
            "text_e2e_b1": lambda: F.normalize(m.encode_text(tokenizer(inputs["prompt1"])), dim=-1),
            "text_e2e_b80": lambda: F.normalize(m.encode_text(tokenizer(inputs["prompts80"])), dim=-1),
        }
        self.info = {"torch_threads": torch.get_num_threads(), "backend": "PyTorch eager, CPU, fp32"}

    def time(self, key: str, n: int) -> list[float]:
        with self.torch.inference_mode():
            return timed(self.ops[key], n)

    def build_index(self, files: list[Path], workers: int, batch_size: int = 32) -> np.ndarray:
        """Decode + transform in a thread pool, encode in batches (what a retrieval script does);
        ``batch_size`` 0: decode + transform only."""
        from PIL import Image

        def load(path: Path):
            with Image.open(path) as im:
                return self.transform(im.convert("RGB"))

        torch = self.torch
        out = []
        if batch_size == 0:  # decoding and preprocessing only
            with ThreadPoolExecutor(max_workers=workers) as pool:
                return np.stack([t.numpy() for t in pool.map(load, files)])
        with ThreadPoolExecutor(max_workers=workers) as pool, torch.inference_mode():
            pixels = list(pool.map(load, files))
            for i in range(0, len(pixels), batch_size):
                emb = self.model.encode_image(torch.stack(pixels[i : i + batch_size]))
                out.append(torch.nn.functional.normalize(emb, dim=-1).numpy())
        return np.concatenate(out)


class Edgefm:
    """edgefm's torch-free ``ClipModel`` on the exported bundle, ONNX Runtime CPU."""

    def __init__(self, bundle: Path, inputs: dict[str, Any], threads: int) -> None:
        import cv2
        from edgefm.runtime.clip.model import ClipModel

        self.model = m = ClipModel(bundle, backend="ort-cpu", threads=threads)
        self.tokens = {k: m.tokenize(inputs[k]) for k in ("prompt1", "prompts80")}
        tok = self.tokens
        self.ops = {
            "image_b1": lambda: m.encode_pixels(inputs["pixels1"]),
            "image_b32": lambda: m.encode_pixels(inputs["pixels32"]),
            "image_e2e_b1": lambda: m.encode_images([inputs["photo"]]),
            "text_b1": lambda: m.encode_tokens(tok["prompt1"]),
            "text_b80": lambda: m.encode_tokens(tok["prompts80"]),
            "text_e2e_b1": lambda: m.encode_texts(inputs["prompt1"]),
            "text_e2e_b80": lambda: m.encode_texts(inputs["prompts80"]),
        }
        so = m.bundle.runner("image_encoder").session.get_session_options()
        self.info = {"backend": m.bundle.backend, "ort_intra_op_threads": so.intra_op_num_threads,
                     "ort_inter_op_threads": so.inter_op_num_threads,
                     "ort_graph_optimization": str(so.graph_optimization_level),
                     "ort_providers": m.bundle.runner("image_encoder").session.get_providers(),
                     "opencv_threads": cv2.getNumThreads(),
                     "precision": {c.name: c.precision for c in m.bundle.manifest.components}}

    def time(self, key: str, n: int) -> list[float]:
        return timed(self.ops[key], n)

    def build_index(self, files: list[Path], workers: int, batch_size: int = 32) -> np.ndarray:
        from edgefm.runtime.clip.index import ImageIndex

        if batch_size == 0:  # decoding and preprocessing only, as ImageIndex.build does them
            with ThreadPoolExecutor(max_workers=workers) as pool:
                return np.stack(list(pool.map(self.model.preprocess, files)))
        return ImageIndex.build(files, self.model, batch_size=batch_size, workers=workers,
                                progress=False).embeddings
