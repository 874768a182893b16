"""``edgefm camera`` on the CPU: throughput and capture-to-result latency on a 640x480 synthetic stream.

    python benchmarks/camera_cpu.py                          # classify, segment, track; 10 s each
    python benchmarks/camera_cpu.py --seconds 3 --out-dir /tmp/x   # smoke run

The stream is a camera stand-in: a GeneratorSource delivering 640x480 RGB frames with moving shapes at
``--source-fps`` (default 60) through the same capture thread and latest-frame slots as a real camera.
Models: the trained demo checkpoints ``models/weights/{sam_shapes,clip_shapes}.safetensors`` when present
(exported to bundles first), else tiny seeded RANDOM-weight models of the same families — the timings then
say nothing about the trained models and every line is labelled so.

Targets (issue 7): classify >= 30 FPS, segment/track >= 10 FPS, latency p99 <= 2 frame intervals of the
achieved rate. Prints PASS/MISS per target and writes JSON + markdown to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "models" / "weights"
TARGET_FPS = {"classify": 30.0, "segment": 10.0, "track": 10.0}
H, W = 480, 640


def synthetic_frames(n: int = 120) -> list[np.ndarray]:
    """A loop of 640x480 frames: a gradient with a red circle crossing and a blue square bobbing."""
    yy, xx = np.mgrid[0:H, 0:W]
    bg = np.stack([xx * 150 // W + 50, yy * 120 // H + 60, np.full_like(xx, 100)], -1).astype(np.uint8)
    frames = []
    for i in range(n):
        t = i / n
        img = bg.copy()
        cv2.circle(img, (int(160 + 320 * abs(np.sin(np.pi * t))), 240), 70, (220, 30, 30), -1)
        y = int(130 + 40 * np.sin(2 * np.pi * t))
        cv2.rectangle(img, (440, y), (540, y + 100), (30, 60, 220), -1)
        frames.append(img)
    return frames


def bundles(work: Path, log) -> tuple[dict[str, Path], str]:
    """(family -> bundle, label) from the demo checkpoints if shipped, else seeded random tiny models."""
    from edgefm.export.clip import export_clip
    from edgefm.export.sam import export_sam

    sam_ckpt, clip_ckpt = WEIGHTS / "sam_shapes.safetensors", WEIGHTS / "clip_shapes.safetensors"
    if sam_ckpt.is_file() and clip_ckpt.is_file():
        from edgefm.models.sam import SamConfig

        cfg = json.loads((WEIGHTS / "sam_shapes.json").read_text())
        cfg = cfg.get("config", cfg)
        fields = {f.name for f in dataclasses.fields(SamConfig)}
        sam_cfg = SamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in fields})
        clip_cfg = json.loads((WEIGHTS / "clip_shapes.json").read_text())
        log("exporting the trained demo models")
        return ({"sam": export_sam(sam_ckpt, work / "sam", sam_cfg, overwrite=True),
                 "clip": export_clip(clip_ckpt, work / "clip", quick_gelu=clip_cfg.get("quick_gelu"),
                                     overwrite=True)},
                "trained demo models (issue 5)")
    import torch
    from edgefm.models.clip import CLIP_CONFIGS, build_clip
    from edgefm.models.sam import SAM_CONFIGS, build_sam

    log("demo weights not found: exporting tiny RANDOM-weight SAM and CLIP (timings only, no meaning)")
    torch.manual_seed(0)
    sam, clip = build_sam(SAM_CONFIGS["tiny"]).eval(), build_clip(CLIP_CONFIGS["tiny-vit"]).eval()
    return ({"sam": export_sam(sam, work / "sam", "tiny", overwrite=True),
             "clip": export_clip(clip, work / "clip", overwrite=True)},
            "RANDOM tiny weights (demo weights absent)")


def make_task(name: str, found: dict[str, Path], threads: int) -> Any:
    from edgefm.runtime.camera import ClassifyTask, SegmentTask, TrackTask
    from edgefm.runtime.clip.model import ClipModel
    from edgefm.runtime.sam import SamPredictor

    if name == "classify":
        model = ClipModel(found["clip"], backend="ort-cpu", threads=threads)
        return ClassifyTask(model, ["red circle", "blue square", "green triangle"], templates="simple")
    predictor = SamPredictor(found["sam"], backend="ort-cpu", threads=threads)
    if name == "segment":
        return SegmentTask(predictor, box=np.array([420, 80, 560, 300], np.float32))
    return TrackTask(predictor, point=np.array([[160, 240]], np.float32))


def run_task(name: str, found: dict[str, Path], frames: list[np.ndarray], args) -> dict[str, Any]:
    from edgefm.runtime.camera import Frame, GeneratorSource, Pipeline

    task = make_task(name, found, args.threads)
    for _ in range(args.warmup):  # sessions allocate and tune on their first runs
        task.infer(Frame(0, time.monotonic(), frames[0]), task.preprocess(frames[0]))
    if name == "track":  # warm-up moved the track; start it on the first frame again
        task = make_task(name, found, args.threads)
    n = int(args.seconds * args.source_fps)
    source = GeneratorSource(lambda i: frames[i % len(frames)] if i < n else None, fps=args.source_fps)
    stats = Pipeline(task, source, drop=True, pace=True).run()
    d = stats.to_dict()
    fps, p99 = d["fps"], d["latency_ms"]["p99"]
    bound = 2e3 / fps if fps else float("inf")
    d["targets"] = {
        "fps": {"target": TARGET_FPS[name], "got": fps, "pass": fps >= TARGET_FPS[name]},
        "p99_latency": {"target_ms": round(bound, 2), "got_ms": p99, "pass": p99 is not None and p99 <= bound},
    }
    return d


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    vers = {}
    for dist in ("onnxruntime", "numpy", "opencv-python-headless", "edgefm"):
        try:
            vers[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            vers[dist] = "not installed"
    return {"cpu": cpu, "usable_cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version(), "versions": vers, "load_avg": os.getloadavg()}


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# camera_cpu — {res['models']}", "",
             f"{res['machine']['cpu']}, {res['machine']['usable_cpus']} CPUs, ORT "
             f"{res['machine']['versions']['onnxruntime']}, backend ort-cpu, {W}x{H} stream at "
             f"{res['settings']['source_fps']} FPS, {res['settings']['seconds']} s per task, load avg at start "
             f"{res['machine']['load_avg'][0]:.1f}", "",
             "| task | FPS (target) | latency p50 | p99 (target ≤ 2 intervals) | dropped | result |",
             "|---|---|---|---|---|---|"]
    for name, d in res["tasks"].items():
        t, lat = d["targets"], d["latency_ms"]
        ok = "PASS" if t["fps"]["pass"] and t["p99_latency"]["pass"] else "MISS"
        lines.append(f"| {name} | {d['fps']:.1f} (≥ {t['fps']['target']:.0f}) | {lat['p50']:.1f} ms | "
                     f"{lat['p99']:.1f} ms (≤ {t['p99_latency']['target_ms']:.1f}) | {d['dropped']}/{d['captured']}"
                     f" | {ok} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="classify,segment,track")
    p.add_argument("--seconds", type=float, default=10.0, help="stream length per task")
    p.add_argument("--source-fps", type=float, default=60.0, help="rate the synthetic camera delivers")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: one per core)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"camera_cpu: {msg}", flush=True)

    res: dict[str, Any] = {"benchmark": "camera_cpu", "machine": machine(), "settings": vars(args), "tasks": {}}
    frames = synthetic_frames()
    with tempfile.TemporaryDirectory(prefix="edgefm-camera-bench-") as work:
        found, res["models"] = bundles(Path(work), log)
        for name in args.tasks.split(","):
            log(f"{name}: {args.seconds:.0f} s of {W}x{H} at {args.source_fps:.0f} FPS ({res['models']})")
            d = res["tasks"][name] = run_task(name, found, frames, args)
            t = d["targets"]
            log(f"  {d['fps']:.1f} FPS [{'PASS' if t['fps']['pass'] else 'MISS'} >= {t['fps']['target']:.0f}]  "
                f"latency p50 {d['latency_ms']['p50']:.1f} ms p99 {d['latency_ms']['p99']:.1f} ms "
                f"[{'PASS' if t['p99_latency']['pass'] else 'MISS'} <= {t['p99_latency']['target_ms']:.1f}]  "
                f"dropped {d['dropped']}/{d['captured']}  stages {json.dumps(d['stages'])}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "camera_cpu.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "camera_cpu.md").write_text(markdown(res))
    print(markdown(res))
    print(f"wrote {out / 'camera_cpu.json'} and {out / 'camera_cpu.md'}")


if __name__ == "__main__":
    main()
