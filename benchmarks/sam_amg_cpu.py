"""Automatic mask generation on the CPU: official segment-anything (PyTorch) vs edgefm (ONNX Runtime), same
weights, same photo, same settings.

The model is the shipped shapes-world SAM (``models/weights/sam_shapes.*``): trained, so its predicted IoUs
and stability scores filter candidates as a real SAM's do, which is what this compares. Its encoder and
decoder are small, so the time is mostly the generator's own work at the photo's size: upscaling candidate
logits to 1500 x 2250, stability scores, thresholds, RLEs and NMS. The official generator upscales all 192
candidates of a 64-point batch before filtering; edgefm's upscales only those that pass the predicted-IoU
filter, 16 at a time ("edgefm, every candidate upscaled" is its generator with that step undone, to show
what it alone changes). Each side runs in its own child process (its peak RSS is its own; the edgefm child
never imports torch), the two alternating, ``--rounds`` times.

``python benchmarks/sam_amg_cpu.py`` writes results/sam_amg_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import machine, stats_ms, versions
from sam_cpu_sides import rss_mb

IMAGE_HW = (1500, 2250)
# The official defaults, but for the two thresholds: the small shipped model's IoU head predicts lower than a
# real SAM's (median ~0.45 here), so 0.88 would keep almost nothing and the comparison would be of empty work.
SETTINGS = dict(points_per_side=32, points_per_batch=64, pred_iou_thresh=0.5, stability_score_thresh=0.8)
# edgefm_full: edgefm with every candidate upscaled (its generator before the IoU filter moved first)
SIDES = ("official", "edgefm", "edgefm_full")
DISTS = ("torch", "onnxruntime", "numpy", "opencv-python-headless", "segment-anything", "edgefm")


def worker(side: str, work: Path, threads: int, iters: int) -> None:
    """Child: build one side, run the generator ``iters`` times, print one JSON line; save the masks."""
    image = np.load(work / "image.npy")
    if side == "official":
        import torch
        from sam_cpu_sides import official_sam
        from segment_anything import SamAutomaticMaskGenerator

        torch.set_num_threads(threads)
        sam = official_sam(json.loads((work / "config.json").read_text()), torch.load(work / "weights.pt"))
        generator = SamAutomaticMaskGenerator(sam, **SETTINGS)
    else:
        from edgefm.runtime.sam import SamAutomaticMaskGenerator, SamPredictor

        class Recording(SamPredictor):  # every candidate's predicted IoU, to say how many pass the filter
            def predict_batch(self, *args, **kwargs):
                out = super().predict_batch(*args, **kwargs)
                ious.append(out[1])
                return out

        class FullSize:  # without ``upscale``: the generator upscales every candidate at once, as the official
            def __init__(self, predictor):
                self.predictor, self.mask_threshold = predictor, predictor.mask_threshold

            def set_image(self, img):
                self.predictor.set_image(img)

            def predict_batch(self, *args, **kwargs):
                return self.predictor.predict_batch(*args, **kwargs)

        ious: list[np.ndarray] = []
        predictor = Recording(work / "bundle", backend="ort-cpu", threads=threads)
        generator = SamAutomaticMaskGenerator(FullSize(predictor) if side == "edgefm_full" else predictor,
                                              **SETTINGS)
    seconds = []
    for _ in range(iters):
        t = time.perf_counter()
        records = generator.generate(image)
        seconds.append(time.perf_counter() - t)
    masks = np.stack([r["segmentation"] for r in records]) if records else np.zeros((0, *IMAGE_HW), bool)
    np.savez_compressed(work / f"{side}_masks.npz", masks=np.packbits(masks, axis=-1),
                        iou=np.array([r["predicted_iou"] for r in records]))
    passed = float(np.mean(np.concatenate([i.ravel() for i in ious]) > SETTINGS["pred_iou_thresh"])) \
        if side != "official" else None
    print(json.dumps({"seconds": seconds, "masks": len(records), "peak_rss_mb": rss_mb("VmHWM"),
                      "torch_imported": "torch" in sys.modules, "iou_passed": passed}))


def run_child(side: str, work: Path, threads: int, iters: int) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--work", str(work),
           "--threads", str(threads), "--iters", str(iters)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{side} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(work: Path) -> None:
    """The shipped SAM as an official checkpoint and as an edgefm bundle, and the photo."""
    import torch
    from edgefm.export.demo import DEMO_MODELS, weights_dir
    from edgefm.runtime.demo import make_scene
    from safetensors.torch import load_file

    w = weights_dir()
    (work / "config.json").write_text(json.dumps(json.loads((w / "sam_shapes.json").read_text())["config"]))
    torch.save(load_file(w / "sam_shapes.safetensors"), work / "weights.pt")
    DEMO_MODELS["sam"][1](work / "bundle", w)  # the demo's own export of it
    np.save(work / "image.npy", make_scene(*IMAGE_HW, seed=3, n_shapes=6))


def agreement(work: Path) -> dict[str, Any]:
    """How many official masks edgefm also found (best IoU >= 0.95), the other way round, and whether the
    two edgefm paths gave the same masks."""
    def unpack(side: str) -> np.ndarray:
        return np.unpackbits(np.load(work / f"{side}_masks.npz")["masks"], axis=-1, count=IMAGE_HW[1]).astype(bool)

    a, b = unpack("official"), unpack("edgefm")
    same = {"edgefm_full_identical": bool(np.array_equal(b, unpack("edgefm_full")))}
    if not len(a) or not len(b):
        return {"official_found": None, "edgefm_found": None, **same}
    fa, fb = a.reshape(len(a), -1).astype(np.float32), b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    iou = inter / (fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter)
    return {"official_found": float((iou.max(1) >= 0.95).mean()), "edgefm_found": float((iou.max(0) >= 0.95).mean()),
            "median_best_iou": float(np.median(iou.max(1))), **same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=SIDES)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--iters", type=int, default=2, help="generate() calls per child")
    ap.add_argument("--rounds", type=int, default=2, help="children per side, alternating")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.work, args.threads, args.iters)
        return
    with tempfile.TemporaryDirectory(prefix="edgefm-amg-") as tmp:
        work = Path(tmp)
        prepare(work)
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        for _ in range(args.rounds):
            for side in runs:
                runs[side].append(run_child(side, work, args.threads, args.iters))
                print(f"{side}: {runs[side][-1]}", file=sys.stderr, flush=True)
        agree = agreement(work)
    sides = {side: {"generate": stats_ms([s for r in rs for s in r["seconds"]]), "masks": rs[-1]["masks"],
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "torch_imported": rs[-1]["torch_imported"],
                    "iou_passed": rs[-1]["iou_passed"]} for side, rs in runs.items()}
    ratio = sides["edgefm"]["generate"]["median_ms"] / sides["official"]["generate"]["median_ms"]
    result = {"benchmark": "sam_amg_cpu", "image_hw": IMAGE_HW, "settings": SETTINGS, "threads": args.threads,
              "model": "the shipped shapes-world SAM (models/weights/sam_shapes.*)", "sides": sides,
              "ratio_edgefm_over_official": ratio, "agreement": agree, "machine": machine(),
              "versions": versions(DISTS)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "sam_amg_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    o, e = sides["official"], sides["edgefm"]
    md = [f"# SAM automatic mask generation, CPU ({args.threads} threads): a {IMAGE_HW[0]} x {IMAGE_HW[1]} photo",
          "", f"The shipped shapes-world SAM; the official generator's defaults (32 x 32 points in batches of 64) "
          f"but pred_iou_thresh 0.5 and stability_score_thresh 0.8 (this model's IoU head predicts lower than a "
          f"real SAM's); {e['iou_passed']:.0%} of the candidates pass the IoU filter. "
          f"{len(runs['official']) * args.iters} generate() calls per side, alternating processes. Raw data: "
          f"`sam_amg_cpu.json`.", "",
          "| side | median s | min s | masks | peak RSS MiB |", "|---|--:|--:|--:|--:|",
          *[f"| {name} | {s['generate']['median_ms'] / 1e3:.2f} | {s['generate']['min_ms'] / 1e3:.2f} | "
            f"{s['masks']} | {s['peak_rss_mb']:.0f} |"
            for name, s in (("official (PyTorch)", o), ("edgefm", e),
                            ("edgefm, every candidate upscaled", sides["edgefm_full"]))],
          "", f"edgefm / official: {ratio:.2f}x the time, {e['peak_rss_mb'] / o['peak_rss_mb']:.2f}x the peak "
          f"memory. Masks: {agree}. edgefm imported torch: {e['torch_imported']}."]
    (args.out_dir / "sam_amg_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
