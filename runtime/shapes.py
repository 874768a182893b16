"""The "shapes world": seeded scenes of colored shapes with exact instance masks and captions.

It is the data the project's small demo models are trained and tested on (numpy + OpenCV only, so the
torch-free runtime and ``edgefm demo`` can draw the same scenes).

Conventions: images are HWC uint8 RGB; masks are bool (H, W) and exact (objects are drawn without
anti-aliasing and never overlap, so a mask is precisely the pixels of its object); boxes are XYXY in pixels
with the exclusive right/bottom edge (``x1 = max column + 1``); centers are XY pixels.

Determinism: a scene is a pure function of ``(seed, index)`` (and the keyword arguments), so datasets are
random-access and a resumed training run sees the same stream. Split convention used by the project:
seed 0 trains, seed 1 evaluates during training, seed 1000+ are the held-out test scenes.

Captions: a single object is "a red triangle"; a scene with several objects names two of them with their
relation, "a small red triangle above a blue circle" (size words only for small/large objects).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "blue": (30, 80, 225),
    "purple": (145, 45, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
SIZES: dict[str, tuple[float, float]] = {  # radius as a fraction of min(H, W) in multi-object scenes
    "small": (0.07, 0.10),
    "medium": (0.12, 0.16),
    "large": (0.19, 0.23),
}
SINGLE_RADIUS: tuple[float, float] = (0.22, 0.40)  # single-object images: the object fills the picture
BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "noisy", "textured")
RELATIONS: tuple[str, ...] = ("above", "below", "to the left of", "to the right of")
#: zero-shot classes, "color shape", in a fixed order (index = color index * len(SHAPES) + shape index)
CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene: its attributes, geometry and exact visible mask."""

    shape: str
    color: str
    size: str
    center: tuple[float, float]  # XY pixels
    radius: float  # circumradius in pixels
    angle: float  # rotation in radians
    mask: np.ndarray = field(repr=False)  # bool (H, W)

    @property
    def box(self) -> np.ndarray:
        """Tight XYXY box of the mask (float32, exclusive right/bottom edge)."""
        ys, xs = np.nonzero(self.mask)
        return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)

    @property
    def label(self) -> str:
        """The zero-shot class name, e.g. "red triangle"."""
        return f"{self.color} {self.shape}"

    def phrase(self, with_size: bool = True) -> str:
        """ "a small red triangle" (size word only for small and large objects when ``with_size``)."""
        words = f"{self.size} {self.color}" if with_size and self.size != "medium" else self.color
        return f"{_article(words)} {words} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A generated picture with its objects (in drawing order) and its caption."""

    image: np.ndarray  # HWC uint8 RGB
    objects: tuple[ShapeObject, ...]
    caption: str
    background: str

    @property
    def masks(self) -> np.ndarray:
        """All instance masks, bool (N, H, W)."""
        return np.stack([o.mask for o in self.objects]) if self.objects else np.zeros((0, *self.image.shape[:2]), bool)

    @property
    def boxes(self) -> np.ndarray:
        """All boxes, float32 (N, 4) XYXY."""
        return np.stack([o.box for o in self.objects]) if self.objects else np.zeros((0, 4), np.float32)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def prompt(color: str, shape: str) -> str:
    """The caption of a single-object image, "a red triangle" ("an orange square")."""
    return f"{_article(color)} {color} {shape}"


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    # separate streams for scenes and single objects, so that the two datasets never coincide
    return np.random.default_rng([seed, stream, index])


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def shape_polygon(shape: str, center: tuple[float, float], radius: float, angle: float) -> np.ndarray:
    """Vertices (K, 2) XY of ``shape`` with circumradius ``radius`` around ``center``, rotated by ``angle``."""
    if shape == "circle":
        k, radii = 64, np.ones(64)
    elif shape in ("square", "triangle", "hexagon"):
        k = {"square": 4, "triangle": 3, "hexagon": 6}[shape]
        radii = np.ones(k)
    elif shape == "star":
        k, radii = 10, np.tile([1.0, 0.45], 5)
    elif shape == "cross":
        # plus sign with arm half-width a: 12 vertices at the arm corners (a, 1), (1, a) ... scaled to radius 1
        a = 0.32
        pts = np.array([(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1), (-a, -1), (-a, -a), (-1, -a),
                        (-1, a), (-a, a), (-a, 1)], dtype=np.float64) / np.hypot(1, a)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        return pts @ rot.T * radius + np.asarray(center)
    else:
        raise ValueError(f"unknown shape '{shape}'; known: {', '.join(SHAPES)}")
    theta = angle - np.pi / 2 + 2 * np.pi * np.arange(k) / k  # first vertex points up when angle == 0
    return np.stack([np.cos(theta), np.sin(theta)], -1) * (radii[:, None] * radius) + np.asarray(center)


def shape_mask(shape: str, center: tuple[float, float], radius: float, angle: float, hw: tuple[int, int]) -> np.ndarray:
    """Exact bool (H, W) mask of a shape, rasterised without anti-aliasing (4 bits of sub-pixel precision)."""
    mask = np.zeros(hw, np.uint8)
    pts = np.round(shape_polygon(shape, center, radius, angle) * 16).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _muted(rng: np.random.Generator) -> np.ndarray:
    # backgrounds are low-saturation so the six object colors stay the salient colors of a scene
    gray = rng.uniform(60, 215)
    tint = rng.uniform(0, 255, 3)
    return (1 - (w := rng.uniform(0.0, 0.3))) * gray + w * tint


def make_background(rng: np.random.Generator, hw: tuple[int, int], kind: str) -> np.ndarray:
    """A float32 (H, W, 3) background of ``kind`` (one of :data:`BACKGROUNDS`)."""
    h, w = hw
    c0 = _muted(rng)
    if kind == "flat" or kind == "noisy":
        return np.broadcast_to(c0, (h, w, 3)).astype(np.float32).copy()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "gradient":
        phi = rng.uniform(0, 2 * np.pi)
        t = (np.cos(phi) * xx / w + np.sin(phi) * yy / h)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return (c0 * (1 - t[..., None]) + _muted(rng) * t[..., None]).astype(np.float32)
    if kind == "textured":
        c1 = c0 + rng.uniform(-45, 45, 3)
        period = rng.uniform(6, 20)
        pattern = rng.integers(3)
        if pattern == 0:  # stripes at a random angle
            phi = rng.uniform(0, np.pi)
            t = (np.sin((np.cos(phi) * xx + np.sin(phi) * yy) * 2 * np.pi / period) > 0).astype(np.float32)
        elif pattern == 1:  # checkerboard
            t = ((xx // period + yy // period) % 2).astype(np.float32)
        else:  # smooth blotches: upsampled random field
            small = rng.uniform(0, 1, (max(2, int(h / period)), max(2, int(w / period)))).astype(np.float32)
            t = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        return (c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.float32)
    raise ValueError(f"unknown background '{kind}'; known: {', '.join(BACKGROUNDS)}")


def _object_color(rng: np.random.Generator, color: str) -> np.ndarray:
    # a little jitter per object so that a color name covers a small neighbourhood, not one RGB value
    return np.clip(np.asarray(COLORS[color], np.float32) + rng.uniform(-18, 18, 3), 0, 255)


def _finish(rng: np.random.Generator, canvas: np.ndarray, kind: str) -> np.ndarray:
    sigma = rng.uniform(8, 20) if kind == "noisy" else rng.uniform(0, 3)
    canvas = canvas + rng.normal(0, sigma, canvas.shape).astype(np.float32)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, hw: tuple[int, int], radius: float, taken: np.ndarray, shape: str,
           angle: float, tries: int = 30) -> tuple[tuple[float, float], np.ndarray] | None:
    """A center for a shape that stays inside the image and clear of ``taken`` (a dilated union of masks)."""
    h, w = hw
    margin = radius + 1
    if 2 * margin >= min(h, w):
        return None
    for _ in range(tries):
        center = (float(rng.uniform(margin, w - margin)), float(rng.uniform(margin, h - margin)))
        mask = shape_mask(shape, center, radius, angle, hw)
        if mask.any() and not (mask & taken).any():
            return center, mask
    return None


def _relation(a: ShapeObject, b: ShapeObject) -> str:
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def random_scene(seed: int, index: int, size: int | tuple[int, int] = 128,
                 n_objects: tuple[int, int] = (1, 4), background: str | None = None) -> Scene:
    """Scene ``index`` of the stream ``seed``: ``n_objects`` (inclusive range) non-overlapping shapes of
    random shape, color and size on a random background; ``size`` is (H, W) or a side."""
    rng = _rng(seed, index, 0)
    hw = _hw(size)
    kind = background or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    canvas = make_background(rng, hw, kind)
    taken = np.zeros(hw, bool)
    objects: list[ShapeObject] = []
    gap = np.ones((5, 5), np.uint8)  # keep 2 px between objects so that no two masks touch
    for _ in range(int(rng.integers(n_objects[0], n_objects[1] + 1))):
        shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
        size_name = list(SIZES)[rng.integers(len(SIZES))]
        radius = float(rng.uniform(*SIZES[size_name])) * min(hw)
        angle = float(rng.uniform(0, 2 * np.pi))
        placed = _place(rng, hw, radius, taken, shape, angle)
        if placed is None:
            continue
        center, mask = placed
        canvas[mask] = _object_color(rng, color)
        taken |= cv2.dilate(mask.astype(np.uint8), gap).astype(bool)
        objects.append(ShapeObject(shape, color, size_name, center, radius, angle, mask))
    if len(objects) >= 2:
        caption = f"{objects[0].phrase()} {_relation(objects[0], objects[1])} {objects[1].phrase()}"
    elif objects:
        caption = objects[0].phrase(with_size=False)
    else:
        caption = "an empty picture"
    return Scene(_finish(rng, canvas, kind), tuple(objects), caption, kind)


def single_object(seed: int, index: int, size: int | tuple[int, int] = 64, color: str | None = None,
                  shape: str | None = None, background: str | None = None) -> Scene:
    """A single-object image captioned "a red triangle"; the class is random unless ``color``/``shape``
    are given. The object is large and roughly centred (``SINGLE_RADIUS`` of min(H, W))."""
    rng = _rng(seed, index, 1)
    hw = _hw(size)
    color = color or list(COLORS)[rng.integers(len(COLORS))]
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    kind = background or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    canvas = make_background(rng, hw, kind)
    radius = float(rng.uniform(*SINGLE_RADIUS)) * min(hw)
    angle = float(rng.uniform(0, 2 * np.pi))
    jitter = (min(hw) / 2 - radius) * 0.8
    center = (hw[1] / 2 + float(rng.uniform(-jitter, jitter)), hw[0] / 2 + float(rng.uniform(-jitter, jitter)))
    mask = shape_mask(shape, center, radius, angle, hw)
    canvas[mask] = _object_color(rng, color)
    obj = ShapeObject(shape, color, "large", center, radius, angle, mask)
    return Scene(_finish(rng, canvas, kind), (obj,), prompt(color, shape), kind)


def class_index(label: str) -> int:
    """Index of "red triangle" in :data:`CLASSES`."""
    return CLASSES.index(label)


def interior_point(mask: np.ndarray) -> np.ndarray:
    """The pixel of ``mask`` farthest from its boundary, as float32 XY (1, 2): the click a person would
    make, and the one-point prompt of the accuracy tests."""
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([[x, y]], dtype=np.float32)
