"""Where a component's time goes on the GPU: its CUDA kernels, whoever launched them (ONNX Runtime or PyTorch).

ONNX Runtime's own profiler times the CUDA provider's nodes on the host (kernel launches are asynchronous), so it
cannot say which kernels are slow. PyTorch's profiler records every CUDA kernel of the process through CUPTI,
ONNX Runtime's included. ``kernel_profile`` runs a callable under it and reports, per call: wall time, GPU busy
time (the sum of kernel durations), kernel launches, and the kernels that take most of the time. Busy time far
below wall time means launch- or host-bound (fewer, larger kernels or a CUDA graph help); busy time near it
means the kernels themselves (fused attention, fp16 tensor-core GEMMs) are what to improve.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def kernel_profile(fn: Callable[[], Any], sync: Callable[[], None], iters: int = 10, top: int = 12,
                   cuda: bool = True) -> dict[str, Any]:
    """Profile ``iters`` calls of ``fn`` (after one warm call). Times are per call, in milliseconds."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        wall = (time.perf_counter() - t) / iters
    want = DeviceType.CUDA if cuda else DeviceType.CPU
    kernels = []
    for e in prof.key_averages():
        if e.device_type != want:
            continue
        us = getattr(e, "self_device_time_total", None) if cuda else e.self_cpu_time_total
        if us is None:  # older PyTorch names
            us = e.self_cuda_time_total
        if us > 0:
            kernels.append((e.key, us / iters / 1e3, e.count / iters))
    kernels.sort(key=lambda k: -k[1])
    busy = sum(k[1] for k in kernels)
    return {
        "wall_ms": round(wall * 1e3, 3), "busy_ms": round(busy, 3),
        "busy_share": round(busy / (wall * 1e3), 3) if wall > 0 else None,
        "launches": round(sum(k[2] for k in kernels), 1),
        "top": [{"kernel": name[:120], "ms": round(ms, 4), "share": round(ms / busy, 3) if busy else None,
                 "calls": round(n, 1)} for name, ms, n in kernels[:top]],
    }


def section_kernel_profile(run: Any, models: dict[str, Any], bundles: dict[str, dict[str, Any]], backend: str,
                           device: str) -> None:
    """The image encoders of SAM and CLIP, batch 1, fp16: PyTorch eager against each ONNX Runtime graph
    (plain and fused attention; inputs and outputs on the device), kernel by kernel."""
    import copy

    import torch
    from gpu_sections_bench import bench_feeds, component_runner, torch_graphs

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = run.results["sections"].setdefault("kernel_profile", {})
    for family in ("sam", "clip"):
        _, model = models[family]
        feeds = bench_feeds(family, "image_encoder", model, run.smoke)
        graph = copy.deepcopy(torch_graphs(family, model)["image_encoder"]).to(device)
        graph = graph.half() if cuda else graph
        x = torch.from_numpy(feeds["image"]).to(device)
        x = x.half() if cuda else x
        with torch.inference_mode():
            out[f"{family}.image_encoder pytorch eager"] = kernel_profile(lambda g=graph, a=x: g(a), sync, cuda=cuda)
        del graph
        for variant in ("fp16", "fused_fp16", "fusedqk_fp16"):
            if variant not in bundles[family]:
                continue
            runner = component_runner(bundles[family][variant], "image_encoder", backend)
            out[f"{family}.image_encoder onnxruntime {variant}"] = kernel_profile(
                runner.resident_call(feeds), sync, cuda=cuda)
        for key, p in out.items():
            if key.startswith(family):
                _log(run, key, p)
        if cuda:
            torch.cuda.empty_cache()
    _profile_clicks(run, bundles["sam"], backend, sync, cuda, out)


def _profile_clicks(run: Any, bundles: dict[str, Any], backend: str, sync: Callable[[], None], cuda: bool,
                    out: dict[str, Any]) -> None:
    """SAM's prompt decoder (one click against an image's decoder context, all on the device), kernel by kernel:
    the component a click waits for, with the 1 ms target."""
    import numpy as np
    from gpu_sections_bench import bench_feeds, component_runner

    for variant in ("fp16", "fused_fp16"):
        if variant not in bundles:
            continue
        context = component_runner(bundles[variant], "decoder_context", backend)
        shape = context.spec.concrete_shape(context.spec.inputs[0])
        emb = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
        click = {k: v for k, v in bench_feeds("sam", "prompt_decoder", None, run.smoke).items()
                 if k in ("point_coords", "point_labels")}
        decoder = component_runner(bundles[variant], "prompt_decoder", backend)
        key = f"sam.prompt_decoder onnxruntime {variant}"
        out[key] = kernel_profile(decoder.resident_call({**click, **context.run({"image_embeddings": emb})}), sync,
                                  cuda=cuda)
        _log(run, key, out[key])


def _log(run: Any, key: str, p: dict[str, Any]) -> None:
    run.log(f"   {key:44s} wall {p['wall_ms']:.2f} ms, GPU busy {p['busy_ms']:.2f} ms, "
            f"{p['launches']} launches; top: {[t['kernel'][:40] for t in p['top'][:3]]}")
