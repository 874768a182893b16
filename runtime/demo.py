"""``edgefm demo``: export the demo checkpoints (cached), run them on generated scenes, write pictures.

Until the project's trained demo weights ship, the demo SAM has seeded random weights: the pictures show
the whole path (checkpoint -> ONNX bundle -> torch-free predictor) working, not a trained model's quality.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from .draw import overlay_masks, write_image
from .errors import MissingExtraError


def make_scene(h: int, w: int, seed: int = 0, n_shapes: int = 4) -> np.ndarray:
    """A gradient background with filled circles and squares: HWC uint8 RGB, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 200, yy / h * 200, (xx + yy) / (w + h) * 150 + 50], -1).astype(np.uint8)
    for _ in range(n_shapes):
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        cx, cy = int(rng.integers(w // 5, 4 * w // 5)), int(rng.integers(h // 5, 4 * h // 5))
        r = int(rng.integers(min(h, w) // 10, min(h, w) // 4))
        if rng.random() < 0.5:
            cv2.circle(img, (cx, cy), r, color, -1)
        else:
            cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), color, -1)
    return img


def default_cache() -> Path:
    return Path(os.environ.get("EDGEFM_CACHE", Path.home() / ".cache" / "edgefm"))


def demo_bundles(cache: Path) -> dict[str, Path]:
    """Bundles of the demo models, exported on first use and reused while their checkpoint is unchanged.
    Without torch installed, existing bundles are used as they are."""
    sam = cache / "demo" / "sam_tiny"
    try:
        from edgefm.export.demo import ensure_demo_bundles
    except ImportError:
        if (sam / "manifest.json").is_file():
            return {"sam": sam}
        raise MissingExtraError("torch", "export", "The first `edgefm demo` (exporting the demo models)") from None
    return ensure_demo_bundles(cache / "demo")


def run_demo(out: Path, cache: Path | None = None, backend: str = "auto") -> None:
    from .sam import SamAutomaticMaskGenerator, SamPredictor

    t_start = time.perf_counter()
    bundles = demo_bundles(cache or default_cache())
    predictor = SamPredictor(bundles["sam"], backend=backend)
    image = make_scene(480, 640, seed=7)
    times: dict[str, list[float]] = {"image_encoder (set_image)": [], "prompt -> mask (predict)": []}

    t = time.perf_counter()
    predictor.set_image(image)
    times["image_encoder (set_image)"].append(time.perf_counter() - t)
    point, box = np.array([[320.0, 240.0]]), np.array([100.0, 80.0, 360.0, 300.0])
    results = []
    for name, prompt in (("click", dict(point_coords=point, point_labels=np.array([1]))), ("box", dict(box=box))):
        t = time.perf_counter()
        masks, scores, _ = predictor.predict(multimask_output=False, **prompt)
        times["prompt -> mask (predict)"].append(time.perf_counter() - t)
        drawn = overlay_masks(image, masks, prompt.get("point_coords"), prompt.get("point_labels"),
                              prompt.get("box"))
        path = write_image(out / f"sam_{name}.png", drawn)
        results.append(f"  sam {name:<6} mask of {int(masks[0].sum())} px, predicted IoU {scores[0]:.3f} -> {path}")

    t = time.perf_counter()
    records = SamAutomaticMaskGenerator(predictor, points_per_side=16, pred_iou_thresh=0.0,
                                        stability_score_thresh=0.8).generate(image)
    t_auto = time.perf_counter() - t
    path = write_image(out / "sam_auto.png", overlay_masks(image, [r["segmentation"] for r in records]))
    results.append(f"  sam auto   {len(records)} masks from a 16x16 point grid in {t_auto:.2f} s -> {path}")

    print(f"edgefm demo ({predictor.backend}); demo SAM weights are seeded random until trained ones ship")
    print("\n".join(results))
    print("latency (median ms):")
    for name, values in times.items():
        print(f"  {name:<28} {np.median(values) * 1e3:8.2f}")
    print(f"done in {time.perf_counter() - t_start:.1f} s; pictures in {out}/", file=sys.stderr)
