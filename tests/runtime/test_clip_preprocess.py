"""CLIP preprocessing in numpy vs the PIL/torchvision path of open_clip, on pixels and on embeddings."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from edgefm.runtime.clip.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    preprocess,
    preprocess_batch,
    resize_center_crop,
    resized_size,
)
from edgefm.runtime.errors import InputError

open_clip = pytest.importorskip("open_clip")
Image = pytest.importorskip("PIL.Image")
torch = pytest.importorskip("torch")

# (height, width, channels): strong downscale, upscale, extreme aspect ratios, gray, RGBA, no-op sizes
CASES = [
    (1500, 2250, 3), (50, 80, 3), (30, 900, 3), (900, 30, 3), (333, 517, 1), (480, 640, 4),
    (224, 224, 3), (224, 301, 3), (225, 225, 3), (7, 5, 3),
]


def textured(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """Shapes, gradients, fine stripes and noise: enough high frequencies that antialiasing matters."""
    from conftest import scene

    rng = np.random.default_rng(seed)
    img = scene(h, w, seed).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    img += 60 * np.sin(xx * 1.3 + yy * 0.7)[..., None]  # stripes near the Nyquist rate
    img += rng.normal(0, 25, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if c == 1:
        return img[..., 1]
    if c == 4:
        alpha = np.clip(xx * 255.0 / max(w - 1, 1) + rng.normal(0, 40, (h, w)), 0, 255).astype(np.uint8)
        alpha[: h // 4] = 0
        alpha[-h // 4 :] = 255
        return np.dstack([img, alpha])
    return img


def reference(image: np.ndarray, size: int = 224, interpolation: str = "bicubic") -> np.ndarray:
    """open_clip's eval transform on the PIL image (mode L, RGB or RGBA as PIL infers it)."""
    transform = open_clip.image_transform(size, is_train=False, interpolation=interpolation)
    return transform(Image.fromarray(image)).numpy()


@pytest.fixture(scope="module")
def tiny_encoder():
    from edgefm.models.clip import CLIP_CONFIGS, build_clip

    torch.manual_seed(0)
    return build_clip(CLIP_CONFIGS["tiny-vit"])  # 224 x 224 input, random weights


@pytest.mark.parametrize("h,w,c", CASES)
def test_matches_pil_torchvision_pixels_and_embeddings(h, w, c, tiny_encoder):
    image = textured(h, w, c, seed=h + w + c)
    ours, ref = preprocess(image), reference(image)
    assert ours.shape == ref.shape == (3, 224, 224) and ours.dtype == np.float32
    # One gray level after normalization is 1/255/std ~ 0.015; PIL's integer arithmetic is reproduced, so
    # the measured difference is 0 for these images.
    diff = float(np.abs(ours - ref).max())
    print(f"{(h, w, c)}: max abs diff of normalized tensors {diff:.3g}")
    assert diff <= 1.0 / 255 / min(OPENAI_CLIP_STD) + 1e-6
    with torch.no_grad():
        a, b = tiny_encoder.encode_image(torch.from_numpy(np.stack([ours, ref])))
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    assert cosine >= 0.995


@pytest.mark.parametrize("h,w,c", [(1500, 2250, 3), (333, 517, 1), (480, 640, 4), (50, 80, 3)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_pixels_bit_identical_to_pil(h, w, c, interpolation):
    image = textured(h, w, c, seed=7)
    pil = Image.fromarray(image)
    new_h, new_w = resized_size(h, w, 224)
    mode = Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
    resized = np.asarray(pil.resize((new_w, new_h), mode).convert("RGB"))
    top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
    expected = resized[top : top + 224, left : left + 224]
    ours = resize_center_crop(image, 224, f"{interpolation}_antialias")
    assert np.array_equal(ours, expected), f"max diff {np.abs(ours.astype(int) - expected).max()} gray levels"
    if interpolation == "bilinear":
        ours = preprocess(image, resize="bilinear_antialias")
        assert np.array_equal(ours, reference(image, 224, "bilinear"))


def test_plain_opencv_bicubic_would_fail_this_comparison():
    """The comparison above is sensitive: cv2.resize without antialiasing is far off on a strong downscale."""
    image = textured(1500, 2250, 3, seed=1)
    new_h, new_w = resized_size(1500, 2250, 224)
    naive = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
    left = int(round((new_w - 224) / 2.0))
    naive = naive[:, left : left + 224].transpose(2, 0, 1).astype(np.float32) / 255
    mean, std = np.float32(OPENAI_CLIP_MEAN).reshape(3, 1, 1), np.float32(OPENAI_CLIP_STD).reshape(3, 1, 1)
    diff = np.abs((naive - mean) / std - reference(image)).max()
    assert diff > 1.0, diff  # > 65 gray levels somewhere; ours: 0


def test_batch_and_sizes(tiny_encoder):
    images = [textured(90, 120, 3, 0), textured(64, 64, 1, 1), textured(300, 200, 4, 2)]
    batch = preprocess_batch(images, image_size=64)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == np.float32
    for row, image in zip(batch, images, strict=True):
        assert np.array_equal(row, reference(image, 64))
    assert resized_size(480, 640, 224) == (224, 298) and resized_size(900, 30, 224) == (6720, 224)


def test_bad_inputs_are_named():
    with pytest.raises(InputError, match="uint8"):
        preprocess(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(InputError, match=r"HxWx3.*\(10, 10, 2\)"):
        preprocess(np.zeros((10, 10, 2), np.uint8))
    with pytest.raises(InputError, match="shape"):
        preprocess(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(InputError, match="no images"):
        preprocess_batch([])
    with pytest.raises(InputError, match="bicubic_antialias"):
        preprocess(np.zeros((10, 10, 3), np.uint8), resize="lanczos")


def test_large_resize_split_over_threads_is_still_pil_exact():
    """SAM's 1500x2250 -> 683x1024: both passes are big enough to be split over the resample thread pool."""
    from edgefm.runtime import resample

    image = textured(1500, 2250, 3, seed=11)
    expected = np.asarray(Image.fromarray(image).resize((1024, 683), Image.Resampling.BILINEAR))
    assert resample._pool()._max_workers >= 1
    assert np.array_equal(resample.resize(image, (683, 1024)), expected)
