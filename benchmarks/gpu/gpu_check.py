"""The GPU verification run (issue 6, section 4; issue 7's GPU camera figures): one prepared script.

On the GPU machine, with that machine's PyTorch, it

1. exports random-weight SAM ViT-B, CLIP ViT-B/32 and the official-size DALL·E dVAE decoder to fp32 and fp16
   bundles (``edgefm export``'s own functions, with their CPU parity gates);
2. checks parity on the GPU: ONNX Runtime CUDA (fp32 with and without TF32, fp16) against PyTorch CUDA fp32
   with TF32 off, per DESIGN.md's policy;
3. times every component at batch 1 (CLIP text: 80 prompts) in one process: PyTorch eager fp32 and fp16,
   torch.compile fp16, and ONNX Runtime CUDA fp32/fp16 three ways — host arrays in and out (``runner.run``),
   device-resident inputs and outputs (IO binding), and a captured CUDA graph (static shapes) — plus SAM's
   prompt -> low-res masks (prompt encoder + mask decoder chained on the device; the prompt decoder alone
   against the image's decoder context);
4. runs the runtime as a user would: ``SamPredictor`` on ort-cuda (the image embedding stays on the device)
   checked against the CPU predictor, and ``edgefm bench`` on ort-cuda (JSON + PNG);
5. runs ``edgefm camera``'s pipeline at 1280x720 (segment, track with SAM ViT-B; classify with CLIP ViT-B/32);
6. last, if time is left: ``edgefm verify`` of the fp32 and fp16 bundles on the GPU backend (each component
   against ONNX Runtime's CPU run of its reference ONNX).

Every section is independent: a failure is recorded with its traceback and the run goes on. Results are
rewritten after each section (``gpu_check.json`` and ``gpu_check.md`` in ``--out``), so a run cut short
still reports what it measured. ``--smoke`` runs the same flow with tiny models on a CPU (ort-cpu), to check
the script itself where no GPU exists.

    bash benchmarks/gpu/run.sh                       # on the GPU machine (see benchmarks/gpu/README.md)
    python benchmarks/gpu/gpu_check.py --smoke --out /tmp/gpu-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from common import machine, versions  # noqa: E402
from gpu_profile import section_kernel_profile  # noqa: E402
from gpu_run import Run  # noqa: E402
from gpu_sections_bench import component_runner, section_bench, torch_graphs  # noqa: E402
from gpu_sections_runtime import (  # noqa: E402
    section_camera,
    section_cli_bench,
    section_dalle_generate,
    section_predictor,
    section_verify,
)

DISTS = ("torch", "onnxruntime-gpu", "onnxruntime", "onnx", "numpy", "opencv-python-headless", "edgefm")


def build_models(smoke: bool) -> dict[str, Any]:
    import torch
    from edgefm.models.clip import CLIP_CONFIGS, build_clip
    from edgefm.models.dalle import build_decoder
    from edgefm.models.sam import SAM_CONFIGS, build_sam

    torch.manual_seed(0)
    sam_variant = "tiny" if smoke else "vit_b"
    sam = build_sam(SAM_CONFIGS[sam_variant]).eval()
    with torch.no_grad():  # the official init leaves biases and relative-position tables at zero: make them count
        for name, param in sam.named_parameters():
            if name.endswith("bias") or "pos" in name.split(".")[-1]:
                param.normal_(0.0, 0.02)
    return {
        "sam": (sam_variant, sam),
        "clip": ("tiny-vit" if smoke else "ViT-B/32", build_clip(CLIP_CONFIGS["tiny-vit" if smoke else "ViT-B/32"])),
        "dalle": ("tiny" if smoke else "official", build_decoder("tiny" if smoke else "official").eval()),
    }


def export_bundles(run: Run, models: dict[str, Any], work: Path) -> dict[str, dict[str, Path]]:
    from edgefm.export.clip import export_clip
    from edgefm.export.dalle import export_dalle
    from edgefm.export.sam import export_sam

    out: dict[str, dict[str, Path]] = {}
    info = run.results["sections"].setdefault("export", {})
    for family, (variant, model) in models.items():
        for precision in ("fp32", "fp16"):
            t = time.monotonic()
            dst = work / f"{family}_{precision}"
            if family == "sam":
                export_sam(model, dst, variant, precision=precision, overwrite=True)
            elif family == "clip":
                export_clip(model, dst, precision=precision, overwrite=True)
            else:
                image_size = 64 if run.smoke else 256
                export_dalle(dst, model, image_size=image_size, precision=precision, overwrite=True)
            _note_export(run, info, out, family, variant, precision, dst, t)
    # SAM and CLIP again with fused attention (com.microsoft.MultiHeadAttention; SAM's relative positions as
    # its bias, or folded into the query/key product).
    for family, attention, key in (("sam", "fused", "fused_fp16"), ("sam", "fused-qk", "fusedqk_fp16"),
                                   ("clip", "fused", "fused_fp16")):
        t = time.monotonic()
        variant, model = models[family]
        dst = work / f"{family}_{key}"
        if family == "sam":
            export_sam(model, dst, variant, precision="fp16", overwrite=True, attention=attention)
        else:
            export_clip(model, dst, precision="fp16", overwrite=True, attention=attention)
        _note_export(run, info, out, family, variant, key, dst, t)
    return out


def _note_export(run: Run, info: dict, out: dict, family: str, variant: str, precision: str, dst: Path,
                 t: float) -> None:
    out.setdefault(family, {})[precision] = dst
    manifest = json.loads((dst / "manifest.json").read_text())
    info[f"{family}_{precision}"] = {
        "variant": variant, "seconds": round(time.monotonic() - t, 1),
        "cpu_parity": {k: v for k, v in manifest["parity"].items() if isinstance(v, dict)},
    }
    run.log(f"exported {family} {variant} {precision} in {time.monotonic() - t:.1f} s")


def feeds_for(family: str, model: Any, smoke: bool) -> dict[str, dict[str, np.ndarray]]:
    """Parity inputs per component (the export's own seeded sets)."""
    if family == "sam":
        from edgefm.export.sam import parity_inputs
        from edgefm.models.sam import SAM_CONFIGS

        return parity_inputs(SAM_CONFIGS["tiny" if smoke else "vit_b"])
    if family == "clip":
        from edgefm.export.clip import parity_inputs

        return parity_inputs(model.config.image_size, model.config.context_length)
    grid = 8 if smoke else 32
    rng = np.random.default_rng(0)
    return {"dvae_decoder": {"image_tokens": rng.integers(0, model.config.vocab_size, (2, grid, grid))}}


def torch_run(module: Any, spec: Any, feeds: dict[str, np.ndarray], device: str) -> dict[str, np.ndarray]:
    import torch

    with torch.inference_mode():
        outs = module(*(torch.from_numpy(feeds[n]).to(device) for n in spec.input_names))
    outs = outs if isinstance(outs, tuple) else (outs,)
    return {n: o.float().cpu().numpy() for n, o in zip(spec.output_names, outs)}


# ---------------------------------------------------------------- sections


def section_env(run: Run, backend: str) -> None:
    import onnxruntime as ort
    import torch

    env: dict[str, Any] = {"machine": machine(), "versions": versions(DISTS), "backend": backend,
                           "ort_providers": ort.get_available_providers(), "torch_cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                      "memory_gib": round(p.total_memory / 2**30, 1)}
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as exc:  # informative only
            env["nvidia_smi"] = f"unavailable: {exc}"
    run.results["env"] = env
    run.log(json.dumps(env.get("gpu", "no GPU")) + f" providers={env['ort_providers']}")


def section_parity(run: Run, models, bundles, backend: str, device: str) -> None:
    """ORT on ``backend`` vs PyTorch fp32 on ``device`` (TF32 off), every component, both precisions."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = run.results["sections"].setdefault("gpu_parity", {})
    for family, (_, model) in models.items():
        try:
            _parity_family(run, out, family, model, bundles, backend, device)
        except Exception:  # one family's failure must not hide the others' results
            run.log(f"!! parity {family} failed: {traceback.format_exc().strip().splitlines()[-1]}")
            run.results["errors"][f"gpu_parity.{family}"] = traceback.format_exc()
        finally:
            model.cpu()


def _parity_family(run: Run, out: dict, family: str, model: Any, bundles, backend: str, device: str) -> None:
    from edgefm.export.parity import compare_outputs
    from edgefm.runtime.bundle import Bundle

    model.to(device)
    graphs = torch_graphs(family, model)
    feeds = feeds_for(family, model, run.smoke)
    refs: dict[str, dict[str, np.ndarray]] = {}
    spec_bundle = Bundle(bundles[family]["fp32"], "ort-cpu")
    for name, graph in graphs.items():
        spec = spec_bundle.spec(name)
        if family == "sam" and name in ("mask_decoder", "decoder_context"):
            emb = refs["image_encoder"]["image_embeddings"]
            feeds[name] = {"image_embeddings": emb, **(refs["prompt_encoder"] if name == "mask_decoder" else {})}
        if family == "sam" and name == "prompt_decoder":  # the same prompts, without their mask input
            points = {n: feeds["prompt_encoder"][n] for n in ("point_coords", "point_labels")}
            feeds[name] = {**points, **refs["decoder_context"]}
        refs[name] = torch_run(graph, spec, feeds[name], device)
    # edgefm runs fp32 on ort-cuda without TF32; the TF32 row (bench --tf32) is judged like fp16, whose
    # 10-bit mantissa TF32 shares.
    variants = [("fp32", {}), ("fp16", {})]
    if backend == "ort-cuda":
        variants.insert(1, ("fp32", {"use_tf32": "1"}))
    variants += [(kind, {}) for kind in bundles[family] if kind.startswith("fused")]
    for kind, cuda_options in variants:
        precision = "fp16" if kind.endswith("fp16") or cuda_options else "fp32"
        for name in graphs:
            runner = component_runner(bundles[family][kind], name, backend, cuda_options=cuda_options or None)
            got = runner.run(feeds[name])
            masks = ("low_res_masks",) if name in ("mask_decoder", "prompt_decoder") else ()
            report = compare_outputs(refs[name], got, precision, masks=masks)
            key = f"{family}.{name}.{kind}" + (".tf32" if cuda_options else "")
            out[key] = report
            worst = min(m.get("mask_iou", m["cosine"]) for m in report["outputs"].values())
            run.log(f"   parity {key:40s} {'PASS' if report['passed'] else 'FAIL'} worst cos/IoU {worst:.6f} "
                    f"max abs {max(m['max_abs'] for m in report['outputs'].values()):.3g}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"))
    p.add_argument("--work", default=None,
                   help="where bundles are written (default: a temporary folder, removed at the end)")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script itself")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=480.0, help="optional sections are skipped past this")
    p.add_argument("--camera-seconds", type=float, default=5.0)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = None if args.work else tempfile.TemporaryDirectory(prefix="edgefm-gpu-")
    work = Path(args.work or scratch.name)
    work.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.smoke, args.budget_s, args.iters, args.warmup)
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls") and not args.smoke:
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels beside PyTorch
    backend = "ort-cpu" if args.smoke else "ort-cuda"
    device = "cpu" if args.smoke else "cuda"
    run.section("env", lambda: section_env(run, backend))
    models = run.section("models", lambda: build_models(args.smoke))
    bundles = run.section("export", lambda: export_bundles(run, models, work)) if models else None
    if not bundles:
        run.log("no bundles: stopping")
        return 1
    run.section("gpu_parity", lambda: section_parity(run, models, bundles, backend, device))
    run.section("bench", lambda: section_bench(run, models, bundles, backend, device,
                                               compiled=not (args.smoke or args.no_compile)))
    run.section("kernel_profile", lambda: section_kernel_profile(run, models, bundles, backend, device),
                min_left_s=60)
    run.section("sam_predictor", lambda: section_predictor(run, bundles, backend), min_left_s=30)
    run.section("camera_1280x720", lambda: section_camera(run, bundles, backend, args.camera_seconds),
                min_left_s=40)
    run.section("dalle_generate", lambda: section_dalle_generate(run, work, backend), min_left_s=30)
    run.section("edgefm_bench", lambda: section_cli_bench(run, bundles, backend), min_left_s=40)
    run.section("edgefm_verify", lambda: section_verify(run, bundles, backend), min_left_s=60)
    run.log(f"done; errors in: {list(run.results['errors'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
