"""The GPU verification run (issue 6, section 4; issue 7's GPU camera figures): one prepared script.

On the GPU machine, with that machine's PyTorch, it

1. exports random-weight SAM ViT-B, CLIP ViT-B/32 and the official-size DALL·E dVAE decoder to fp32 and fp16
   bundles (``edgefm export``'s own functions, with their CPU parity gates);
2. checks parity on the GPU: ONNX Runtime CUDA (fp32 with and without TF32, fp16) against PyTorch CUDA fp32
   with TF32 off, per DESIGN.md's policy;
3. times every component at batch 1 (CLIP text: 80 prompts) in one process: PyTorch eager fp32 and fp16,
   torch.compile fp16, and ONNX Runtime CUDA fp32/fp16 three ways — host arrays in and out (``runner.run``),
   device-resident inputs and outputs (IO binding), and a captured CUDA graph (static shapes) — plus SAM's
   prompt -> low-res masks (prompt encoder + mask decoder chained on the device);
4. runs the runtime as a user would: ``SamPredictor`` on ort-cuda (the image embedding stays on the device)
   checked against the CPU predictor, and ``edgefm bench`` on ort-cuda (JSON + PNG);
5. runs ``edgefm camera``'s pipeline at 1280x720 (segment, track with SAM ViT-B; classify with CLIP ViT-B/32).

Every section is independent: a failure is recorded with its traceback and the run goes on. Results are
rewritten after each section (``gpu_check.json`` and ``gpu_check.md`` in ``--out``), so a run cut short
still reports what it measured. ``--smoke`` runs the same flow with tiny models on a CPU (ort-cpu), to check
the script itself where no GPU exists.

    bash benchmarks/gpu/run.sh                       # on the GPU machine (see benchmarks/gpu/README.md)
    python benchmarks/gpu/gpu_check.py --smoke --out /tmp/gpu-smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from common import machine, versions  # noqa: E402
from gpu_profile import section_kernel_profile  # noqa: E402
from gpu_run import Run, time_fn  # noqa: E402
from gpu_sections_runtime import section_camera, section_cli_bench, section_dalle_generate, section_predictor  # noqa: E402

DISTS = ("torch", "onnxruntime-gpu", "onnxruntime", "onnx", "numpy", "opencv-python-headless", "edgefm")


def build_models(smoke: bool) -> dict[str, Any]:
    import torch
    from edgefm.models.clip import CLIP_CONFIGS, build_clip
    from edgefm.models.dalle import build_decoder
    from edgefm.models.sam import SAM_CONFIGS, build_sam

    torch.manual_seed(0)
    sam_variant = "tiny" if smoke else "vit_b"
    return {
        "sam": (sam_variant, build_sam(SAM_CONFIGS[sam_variant]).eval()),
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
    # SAM and CLIP again with fused attention (com.microsoft.MultiHeadAttention; SAM's relative positions
    # as its bias).
    for family in ("sam", "clip"):
        t = time.monotonic()
        variant, model = models[family]
        dst = work / f"{family}_fused_fp16"
        if family == "sam":
            export_sam(model, dst, variant, precision="fp16", overwrite=True, attention="fused")
        else:
            export_clip(model, dst, precision="fp16", overwrite=True, attention="fused")
        _note_export(run, info, out, family, variant, "fused_fp16", dst, t)
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


def torch_graphs(family: str, model: Any) -> dict[str, Any]:
    """The PyTorch modules each component's reference (and eager timing) runs."""
    if family == "sam":
        from edgefm.export.sam import ImageEncoderGraph, MaskDecoderGraph, PromptEncoderGraph

        return {"image_encoder": ImageEncoderGraph(model), "prompt_encoder": PromptEncoderGraph(model),
                "mask_decoder": MaskDecoderGraph(model)}
    if family == "clip":
        import torch.nn as nn

        class Image(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                return self.m.encode_image(x)

        class Text(Image):
            def forward(self, x):
                return self.m.encode_text(x)

        return {"image_encoder": Image(model), "text_encoder": Text(model)}
    from edgefm.models.dalle import DecoderFromIds

    return {"dvae_decoder": DecoderFromIds(model)}


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
        if family == "sam" and name == "mask_decoder":
            emb = refs["image_encoder"]["image_embeddings"]
            feeds[name] = {"image_embeddings": emb, **refs["prompt_encoder"]}
        refs[name] = torch_run(graph, spec, feeds[name], device)
    variants = [("fp32", {}), ("fp16", {})]
    if backend == "ort-cuda":
        variants.insert(1, ("fp32", {"use_tf32": "0"}))
    if family == "sam":
        variants.append(("fused_fp16", {}))
    for kind, cuda_options in variants:
        bundle = Bundle(bundles[family][kind], "ort-cpu")
        precision = "fp16" if kind.endswith("fp16") else "fp32"
        for name in graphs:
            if kind == "fused_fp16" and name != "image_encoder":
                continue
            from edgefm.runtime.backends.onnxruntime import OrtRunner

            entry = bundle.entry(name)
            runner = OrtRunner(bundle.path / entry.file, entry.spec, backend,
                               cuda_options=cuda_options or None)
            got = runner.run(feeds[name])
            masks = ("low_res_masks",) if name == "mask_decoder" else ()
            report = compare_outputs(refs[name], got, precision, masks=masks)
            key = f"{family}.{name}.{kind}" + (".no_tf32" if cuda_options else "")
            out[key] = report
            worst = min(m.get("mask_iou", m["cosine"]) for m in report["outputs"].values())
            run.log(f"   parity {key:40s} {'PASS' if report['passed'] else 'FAIL'} worst cos/IoU {worst:.6f} "
                    f"max abs {max(m['max_abs'] for m in report['outputs'].values()):.3g}")


def bench_feeds(family: str, name: str, model: Any, smoke: bool) -> dict[str, np.ndarray]:
    """Batch-1 timing inputs (CLIP text: 80 prompts at the full context)."""
    rng = np.random.default_rng(1)
    if family == "sam":
        from edgefm.models.sam import SAM_CONFIGS

        cfg = SAM_CONFIGS["tiny" if smoke else "vit_b"]
        s, e = cfg.image_size, cfg.image_embedding_size
        if name == "image_encoder":
            return {"image": rng.standard_normal((1, 3, s, s)).astype(np.float32)}
        return {"point_coords": np.array([[[s * 0.4, s * 0.6], [0.0, 0.0]]], np.float32),
                "point_labels": np.array([[1, -1]], np.float32),
                "mask_input": np.zeros((1, 1, 4 * e, 4 * e), np.float32),
                "has_mask_input": np.zeros((1,), np.float32)}
    if family == "clip":
        c = model.config
        if name == "image_encoder":
            return {"image": rng.standard_normal((1, 3, c.image_size, c.image_size)).astype(np.float32)}
        from edgefm.runtime.clip.tokenizer import ClipTokenizer

        prompts = [f"a photo of a {w}, number {i}" for i, w in enumerate(["cat", "dog", "car", "tree"] * 20)]
        return {"tokens": ClipTokenizer(context_length=c.context_length)(prompts)}
    grid = 8 if smoke else 32
    return {"image_tokens": rng.integers(0, model.config.vocab_size, (1, grid, grid))}


def _torch_rows(run: Run, comp: str, graph: Any, spec: Any, feeds: dict[str, np.ndarray], device: str,
                sync: Callable[[], None], compiled: bool, family: str) -> None:
    """PyTorch eager fp32 and fp16 (and torch.compile fp16) on ``device``."""
    import torch

    precisions = ("fp32", "fp16") if device == "cuda" else ("fp32",)  # CPU PyTorch lacks many fp16 kernels
    for precision in precisions:
        module = graph if precision == "fp32" else copy.deepcopy(graph).half()
        xs = [torch.from_numpy(feeds[n]).to(device) for n in spec.input_names]
        if precision == "fp16":
            xs = [x.half() if x.is_floating_point() else x for x in xs]
        with torch.inference_mode():
            run.row(comp, "pytorch eager", precision,
                    time_fn(lambda m=module, a=xs: m(*a), run.iters, run.warmup, sync))
            if compiled and precision == "fp16" and run.left() > 240:
                # CUDA graphs where launches dominate (CLIP); plain inductor kernels elsewhere.
                mode = "reduce-overhead" if family == "clip" else "default"
                t = time.monotonic()
                fn = torch.compile(module, mode=mode)
                for _ in range(3):
                    fn(*xs)
                sync()
                run.row(comp, f"torch.compile {mode}", precision,
                        time_fn(lambda f=fn, a=xs: f(*a), run.iters, run.warmup, sync),
                        compile_s=round(time.monotonic() - t, 1))
        if device == "cuda":
            torch.cuda.empty_cache()


def _ort_rows(run: Run, comp: str, bundle_path: Path, name: str, feeds: dict[str, np.ndarray], backend: str,
              precision: str) -> None:
    """ONNX Runtime three ways: host arrays, IO binding with device-resident tensors, a captured graph."""
    import onnxruntime as ort
    from edgefm.runtime.backends.onnxruntime import OrtRunner, _CapturedGraph
    from edgefm.runtime.bundle import Bundle

    it, wu = run.iters, run.warmup
    entry = Bundle(bundle_path, "ort-cpu").entry(name)
    runner = OrtRunner(bundle_path / entry.file, entry.spec, backend)
    run.row(comp, f"onnxruntime {backend} host arrays", precision, time_fn(lambda: runner.run(feeds), it, wu))
    dev = {n: ort.OrtValue.ortvalue_from_numpy(a, runner.device, 0) for n, a in feeds.items()}
    keep = tuple(entry.spec.output_names)
    run.row(comp, f"onnxruntime {backend} IO binding", precision,
            time_fn(lambda: runner.run_on_device(dev, keep=keep), it, wu))
    try:
        captured = _CapturedGraph(runner, runner.spec.check_feeds(feeds))
        label = "CUDA graph" if backend == "ort-cuda" else "static shapes"
        run.row(comp, f"onnxruntime {backend} {label}", precision,
                time_fn(lambda: captured.session.run_with_iobinding(captured.binding), it, wu))
        want, got = runner.run(feeds), captured.run(feeds)
        diff = max(float(np.abs(got[k].astype(np.float32) - want[k].astype(np.float32)).max()) for k in want)
        run.results["sections"].setdefault("captured_vs_plain_max_abs", {})[f"{comp}.{precision}"] = diff
    except Exception as exc:
        run.log(f"   {comp} {precision} captured graph failed: {type(exc).__name__}: {str(exc)[:300]}")
        run.results["errors"][f"captured_graph.{comp}.{precision}"] = traceback.format_exc()


def _nhwc_row(run: Run, comp: str, bundle_path: Path, name: str, feeds: dict[str, np.ndarray], backend: str) -> None:
    """Convolution-heavy graphs again with the CUDA provider's ``prefer_nhwc`` (channels-last convolutions,
    the layout tensor cores want; the dVAE decoder is 308 GFLOP of convolutions), IO binding. (On ort-cpu, in
    a smoke run, the option does not apply.)"""
    import onnxruntime as ort
    from edgefm.runtime.backends.onnxruntime import OrtRunner
    from edgefm.runtime.bundle import Bundle

    entry = Bundle(bundle_path, "ort-cpu").entry(name)
    try:
        runner = OrtRunner(bundle_path / entry.file, entry.spec, backend, cuda_options={"prefer_nhwc": "1"})
        dev = {n: ort.OrtValue.ortvalue_from_numpy(a, runner.device, 0) for n, a in feeds.items()}
        keep = tuple(entry.spec.output_names)
        run.row(comp, f"onnxruntime {backend} IO binding, prefer_nhwc", "fp16",
                time_fn(lambda: runner.run_on_device(dev, keep=keep), run.iters, run.warmup))
    except Exception as exc:  # an onnxruntime-gpu built without NHWC kernels refuses the option
        run.log(f"   {comp} prefer_nhwc failed: {type(exc).__name__}: {str(exc)[:300]}")
        run.results["errors"][f"prefer_nhwc.{comp}"] = traceback.format_exc()


def section_bench(run: Run, models, bundles, backend: str, device: str, compiled: bool) -> None:
    """Per component, batch 1: PyTorch eager fp32/fp16 (and compiled), ORT host / IO binding / CUDA graph."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = True  # PyTorch's fast fp32, as a user would time it
    torch.backends.cudnn.allow_tf32 = True
    for family, (_, model) in models.items():
        try:
            _bench_family(run, family, model, bundles, backend, device, compiled, sync)
        except Exception:  # one family's failure must not hide the others' results
            run.log(f"!! bench {family} failed: {traceback.format_exc().strip().splitlines()[-1]}")
            run.results["errors"][f"bench.{family}"] = traceback.format_exc()
        finally:
            model.cpu()
            if device == "cuda":
                torch.cuda.empty_cache()


def _bench_family(run: Run, family: str, model: Any, bundles, backend: str, device: str, compiled: bool,
                  sync: Callable[[], None]) -> None:
    from edgefm.runtime.bundle import Bundle

    model.to(device)
    graphs = torch_graphs(family, model)
    for name in [n for n in graphs if n not in ("prompt_encoder", "mask_decoder")]:
        feeds = bench_feeds(family, name, model, run.smoke)
        spec = Bundle(bundles[family]["fp32"], "ort-cpu").spec(name)
        comp = f"{family}.{name}"
        _torch_rows(run, comp, graphs[name], spec, feeds, device, sync, compiled, family)
        for precision in ("fp32", "fp16"):
            _ort_rows(run, comp, bundles[family][precision], name, feeds, backend, precision)
        if "fused_fp16" in bundles[family]:
            _ort_rows(run, comp, bundles[family]["fused_fp16"], name, feeds, backend, "fp16 fused attention")
        if (family, name) in (("dalle", "dvae_decoder"), ("sam", "image_encoder")):
            _nhwc_row(run, comp, bundles[family]["fp16"], name, feeds, backend)
    if family == "sam":
        prompt_to_masks(run, graphs, bundles, backend, device, sync)


def prompt_to_masks(run: Run, graphs, bundles, backend: str, device: str, sync) -> None:
    """SAM: one click (+ padding point) -> low-res masks and IoU scores; embedding already on the device."""
    import torch
    from edgefm.runtime.bundle import Bundle

    it, wu = run.iters, run.warmup
    feeds = bench_feeds("sam", "prompt_encoder", None, run.smoke)
    image = bench_feeds("sam", "image_encoder", None, run.smoke)
    xs = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
    with torch.inference_mode():
        emb = graphs["image_encoder"](torch.from_numpy(image["image"]).to(device))
        pe, md = graphs["prompt_encoder"], graphs["mask_decoder"]

        def eager():
            sparse, dense = pe(xs["point_coords"], xs["point_labels"], xs["mask_input"], xs["has_mask_input"])
            return md(emb, sparse, dense)

        run.row("sam.prompt_to_masks", "pytorch eager", "fp32", time_fn(eager, run.iters, run.warmup, sync))
    for precision in ("fp32", "fp16"):
        bundle = Bundle(bundles["sam"][precision], backend)
        enc, p, d = (bundle.runner(n) for n in ("image_encoder", "prompt_encoder", "mask_decoder"))
        kept = enc.run_on_device(image, keep=("image_embeddings",))["image_embeddings"]

        def chained(p=p, d=d, kept=kept):
            mid = p.run_on_device(feeds, keep=("sparse_embeddings", "dense_embeddings"))
            return d.run_on_device({"image_embeddings": kept, **mid})

        run.row("sam.prompt_to_masks", f"onnxruntime {backend} chained on device", precision,
                time_fn(chained, it, wu))
    _captured_chain(run, bundles, backend, feeds, image)


def _captured_chain(run: Run, bundles, backend: str, feeds, image) -> None:
    """Prompt encoder and mask decoder as two captured graphs sharing their buffers: a click is the point
    arrays copied in (a few bytes) and two graph replays; the embedding was written once for the image."""
    from edgefm.runtime.backends.onnxruntime import _CapturedGraph
    from edgefm.runtime.bundle import Bundle

    for variant in ("fp16", "fused_fp16"):
        try:
            bundle = Bundle(bundles["sam"][variant], backend)
            pe, dec = bundle.runner("prompt_encoder"), bundle.runner("mask_decoder")
            emb = bundle.runner("image_encoder").run(image)["image_embeddings"]
            prompt = _CapturedGraph(pe, pe.spec.check_feeds(feeds))
            mid = {n: prompt.outputs[n] for n in ("sparse_embeddings", "dense_embeddings")}
            decoder = _CapturedGraph(dec, {"image_embeddings": emb}, bound=mid)
            click = {k: feeds[k] for k in ("point_coords", "point_labels")}

            def replay(prompt=prompt, decoder=decoder, click=click):
                prompt.replay(click)
                decoder.replay()
                return decoder.outputs["iou_predictions"].numpy()  # the scores to the host: the call is done

            run.row("sam.prompt_to_masks", f"onnxruntime {backend} captured graphs, chained", variant,
                    time_fn(replay, run.iters, run.warmup))
            want = dec.run({"image_embeddings": emb, **pe.run(feeds)})["low_res_masks"]
            diff = float(np.abs(decoder.outputs["low_res_masks"].numpy() - want).max())
            run.results["sections"].setdefault("captured_vs_plain_max_abs", {})[f"prompt_to_masks.{variant}"] = diff
        except Exception as exc:
            run.log(f"   prompt_to_masks {variant} captured chain failed: {type(exc).__name__}: {str(exc)[:300]}")
            run.results["errors"][f"captured_chain.{variant}"] = traceback.format_exc()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"))
    p.add_argument("--work", default=None, help="where bundles are written (default: a folder under /tmp)")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script itself")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=480.0, help="optional sections are skipped past this")
    p.add_argument("--camera-seconds", type=float, default=5.0)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or f"/tmp/edgefm-gpu-{os.getpid()}")
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
    run.section("kernel_profile", lambda: section_kernel_profile(run, models, bundles, backend, device, bench_feeds,
                                                                 torch_graphs), min_left_s=60)
    run.section("sam_predictor", lambda: section_predictor(run, bundles, backend), min_left_s=30)
    run.section("camera_1280x720", lambda: section_camera(run, bundles, backend, args.camera_seconds),
                min_left_s=40)
    run.section("dalle_generate", lambda: section_dalle_generate(run, work, backend), min_left_s=30)
    run.section("edgefm_bench", lambda: section_cli_bench(run, bundles, backend), min_left_s=40)
    run.log(f"done; errors in: {list(run.results['errors'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
