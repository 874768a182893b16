"""``edgefm bench --pytorch CHECKPOINT``: the checkpoint a bundle was exported from, run by PyTorch on the inputs
``edgefm bench`` times, on the same device and the same number of threads.

Each component gets PyTorch's median beside edgefm's, their ratio, and how far the two outputs are apart on
those inputs (judged by the component's precision policy), so a speed-up is only reported next to proof that
the same work was done. The checkpoint's sha256 must be the one the manifest records: timing another model
would compare nothing.

PyTorch runs as its users run it: eager, ``inference_mode``; the models' own ``encode_image``/``encode_text``
for CLIP; fp16 components against ``torch.autocast(float16)`` on a GPU and fp32 on the CPU (PyTorch's CPU fp16
is not what anyone deploys). ``compile_mode`` (``edgefm bench --pytorch-compile MODE``) runs each component
through ``torch.compile`` in that mode instead, compiled by one untimed call before the warm-up, as a
deployment that compiles would: the figure PyTorch users quote on a GPU. SAM and CLIP only: a DALL·E bundle
comes from three checkpoints (see ``benchmarks/dalle_cpu.py`` for its PyTorch comparison).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from edgefm.runtime.bundle import Bundle, sha256_file
from edgefm.runtime.errors import InputError, require
from edgefm.runtime.timing import latency_stats, time_calls

from .verify import judge


def check_checkpoint(bundle: Bundle, checkpoint: str | Path) -> Path:
    """Refuse, before anything is timed, a checkpoint that is not the bundle's, or a bundle this cannot do."""
    torch = require("torch", "export", "`edgefm bench --pytorch`")
    if bundle.backend != "ort-cpu" and not torch.cuda.is_available():
        raise InputError(f"--pytorch on {bundle.backend!r} needs PyTorch with CUDA to compare on the same device; "
                         "this torch has none (or use --backend ort-cpu)")
    path = Path(checkpoint)
    if not path.is_file():
        raise InputError(f"--pytorch {path}: no such checkpoint file")
    family, source = bundle.family, bundle.manifest.source
    if family not in ("sam", "clip"):
        raise InputError(f"--pytorch compares SAM and CLIP bundles with their checkpoint; {bundle.path} is a "
                         f"{family!r} bundle (DALL·E's comes from three checkpoints: see benchmarks/dalle_cpu.py)")
    want = source.get("sha256")
    if not want:
        raise InputError(f"{bundle.path} records no checkpoint (it was exported from a model in memory), so "
                         "--pytorch cannot check that it is the same model; export it from the checkpoint file")
    got = sha256_file(path)
    if got != want:
        raise InputError(f"--pytorch {path} (sha256 {got[:16]}…) is not the checkpoint {bundle.path} was exported "
                         f"from ({source.get('checkpoint')}, sha256 {want[:16]}…); pass that file")
    from edgefm.models.sam import SAM_CONFIGS

    variant = bundle.manifest.variant
    if family == "sam" and variant not in SAM_CONFIGS and not path.with_suffix(".json").is_file():
        raise InputError(f"{bundle.path} holds a SAM of no named size ({variant!r}); --pytorch needs its SamConfig "
                         f"as JSON beside the checkpoint ({path.with_suffix('.json')}, key \"config\")")
    return path


def torch_components(bundle: Bundle, path: Path) -> dict[str, Any]:
    """Component name -> a PyTorch callable taking the component's inputs (tensors) in spec order, from the
    checkpoint at ``path`` (checked by :func:`check_checkpoint`)."""
    if bundle.family == "sam":
        from edgefm.models.sam import SAM_CONFIGS, load_sam

        from .sam import component_graphs

        variant = bundle.manifest.variant
        if variant not in SAM_CONFIGS:  # a model of the project's own size (the demo's): its config is beside it
            from .demo import sam_config_beside

            variant = sam_config_beside(path)
        return component_graphs(load_sam(path, variant))
    from edgefm.models.clip import load_clip

    model, _, _ = load_clip(path, quick_gelu=bundle.config.get("quick_gelu"))
    return {"image_encoder": model.encode_image, "text_encoder": model.encode_text}


def _modules(fn: Any) -> list[Any]:
    return [fn] if hasattr(fn, "to") else [fn.__self__]


def _compile_first(call: Callable[[], Any], name: str, mode: str, progress: Callable[[str], None] | None) -> None:
    """The first call compiles; a failure (no C++ compiler for the CPU backend, an unsupported op) is told plainly."""
    if progress:
        progress(f"compiling {name} with torch.compile (mode {mode}); the first call takes a while")
    try:
        call()
    except Exception as exc:  # inductor raises many types; the message is what helps
        raise InputError(f"--pytorch-compile {mode}: torch.compile failed on {name} ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}); on a CPU it needs a "
                         "C++ compiler (g++); leave the flag out to compare with eager PyTorch") from exc


def time_pytorch(bundle: Bundle, checkpoint: str | Path, feeds: dict[str, dict[str, np.ndarray]],
                 ours: dict[str, dict[str, Any]], iters: int, warmup: int, threads: int | None = None,
                 progress: Callable[[str], None] | None = None,
                 compile_mode: str | None = None) -> dict[str, dict[str, Any]]:
    """Time each component's PyTorch twin on ``feeds`` (component -> inputs); ``ours`` holds edgefm's results
    (``latency_ms``, ``precision``) for the ratio; ``checkpoint`` has passed :func:`check_checkpoint`. Returns
    component -> PyTorch's figures."""
    import torch

    on_gpu = bundle.backend != "ort-cpu"
    device = "cuda" if on_gpu else "cpu"
    if threads and not on_gpu:
        torch.set_num_threads(threads)
    fns = torch_components(bundle, Path(checkpoint))
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    out: dict[str, dict[str, Any]] = {}
    for name, fn in fns.items():
        if name not in feeds:
            continue
        if progress:
            progress(f"timing {name} in PyTorch on {device}")
        for m in _modules(fn):
            m.to(device).eval()
        spec = bundle.spec(name)
        precision = ours[name]["precision"]
        half = on_gpu and precision in ("fp16", "mixed")
        args = [torch.from_numpy(feeds[name][n]).to(device) for n in spec.input_names]
        run = torch.compile(fn, mode=compile_mode) if compile_mode else fn

        def call(fn=run, args=args, half=half):
            with torch.inference_mode(), torch.autocast(device, torch.float16, enabled=half):
                result = fn(*args)
            sync()
            return result

        if compile_mode:
            _compile_first(call, name, compile_mode, progress)
        times = time_calls(call, iters, warmup)
        result = call()  # the outputs to compare, from one more (untimed) call
        result = result if isinstance(result, tuple) else (result,)
        ref = {n: r.float().cpu().numpy() for n, r in zip(spec.output_names, result)}
        got = bundle.runner(name).run(feeds[name])
        agreement = judge(ref, got, precision, spec, float(bundle.config.get("mask_threshold", 0.0)))
        stats = latency_stats(times)
        math = "fp16 autocast" if half else "fp32"
        out[name] = {"device": device, "math": f"{math}, torch.compile {compile_mode}" if compile_mode else math,
                     "iterations": stats["iterations"], "latency_ms": stats["latency_ms"],
                     "ratio": ours[name]["latency_ms"]["median"] / stats["latency_ms"]["median"],
                     "agreement": {"policy": precision, "passed": agreement["passed"],
                                   "worst": min(m.get("mask_iou", m["cosine"])
                                                for m in agreement["outputs"].values()),
                                   "outputs": agreement["outputs"]}}
        for m in _modules(fn):
            m.cpu()
        if on_gpu:
            torch.cuda.empty_cache()
    return out
