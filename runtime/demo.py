"""``edgefm demo``: the shipped shapes-world models, exported (cached) and run by the torch-free runtime.

On a generated scene: SAM segments an object from a click and another from a box, then finds every object
with automatic mask generation; CLIP names each found object zero-shot; DALL·E draws two prompts, reranked
by CLIP. Pictures go to the output folder; a summary (what was found, latency per component) is printed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from . import shapes
from .backends import resolve_backend
from .bundle import Bundle
from .draw import overlay_masks, put_label, write_image
from .errors import MissingExtraError

DEMO_NAMES = ("sam", "clip", "dalle")


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
    """Bundles of the demo models, exported on first use and reused while their checkpoints are unchanged.
    Without torch installed, bundles already in the cache are used as they are."""
    folder = cache / "demo"
    try:
        from edgefm.export.demo import ensure_demo_bundles
    except ImportError:
        found = {n: folder / f"{n}_shapes" for n in DEMO_NAMES}
        if all((p / "manifest.json").is_file() for p in found.values()):  # torch-free rerun on the cache
            return found
        raise MissingExtraError("torch", "export", "The first `edgefm demo` (exporting the demo models)") from None
    return ensure_demo_bundles(folder, progress=lambda m: print(f"edgefm: {m}", file=sys.stderr, flush=True))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


class _Remembering:
    """CLIP as DALL·E's reranker, keeping the image embeddings it computed so the demo can classify the same
    samples without encoding them twice."""

    def __init__(self, clip) -> None:  # noqa: ANN001 - a ClipModel
        self.clip, self.image_embeddings = clip, None

    def encode_images(self, images):  # noqa: ANN001, ANN201 - the Reranker protocol
        self.image_embeddings = self.clip.encode_images(images)
        return self.image_embeddings

    def encode_texts(self, texts):  # noqa: ANN001, ANN201
        return self.clip.encode_texts(texts)


def _crop(image: np.ndarray, box_xywh, margin: float = 0.15) -> np.ndarray:
    x, y, w, h = box_xywh
    m = int(max(w, h) * margin)
    return image[max(y - m, 0): y + h + m, max(x - m, 0): x + w + m]


def run_demo(out: Path, cache: Path | None = None, backend: str = "auto") -> None:
    from .clip import ClipModel
    from .dalle.cli import image_grid
    from .dalle.generator import DalleGenerator
    from .sam import SamAutomaticMaskGenerator, SamPredictor

    t_start = time.perf_counter()
    paths = demo_bundles(cache or default_cache())
    backend = resolve_backend(backend, {"onnx"})  # once for the three bundles (they hold ONNX only)
    bundles = {n: Bundle(p, backend, family=n, timed=True) for n, p in paths.items()}
    predictor, clip = SamPredictor(bundles["sam"]), ClipModel(bundles["clip"])
    scene = shapes.random_scene(seed=2024, index=6, size=(360, 480), n_objects=(4, 4))
    image, objects = scene.image, scene.objects
    lines = [f"scene: {', '.join(o.phrase() for o in objects)} on a {scene.background} background"]

    predictor.set_image(image)
    click = shapes.interior_point(objects[0].mask)
    masks, scores, _ = predictor.predict(click, np.array([1]), multimask_output=True)
    best = masks[int(np.argmax(scores))]
    write_image(out / "sam_click.png", overlay_masks(image, [best], click, np.array([1])))
    lines.append(f"click on the {objects[0].label}: mask IoU {_iou(best, objects[0].mask):.3f} with the exact mask"
                 f" -> {out / 'sam_click.png'}")
    box = objects[1].box
    masks, _, _ = predictor.predict(box=box, multimask_output=False)
    write_image(out / "sam_box.png", overlay_masks(image, masks, boxes=box))
    lines.append(f"box around the {objects[1].label}: mask IoU {_iou(masks[0], objects[1].mask):.3f} "
                 f"-> {out / 'sam_box.png'}")

    # The official quality thresholds (0.88 / 0.95) suit 256² mask logits; this model's are 64², so its
    # stability scores run lower.
    records = SamAutomaticMaskGenerator(predictor, points_per_side=16, pred_iou_thresh=0.8,
                                        stability_score_thresh=0.9).generate(image)
    labels = list(shapes.CLASSES)
    templates_file = next(iter(paths.values())).parent / "clip_templates.json"
    templates = json.loads(templates_file.read_text()) if templates_file.is_file() else "simple"
    named = []
    if records:
        probs = clip.zero_shot([_crop(image, r["bbox"]) for r in records], labels, templates=templates)
        named = [(labels[int(p.argmax())], float(p.max())) for p in probs]
    captions = [f"{lab} {p:.2f}" for lab, p in named]
    write_image(out / "sam_auto.png", overlay_masks(image, [r["segmentation"] for r in records], captions=captions))
    truth = {o.label for o in objects}
    found = sum(lab in truth for lab, _ in named)
    lines.append(f"automatic masks: {len(records)} found, CLIP names {found} of them as objects in the scene: "
                 + ", ".join(captions) + f" -> {out / 'sam_auto.png'}")

    generator = DalleGenerator(bundles["dalle"])
    reranker = _Remembering(clip)
    for text in ("a red circle", "a blue star"):
        result = generator.generate(text, n=6, seed=0, top_k=8, rerank=reranker)
        # How many samples the demo CLIP reads as the prompt's class: the honest measure of this small DALL·E
        # (from the embeddings the reranking computed, in the samples' order).
        label = text.removeprefix("a ")
        read = clip.zero_shot(reranker.image_embeddings, labels, templates=templates).argmax(axis=1)
        hits = int(sum(labels[int(k)] == label for k in read))
        tiles = [cv2.resize(im, (96, 96), interpolation=cv2.INTER_NEAREST) for im in result.ranked_images()]
        grid = image_grid(tiles, [f"{s:.2f}" for s in np.sort(result.scores)[::-1]], columns=6)
        name = out / f"dalle_{text.replace(' ', '_')}.png"
        put_label(grid, text, (3, grid.shape[0] - 6))
        write_image(name, grid)
        lines.append(f"DALL·E '{text}' (guidance {result.guidance:g}): CLIP reads {hits} of 6 samples as a {label}; "
                     f"reranked, best score {result.scores.max():.3f} -> {name}")

    print(f"edgefm demo — shapes-world models trained by this project, backend {predictor.backend}")
    print("\n".join("  " + line for line in lines))
    print("latency per component (median ms over its calls):")
    print("\n".join(latency_lines(bundles)))
    print(f"done in {time.perf_counter() - t_start:.1f} s; pictures in {out}/", file=sys.stderr)


def latency_lines(bundles: dict[str, Bundle]) -> list[str]:
    """One line per component the demo called: its median latency and call count. Components that were opened
    but never called (SAM's two-call path, when every prompt went through ``prompt_decoder``) are left out."""
    return [f"  {fam + '.' + comp:<24} {np.median(ts) * 1e3:8.2f}  ({len(ts)} calls)"
            for fam, b in bundles.items() for comp, ts in (b.timings or {}).items() if ts]
