"""Accuracy of the shipped shapes-world SAM and CLIP through the exported runtime, on held-out scenes.

Parity proves the ONNX graphs equal PyTorch; these tests prove the whole path is right: a wrong coordinate
transform, resize rule or normalization in the runtime's pre/post-processing passes parity and fails here.
The scenes come from the generator's held-out streams (seed 1000+; training used seeds 0 and 1), drawn at
sizes other than the models' input sizes so that the runtime's resizing is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # exporting the shipped checkpoints needs the [export] extra

from edgefm.runtime.clip import ClipModel  # noqa: E402
from edgefm.runtime.sam import SamPredictor  # noqa: E402
from edgefm.runtime.shapes import CLASSES, interior_point, random_scene, single_object  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"
SAM_SIZES = [(160, 224), (256, 192), (128, 128)]  # (H, W) of the held-out scenes


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def sam_predictor(tmp_path_factory) -> SamPredictor:
    from edgefm.export.sam import export_sam
    from edgefm.models.sam import SamConfig

    meta = json.loads((WEIGHTS / "sam_shapes.json").read_text())
    cfg = SamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    out = export_sam(WEIGHTS / "sam_shapes.safetensors", tmp_path_factory.mktemp("sam") / "bundle", variant=cfg)
    return SamPredictor(out, backend="ort-cpu", threads=1)


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> tuple[ClipModel, list[str]]:
    from edgefm.export.clip import export_clip

    meta = json.loads((WEIGHTS / "clip_shapes.json").read_text())
    out = export_clip(WEIGHTS / "clip_shapes.safetensors", tmp_path_factory.mktemp("clip") / "bundle")
    return ClipModel(out, backend="ort-cpu", threads=1), meta["templates"]


@pytest.fixture(scope="module")
def sam_ious(sam_predictor) -> dict[str, list[float]]:
    """IoU of the single-mask output against the generator's masks, per object, for a click at the
    object's interior point and for its tight box."""
    ious: dict[str, list[float]] = {"point": [], "box": []}
    for i in range(30):
        scene = random_scene(1000, i, SAM_SIZES[i % len(SAM_SIZES)])
        sam_predictor.set_image(scene.image)
        for obj in scene.objects:
            masks, _, _ = sam_predictor.predict(point_coords=interior_point(obj.mask), point_labels=np.array([1]),
                                                multimask_output=False)
            ious["point"].append(_iou(masks[0], obj.mask))
            masks, _, _ = sam_predictor.predict(box=obj.box, multimask_output=False)
            ious["box"].append(_iou(masks[0], obj.mask))
    return ious


@pytest.mark.slow
def test_sam_one_point_miou(sam_ious):
    miou = float(np.mean(sam_ious["point"]))
    print(f"SAM one-point mIoU {miou:.4f} over {len(sam_ious['point'])} objects")
    assert miou >= 0.85


@pytest.mark.slow
def test_sam_box_miou(sam_ious):
    miou = float(np.mean(sam_ious["box"]))
    print(f"SAM box mIoU {miou:.4f} over {len(sam_ious['box'])} objects")
    assert miou >= 0.92


@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 96])
def test_clip_zero_shot_top1(clip_model, size):
    model, templates = clip_model
    scenes = [single_object(1000, i, size) for i in range(216)]
    probs = model.zero_shot([s.image for s in scenes], list(CLASSES), templates=templates)
    truth = np.array([CLASSES.index(s.objects[0].label) for s in scenes])
    top1 = float((probs.argmax(1) == truth).mean())
    print(f"CLIP zero-shot top-1 at {size} px: {top1:.4f} over {len(CLASSES)} classes (chance {1 / len(CLASSES):.3f})")
    assert top1 >= 0.90
