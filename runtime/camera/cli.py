"""``edgefm camera``: live CLIP labels or SAM masks on a camera, stream, video file or image folder.

    edgefm camera CLIP_BUNDLE --source 0 --task classify --labels "cat,dog,person" --show
    edgefm camera SAM_BUNDLE --source clip.mp4 --task track --point 320,240 --out tracked.mp4 --jsonl masks.jsonl

Bundles are told apart by their manifest's family (clip for classify; sam for segment/track/auto), so
both may be passed in any order. The summary table goes to stderr at the end; ``--stats FILE`` writes it
as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..image_prep import PREPROCESS
from ..manifest import add_precision_arg

TASK_FAMILY = {"classify": "clip", "segment": "sam", "track": "sam", "auto": "sam"}


def parse_numbers(text: str, n: int, what: str) -> np.ndarray:
    """``"x,y"``-style text -> float32 array of ``n`` numbers, or InputError naming the flag."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise InputError(f"{what} {text!r} must be {n} comma-separated numbers (pixels), e.g. "
                         f"{'320,240' if n == 2 else '100,80,360,300'}")
    return np.array(values, np.float32)


def pick_bundles(paths: list[str]) -> dict[str, Path]:
    """Bundle paths keyed by their manifest family; two of one family is an error."""
    from ..manifest import read_manifest

    found: dict[str, Path] = {}
    for p in paths:
        family = read_manifest(Path(p)).family
        if family in found:
            raise InputError(f"two {family} bundles given ({found[family]} and {p}); pass one per family")
        found[family] = Path(p)
    return found


def build_task(args: argparse.Namespace, bundles: dict[str, Path]) -> Any:
    """The task of ``--task`` with its model loaded once."""
    from . import tasks

    need = TASK_FAMILY[args.task]
    if need not in bundles:
        raise InputError(f"--task {args.task} needs a {need} bundle (edgefm export {need} ...); the bundles given "
                         f"are {', '.join(f'{f}: {p}' for f, p in bundles.items()) or 'none'}")
    if args.task == "classify":
        from ..clip.model import ClipModel

        labels = [lab.strip() for lab in (args.labels or "").split(",") if lab.strip()]
        if not labels:
            raise InputError("--task classify needs --labels, comma-separated, e.g. --labels 'cat,dog,person'")
        model = ClipModel(bundles["clip"], backend=args.backend, threads=args.threads, precision=args.precision,
                          preprocess=args.preprocess, cuda_graphs=args.cuda_graph)
        return tasks.ClassifyTask(model, labels, templates=args.templates, smooth=args.smooth)
    from ..sam.predictor import SamPredictor

    points = np.stack([parse_numbers(p, 2, "--point") for p in args.point]) if args.point else None
    box = parse_numbers(args.box, 4, "--box") if args.box else None
    if args.task in ("segment", "track"):
        tasks._check_prompt(points, box, args.task)
    predictor = SamPredictor(bundles["sam"], backend=args.backend, threads=args.threads, precision=args.precision,
                             cuda_graphs=args.cuda_graph, preprocess=args.preprocess)
    if args.task == "segment":
        return tasks.SegmentTask(predictor, points, box)
    if args.task == "track":
        return tasks.TrackTask(predictor, points, box)
    return tasks.AutoTask(predictor, points_per_side=args.points_per_side, interval=args.auto_interval)


def build_sinks(args: argparse.Namespace, fps: float | None) -> list[Any]:
    from . import sinks

    out: list[Any] = []
    if args.out:
        out.append(sinks.VideoSink(args.out, fps=args.fps or fps or 30.0))
    if args.frames:
        out.append(sinks.FramesSink(args.frames))
    if args.show:
        out.append(sinks.WindowSink())
    if args.jsonl:
        out.append(sinks.JsonlSink(args.jsonl))
    return out


def cmd_camera(args: argparse.Namespace) -> None:
    from .pipeline import Pipeline
    from .sources import open_source

    if args.max_frames is not None and args.max_frames < 1:
        raise InputError(f"--max-frames must be at least 1, got {args.max_frames}")
    if not (args.out or args.frames or args.show or args.jsonl or args.stats):
        print("edgefm camera: no output chosen (--out, --frames, --show, --jsonl, --stats); printing the summary "
              "only", file=sys.stderr)
    bundles = pick_bundles(args.bundles)
    source = open_source(args.source, fps=args.fps, reconnects=args.reconnects)
    source.ensure_open()  # a bad source fails before the models load
    task = build_task(args, bundles)
    pipeline = Pipeline(task, source, build_sinks(args, source.fps), drop=not args.no_drop,
                        pace=not args.no_drop, max_frames=args.max_frames, overlay=not args.no_overlay)
    try:
        pipeline.run()
    finally:
        print(f"edgefm camera: summary\n{pipeline.stats.summary()}", file=sys.stderr)
        if args.stats:
            pipeline.stats.write_json(args.stats)


def register(sub: Any) -> None:
    """Add ``camera`` to the ``edgefm`` subparsers."""
    c = sub.add_parser("camera", help="live CLIP labels / SAM masks on a camera, stream, video or image folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("bundles", nargs="+", metavar="BUNDLE", help="CLIP and/or SAM bundle(s)")
    c.add_argument("--source", required=True,
                   help="camera index (0), /dev/videoN, video file, image folder, or rtsp:// / http:// URL")
    c.add_argument("--task", required=True, choices=sorted(TASK_FAMILY))
    c.add_argument("--labels", help="classify: comma-separated labels")
    c.add_argument("--templates", default="imagenet80", help="classify: prompt templates (imagenet80, simple...)")
    c.add_argument("--smooth", type=int, default=1, help="classify: average probabilities over N frames")
    c.add_argument("--point", action="append", metavar="X,Y", help="segment/track: a foreground point (pixels); "
                   "repeat for more")
    c.add_argument("--box", metavar="X0,Y0,X1,Y1", help="segment/track: a box (pixels)")
    c.add_argument("--points-per-side", type=int, default=16, help="auto: point grid density")
    c.add_argument("--auto-interval", type=float, default=0.0, help="auto: at most one run per this many s")
    out = c.add_argument_group("outputs")
    out.add_argument("--out", help="annotated video file (.mp4 or .avi)")
    out.add_argument("--frames", help="folder for annotated frames (frame_NNNNNN.jpg)")
    out.add_argument("--show", action="store_true", help="show a window (needs a display; q quits)")
    out.add_argument("--jsonl", help="per-frame results as JSON lines ('-' for stdout)")
    out.add_argument("--stats", help="write the run's stats (FPS, latency p50/p99, dropped) as JSON")
    out.add_argument("--no-overlay", action="store_true", help="do not draw the stats line on frames")
    run = c.add_argument_group("run")
    run.add_argument("--max-frames", type=int, help="stop after N results")
    run.add_argument("--no-drop", action="store_true",
                     help="process every frame (files/folders read as fast as the pipeline goes) instead of "
                          "always the newest one")
    run.add_argument("--fps", type=float, help="rate of an image folder, and of the output video")
    run.add_argument("--reconnects", type=int, default=5, help="network streams: reconnect attempts")
    run.add_argument("--backend", default="auto", help="auto, ort-cpu, ort-cuda, ort-trt or tensorrt")
    run.add_argument("--threads", type=int, default=None, help="ONNX Runtime CPU threads")
    run.add_argument("--preprocess", choices=PREPROCESS, default="auto",
                     help="where frames are resized and normalized (auto: on the GPU with ONNX Runtime GPU backends)")
    add_precision_arg(run)
    run.add_argument("--cuda-graph", action="store_true",
                     help="ort-cuda: each frame's encoder run (CLIP's or SAM's) and SAM's prompt -> masks chain "
                          "replay captured CUDA graphs (fixed shapes; a second copy of the weights in GPU memory)")
    c.set_defaults(func=cmd_camera)
