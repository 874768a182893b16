"""Low-latency camera inference: latest-frame capture, pipelined stages, CLIP labels and SAM masks live.

``Pipeline(task, open_source(spec), sinks).run()`` returns the run's :class:`RunStats`; ``edgefm camera``
(``cli.register``) wires bundles, tasks and sinks from the command line. No torch, no GUI needed.
"""

from .pipeline import Packet, Pipeline
from .sinks import FramesSink, JsonlSink, Sink, VideoSink, WindowSink
from .sources import CaptureSource, FolderSource, Frame, GeneratorSource, LatestSlot, Source, open_source
from .stats import RunStats
from .tasks import AutoTask, ClassifyTask, Result, SegmentTask, Task, TrackTask

__all__ = [
    "AutoTask", "CaptureSource", "ClassifyTask", "FolderSource", "Frame", "FramesSink", "GeneratorSource",
    "JsonlSink", "LatestSlot", "Packet", "Pipeline", "Result", "RunStats", "SegmentTask", "Sink", "Source",
    "Task", "TrackTask", "VideoSink", "WindowSink", "open_source",
]
