"""Activation ranges for static int8 quantization, streamed over calibration images in bounded memory.

ONNX Runtime's own percentile calibrator keeps every calibration image's activations until it builds its
histograms (about 1 GB per image for SAM ViT-B's encoder, 4.7 GB for ViT-H's), and fed one image at a time
it grows each histogram at the first image's bin width, which runs to millions of bins when a later image
has a larger range (measured: 16 GB after 8 images of ViT-B). Here each tensor keeps a fixed 2048-bin
histogram of ``|x|`` whose range doubles, merging bins in pairs, when a larger value arrives: one image's
activations in memory at a time, and a threshold within one bin of the exact percentile.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from edgefm.runtime.errors import require

from .onnx import constant_names

BINS = 2048
PERCENTILE = 99.999  # of |x|: TensorRT's and ONNX Runtime's usual percentile calibration setting


class AbsHistogram:
    """A streaming histogram of ``|x|`` over ``[0, top)`` with ``BINS`` bins; ``top`` doubles as needed."""

    def __init__(self) -> None:
        self.counts = np.zeros(BINS, np.int64)
        self.top = 0.0
        self.amax = 0.0

    def add(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, np.float32)).ravel()
        if a.size == 0:
            return
        m = float(a.max())
        self.amax = max(self.amax, m)
        if self.top == 0.0:
            self.top = m if m > 0 else 1.0
        while m > self.top:  # a value past the end: double the range, two bins become one
            self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(1), np.zeros(BINS // 2, np.int64)])
            self.top *= 2
        self.counts += np.histogram(a, bins=BINS, range=(0.0, self.top))[0]

    def threshold(self, percentile: float = PERCENTILE) -> float:
        """The upper edge of the bin where ``percentile`` % of the values are reached, capped at the max."""
        total = int(self.counts.sum())
        if total == 0 or self.amax == 0.0:
            return 0.0
        i = int(np.searchsorted(np.cumsum(self.counts), percentile / 100.0 * total))
        return min(self.amax, (i + 1) * self.top / BINS)


def activations_to_calibrate(graph: Any, op_types: list[str], exclude: list[str]) -> list[str]:
    """The activation inputs that static quantization gives a Q/DQ pair: the data input of each ``op_types``
    node not in ``exclude`` whose weight (input 1) is a constant, in graph order, each once."""
    consts = constant_names(graph)
    out: list[str] = []
    for n in graph.node:
        if n.op_type in op_types and n.name not in exclude and len(n.input) > 1 and n.input[1] in consts:
            if n.input[0] not in out:
                out.append(n.input[0])
    return out


def activation_products(graph: Any, op_types: list[str]) -> list[str]:
    """Names of the ``op_types`` nodes whose second input is not a constant (attention's q k^T and p v)."""
    consts = constant_names(graph)
    return [n.name for n in graph.node if n.op_type in op_types and len(n.input) > 1 and n.input[1] not in consts]


def activation_thresholds(src: str | Path, tensors: list[str], feeds: Iterable[dict[str, np.ndarray]],
                          method: str, threads: int | None = None,
                          progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """``|x|`` thresholds of ``tensors`` of the graph at ``src`` over ``feeds``: the max (``minmax``) or the
    99.999th percentile (``percentile``). The graph runs once per feed with those tensors as extra outputs."""
    onnx = require("onnx", "export", "Calibrating")
    ort = require("onnxruntime", "export", "Calibrating")
    src = Path(src)
    model = onnx.load(str(src), load_external_data=False)
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in have)
    # Saved beside the source so that its external weights (ViT-H) resolve by the same relative path.
    probe = src.with_name(f".{src.stem}.calibrate-{os.getpid()}.onnx")
    onnx.save_model(model, str(probe))
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = False  # its memory is returned before the quantizer and parity runs
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(probe), options, providers=["CPUExecutionProvider"])
    finally:
        probe.unlink(missing_ok=True)
    hists = {t: AbsHistogram() for t in tensors}
    for i, feed in enumerate(feeds):
        for t, value in zip(tensors, session.run(tensors, feed)):
            hists[t].add(value)
        if progress:
            progress(i + 1)
    return {t: (h.amax if method == "minmax" else h.threshold()) for t, h in hists.items()}
