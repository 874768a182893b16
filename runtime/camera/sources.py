"""Frame sources and the latest-frame hand-off.

A source yields RGB frames; :class:`CaptureThread` reads it in its own thread and puts each frame into a
:class:`LatestSlot` — a size-1 slot that a new frame *overwrites*, so a slow consumer always gets the newest
frame and never a backlog (each overwritten frame is counted as dropped). With ``drop=False`` the slot
blocks the producer instead (every frame processed; for offline runs and accuracy tests).

Conventions: frames are HWC uint8 RGB; ``Frame.t_capture`` is ``time.monotonic()`` when the frame left the
device (or, for paced files and folders, when it was due); ``Frame.index`` counts frames read from the
source, so gaps in the indices the consumer sees are the dropped frames.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
NETWORK_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


@dataclass
class Frame:
    """One captured frame: ``image`` HWC uint8 RGB, ``index`` in source order, ``t_capture`` monotonic s."""

    index: int
    t_capture: float
    image: np.ndarray


class LatestSlot:
    """A size-1 hand-off between two threads.

    ``put`` overwrites an unread item (``dropped`` counts them) unless ``drop=False``, where it waits until
    the consumer took the previous one. ``get`` waits for an item; after ``close()`` it still returns the
    pending item once (so the end of a file is drained) and then ``None``. ``close(discard=True)`` drops
    the pending item too (abort).
    """

    def __init__(self, drop: bool = True) -> None:
        self.drop = drop
        self.dropped = 0
        self._cond = threading.Condition()
        self._item: object | None = None
        self._full = False
        self._closed = False

    def put(self, item: object) -> bool:
        """False when the slot is closed (the consumer is gone): the producer should stop."""
        with self._cond:
            while not self.drop and self._full and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            if self._full:
                self.dropped += 1
            self._item, self._full = item, True
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> object | None:
        with self._cond:
            end = None if timeout is None else time.monotonic() + timeout
            while not self._full and not self._closed:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            if not self._full:
                return None
            item, self._item, self._full = self._item, None, False
            self._cond.notify_all()
            return item

    def close(self, discard: bool = False) -> None:
        with self._cond:
            self._closed = True
            if discard and self._full:
                self._item, self._full = None, False
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


class Source:
    """Base of frame sources: ``read()`` returns the next RGB frame or ``None`` at the end."""

    name: str = "source"
    fps: float | None = None  # the source's nominal rate, when it has one
    paced: bool = False  # read() already waits like a live device (cameras, network streams)

    def open(self) -> None:
        pass

    def ensure_open(self) -> None:
        """``open()`` once (the CLI opens the source before loading models, so a bad one fails fast)."""
        if not getattr(self, "_opened", False):
            self.open()
            self._opened = True

    def read(self) -> np.ndarray | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _is_network(spec: str) -> bool:
    return spec.lower().startswith(NETWORK_SCHEMES)


class CaptureSource(Source):
    """OpenCV ``VideoCapture`` on a camera index, ``/dev/videoN``, a video file or a network URL.

    Network streams reconnect up to ``reconnects`` times (waiting 0.5, 1, 2, ... s, at most 4 s between
    tries) when a read fails; a camera or file that stops delivering ends the stream.
    """

    def __init__(self, spec: str | int, reconnects: int = 5) -> None:
        self.spec = spec
        self.name = str(spec)
        self.network = isinstance(spec, str) and _is_network(spec)
        self.live = self.network or isinstance(spec, int) or str(spec).startswith("/dev/video")
        self.paced = self.live
        self.reconnects = reconnects
        self.reconnect_count = 0
        self._cap: cv2.VideoCapture | None = None

    def _open_capture(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self.spec)
        if self.live:
            # Keep OpenCV's own queue minimal: stale frames would sit there before our slot ever sees them.
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return cap

    def open(self) -> None:
        if not self.live and not Path(str(self.spec)).is_file():
            raise InputError(
                f"--source {self.name!r}: no such video file, image folder or camera. Pass a camera index "
                "(0), /dev/videoN, a video file, a folder of images, or an rtsp:// or http:// URL."
            )
        if isinstance(self.spec, str) and self.spec.startswith("/dev/video") and not os.path.exists(self.spec):
            raise InputError(f"--source {self.name!r}: the device does not exist (is the camera plugged in?)")
        cap = self._open_capture()
        if not cap.isOpened():
            cap.release()
            what = ("could not be opened as a video file (unreadable, truncated or an unsupported codec)"
                    if not self.live else "could not be opened (check the index/URL, permissions and that "
                    "no other program holds the camera)")
            raise InputError(f"--source {self.name!r} {what}.")
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else None
        self._cap = cap

    def read(self) -> np.ndarray | None:
        ok, bgr = self._cap.read() if self._cap is not None else (False, None)
        while not ok and self.network and self.reconnect_count < self.reconnects:
            time.sleep(min(0.5 * 2 ** self.reconnect_count, 4.0))
            self.reconnect_count += 1
            if self._cap is not None:
                self._cap.release()
            self._cap = self._open_capture()
            ok, bgr = self._cap.read() if self._cap.isOpened() else (False, None)
        if not ok:
            if self.network:
                raise InputError(
                    f"--source {self.name!r}: the stream stopped and {self.reconnects} reconnect attempts "
                    "failed; giving up. Check the camera/server and the network, then run again."
                )
            return None
        if not self.network:
            self.reconnect_count = 0
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class FolderSource(Source):
    """Images of a folder in name order (unreadable files are skipped and counted)."""

    def __init__(self, folder: str | Path, fps: float = 30.0) -> None:
        self.folder = Path(folder)
        self.name, self.fps = str(folder), fps
        self.skipped: list[str] = []
        self._files: Iterator[Path] = iter(())

    def open(self) -> None:
        files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"--source {self.name!r}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self._files = iter(files)

    def read(self) -> np.ndarray | None:
        for path in self._files:
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is not None:
                return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            self.skipped.append(str(path))
        return None


class GeneratorSource(Source):
    """Frames from a function ``make(index) -> RGB array or None`` (synthetic streams, tests, benchmarks)."""

    def __init__(self, make: Callable[[int], np.ndarray | None], fps: float = 30.0, name: str = "synthetic") -> None:
        self.make, self.fps, self.name = make, fps, name
        self._i = 0

    def read(self) -> np.ndarray | None:
        frame = self.make(self._i)
        self._i += 1
        return frame


def open_source(spec: str | int | Source, fps: float | None = None, reconnects: int = 5) -> Source:
    """A :class:`Source` for ``--source``: an int or digit string (camera index), ``/dev/videoN``, a URL,
    a folder of images or a video file. ``fps`` sets a folder's rate (default 30)."""
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        return CaptureSource(int(spec), reconnects)
    spec = str(spec)
    if Path(spec).is_dir():
        return FolderSource(spec, fps or 30.0)
    return CaptureSource(spec, reconnects)


class CaptureThread(threading.Thread):
    """Reads ``source`` into ``slot`` until the end, ``stop()`` or an error (kept in ``error``).

    Files and folders are read at their nominal rate when ``pace`` is true (as a camera would deliver
    them, so that dropping works as live); with ``pace=False`` as fast as the slot accepts.
    """

    def __init__(self, source: Source, slot: LatestSlot, pace: bool = True, max_frames: int | None = None) -> None:
        super().__init__(name="edgefm-capture", daemon=True)
        self.source, self.slot = source, slot
        self.pace = pace and not source.paced and bool(source.fps)
        self.max_frames = max_frames
        self.captured = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            while not self._stop_event.is_set():
                if self.max_frames is not None and self.captured >= self.max_frames:
                    break
                if self.pace:
                    due = t0 + self.captured / self.source.fps
                    wait = due - time.monotonic()
                    if wait > 0 and self._stop_event.wait(wait):
                        break
                image = self.source.read()
                if image is None:
                    break
                frame = Frame(self.captured, time.monotonic(), image)
                self.captured += 1
                if not self.slot.put(frame):
                    break
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self.error = exc
        finally:
            self.source.close()
            self.slot.close()
