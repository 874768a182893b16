"""PIL-exact image resampling in numpy: the antialiased bilinear / bicubic resize of PIL's ``Image.resize``.

Official SAM (``ResizeLongestSide`` via torchvision on a PIL image) and CLIP (``Resize(BICUBIC)`` on a PIL
image) both preprocess with PIL; reproducing its arithmetic makes the runtime's embeddings equal the
reference's instead of merely close. PIL's ``ImagingResample`` on 8-bit images: separable, horizontal pass
first, each pass rounded back to uint8. A filter of support ``s * max(scale, 1)`` (scale = input / output
size, so downscaling widens the kernel: antialiasing) centred at ``(x + 0.5) * scale``; bicubic uses
a = -0.5 (PIL's choice; torch's tensor bicubic uses a = -0.75). Weights are normalized per output pixel,
then turned into 22-bit fixed point; each pass sums ``pixel * weight`` in integers, adds half a unit and
shifts. The same float64 and integer arithmetic here makes the result bit-identical to PIL's.
``cv2.resize`` is not used for this: its bicubic does not antialias when shrinking and INTER_AREA is a box
filter; OpenCV only transposes here.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from .errors import InputError

_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed point for 8-bit images


def _bicubic(x: np.ndarray) -> np.ndarray:
    # Keys' cubic with a = -0.5, written in PIL's operation order so float64 results agree bit for bit.
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


# name -> (filter, support at scale 1)
RESAMPLERS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "bicubic_antialias": (_bicubic, 2.0),
    "bilinear_antialias": (_bilinear, 1.0),
}


@functools.lru_cache(maxsize=128)
def coefficients(
    in_size: int, out_size: int, start: int, stop: int, resize: str
) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and fixed-point weights ``[stop - start, taps]`` of output pixels ``start..stop-1``."""
    kernel, base_support = RESAMPLERS[resize]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(start, stop, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C's (int) truncates
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    offsets = np.arange(taps)
    weights = kernel(((offsets[None, :] + first[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where(offsets[None, :] < count[:, None], weights, 0.0)
    total = np.zeros(len(center))
    for k in range(taps):  # sequential sum, as PIL (numpy's pairwise sum could round differently)
        total = total + weights[:, k]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * (1 << _PRECISION_BITS)
    fixed = np.trunc(np.where(weights < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    used = max(int(count.max()), 1)
    index = np.minimum(first[:, None] + offsets[None, :used], in_size - 1)  # padded taps have weight 0
    return index, fixed[:, :used]


_PARALLEL_MIN = 1 << 20  # output values below which one thread is faster than handing out work


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    # numpy releases the GIL in the gathers and integer ufuncs below, so row blocks run truly in parallel
    # (a 1500x2250 photo's wide pass: 42 ms on one thread, 26 ms on two loaded cores).
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="edgefm-resample")


def _rows_into(out: np.ndarray, image: np.ndarray, index: np.ndarray, weights: np.ndarray) -> None:
    acc = np.full((index.shape[0], *image.shape[1:]), 1 << (_PRECISION_BITS - 1), dtype=np.int32)
    for k in range(index.shape[1]):
        acc += image[index[:, k]] * weights[:, k, None, None]  # uint8 * int32 -> int32, as PIL's int sums
    np.clip(acc >> _PRECISION_BITS, 0, 255, out=acc)
    out[...] = acc


def resample_rows(image: np.ndarray, index: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One PIL pass along axis 0 of a uint8 ``[rows, cols, C]`` array -> ``[len(index), cols, C]`` uint8.

    Large passes are split into blocks of output rows run on a small thread pool; every output row is
    computed by the same integer arithmetic either way, so the result does not depend on the split."""
    n = index.shape[0]
    out = np.empty((n, *image.shape[1:]), dtype=np.uint8)
    workers = _pool()._max_workers if out.size >= _PARALLEL_MIN else 1
    if workers <= 1 or n < 2 * workers:
        _rows_into(out, image, index, weights)
        return out
    bounds = np.linspace(0, n, workers + 1).astype(int)
    jobs = [_pool().submit(_rows_into, out[a:b], image, index[a:b], weights[a:b])
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    for job in jobs:
        job.result()
    return out


def resample_axis(image: np.ndarray, axis: int, out_size: int, start: int, stop: int,
                   resize: str) -> np.ndarray:
    in_size = image.shape[axis]
    if in_size == out_size:  # PIL skips the pass; the crop is a plain slice
        return image[start:stop] if axis == 0 else image[:, start:stop]
    index, weights = coefficients(in_size, out_size, start, stop, resize)
    if axis == 0:
        return resample_rows(image, index, weights)
    # Gathering whole rows is much faster than gathering columns: work on the transposed image.
    return _transpose(resample_rows(_transpose(image), index, weights))


def _transpose(image: np.ndarray) -> np.ndarray:
    """``[H, W, C]`` -> contiguous ``[W, H, C]``; OpenCV's transpose is several times numpy's copy."""
    return cv2.transpose(image).reshape(image.shape[1], image.shape[0], image.shape[2])


def premultiply(rgba: np.ndarray) -> np.ndarray:
    t = rgba[..., :3].astype(np.int32) * rgba[..., 3:].astype(np.int32) + 128
    out = rgba.copy()
    out[..., :3] = ((t >> 8) + t) >> 8  # PIL's MULDIV255
    return out


def unpremultiply_rgb(rgba: np.ndarray) -> np.ndarray:
    rgb, alpha = rgba[..., :3].astype(np.int32), rgba[..., 3:].astype(np.int32)
    straight = np.minimum((255 * rgb) // np.maximum(alpha, 1), 255)
    return np.where((alpha == 0) | (alpha == 255), rgb, straight).astype(np.uint8)


def check_rule(method: str) -> None:
    """``method`` names one of :data:`RESAMPLERS`, or an :class:`InputError` says which do."""
    if method not in RESAMPLERS:
        raise InputError(f"Unknown resize rule {method!r}; choose one of {sorted(RESAMPLERS)}.")


def resize(image: np.ndarray, size: tuple[int, int], method: str = "bilinear_antialias") -> np.ndarray:
    """HWC uint8 (any channel count; alpha is not premultiplied here) -> ``size`` = (H, W), PIL's pixels."""
    check_rule(method)
    squeeze = image.ndim == 2
    out = image[:, :, None] if squeeze else image
    h, w = size
    out = resample_axis(np.ascontiguousarray(out), 1, w, 0, w, method)
    out = resample_axis(np.ascontiguousarray(out), 0, h, 0, h, method)
    return out[:, :, 0] if squeeze else out
