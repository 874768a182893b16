"""The DALL·E prior's steps replayed as captured graphs (``DalleGenerator(cuda_graphs=True)`` on ort-cuda).

A step's shapes never change within one generation (fixed-size caches, one token per row, a position of
shape [1]), so it can be captured once per batch size. Its cache input and output are different buffers, and the
next step reads what this one wrote, so two graphs take turns: the first reads cache buffers A and writes B, the
second reads B and writes A. A step is then a host copy of the tokens and position, one replay, and the logits
copied back for sampling; the cache never moves. Prefill writes its cache straight into A.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.onnxruntime import _CapturedGraph, ort

CACHES = ("k_cache", "v_cache")


class CapturedSteps:
    """Prefill + alternating captured steps for one batch size. Each captured graph is a session of its own: two
    more copies of the prior's weights on the device."""

    def __init__(self, prefill: Any, step: Any, batch: int, first_position: int) -> None:
        rt = ort()
        spec = step.spec
        buffers = {t.name: rt.OrtValue.ortvalue_from_shape_and_type(
            list(spec.concrete_shape(t, "opt", batch=batch)), np.dtype(t.dtype), step.device, 0)
            for t in spec.inputs if t.name in CACHES}
        feeds = {"token": np.zeros(batch, np.int64), "position": np.array([first_position], np.int64)}
        self._ab = _CapturedGraph(step, feeds, bound=buffers)
        written = {name: self._ab.outputs[f"{name}_out"] for name in CACHES}
        self._ba = _CapturedGraph(step, feeds, bound=written, into={f"{n}_out": buffers[n] for n in CACHES})
        self._prefill, self._buffers, self._turn = prefill, buffers, 0

    def start(self, text_tokens: np.ndarray) -> np.ndarray:
        """Prefill ``text_tokens`` [batch, text_len] with its cache written into buffers A; its logits."""
        out = self._prefill.run_on_device({"text_tokens": text_tokens}, into=self._buffers)
        self._turn = 0
        return out["logits"].numpy()

    def __call__(self, token: np.ndarray, position: int) -> np.ndarray:
        """One step: feed ``token`` [batch] at ``position``; the next token's logits."""
        graph = self._ab if self._turn % 2 == 0 else self._ba
        self._turn += 1
        graph.replay({"token": token, "position": np.array([position], np.int64)})
        return graph.outputs["logits"].numpy()
