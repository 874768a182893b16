"""The GPU check's timing sections (see ``gpu_check.py``): every component at batch 1, PyTorch eager (and
torch.compile) against ONNX Runtime three ways (host arrays, IO binding, a captured graph), plus SAM's
prompt -> low-res masks chained on the device and as two captured graphs sharing their buffers, and the same
click as one prompt decoder call against the image's decoder context (plain and captured)."""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gpu_run import Run, time_fn

# SAM's per-click components: timed together, as prompt -> masks.
PROMPT_SIDE = ("prompt_encoder", "mask_decoder", "decoder_context", "prompt_decoder")


def torch_graphs(family: str, model: Any) -> dict[str, Any]:
    """The PyTorch modules each component's reference (and eager timing) runs."""
    if family == "sam":
        from edgefm.export.sam import component_graphs

        return component_graphs(model)
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


def component_runner(bundle_path: Path, name: str, backend: str, **options: Any) -> Any:
    """A fresh ``OrtRunner`` for one component of a bundle (``options``: e.g. ``cuda_options``)."""
    from edgefm.runtime.backends.onnxruntime import OrtRunner
    from edgefm.runtime.bundle import Bundle

    entry = Bundle(bundle_path, "ort-cpu").entry(name)
    return OrtRunner(bundle_path / entry.file, entry.spec, backend, **options)


def _ort_rows(run: Run, comp: str, bundle_path: Path, name: str, feeds: dict[str, np.ndarray], backend: str,
              precision: str) -> None:
    """ONNX Runtime three ways: host arrays, IO binding with device-resident tensors, a captured graph."""
    from edgefm.runtime.backends.onnxruntime import _CapturedGraph

    it, wu = run.iters, run.warmup
    runner = component_runner(bundle_path, name, backend)
    run.row(comp, f"onnxruntime {backend} host arrays", precision, time_fn(lambda: runner.run(feeds), it, wu))
    run.row(comp, f"onnxruntime {backend} IO binding", precision, time_fn(runner.resident_call(feeds), it, wu))
    try:
        captured = _CapturedGraph(runner, runner.spec.check_feeds(feeds))
        label = "CUDA graph" if backend == "ort-cuda" else "static shapes"
        run.row(comp, f"onnxruntime {backend} {label}", precision, time_fn(captured.replay, it, wu))
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
    try:
        runner = component_runner(bundle_path, name, backend, cuda_options={"prefer_nhwc": "1"})
        run.row(comp, f"onnxruntime {backend} IO binding, prefer_nhwc", "fp16",
                time_fn(runner.resident_call(feeds), run.iters, run.warmup))
    except Exception as exc:  # an onnxruntime-gpu built without NHWC kernels refuses the option
        run.log(f"   {comp} prefer_nhwc failed: {type(exc).__name__}: {str(exc)[:300]}")
        run.results["errors"][f"prefer_nhwc.{comp}"] = traceback.format_exc()


def section_bench(run: Run, models, bundles, backend: str, device: str, compiled: bool) -> None:
    """Per component, batch 1: PyTorch eager fp32/fp16 (and compiled), ORT host / IO binding / CUDA graph."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # fp32 rows are fp32 on both sides: edgefm opens ONNX Runtime's CUDA provider without TF32 (bench --tf32
    # opts in), so PyTorch's TF32 is off too; the targets are fp16 rows, which TF32 does not touch.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
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
    for name in [n for n in graphs if n not in PROMPT_SIDE]:
        feeds = bench_feeds(family, name, model, run.smoke)
        spec = Bundle(bundles[family]["fp32"], "ort-cpu").spec(name)
        comp = f"{family}.{name}"
        _torch_rows(run, comp, graphs[name], spec, feeds, device, sync, compiled, family)
        for precision in ("fp32", "fp16"):
            _ort_rows(run, comp, bundles[family][precision], name, feeds, backend, precision)
        for key, label in (("fused_fp16", "fp16 fused attention"), ("fusedqk_fp16", "fp16 fused, rel-pos in q.k")):
            if key in bundles[family]:
                _ort_rows(run, comp, bundles[family][key], name, feeds, backend, label)
        if (family, name) in (("dalle", "dvae_decoder"), ("sam", "image_encoder")):
            _nhwc_row(run, comp, bundles[family]["fp16"], name, feeds, backend)
    if family == "sam":
        prompt_to_masks(run, graphs, bundles, backend, device, sync)


def prompt_to_masks(run: Run, graphs, bundles, backend: str, device: str, sync) -> None:
    """SAM: one click (+ padding point) -> low-res masks and IoU scores; embedding already on the device."""
    import torch
    from edgefm.runtime.bundle import Bundle
    from edgefm.runtime.sam.spec import CONTEXT

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
        context = graphs["decoder_context"](emb)
        decode, xy = graphs["prompt_decoder"], (xs["point_coords"], xs["point_labels"])
        run.row("sam.prompt_to_masks", "pytorch eager, prompt decoder + context", "fp32",
                time_fn(lambda: decode(*xy, *context), it, wu, sync))
    click = {k: feeds[k] for k in ("point_coords", "point_labels")}
    for precision in ("fp32", "fp16"):
        bundle = Bundle(bundles["sam"][precision], backend)
        enc, p, d = (bundle.runner(n) for n in ("image_encoder", "prompt_encoder", "mask_decoder"))
        kept = enc.run_on_device(image, keep=("image_embeddings",))["image_embeddings"]

        def chained(p=p, d=d, kept=kept):
            mid = p.run_on_device(feeds, keep=("sparse_embeddings", "dense_embeddings"))
            return d.run_on_device({"image_embeddings": kept, **mid})

        run.row("sam.prompt_to_masks", f"onnxruntime {backend} chained on device", precision,
                time_fn(chained, it, wu))
        ctx = bundle.runner("decoder_context").run_on_device({"image_embeddings": kept}, keep=CONTEXT)
        pd = bundle.runner("prompt_decoder")
        run.row("sam.prompt_to_masks", f"onnxruntime {backend} prompt decoder + context on device", precision,
                time_fn(lambda pd=pd, ctx=ctx: pd.run_on_device({**click, **ctx}), it, wu))
    _captured_chain(run, bundles, backend, feeds, image)
    _captured_prompt_decoder(run, bundles, backend, feeds, image)


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


def _captured_prompt_decoder(run: Run, bundles, backend: str, feeds, image) -> None:
    """The click as one captured graph: the prompt decoder bound to the decoder context's captured outputs."""
    from edgefm.runtime.backends.onnxruntime import _CapturedGraph
    from edgefm.runtime.bundle import Bundle

    click = {k: feeds[k] for k in ("point_coords", "point_labels")}
    for variant in ("fp16", "fused_fp16"):
        try:
            bundle = Bundle(bundles["sam"][variant], backend)
            emb = bundle.runner("image_encoder").run(image)["image_embeddings"]
            context = _CapturedGraph(bundle.runner("decoder_context"), {"image_embeddings": emb})
            pd = bundle.runner("prompt_decoder")
            decoder = _CapturedGraph(pd, click, bound=context.outputs)

            def replay(decoder=decoder):
                decoder.replay(click)
                return decoder.outputs["iou_predictions"].numpy()

            run.row("sam.prompt_to_masks", f"onnxruntime {backend} captured prompt decoder", variant,
                    time_fn(replay, run.iters, run.warmup))
            want = bundle.runner("mask_decoder").run({"image_embeddings": emb, **bundle.runner("prompt_encoder").run(
                feeds)})["low_res_masks"]
            diff = float(np.abs(decoder.outputs["low_res_masks"].numpy() - want).max())
            run.results["sections"].setdefault("captured_vs_plain_max_abs", {})[f"prompt_decoder.{variant}"] = diff
        except Exception as exc:
            run.log(f"   prompt_decoder {variant} captured graph failed: {type(exc).__name__}: {str(exc)[:300]}")
            run.results["errors"][f"captured_prompt_decoder.{variant}"] = traceback.format_exc()
