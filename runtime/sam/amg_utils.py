"""Numpy/OpenCV helpers of SAM's automatic mask generator (no torch).

Conventions, as in the official ``segment_anything.utils.amg``:
- sizes are ``(H, W)``; points are ``(..., 2)`` XY in pixels; boxes are ``(..., 4)`` XYXY in pixels, integer
  for boxes measured on masks (``x1``/``y1`` are the last covered column/row, not one past it);
- crop boxes are ``[x0, y0, x1, y1]`` Python ints with exclusive ``x1``/``y1``;
- masks are bool ``(..., H, W)``; an uncompressed RLE is ``{"size": [H, W], "counts": [int, ...]}`` over the
  mask flattened in column-major (Fortran) order, starting with a run of zeros (possibly empty), which is
  what pycocotools' ``frPyObjects`` expects.
Dtypes follow the reference so that its filters give the same decisions: scores are float32, boxes int64.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any

import cv2
import numpy as np

RLE = dict[str, Any]


def build_point_grid(n_per_side: int) -> np.ndarray:
    """``(n*n, 2)`` float64 XY points at the centres of an n x n tiling of [0,1]², x varying fastest."""
    half_step = 1 / (2 * n_per_side)
    side = np.linspace(half_step, 1 - half_step, n_per_side)
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One normalised grid per crop layer (layer 0 = the whole image); layer i has n / scale**i per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (XYXY ints) and their layer indices: the whole image, then (2**i)² overlapping crops per
    layer i >= 1. The overlap is ``overlap_ratio`` of the short side in layer 1 and halves per layer."""
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes: list[list[int]] = [[0, 0, im_w, im_h]]
    layers = [0]
    for layer in range(1, n_layers + 1):
        n_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / n_side))
        # Equal crops that together with (n_side - 1) overlaps cover the side exactly (rounded up).
        crop_w = int(math.ceil((overlap * (n_side - 1) + im_w) / n_side))
        crop_h = int(math.ceil((overlap * (n_side - 1) + im_h) / n_side))
        x0s = [int((crop_w - overlap) * i) for i in range(n_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_side)]
        # x is the outer loop: the reference's ordering, which decides NMS ties between equal-size crops.
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer)
    return boxes, layers


def calculate_stability_score(masks: np.ndarray, mask_threshold: float, threshold_offset: float) -> np.ndarray:
    """IoU between the masks binarised at ``threshold ± offset``, float32 of shape ``masks.shape[:-2]``.

    The high-cutoff mask is contained in the low-cutoff one, so IoU = count(high) / count(low). An all-low
    logit map gives 0/0 = nan, as in the reference (nan then fails any ``>=`` filter).
    """
    flat = masks.reshape(-1, *masks.shape[-2:])
    # One map at a time: the boolean temporaries stay in cache and a whole-array count is a fast path.
    high = np.array([np.count_nonzero(m > (mask_threshold + threshold_offset)) for m in flat], np.float32)
    low = np.array([np.count_nonzero(m > (mask_threshold - threshold_offset)) for m in flat], np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (high / low).reshape(masks.shape[:-2])


def batched_mask_to_box(masks: np.ndarray) -> np.ndarray:
    """XYXY int64 boxes ``(..., 4)`` around bool masks ``(..., H, W)``; inclusive right/bottom edges,
    ``[0, 0, 0, 0]`` for an empty mask."""
    lead = masks.shape[:-2]
    h, w = masks.shape[-2:]
    if masks.size == 0:
        return np.zeros((*lead, 4), np.int64)
    flat = masks.reshape(-1, h, w)
    rows = flat.any(axis=2)  # (N, H): which rows the mask touches
    cols = flat.any(axis=1)  # (N, W)
    top = rows.argmax(axis=1)
    bottom = h - 1 - rows[:, ::-1].argmax(axis=1)
    left = cols.argmax(axis=1)
    right = w - 1 - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([left, top, right, bottom], axis=-1).astype(np.int64)
    boxes[~rows.any(axis=1)] = 0
    return boxes.reshape(*lead, 4)


def is_box_near_crop_edge(
    boxes: np.ndarray, crop_box: list[int], orig_box: list[int], atol: float = 20.0
) -> np.ndarray:
    """Bool ``(N,)``: the box (in crop coordinates) lies within ``atol`` px of a crop edge that is not also
    an edge of the original image — such masks are likely cut off by the crop."""
    full = uncrop_boxes_xyxy(boxes, crop_box).astype(np.float32)
    near_crop = np.abs(full - np.asarray(crop_box, np.float32)) <= atol
    near_image = np.abs(full - np.asarray(orig_box, np.float32)) <= atol
    return np.any(near_crop & ~near_image, axis=-1)


def box_xyxy_to_xywh(box_xyxy: np.ndarray) -> np.ndarray:
    """XYXY -> XYWH along the last axis (a copy; dtype kept)."""
    box = np.array(box_xyxy, copy=True)
    box[..., 2] = box[..., 2] - box[..., 0]
    box[..., 3] = box[..., 3] - box[..., 1]
    return box


def uncrop_boxes_xyxy(boxes: np.ndarray, crop_box: list[int]) -> np.ndarray:
    """Shift XYXY boxes ``(..., 4)`` from crop to image coordinates."""
    x0, y0 = crop_box[:2]
    return boxes + np.array([x0, y0, x0, y0], dtype=np.int64)


def uncrop_points(points: np.ndarray, crop_box: list[int]) -> np.ndarray:
    """Shift XY points ``(..., 2)`` from crop to image coordinates."""
    x0, y0 = crop_box[:2]
    return points + np.array([x0, y0], dtype=np.int64)


def uncrop_masks(masks: np.ndarray, crop_box: list[int], orig_h: int, orig_w: int) -> np.ndarray:
    """Place crop masks ``(N, h, w)`` into zero masks of the image size ``(N, orig_h, orig_w)``."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    out = np.zeros((*masks.shape[:-2], orig_h, orig_w), masks.dtype)
    out[..., y0:y1, x0:x1] = masks
    return out


def mask_to_rle(masks: np.ndarray) -> list[RLE]:
    """Uncompressed RLEs of bool masks ``(N, H, W)`` in Fortran order (pycocotools' layout)."""
    n, h, w = masks.shape
    out = []
    for mask in masks:  # per mask: ~6x faster than one batched nonzero, and no (N, H*W) temporaries
        flat = mask.T.ravel()  # column-major
        changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # first index of every run but the first
        counts = np.diff(np.concatenate([[0], changes, [h * w]])).tolist()
        if flat[0]:
            counts.insert(0, 0)  # counts always start with a (here empty) run of zeros
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: RLE) -> np.ndarray:
    """Bool ``(H, W)`` C-contiguous mask from an uncompressed RLE."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1  # runs alternate 0, 1, 0, ...
    flat = np.repeat(values, counts)
    return np.ascontiguousarray(flat.reshape(w, h).T)


def area_from_rle(rle: RLE) -> int:
    """Number of foreground pixels of an uncompressed RLE (sum of the odd runs)."""
    return int(sum(rle["counts"][1::2]))


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``mode="islands"``) smaller than ``area_thresh`` px,
    using 8-connectivity; returns the mask and whether it changed. If every island is small, the largest
    one is kept so that the mask never becomes empty."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"remove_small_regions: mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    # For holes, label the background's connected components; for islands, the foreground's.
    working = (mask ^ holes).astype(np.uint8)
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]  # label 0 is the complement of ``working``
    small = np.flatnonzero(sizes < area_thresh) + 1
    if small.size == 0:
        return mask, False
    fill = np.zeros(n_labels, dtype=bool)  # lookup: label -> output value
    if holes:
        fill[0] = True  # the mask itself
        fill[small] = True  # the small holes, now filled
    else:
        fill[1:] = True
        fill[small] = False
        if not fill.any():
            fill[int(np.argmax(sizes)) + 1] = True
    return fill[labels], True


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression with torchvision's semantics; returns kept indices (int64), best first.

    Boxes ``(N, 4)`` XYXY, IoU computed in float32 with areas ``(x1 - x0) * (y1 - y0)``; a box is dropped
    when its IoU with a kept, higher-scored box is ``> iou_threshold``. Equal scores are visited in index
    order (a stable sort), as torchvision's CPU kernel does.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores).reshape(-1)
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = boxes[order].T
    areas = (x1 - x0) * (y1 - y0)
    alive = np.ones(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not alive[i]:
            continue
        keep.append(order[i])
        rest = i + 1 + np.flatnonzero(alive[i + 1 :])
        if rest.size == 0:
            break
        w = np.maximum(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), np.float32(0))
        h = np.maximum(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), np.float32(0))
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):  # two empty boxes: 0/0 = nan, never suppressed
            iou = inter / (areas[i] + areas[rest] - inter)
        # Compare in float64 like the C++ kernel (float IoU promoted against a double threshold).
        alive[rest[iou.astype(np.float64) > iou_threshold]] = False
    return np.asarray(keep, dtype=np.int64)
