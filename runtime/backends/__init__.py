"""Backends behind one interface (``Runner.run(dict) -> dict``) and ``--backend auto`` selection."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import BackendError, InputError
from ..manifest import ComponentEntry
from .base import BACKENDS, Runner

__all__ = ["BACKENDS", "Runner", "available_backends", "check_cuda_graphs", "resolve_backend", "open_runner"]

log = logging.getLogger("edgefm")


def _tensorrt_usable() -> bool:
    """TensorRT imports (the PyPI stubs raise when NVIDIA's libraries are missing) and a GPU is visible."""
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    from .tensorrt import current_gpu

    return current_gpu() is not None


def available_backends() -> list[str]:
    """Backends that work on this machine, best first."""
    from .onnxruntime import available_ort_backends

    have = available_ort_backends()
    if _tensorrt_usable():
        have.append("tensorrt")
    return [b for b in BACKENDS if b in have]


def resolve_backend(name: str, formats: set[str] | None = None) -> str:
    """Turn ``auto`` (or an explicit name) into a backend that is installed and can run the bundle.

    ``formats`` is the set of component formats the bundle offers; native TensorRT needs engines.
    """
    if name != "auto" and name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {['auto', *BACKENDS]}")
    have = available_backends()
    if formats is not None and "tensorrt" not in formats:
        have = [b for b in have if b != "tensorrt"]
    if name == "auto":
        if not have:
            raise BackendError("no backend is available: install onnxruntime (pip install edgefm)")
        log.info("backend auto -> %s (usable here, best first: %s)", have[0], ", ".join(have))
        return have[0]
    if name not in have:
        if name == "tensorrt" and formats is not None and "tensorrt" not in formats:
            why = "the bundle has no TensorRT engines (run `edgefm build-engine`)"
        elif name == "tensorrt":
            why = "TensorRT is not importable or no GPU is visible (pip install 'edgefm[tensorrt]')"
        else:
            from .onnxruntime import unavailable_reason

            why = unavailable_reason(name)
        raise BackendError(f"backend {name!r} cannot be used: {why}; available: {have}")
    return name


def check_cuda_graphs(backend: str) -> None:
    """Refuse ``cuda_graphs=True`` (the CLIs' ``--cuda-graph``) on a backend other than ort-cuda."""
    if backend != "ort-cuda":
        raise InputError(f"cuda_graphs=True (--cuda-graph) replays ONNX Runtime CUDA graphs: it needs backend "
                         f"'ort-cuda' (--backend ort-cuda), not {backend!r} (the tensorrt backend captures CUDA "
                         "graphs by itself)")


def open_runner(entry: ComponentEntry, folder: Path, backend: str, **options) -> Runner:
    """Load one component file on a resolved backend."""
    path = Path(folder) / entry.file
    if backend == "tensorrt":
        from .tensorrt import TensorRTRunner

        return TensorRTRunner(path, entry, **options)
    from .onnxruntime import OrtRunner

    return OrtRunner(path, entry.spec, backend=backend, explicit_int8=entry.explicitly_quantized, **options)
