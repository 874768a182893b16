"""Drawing results as pictures: mask overlays with outlines, prompts and labels (OpenCV, RGB in and out)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .errors import InputError

PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]],
    dtype=np.uint8,
)


def overlay_masks(
    image: np.ndarray,
    masks: np.ndarray | list[np.ndarray],
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    captions: list[str] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """HWC uint8 RGB image with each (H, W) bool mask tinted and outlined; points green (fg) / red (bg),
    XYXY boxes in white, an optional caption per mask at its top-left."""
    out = image.copy()
    for i, mask in enumerate(masks):
        mask = np.asarray(mask, bool)
        if not mask.any():
            continue
        color = PALETTE[i % len(PALETTE)]
        out[mask] = (out[mask] * (1 - alpha) + color * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), 2)
        if captions and i < len(captions):
            ys, xs = np.nonzero(mask)
            put_label(out, captions[i], (int(xs.min()), max(int(ys.min()) - 4, 12)))
    for j, (x, y) in enumerate(np.asarray(points if points is not None else []).reshape(-1, 2)):
        fg = labels is None or labels[j] == 1
        cv2.circle(out, (int(x), int(y)), 6, (0, 255, 0) if fg else (255, 0, 0), -1)
        cv2.circle(out, (int(x), int(y)), 6, (255, 255, 255), 1)
    for box in np.asarray(boxes if boxes is not None else []).reshape(-1, 4):
        cv2.rectangle(out, (int(box[0]), int(box[1])), (int(box[2]), int(box[3])), (255, 255, 255), 2)
    return out


def put_label(image: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.5) -> None:
    """Text with a dark backing box so it reads on any background (drawn in place)."""
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x, y = org
    cv2.rectangle(image, (x, y - h - base), (x + w, y + base), (0, 0, 0), -1)
    cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as HWC uint8 RGB, or raise InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file {str(path)!r} does not exist")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(f"{str(path)!r} could not be decoded as an image (OpenCV reads PNG, JPEG, BMP, TIFF, WebP)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def write_image(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB image atomically (temporary file, then rename); the extension picks the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise InputError(f"cannot write an image to {str(path)!r}: use a .png or .jpg name in a writable folder")
    tmp.replace(path)
    return path
