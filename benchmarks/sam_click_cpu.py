"""SAM clicks on the CPU: one ``prompt_decoder`` call against the image's decoder context, against the
official split (``prompt_encoder`` + ``mask_decoder``), on the same bundle in the same process.

A vit_b-size SAM with seeded random weights (non-zero biases, as in ``sam_cpu.py``) is exported once; two
``SamPredictor`` s open it, one of them told to ignore the two new components (what a bundle exported
before them does). Both encode the same 1500 x 2250 photo; then, alternating in rounds so that load from
other processes falls on both alike, each times:

- ``click``: one foreground point -> 3 masks at full size (``predict``, what an interactive user waits for);
- ``decode``: the same click to low-res logits only (``predict_batch(upscale=False)``);
- ``batch64``: 64 single-point prompts in one call, low-res only (one batch of the automatic mask generator).

The split path's one-off cost per image, ``decoder_context``, is timed on its own. Both paths' logits are
compared on every prompt kind timed (max abs difference, mask agreement).

    python benchmarks/sam_click_cpu.py [--precision fp32|int8] [--iters 20] [--rounds 4] [--threads 2]
        [--out-dir benchmarks/results]      # writes sam_click_cpu.{json,md} (int8: sam_click_cpu_int8.*)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, split, stats_ms, versions  # noqa: E402
from sam_cpu_sides import IMAGE_HW, POINT_XY, SEED, scene  # noqa: E402

SIDES = ("official_split", "prompt_decoder")


def export(variant: str, out: Path, precision: str) -> dict[str, Any]:
    import torch
    from edgefm.export.sam import export_sam
    from edgefm.models.sam import SAM_CONFIGS, build_sam

    torch.manual_seed(SEED)
    model = build_sam(SAM_CONFIGS[variant]).eval()
    with torch.no_grad():  # the official init leaves biases at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("bias") or "pos" in name.split(".")[-1]:
                param.normal_(0.0, 0.02)
    t0 = time.perf_counter()
    export_sam(model, out, variant, precision=precision)
    written = {c["name"]: c["precision"] for c in json.loads((out / "manifest.json").read_text())["components"]}
    return {"export_s": time.perf_counter() - t0, "precisions": written}


def run(args) -> dict[str, Any]:
    from edgefm.runtime.sam import SamPredictor

    res: dict[str, Any] = {"benchmark": "sam_click_cpu", "variant": args.variant, "precision": args.precision,
                           "machine": machine(),
                           "versions": versions(("onnxruntime", "numpy", "opencv-python-headless", "edgefm")),
                           "settings": {"iters": args.iters, "rounds": args.rounds, "threads": args.threads,
                                        "image_hw": list(IMAGE_HW), "point_xy": list(POINT_XY), "seed": SEED},
                           "loadavg": {"start": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="sam_click_") as tmp:
        bundle = Path(tmp) / "bundle"
        res["export"] = export(args.variant, bundle, args.precision)
        sides = {name: SamPredictor(bundle, "ort-cpu", threads=args.threads) for name in SIDES}
        sides["official_split"].prompt_decoder = None
        image = scene(*IMAGE_HW)
        for p in sides.values():
            p.set_image(image)
        h, w = IMAGE_HW
        point, label = np.array([POINT_XY], np.float32), np.array([1], np.float32)
        grid = np.stack(np.meshgrid(np.linspace(w / 16, w - w / 16, 8), np.linspace(h / 16, h - h / 16, 8)), -1)
        batch = grid.reshape(64, 1, 2).astype(np.float32)

        def ops(p):
            return {"click": lambda: p.predict(point, label, multimask_output=True),
                    "decode": lambda: p.predict_batch(point[None], label[None], upscale=False),
                    "batch64": lambda: p.predict_batch(batch, np.ones((64, 1), np.float32), upscale=False)}

        samples: dict[str, dict[str, list[float]]] = {s: {} for s in SIDES}
        for what in ("click", "decode", "batch64"):
            n = max(3, args.iters // 4) if what == "batch64" else args.iters
            for r, k in enumerate(split(n, args.rounds)):
                for name in SIDES if r % 2 == 0 else SIDES[::-1]:
                    fn = ops(sides[name])[what]
                    if r == 0:
                        fn()  # warm-up
                    for _ in range(k):
                        t0 = time.perf_counter()
                        fn()
                        samples[name].setdefault(what, []).append(time.perf_counter() - t0)
            print(f"{what}: done", file=sys.stderr, flush=True)
        split_side = sides["prompt_decoder"]
        context = []
        for _ in range(args.iters):
            split_side._context = None
            t0 = time.perf_counter()
            split_side.decoder_context()
            context.append(time.perf_counter() - t0)
        res["sides"] = {name: {k: stats_ms(v) for k, v in s.items()} for name, s in samples.items()}
        res["sides"]["prompt_decoder"]["decoder_context (once per image)"] = stats_ms(context)
        res["ratios"] = {k: res["sides"]["prompt_decoder"][k]["median_ms"]
                         / res["sides"]["official_split"][k]["median_ms"] for k in samples["prompt_decoder"]}
        res["agreement"] = agreement(sides, point, label, batch)
    res["loadavg"]["end"] = os.getloadavg()
    return res


def agreement(sides, point, label, batch) -> dict[str, Any]:
    """Both paths' low-res logits on each timed prompt, and on a box + point prompt."""
    old, new = sides["official_split"], sides["prompt_decoder"]
    box = np.array([[900, 300, 1700, 1000]], np.float32)
    prompts = {"click": (point[None], label[None], None), "batch64": (batch, np.ones((64, 1), np.float32), None),
               "box_and_point": (point[None], label[None], box)}
    out = {}
    for name, (pts, lbl, boxes) in prompts.items():
        _, s1, a = old.predict_batch(pts, lbl, boxes, upscale=False)
        _, s2, b = new.predict_batch(pts, lbl, boxes, upscale=False)
        out[name] = {"max_abs_logits": float(np.abs(a - b).max()), "logit_scale": float(np.abs(a).max()),
                     "max_abs_iou_pred": float(np.abs(s1 - s2).max()),
                     "mask_agreement": float(((a > 0) == (b > 0)).mean())}
    return out


def markdown(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    lines = [f"# SAM clicks on the CPU: prompt_decoder vs prompt_encoder + mask_decoder ({res['variant']}, "
             f"{res['precision']})", "",
             f"{m['cpu_model']}, {m['usable_cpus']} usable CPUs, {s['threads']} threads; onnxruntime "
             f"{res['versions'].get('onnxruntime')}; {s['image_hw'][0]} x {s['image_hw'][1]} photo, seeded random "
             f"weights; {s['iters']} calls per side ({s['rounds']} alternating rounds); load average "
             f"{res['loadavg']['start'][0]:.2f} -> {res['loadavg']['end'][0]:.2f}. Components as written: "
             + ", ".join(f"{k} {v}" for k, v in res["export"]["precisions"].items()) + ".", "",
             "| step | prompt_encoder + mask_decoder: median ms | prompt_decoder: median ms | ratio |",
             "|---|---|---|---|"]
    old, new = res["sides"]["official_split"], res["sides"]["prompt_decoder"]
    for k, ratio in res["ratios"].items():
        lines.append(f"| {k} | {old[k]['median_ms']:.1f} | {new[k]['median_ms']:.1f} | {ratio:.2f}x |")
    ctx = new["decoder_context (once per image)"]
    lines += ["", f"decoder_context, once per image (at its first click): median {ctx['median_ms']:.1f} ms.", "",
              "Agreement of the two paths' low-res logits:", ""]
    for k, a in res["agreement"].items():
        lines.append(f"- {k}: max abs {a['max_abs_logits']:.2e} (logits up to {a['logit_scale']:.2f}), IoU "
                     f"predictions within {a['max_abs_iou_pred']:.1e}, mask agreement {a['mask_agreement']:.6f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="vit_b", help="vit_b (default) or tiny for a smoke run")
    p.add_argument("--precision", default="fp32", choices=("fp32", "int8"), help="the bundle's export precision")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    res = run(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "sam_click_cpu" + ("" if args.precision == "fp32" else f"_{args.precision}")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
