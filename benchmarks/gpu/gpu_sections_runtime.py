"""The GPU check's runtime sections: the predictor, the camera pipeline, DALL·E generation and `edgefm bench`,
run as a user would on the GPU backend."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from gpu_run import Run, time_fn

ROOT = Path(__file__).resolve().parents[2]


def section_predictor(run: Run, bundles, backend: str) -> None:
    """SamPredictor on the GPU backend vs on the CPU: same masks; set_image and predict latency."""
    from edgefm.runtime.sam import SamAutomaticMaskGenerator, SamPredictor

    rng = np.random.default_rng(2)
    image = (rng.random((1500, 2250, 3)) * 255).astype(np.uint8)
    image[400:900, 900:1600] = (200, 40, 40)
    point, label = np.array([[1250.0, 650.0]], np.float32), np.array([1], np.float32)
    out = run.results["sections"].setdefault("sam_predictor", {})
    ref = SamPredictor(bundles["sam"]["fp32"], backend="ort-cpu")
    ref.set_image(image)
    ref_masks, ref_scores, _ = ref.predict(point, label)
    for precision in ("fp32", "fp16"):
        # Preprocessing on the host (numpy) and on the device (runtime/image_prep.py, what "auto" picks).
        for where in ("host", "device"):
            pred = SamPredictor(bundles["sam"][precision], backend=backend, preprocess=where)
            pred.set_image(image)
            masks, scores, _ = pred.predict(point, label)
            ious = [float((m & r).sum() / max(1, (m | r).sum())) for m, r in zip(masks, ref_masks)]
            out[f"{precision}_{where}_preprocess"] = {
                "embedding_on_device": bool(pred._on_device), "mask_iou_vs_cpu_fp32": ious,
                "score_max_abs_vs_cpu_fp32": float(np.abs(scores - ref_scores).max())}
            run.log(f"   predictor {precision}, {where} preprocessing: on device {pred._on_device}, IoU vs CPU "
                    f"{np.round(ious, 5)}")
            run.row("sam.set_image 1500x2250", f"SamPredictor {backend} preprocess={where}", precision,
                    time_fn(lambda p=pred: p.set_image(image), max(10, run.iters // 4), 3))
        # Automatic masks with no filter (random weights predict low IoUs): every candidate upscaled and scored
        # on the device, only boolean masks back; the worst case of the generator's host traffic.
        side = 2 if run.smoke else 8  # the smoke run's CPU does this on the host, the slow way
        amg = SamAutomaticMaskGenerator(pred, points_per_side=side, pred_iou_thresh=0.0, stability_score_thresh=0.0)
        run.row(f"sam.amg {side}x{side} points ({3 * side * side} candidates) 1500x2250",
                f"SamAutomaticMaskGenerator {backend}", precision, time_fn(lambda g=amg: g.generate(image), 2, 1))
        run.row("sam.predict 1 point -> 3 masks", f"SamPredictor {backend}", precision,
                time_fn(lambda p=pred: p.predict(point, label), run.iters, run.warmup))
    if backend == "ort-cuda":  # the captured-graph predictor: same masks, and what the graphs save
        pred = SamPredictor(bundles["sam"]["fp16"], backend=backend, cuda_graphs=True)
        pred.set_image(image)
        masks, scores, _ = pred.predict(point, label)
        ious = [float((m & r).sum() / max(1, (m | r).sum())) for m, r in zip(masks, ref_masks)]
        out["fp16_cuda_graphs"] = {"mask_iou_vs_cpu_fp32": ious,
                                   "score_max_abs_vs_cpu_fp32": float(np.abs(scores - ref_scores).max())}
        run.log(f"   predictor fp16 cuda_graphs: IoU vs CPU {np.round(ious, 5)}")
        run.row("sam.set_image 1500x2250", f"SamPredictor {backend} cuda_graphs preprocess={pred.preprocess_on}",
                "fp16",
                time_fn(lambda p=pred: p.set_image(image), max(10, run.iters // 4), 3))
        run.row("sam.predict 1 point -> 3 masks", f"SamPredictor {backend} cuda_graphs", "fp16",
                time_fn(lambda p=pred: p.predict(point, label), run.iters, run.warmup))


def section_cli_bench(run: Run, bundles, backend: str) -> None:
    """``edgefm bench`` as a user runs it, on the fp16 bundles (JSON and a PNG chart)."""
    for family in ("sam", "clip", "dalle"):
        cmd = [sys.executable, "-m", "edgefm.runtime.cli", "bench", str(bundles[family]["fp16"]), "--backend",
               backend, "--iters", str(run.iters), "--warmup", str(run.warmup),
               "--json", str(run.out / f"bench_{family}_fp16.json")]
        if family == "sam":
            cmd += ["--plot", str(run.out / "bench_sam_fp16.png")]
        if backend == "ort-cuda":
            cmd += ["--cuda-graph"]
        # The committed run of an earlier H100 check: the table then says, row by row, what changed since.
        baseline = Path(__file__).resolve().parents[1] / "results" / f"h100_bench_{family}_fp16.json"
        if baseline.is_file() and not run.smoke:
            cmd += ["--baseline", str(baseline)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        run.log(f"   edgefm bench {family}: rc={proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-1500:]}")
        run.results["sections"].setdefault("edgefm_bench", {})[family] = {"rc": proc.returncode,
                                                                            "table": proc.stdout[-4000:]}


def section_camera(run: Run, bundles, backend: str, seconds: float) -> None:
    """The camera pipeline at 1280x720: segment and track (SAM), classify (CLIP)."""
    import cv2
    from edgefm.runtime.camera import ClassifyTask, Frame, GeneratorSource, Pipeline, SegmentTask, TrackTask
    from edgefm.runtime.clip.model import ClipModel
    from edgefm.runtime.sam import SamPredictor

    h, w, fps = 720, 1280, 60.0
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([xx * 150 // w + 50, yy * 120 // h + 60, np.full_like(xx, 100)], -1).astype(np.uint8)
    frames = []
    for i in range(90):
        img = bg.copy()
        cv2.circle(img, (int(320 + 640 * abs(np.sin(np.pi * i / 90))), 360), 140, (220, 30, 30), -1)
        frames.append(img)
    out = run.results["sections"].setdefault("camera_1280x720", {})
    # "+graphs": `edgefm camera --cuda-graph`: ClipModel's captured image encoder, SamPredictor's captured encoder
    # and prompt -> masks chain.
    graphs = ("classify+graphs", "segment+graphs") if backend == "ort-cuda" else ()
    for task_name in ("classify", "segment", "track", *graphs):
        if task_name.startswith("classify"):
            clip = ClipModel(bundles["clip"]["fp16"], backend=backend, cuda_graphs=task_name.endswith("+graphs"))
            task = ClassifyTask(clip, ["red circle", "blue square", "green triangle"], templates="simple")
        else:
            pred = SamPredictor(bundles["sam"]["fp16"], backend=backend, cuda_graphs=task_name.endswith("+graphs"))
            task = (SegmentTask(pred, box=np.array([150, 200, 500, 520], np.float32))
                    if task_name.startswith("segment") else TrackTask(pred, point=np.array([[320, 360]], np.float32)))
        for _ in range(3):
            task.infer(Frame(0, time.monotonic(), frames[0]), task.preprocess(frames[0]))
        if task_name == "track":
            task = TrackTask(SamPredictor(bundles["sam"]["fp16"], backend=backend),
                             point=np.array([[320, 360]], np.float32))
        n = int(seconds * fps)
        source = GeneratorSource(lambda i, n=n: frames[i % len(frames)] if i < n else None, fps=fps)
        d = Pipeline(task, source, drop=True, pace=True).run().to_dict()
        out[task_name] = d
        run.log(f"   camera {task_name}: {d.get('fps')} FPS, latency {d.get('latency_ms')}")


def section_dalle_generate(run: Run, work: Path, backend: str) -> None:
    """The shipped shapes DALL·E: the prior's KV cache stays on the device between steps; same ids as CPU."""
    from edgefm.export.dalle import export_dalle
    from edgefm.runtime.dalle.generator import DalleGenerator

    weights = ROOT / "models" / "weights"
    bundle = export_dalle(work / "dalle_shapes", weights / "dvae_shapes_decoder.safetensors",
                          weights / "dvae_shapes_encoder.safetensors", weights / "prior_shapes.safetensors",
                          overwrite=True)
    cpu, dev = DalleGenerator(bundle, backend="ort-cpu"), DalleGenerator(bundle, backend=backend)
    out = run.results["sections"].setdefault("dalle_generate", {})
    prompt = "a red circle"
    a = cpu.generate(prompt, n=4, seed=3, top_k=8).tokens
    b = dev.generate(prompt, n=4, seed=3, top_k=8).tokens
    out["same_tokens_as_cpu"] = float(np.mean(a == b))
    run.log(f"   dalle: {out['same_tokens_as_cpu']:.4f} of image tokens equal to the CPU run")
    # Each prior step replayed as a captured graph, two taking turns with the cache (on the CPU smoke run: the
    # static-shape stand-in, as in the tests).
    graphs = DalleGenerator(bundle, backend=backend, cuda_graphs=backend == "ort-cuda")
    graphs._graphs = True
    out["captured_same_tokens_as_cpu"] = float(np.mean(graphs.generate(prompt, n=4, seed=3, top_k=8).tokens == a))
    run.log(f"   dalle, captured steps: {out['captured_same_tokens_as_cpu']:.4f} of image tokens equal to the CPU run")
    for n in (1, 8):
        run.row(f"dalle.generate n={n} (shapes, 8x8 grid)", f"DalleGenerator {backend}", "fp32",
                time_fn(lambda n=n: dev.generate(prompt, n=n, seed=0, top_k=8), 10, 2))
        run.row(f"dalle.generate n={n} (shapes, 8x8 grid)", f"DalleGenerator {backend} captured steps", "fp32",
                time_fn(lambda n=n: graphs.generate(prompt, n=n, seed=0, top_k=8), 10, 2))


def section_verify(run: Run, bundles, backend: str) -> None:
    """``edgefm verify`` as a user runs it: each component of the fp32 and fp16 bundles on the GPU backend
    against ONNX Runtime's CPU run of the same bundle's reference ONNX."""
    from edgefm.export.verify import parity_summary, verify_bundle

    out = run.results["sections"].setdefault("edgefm_verify", {})
    for family, kinds in bundles.items():
        for kind in ("fp32", "fp16"):
            if kind not in kinds:
                continue
            result = verify_bundle(kinds[kind], backend)
            lines = {n: r.get("skipped") or parity_summary(r) for n, r in result["components"].items()}
            out[f"{family}.{kind}"] = {"passed": result["passed"], "components": lines}
            for n, line in lines.items():
                run.log(f"   verify {family}.{kind}.{n}: {line}")
