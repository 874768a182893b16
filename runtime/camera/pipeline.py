"""The camera pipeline: capture -> preprocess -> infer -> postprocess/draw -> sink, one thread per stage.

Stages are joined by size-1 :class:`LatestSlot` hand-offs. A stage that is slower than the camera makes
the stage before it overwrite its slot, so it always picks up the newest frame when it is free: latency
stays bounded by roughly the sum of the stage times plus one frame interval per hand-off, whatever the
camera rate, and the frames that were skipped are counted (``dropped``). With ``drop=False`` every slot
blocks instead: every frame is processed in order (offline runs, accuracy tests).

Stages also start just in time: a stage takes its next frame only when the busy stage after it is about
to be free (by the running mean of both durations), so no CPU goes into frames that would be overwritten
and the frame taken is the newest; measured, a 5-interval infer stage gives latency ~1 stage duration.

The sink runs on the calling (main) thread, which OpenCV windows need. Errors in any stage stop the whole
pipeline and are re-raised by :meth:`Pipeline.run`; end of stream drains the frames in flight and ends
cleanly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..draw import put_label
from .sinks import Sink
from .sources import CaptureThread, Frame, LatestSlot, Source
from .stats import RunStats
from .tasks import Result, Task


@dataclass
class _Clock:
    """A stage's running mean duration and, while it works, when it expects to be done (monotonic s)."""

    ema: float = 0.0
    busy_until: float = 0.0


@dataclass
class Packet:
    """What travels between stages for one frame."""

    frame: Frame
    pre: Any = None
    result: Result | None = None
    image: np.ndarray | None = None
    record: dict[str, Any] = field(default_factory=dict)
    t_result: float = 0.0


class Pipeline:
    """Run ``task`` on ``source`` into ``sinks``.

    Args:
        task: a :class:`Task` with its models already loaded.
        source: a :class:`Source` (see ``open_source``); opened by ``run`` if not yet.
        sinks: where annotated frames and records go.
        drop: latest-frame semantics (True, live) or process every frame (False).
        pace: read files and folders at their nominal rate, as a camera would deliver them.
        max_frames: stop after this many results.
        overlay: draw the stats line on the frames.
        on_result: called on the main thread with each finished :class:`Packet` (tests, custom sinks).
    """

    def __init__(self, task: Task, source: Source, sinks: Sequence[Sink] = (), drop: bool = True,
                 pace: bool = True, max_frames: int | None = None, overlay: bool = True,
                 on_result: Callable[[Packet], None] | None = None) -> None:
        self.task, self.source, self.sinks = task, source, list(sinks)
        self.drop, self.pace, self.max_frames, self.overlay = drop, pace, max_frames, overlay
        self.on_result = on_result
        self.want_image = any(s.wants_image for s in self.sinks) or on_result is not None
        self.want_record = any(not s.wants_image for s in self.sinks) or on_result is not None
        self.stats = RunStats(task.name, task.backend, source.name,
                              "device" if getattr(task, "device_prep", False) else "host")
        self.slots = [LatestSlot(drop) for _ in range(4)]  # capture | pre | infer | post | sink
        self.error: BaseException | None = None
        self._skipped = 0
        self._stop = threading.Event()
        self._capture: CaptureThread | None = None

    # -- stage bodies ---------------------------------------------------------------------------------

    def _preprocess(self, p: Packet) -> Packet:
        p.pre = self.task.preprocess(p.frame.image)
        return p

    def _infer(self, p: Packet) -> Packet:
        p.result = self.task.infer(p.frame, p.pre)
        p.pre = None  # free the encoder input early
        return p

    def _postprocess(self, p: Packet) -> Packet:
        if self.want_image:
            p.image = self.task.draw(p.frame.image, p.result)
        if self.want_record:
            p.record = {"frame": p.frame.index, "t_capture": round(p.frame.t_capture, 6), "task": self.task.name,
                        **self.task.record(p.result)}
        p.t_result = time.monotonic()
        if self.want_record:
            p.record["latency_ms"] = round((p.t_result - p.frame.t_capture) * 1e3, 3)
        self.stats.dropped = self.dropped
        if self.want_image and self.overlay:
            put_label(p.image, self._overlay_line(p.t_result - p.frame.t_capture), (8, 18), scale=0.5)
        return p

    def _overlay_line(self, latency: float) -> str:
        s = self.stats
        return (f"{s.task} | {s.recent_fps():.1f} FPS | latency {latency * 1e3:.0f} ms "
                f"(p50 {s.percentile_ms(50):.0f} p99 {s.percentile_ms(99):.0f}) | dropped {s.dropped} | {s.backend}")

    # -- threads --------------------------------------------------------------------------------------

    def _stage(self, name: str, inbox: LatestSlot, outbox: LatestSlot, body: Callable[[Packet], Packet],
               clock: _Clock, downstream: _Clock | None) -> None:
        try:
            while not self._stop.is_set():
                if self.drop and downstream is not None:
                    self._just_in_time(clock, downstream)
                item = inbox.get()
                if item is None:
                    break
                # The stage after may have picked up work while this one waited for a frame: wait again, then
                # take the newest frame instead of one that would be stale by then.
                if self.drop and downstream is not None and self._just_in_time(clock, downstream):
                    newer = inbox.get(timeout=0)
                    if newer is not None:
                        item, self._skipped = newer, self._skipped + 1
                t = time.monotonic()
                clock.busy_until = t + clock.ema
                out = body(item if isinstance(item, Packet) else Packet(item))
                dt = time.monotonic() - t
                clock.ema, clock.busy_until = (dt if clock.ema == 0 else 0.8 * clock.ema + 0.2 * dt), 0.0
                self.stats.stage(name, dt)
                if not outbox.put(out):
                    break
        except BaseException as exc:  # re-raised on the main thread by run()
            self._fail(exc)
        finally:
            outbox.close()

    def _just_in_time(self, clock: _Clock, downstream: _Clock) -> bool:
        """Wait to take the next frame until the busy stage after this one is about to be free: work on
        frames that would only be overwritten is wasted CPU (taken from the slow stage on a small device),
        and the frame taken later is newer."""
        waited = False
        if downstream.ema <= clock.ema:  # the stage after is not the bottleneck: nothing to wait for
            return waited
        while not self._stop.is_set():
            left = downstream.busy_until - clock.ema - time.monotonic()
            if left <= 1e-3:  # a sleep costs more than that on a loaded machine
                break
            waited = True
            self._stop.wait(min(left, 0.05))
        return waited

    @property
    def dropped(self) -> int:
        """Frames overwritten in a hand-off plus frames a stage skipped for a newer one."""
        return sum(s.dropped for s in self.slots) + self._skipped

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._abort()

    def _abort(self) -> None:
        self._stop.set()
        if self._capture is not None:
            self._capture.stop()
        for slot in self.slots:
            slot.close(discard=True)

    def run(self) -> RunStats:
        """Process the stream until its end, ``max_frames``, a window's ``q``, Ctrl-C or an error."""
        self.source.ensure_open()
        self._capture = CaptureThread(self.source, self.slots[0], pace=self.pace)
        clocks = [_Clock() for _ in range(3)]
        bodies = [("preprocess", self._preprocess), ("infer", self._infer), ("postprocess", self._postprocess)]
        stages = [
            threading.Thread(target=self._stage, name=f"edgefm-{name}", daemon=True,
                             args=(name, self.slots[k], self.slots[k + 1], body, clocks[k],
                                   clocks[k + 1] if k + 1 < len(clocks) else None))
            for k, (name, body) in enumerate(bodies)
        ]
        self.stats.t_start = time.monotonic()
        for t in (self._capture, *stages):
            t.start()
        try:
            self.stats.ended = self._sink_loop(self.slots[-1])
        except KeyboardInterrupt:
            self.stats.ended = "stopped (Ctrl-C)"
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._abort()
            for t in (self._capture, *stages):
                t.join(timeout=10)
            self.task.close()
            for sink in self.sinks:
                sink.close()
            self.stats.captured = self._capture.captured
            self.stats.dropped = self.dropped
            self.stats.reconnects = getattr(self.source, "reconnect_count", 0)
        error = self.error or self._capture.error
        if error is not None:
            self.stats.ended = f"error: {error}"
            raise error
        return self.stats

    def _sink_loop(self, inbox: LatestSlot) -> str:
        while True:
            item = inbox.get(timeout=0.2)
            if item is None:
                if inbox.closed and not self._stop.is_set():
                    return "end of stream"
                if self._stop.is_set():
                    return "stopped"
                continue
            t = time.monotonic()
            for sink in self.sinks:
                sink.write(item.frame, item.image, item.record)
            self.stats.stage("sink", time.monotonic() - t)
            self.stats.result(item.frame.t_capture, item.t_result)
            if self.on_result is not None:
                self.on_result(item)
            if any(getattr(s, "quit", False) for s in self.sinks):
                return "window closed"
            if self.max_frames is not None and self.stats.processed >= self.max_frames:
                return "max frames"
