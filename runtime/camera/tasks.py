"""What the camera pipeline computes per frame: CLIP zero-shot labels, SAM masks from a fixed prompt,
SAM tracking from the previous mask, or automatic masks at a reduced rate.

Each task splits its work over the pipeline's stages: ``preprocess(image)`` (resize/normalize, pure
numpy/OpenCV), ``infer(frame, pre)`` (the models; tasks keep state such as the tracked mask here, only
ever touched by the infer thread), ``draw(image, result)`` and ``record(result)`` (a JSON-able dict).
Models are loaded once, in the constructor. Conventions: images HWC uint8 RGB, points XY pixels, boxes
XYXY pixels, masks bool (N, H, W).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from ..draw import overlay_masks, put_label
from ..errors import InputError
from ..sam.amg_utils import mask_to_rle
from .sources import Frame


@dataclass
class Result:
    """One frame's output. ``t_capture`` is the capture time of the frame the result was computed on
    (older than the drawn frame for ``auto``, which reuses its last result)."""

    t_capture: float
    labels: list[str] = field(default_factory=list)  # classify: labels best first
    scores: list[float] = field(default_factory=list)  # classify: their probabilities; masks: predicted IoU
    masks: np.ndarray | None = None  # (N, H, W) bool
    points: np.ndarray | None = None  # prompt points used (N, 2)
    box: np.ndarray | None = None  # prompt box used (4,)
    lost: bool = False  # track: the object was not found in this frame


def mask_boxes(masks: np.ndarray) -> list[list[int]]:
    """XYXY integer boxes (inclusive pixel bounds) of bool masks (N, H, W); [0, 0, 0, 0] for an empty one."""
    out = []
    for m in masks:
        ys, xs = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        out.append([int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])] if len(xs) else [0, 0, 0, 0])
    return out


def inner_point(mask: np.ndarray) -> np.ndarray:
    """The pixel deepest inside ``mask`` (peak of the distance transform), XY; robust for concave shapes
    where the centroid can lie outside the object."""
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return np.array([x, y], np.float32)


class Task:
    """Base: subclasses set ``name``/``backend`` and implement ``infer``."""

    name = "task"
    backend = "-"

    def preprocess(self, image: np.ndarray) -> Any:
        return None

    def infer(self, frame: Frame, pre: Any) -> Result:
        raise NotImplementedError

    def draw(self, image: np.ndarray, result: Result) -> np.ndarray:
        return image.copy()

    def record(self, result: Result) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class ClassifyTask(Task):
    """CLIP zero-shot over ``labels``: text embeddings once at start; probabilities averaged over the last
    ``smooth`` frames (1 = no smoothing) to steady the label on a live stream."""

    name = "classify"

    def __init__(self, model: Any, labels: Sequence[str], templates: str | Sequence[str] = "imagenet80",
                 smooth: int = 1, top_k: int = 3) -> None:
        from ..clip.zero_shot import check_labels

        if smooth < 1:
            raise InputError(f"--smooth must be at least 1 (frames averaged), got {smooth}")
        self.model, self.labels = model, list(check_labels(labels))
        self.backend = model.bundle.backend
        self.label_emb = model.label_embeddings(self.labels, templates)
        self.top_k = max(1, min(top_k, len(self.labels)))
        self._history: deque[np.ndarray] = deque(maxlen=smooth)
        self.device_prep = model.preprocess_on == "device"  # decided (and checked) before the threads start

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        # On the device, the infer stage resizes and normalizes where the encoder runs.
        return image if self.device_prep else self.model.preprocess(image)

    def infer(self, frame: Frame, pre: np.ndarray) -> Result:
        from ..clip.zero_shot import zero_shot_probs

        emb = self.model.encode_images([pre]) if self.device_prep else self.model.encode_pixels(pre[None])
        self._history.append(zero_shot_probs(emb, self.label_emb, self.model.logit_scale)[0])
        probs = np.mean(self._history, axis=0)
        order = np.argsort(-probs, kind="stable")[: self.top_k]
        return Result(frame.t_capture, [self.labels[i] for i in order], [float(probs[i]) for i in order])

    def draw(self, image: np.ndarray, result: Result) -> np.ndarray:
        out = image.copy()
        for row, (label, score) in enumerate(zip(result.labels, result.scores)):
            put_label(out, f"{score:5.1%}  {label}", (8, 44 + 22 * row), scale=0.6)
        return out

    def record(self, result: Result) -> dict[str, Any]:
        return {"labels": result.labels, "scores": [round(s, 5) for s in result.scores]}


class _SamTask(Task):
    """Shared SAM plumbing: the encoder input is made in the preprocess stage, encoder + decoder in infer."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.backend = predictor.backend
        # Decided (and, on a GPU, checked) here, before the stages' threads start.
        self.device_prep = predictor.preprocess_on == "device"

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]] | np.ndarray:
        from ..sam.transforms import resized_shape

        p = self.predictor
        if self.device_prep:  # done by the infer stage, on the GPU (its buffer is the encoder's input)
            return image
        return p.host_pixels(image), image.shape[:2], resized_shape(*image.shape[:2], p.image_size)

    def _encode(self, pre: tuple[np.ndarray, tuple[int, int], tuple[int, int]] | np.ndarray) -> None:
        # The same state SamPredictor.set_image leaves, with the resize/normalize already done upstream.
        if isinstance(pre, np.ndarray):
            self.predictor.set_image(pre)
        else:
            self.predictor.set_preprocessed(*pre)

    def _predict(self, points: np.ndarray | None, box: np.ndarray | None) -> tuple[np.ndarray, float]:
        labels = None if points is None else np.ones(len(points), np.float32)
        # One click is ambiguous (part vs whole): take the best of the three candidates, as SAM advises.
        multi = box is None and points is not None and len(points) == 1
        masks, scores, _ = self.predictor.predict(points, labels, box, multimask_output=multi)
        best = int(np.argmax(scores))
        return masks[best], float(scores[best])

    def draw(self, image: np.ndarray, result: Result) -> np.ndarray:
        masks = result.masks if result.masks is not None else []
        out = overlay_masks(image, masks, result.points, None, result.box)
        if result.lost:
            put_label(out, "lost", (8, 44), scale=0.6)
        return out

    def record(self, result: Result) -> dict[str, Any]:
        masks = result.masks if result.masks is not None else np.zeros((0, 1, 1), bool)
        rles = mask_to_rle(masks) if len(masks) else []
        items = [{"box": b, "score": round(s, 5), "area": int(m.sum()), "rle": r}
                 for b, s, m, r in zip(mask_boxes(masks), result.scores, masks, rles)]
        out: dict[str, Any] = {"masks": items}
        if result.lost:
            out["lost"] = True
        return out


def _check_prompt(point: np.ndarray | None, box: np.ndarray | None, task: str) -> None:
    if point is None and box is None:
        raise InputError(f"--task {task} needs a prompt: pass --point X,Y and/or --box X0,Y0,X1,Y1 (pixels)")


class SegmentTask(_SamTask):
    """SAM with the same point(s) and/or box on every frame."""

    name = "segment"

    def __init__(self, predictor: Any, point: np.ndarray | None = None, box: np.ndarray | None = None) -> None:
        super().__init__(predictor)
        _check_prompt(point, box, self.name)
        self.points = None if point is None else np.asarray(point, np.float32).reshape(-1, 2)
        self.box = None if box is None else np.asarray(box, np.float32).reshape(4)

    def infer(self, frame: Frame, pre: Any) -> Result:
        self._encode(pre)
        mask, score = self._predict(self.points, self.box)
        return Result(frame.t_capture, scores=[score], masks=mask[None], points=self.points, box=self.box)


class TrackTask(_SamTask):
    """One click (or box) follows an object: each frame is prompted with the previous mask's box, widened
    by ``margin`` of its size so the moved object still fits, plus the mask's deepest inner point. When the
    mask comes back empty the last good prompt is kept and the frame is marked lost."""

    name = "track"

    def __init__(self, predictor: Any, point: np.ndarray | None = None, box: np.ndarray | None = None,
                 margin: float = 0.15) -> None:
        super().__init__(predictor)
        _check_prompt(point, box, self.name)
        self.points = None if point is None else np.asarray(point, np.float32).reshape(-1, 2)
        self.box = None if box is None else np.asarray(box, np.float32).reshape(4)
        self.margin = margin

    def _next_prompt(self, mask: np.ndarray) -> None:
        h, w = mask.shape
        x0, y0, x1, y1 = mask_boxes(mask[None])[0]
        mx, my = self.margin * (x1 - x0 + 1) + 2, self.margin * (y1 - y0 + 1) + 2
        self.box = np.array([max(x0 - mx, 0), max(y0 - my, 0), min(x1 + 1 + mx, w), min(y1 + 1 + my, h)],
                            np.float32)
        self.points = inner_point(mask)[None]

    def infer(self, frame: Frame, pre: Any) -> Result:
        self._encode(pre)
        points, box = self.points, self.box
        mask, score = self._predict(points, box)
        lost = not mask.any()
        if not lost:
            self._next_prompt(mask)
        return Result(frame.t_capture, scores=[score], masks=mask[None], points=points, box=box, lost=lost)


class AutoTask(_SamTask):
    """Automatic masks on a background thread, as often as it can run (and at most every ``interval`` s);
    every frame is drawn with the newest finished result, so the stream keeps its frame rate."""

    name = "auto"

    def __init__(self, predictor: Any, points_per_side: int = 16, pred_iou_thresh: float = 0.8,
                 stability_score_thresh: float = 0.9, interval: float = 0.0) -> None:
        from ..sam.amg import SamAutomaticMaskGenerator

        super().__init__(predictor)
        self.generator = SamAutomaticMaskGenerator(predictor, points_per_side=points_per_side,
                                                   pred_iou_thresh=pred_iou_thresh,
                                                   stability_score_thresh=stability_score_thresh)
        self.interval = interval
        self.runs = 0
        self.error: BaseException | None = None
        self._last = Result(t_capture=float("nan"))
        self._pending: threading.Event = threading.Event()
        self._busy = False
        self._next_frame: Frame | None = None
        self._t_last_run = -float("inf")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._worker, name="edgefm-auto", daemon=True)
        self._thread.start()

    def preprocess(self, image: np.ndarray) -> None:
        return None

    def _worker(self) -> None:
        while not self._stop.is_set():
            if not self._pending.wait(0.1):
                continue
            self._pending.clear()
            with self._lock:
                frame, self._next_frame = self._next_frame, None
            if frame is None:
                continue
            try:
                records = self.generator.generate(frame.image)
            except BaseException as exc:  # re-raised by infer on the pipeline's thread
                self.error = exc
                return
            masks = np.array([r["segmentation"] for r in records], bool).reshape(-1, *frame.image.shape[:2])
            with self._lock:
                self._last = Result(frame.t_capture, scores=[float(r["predicted_iou"]) for r in records],
                                    masks=masks)
                self._busy = False
                self.runs += 1

    def infer(self, frame: Frame, pre: Any) -> Result:
        import time

        if self.error is not None:
            raise self.error
        with self._lock:
            now = time.monotonic()
            if not self._busy and now - self._t_last_run >= self.interval:
                self._busy, self._next_frame, self._t_last_run = True, frame, now
                self._pending.set()
            return self._last

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
