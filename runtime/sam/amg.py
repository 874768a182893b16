"""Automatic mask generation for SAM without torch: the algorithm of the official
``segment_anything.SamAutomaticMaskGenerator`` (v1), with its defaults and record fields.

For every crop (the whole image, then optional layers of overlapping crops) the crop is embedded once and a
grid of single foreground points is decoded in batches of ``points_per_batch``, three candidate masks per
point. Candidates are filtered by predicted IoU, by stability score (IoU of the logits thresholded at
``0 ± stability_score_offset``) and by touching a crop edge that is not an image edge; survivors are stored as
run-length encodings right away. With edgefm's ``SamPredictor`` only the candidates that pass the IoU filter
(known from the decoder) are upscaled to full size, 16 at a time: the official generator upscales all of a
batch at once (2.6 GB of float32 for 64 points on a 1500 x 2250 photo), and the records are the same. Duplicates are
removed by box NMS within each crop (best predicted IoU wins), then across crops (the smaller crop wins),
and optionally after filling small holes and removing small islands (unchanged masks win).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from ..errors import InputError
from .amg_utils import (
    area_from_rle,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle,
    nms,
    remove_small_regions,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
Columns = dict[str, Any]  # column name -> ndarray (first axis = mask) or list of RLEs


class PointPredictor(Protocol):
    """What the generator needs from a predictor (``edgefm.runtime.sam.SamPredictor`` provides it). A predictor
    that also has SamPredictor's ``upscale(low_res, stability_offset=...)`` and ``predict_batch(...,
    upscale=False)`` gets only its IoU-filter survivors upscaled, a chunk at a time."""

    def set_image(self, image: np.ndarray) -> None: ...

    def predict_batch(
        self,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        multimask_output: bool = True,
        return_logits: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def _take(cols: Columns, keep: np.ndarray) -> Columns:
    """Rows ``keep`` (bool mask or indices, in that order) of every column."""
    if keep.dtype == bool:
        keep = np.flatnonzero(keep)
    return {k: [v[i] for i in keep] if isinstance(v, list) else v[keep] for k, v in cols.items()}


def _concat(parts: list[Columns], keys: tuple[str, ...], row_shapes: dict[str, tuple]) -> Columns:
    """Concatenate column dicts row-wise; empty inputs give correctly shaped empty columns."""
    out: Columns = {}
    for k in keys:
        if k == "rles":
            out[k] = [r for p in parts for r in p[k]]
        elif parts:
            out[k] = np.concatenate([p[k] for p in parts], axis=0)
        else:
            shape, dtype = row_shapes[k]
            out[k] = np.zeros((0, *shape), dtype)
    return out


_KEYS = ("rles", "boxes", "iou_preds", "points", "stability_score", "crop_boxes")
_ROWS = {
    "boxes": ((4,), np.int64),
    "iou_preds": ((), np.float32),
    "points": ((2,), np.float64),
    "stability_score": ((), np.float32),
    "crop_boxes": ((4,), np.int64),
}


class SamAutomaticMaskGenerator:
    """Masks for a whole image from a grid of point prompts (official defaults, tuned for ViT-H).

    Args:
        predictor: a ``SamPredictor`` (or anything with ``set_image`` and ``predict_batch``, see
            :class:`PointPredictor`); ``predict_batch`` takes XY points in pixels of the image last given to
            ``set_image`` and returns full-size logits.
        points_per_side: grid points along each side of layer 0 (``points_per_side**2`` prompts); ``None``
            when ``point_grids`` is given instead.
        points_per_batch: prompts decoded per call; bounds memory (3 full-size float32 logit maps each).
        pred_iou_thresh: keep masks whose predicted IoU is ``>`` this (skipped when 0).
        stability_score_thresh: keep masks whose stability score is ``>=`` this (skipped when 0).
        stability_score_offset: logit offset of the two cutoffs of the stability score.
        box_nms_thresh: box IoU above which a mask is a duplicate within one crop.
        crop_n_layers: extra crop layers; layer i has ``(2**i)**2`` crops.
        crop_nms_thresh: box IoU above which masks of different crops are duplicates.
        crop_overlap_ratio: overlap of layer-1 crops as a fraction of the image's short side.
        crop_n_points_downscale_factor: layer i uses ``points_per_side / factor**i`` points per side.
        point_grids: explicit normalised ``(N, 2)`` XY grids in [0, 1], one per layer.
        min_mask_region_area: if > 0, fill holes and remove islands smaller than this many pixels.
        output_mode: ``"binary_mask"`` (bool HxW), ``"uncompressed_rle"`` or ``"coco_rle"`` (pycocotools).
        progress: show a progress bar over the decoder batches.
    """

    def __init__(
        self,
        predictor: PointPredictor,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        progress: bool = False,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise InputError(
                "SamAutomaticMaskGenerator: give exactly one of points_per_side (a number of grid points per "
                "side) and point_grids (explicit normalised grids, one per crop layer); pass "
                "points_per_side=None when you give point_grids."
            )
        if points_per_side is not None:
            point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        if len(point_grids) < crop_n_layers + 1:
            raise InputError(
                f"SamAutomaticMaskGenerator: point_grids has {len(point_grids)} grid(s) but crop_n_layers="
                f"{crop_n_layers} needs {crop_n_layers + 1} (one for the whole image and one per crop layer)."
            )
        if output_mode not in OUTPUT_MODES:
            raise InputError(
                f"SamAutomaticMaskGenerator: unknown output_mode {output_mode!r}; use one of {OUTPUT_MODES}."
            )
        if output_mode == "coco_rle":
            try:
                import pycocotools.mask  # noqa: F401
            except ImportError as exc:
                raise InputError(
                    "SamAutomaticMaskGenerator: output_mode='coco_rle' needs the package pycocotools, which "
                    "is not installed; install it (pip install pycocotools) or use "
                    "output_mode='uncompressed_rle', the same RLE before compression."
                ) from exc
        if points_per_batch < 1:
            raise InputError(
                f"SamAutomaticMaskGenerator: points_per_batch must be >= 1, got {points_per_batch}."
            )
        self.predictor = predictor
        self.point_grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.progress = progress
        # The official model binarises logits at 0; a predictor may say otherwise.
        self.mask_threshold = float(getattr(predictor, "mask_threshold", 0.0))
        # How the last generate()'s candidates fared in the two quality filters (a "0 masks" can say why).
        self.filter_counts = {"candidates": 0, "passed_iou": 0, "passed_stability": 0}
        self.best_predicted_iou = float("nan")

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for ``image`` (HWC uint8 RGB), as records with the official keys:

        ``segmentation`` (bool HxW, or an RLE dict per ``output_mode``), ``area`` (int pixels), ``bbox``
        (XYWH ints), ``predicted_iou`` (float), ``point_coords`` (``[[x, y]]`` the prompt, image pixels),
        ``stability_score`` (float), ``crop_box`` (XYWH ints of the crop that produced the mask).
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(
                f"SamAutomaticMaskGenerator.generate: expected an HxWx3 uint8 RGB image, got an array of "
                f"shape {image.shape} and dtype {image.dtype}; convert it (e.g. cv2.cvtColor(img, "
                "cv2.COLOR_BGR2RGB) for OpenCV's BGR images)."
            )
        self.filter_counts = dict.fromkeys(self.filter_counts, 0)
        self.best_predicted_iou = float("nan")
        data = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        return [self._record(data, i) for i in range(len(data["rles"]))]

    def _record(self, data: Columns, i: int) -> dict[str, Any]:
        rle = data["rles"][i]
        if self.output_mode == "binary_mask":
            segmentation: Any = rle_to_mask(rle)
        elif self.output_mode == "coco_rle":
            segmentation = _coco_encode_rle(rle)
        else:
            segmentation = rle
        return {
            "segmentation": segmentation,
            "area": area_from_rle(rle),
            "bbox": box_xyxy_to_xywh(data["boxes"][i]).tolist(),
            "predicted_iou": float(data["iou_preds"][i]),
            "point_coords": [data["points"][i].tolist()],
            "stability_score": float(data["stability_score"][i]),
            "crop_box": box_xyxy_to_xywh(data["crop_boxes"][i]).tolist(),
        }

    def _generate_masks(self, image: np.ndarray) -> Columns:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        n_batches = sum(
            math.ceil(len(self.point_grids[layer]) / self.points_per_batch) for layer in layer_idxs
        )
        bar = _progress_bar(n_batches, self.progress)
        try:
            parts = [
                self._process_crop(image, box, layer, orig_size, bar)
                for box, layer in zip(crop_boxes, layer_idxs, strict=True)
            ]
        finally:
            if bar is not None:
                bar.close()
        data = _concat(parts, _KEYS, _ROWS)
        if len(crop_boxes) > 1:
            # Across crops, the smaller crop's mask wins: it saw the object at a higher resolution.
            cb = data["crop_boxes"]
            area = ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1])).astype(np.float32)
            data = _take(data, nms(data["boxes"], np.float32(1) / area, self.crop_nms_thresh))
        return data

    def _process_crop(
        self, image: np.ndarray, crop_box: list[int], layer: int, orig_size: tuple[int, int], bar: Any
    ) -> Columns:
        x0, y0, x1, y1 = crop_box
        crop = np.ascontiguousarray(image[y0:y1, x0:x1, :])
        crop_size = crop.shape[:2]
        self.predictor.set_image(crop)
        points = self.point_grids[layer] * np.array(crop_size)[None, ::-1]  # normalised -> crop XY pixels
        parts = []
        for start in range(0, len(points), self.points_per_batch):
            batch = points[start : start + self.points_per_batch]
            parts.append(self._process_batch(batch, crop_size, crop_box, orig_size))
            if bar is not None:
                bar.update(1)
        data = _concat(parts, _KEYS[:-1], _ROWS)
        # Within a crop, the mask with the best predicted IoU wins among overlapping boxes.
        data = _take(data, nms(data["boxes"], data["iou_preds"], self.box_nms_thresh))
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = np.tile(np.asarray(crop_box, np.int64), (len(data["rles"]), 1))
        return data

    UPSCALE_CHUNK = 16  # full-size logit maps made at once from the low-res ones

    def _process_batch(
        self, points: np.ndarray, crop_size: tuple[int, int], crop_box: list[int], orig_size: tuple[int, int]
    ) -> Columns:
        labels = np.ones((len(points), 1), dtype=np.int64)
        upscale = getattr(self.predictor, "upscale", None)
        if upscale is None:  # a predictor that only gives full-size logits: all of them at once
            masks, iou_preds, _ = self.predictor.predict_batch(
                points[:, None, :], labels, multimask_output=True, return_logits=True
            )
            n_out = masks.shape[1]
            masks = masks.reshape(-1, *masks.shape[-2:])  # (B*C, h, w) logits, point-major like the reference

            def masks_and_stability(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                maps = masks[rows]
                score = calculate_stability_score(maps, self.mask_threshold, self.stability_score_offset)
                return maps > self.mask_threshold, score
        else:
            # SamPredictor: the candidates the IoU filter drops are never upscaled, and the rest a few at a time,
            # so a batch never holds B*C full-size float maps (2.6 GB for 64 points on a 1500 x 2250 photo).
            _, iou_preds, low = self.predictor.predict_batch(
                points[:, None, :], labels, multimask_output=True, return_logits=True, upscale=False
            )
            n_out = low.shape[1]
            low = low.reshape(-1, 1, *low.shape[-2:])

            def masks_and_stability(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                binary, score = upscale(low[rows], stability_offset=self.stability_score_offset)
                return binary[:, 0], score[:, 0]

        iou_preds = np.asarray(iou_preds, np.float32).reshape(-1)
        points = np.repeat(points, n_out, axis=0)
        # Filters pick row indices; the logits are then made and read a chunk at a time, which keeps the
        # temporaries small (and per map in cache: about 3x faster than whole-batch comparisons).
        idx = np.arange(len(iou_preds))
        if self.pred_iou_thresh > 0.0:
            idx = idx[iou_preds > self.pred_iou_thresh]
        counts = self.filter_counts
        counts["candidates"] += len(iou_preds)
        counts["passed_iou"] += len(idx)
        if len(iou_preds):
            self.best_predicted_iou = float(np.fmax(self.best_predicted_iou, iou_preds.max()))
        kept, stability, binary = [], [], []
        for start in range(0, len(idx), self.UPSCALE_CHUNK):
            rows = idx[start : start + self.UPSCALE_CHUNK]
            chunk, score = masks_and_stability(rows)
            passed = score >= self.stability_score_thresh if self.stability_score_thresh > 0.0 else \
                np.ones(len(rows), bool)
            kept.append(rows[passed])
            stability.append(score[passed])
            binary.extend(chunk[passed])
            del chunk
        idx = np.concatenate(kept) if kept else idx[:0]
        counts["passed_stability"] += len(idx)
        stability = np.concatenate(stability) if stability else np.zeros(0, np.float32)
        binary = np.stack(binary) if binary else np.zeros((0, *crop_size), bool)
        boxes = batched_mask_to_box(binary)
        # Masks cut by a crop edge (not an image edge) are partial objects; another crop sees them whole.
        keep = np.flatnonzero(~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]]))
        binary = uncrop_masks(binary[keep], crop_box, *orig_size)
        idx = idx[keep]
        return {
            "rles": mask_to_rle(binary),
            "boxes": boxes[keep],
            "iou_preds": iou_preds[idx],
            "points": points[idx],
            "stability_score": stability[keep],
        }

    @staticmethod
    def postprocess_small_regions(data: Columns, min_area: int, nms_thresh: float) -> Columns:
        """Fill holes and drop islands smaller than ``min_area`` px, then NMS again, preferring masks that
        did not change; boxes and RLEs are recomputed only for the changed masks that survive."""
        if len(data["rles"]) == 0:
            return data
        changed_masks: dict[int, np.ndarray] = {}
        boxes = np.array(data["boxes"], copy=True)
        scores = np.ones(len(data["rles"]), np.float32)
        for i, rle in enumerate(data["rles"]):
            mask = rle_to_mask(rle)
            mask, filled = remove_small_regions(mask, min_area, mode="holes")
            mask, trimmed = remove_small_regions(mask, min_area, mode="islands")
            if filled or trimmed:
                changed_masks[i] = mask
                scores[i] = 0.0
                boxes[i] = batched_mask_to_box(mask)
        keep = nms(boxes, scores, nms_thresh)
        rles = list(data["rles"])
        for i in keep:
            if i in changed_masks:
                rles[i] = mask_to_rle(changed_masks[i][None])[0]
        data = dict(data, rles=rles, boxes=boxes)
        return _take(data, keep)


def _coco_encode_rle(rle: dict[str, Any]) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    h, w = rle["size"]
    coco = mask_utils.frPyObjects(rle, h, w)
    coco["counts"] = coco["counts"].decode("utf-8")  # bytes -> str so that the record is JSON-serialisable
    return coco


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="automatic masks", unit="batch")
