"""Where annotated frames and per-frame results go: a video file, a folder of frames, a window, JSON lines.

Every sink takes ``write(frame, image, record)`` with ``image`` the annotated HWC uint8 RGB frame and
``record`` the frame's JSON-able result, and ``close()``. Files appear complete or not at all: the video
is written to a temporary name and renamed on close; each JSON line is flushed as soon as it is written so
another program can follow the stream (``tail -f``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import InputError
from .sources import Frame

FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".avi": "MJPG", ".mkv": "mp4v", ".mov": "mp4v"}


class Sink:
    def write(self, frame: Frame, image: np.ndarray, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def wants_image(self) -> bool:
        return True


class VideoSink(Sink):
    """Annotated video via ``cv2.VideoWriter`` at ``fps`` (the source's rate); the size is taken from the
    first frame. ``.mp4`` uses the MPEG-4 Part 2 codec every OpenCV build has, ``.avi`` Motion-JPEG."""

    def __init__(self, path: str | Path, fps: float = 30.0) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in FOURCC:
            raise InputError(f"--out {str(self.path)!r}: use a video name ending in {', '.join(FOURCC)}")
        self.fps = fps
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp{self.path.suffix}")
        self.frames = 0
        self._writer: cv2.VideoWriter | None = None

    def write(self, frame: Frame, image: np.ndarray, record: dict[str, Any]) -> None:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            h, w = image.shape[:2]
            fourcc = cv2.VideoWriter_fourcc(*FOURCC[self.path.suffix.lower()])
            self._writer = cv2.VideoWriter(str(self.tmp), fourcc, float(self.fps), (w, h))
            if not self._writer.isOpened():
                raise InputError(f"--out {str(self.path)!r}: OpenCV cannot write this video (folder not writable "
                                 "or codec missing); try a .avi name")
        self._writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            self.tmp.replace(self.path)


class FramesSink(Sink):
    """One picture per processed frame, ``frame_{index:06d}.jpg`` (source index, so gaps show drops)."""

    def __init__(self, folder: str | Path, ext: str = ".jpg") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ext = ext

    def write(self, frame: Frame, image: np.ndarray, record: dict[str, Any]) -> None:
        from ..draw import write_image

        write_image(self.folder / f"frame_{frame.index:06d}{self.ext}", image)


def display_available() -> bool:
    """True when a window can be opened: a display server on Linux (always on Windows/macOS)."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


class WindowSink(Sink):
    """An OpenCV window; ``q`` or Esc sets ``quit``. Must run on the main thread (the pipeline's sink)."""

    def __init__(self, title: str = "edgefm camera") -> None:
        if not display_available():
            raise InputError("--show needs a display (no DISPLAY/WAYLAND_DISPLAY is set); write --out video.mp4 "
                             "or --frames DIR instead")
        self.title, self.quit = title, False
        try:
            cv2.namedWindow(self.title, cv2.WINDOW_NORMAL)
        except cv2.error:
            raise InputError("--show: this OpenCV build has no GUI support (opencv-python-headless); install "
                             "opencv-python, or use --out video.mp4 / --frames DIR") from None

    def write(self, frame: Frame, image: np.ndarray, record: dict[str, Any]) -> None:
        cv2.imshow(self.title, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
            self.quit = True

    def close(self) -> None:
        cv2.destroyWindow(self.title)


class JsonlSink(Sink):
    """One JSON object per processed frame: ``frame`` (source index), ``t_capture`` (monotonic s),
    ``latency_ms``, ``task``, then the task's fields — classify: ``labels``/``scores`` best first;
    segment/track/auto: ``masks`` = [{``box`` XYXY, ``score``, ``area``, ``rle`` {size [H, W], counts}}]
    (uncompressed COCO RLE, column-major). ``path`` "-" writes to stdout."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path == "-":
            self._file = sys.stdout
        else:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    @property
    def wants_image(self) -> bool:
        return False

    def write(self, frame: Frame, image: np.ndarray, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not sys.stdout:
            self._file.close()
