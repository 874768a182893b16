"""CLIP image preprocessing in numpy, reproducing the PIL/torchvision path that open_clip and OpenAI use.

Reference: ``Resize(S, interpolation=BICUBIC)`` on a PIL image (which always antialiases), ``CenterCrop(S)``,
``convert("RGB")``, ``ToTensor``, ``Normalize(mean, std)``. Conventions reproduced here:

- Output size: the short side becomes S, the long side ``int(S * long / short)`` (torchvision's rule).
- Resampling (PIL's ``ImagingResample`` on 8-bit images): separable, horizontal pass first, each pass
  rounded back to uint8. A filter of support ``s * max(scale, 1)`` (scale = input / output size, so
  downscaling widens the kernel: antialiasing) centred at ``(x + 0.5) * scale``; bicubic uses a = -0.5
  (PIL's choice; torch's tensor bicubic uses a = -0.75). Weights are normalized per output pixel, then
  turned into 22-bit fixed point; each pass sums ``pixel * weight`` in integers, adds half a unit and
  shifts. The same float64 and integer arithmetic here makes the result bit-identical to PIL's.
- Center crop offsets ``int(round((size - S) / 2))`` (Python's round: half to even), as torchvision.
- Only the output pixels inside the crop are computed (each depends on its own weights only).
- RGBA: PIL resizes premultiplied alpha (``RGBa``) and un-premultiplies after, then drops alpha without
  compositing; reproduced. Grayscale is resized as one channel and then replicated to RGB.
- ``ToTensor`` + ``Normalize`` in float32: ``(x / 255 - mean) / std``, RGB order, CHW.

Images are HWC uint8 RGB (``H x W`` or ``H x W x 1`` grayscale, ``H x W x 4`` RGBA also accepted).
``cv2.resize`` is not used: its bicubic does not antialias when shrinking and INTER_AREA is a box filter,
both of which move CLIP embeddings; OpenCV only transposes here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from ..resample import check_rule, coefficients, premultiply, resample_axis, resample_rows, unpremultiply_rgb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(height: int, width: int, image_size: int) -> tuple[int, int]:
    """``(new_h, new_w)`` with the short side ``image_size`` and the long side as torchvision computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = image_size, int(image_size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def crop_offset(size: int, crop: int) -> int:
    """torchvision's CenterCrop offset along one axis."""
    return int(round((size - crop) / 2.0))


def _as_hwc(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise InputError(
            f"CLIP preprocessing takes uint8 images (0..255); got dtype {image.dtype}. Convert with "
            "np.clip(x * 255, 0, 255).astype(np.uint8) if it is a [0, 1] float image."
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(
            "CLIP preprocessing takes an HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA) image; got shape "
            f"{image.shape}."
        )
    return image


def resize_center_crop(image: np.ndarray, image_size: int, resize: str = "bicubic_antialias") -> np.ndarray:
    """Short side to ``image_size``, center crop, RGB: uint8 ``[S, S, 3]`` equal to PIL's pixels."""
    check_rule(resize)
    image = _as_hwc(image)
    rgba = image.shape[2] == 4
    if rgba:
        image = premultiply(image)
    height, width = image.shape[:2]
    new_h, new_w = resized_size(height, width, image_size)
    top, left = crop_offset(new_h, image_size), crop_offset(new_w, image_size)
    # PIL's horizontal pass runs only over the rows the vertical pass reads.
    if new_h != height:
        rows, _ = coefficients(height, new_h, top, top + image_size, resize)
        lo, hi = int(rows.min()), int(rows.max()) + 1
    else:
        lo, hi = top, top + image_size
    out = resample_axis(np.ascontiguousarray(image[lo:hi]), 1, new_w, left, left + image_size, resize)
    if new_h != height:
        index, weights = coefficients(height, new_h, top, top + image_size, resize)
        out = resample_rows(np.ascontiguousarray(out), index - lo, weights)
    if rgba:
        return unpremultiply_rgb(out)
    return np.repeat(out, 3, axis=2) if out.shape[2] == 1 else out


def preprocess(image: np.ndarray, image_size: int = 224, mean: Sequence[float] = OPENAI_CLIP_MEAN,
               std: Sequence[float] = OPENAI_CLIP_STD, resize: str = "bicubic_antialias") -> np.ndarray:
    """One HWC uint8 image -> float32 ``[3, S, S]`` normalized CHW RGB (see the module docstring)."""
    pixels = resize_center_crop(image, image_size, resize)
    x = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean32 = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std32 = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean32) / std32)


def preprocess_batch(images: Sequence[np.ndarray], image_size: int = 224,
                     mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                     resize: str = "bicubic_antialias") -> np.ndarray:
    """Images of any sizes -> float32 ``[N, 3, S, S]``; each one as :func:`preprocess`."""
    if len(images) == 0:
        raise InputError("preprocess_batch got no images; pass a non-empty list of HWC uint8 arrays.")
    return np.stack([preprocess(im, image_size, mean, std, resize) for im in images])
