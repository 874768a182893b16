"""The backend interface: a runner takes ``dict[str, np.ndarray]`` and returns ``dict[str, np.ndarray]``."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..spec import ComponentSpec


class Runner(Protocol):
    """A loaded component, created once and reused for every call."""

    spec: ComponentSpec
    backend: str  # e.g. "ort-cpu", "ort-cuda", "tensorrt"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on host arrays; feeds are checked against ``spec`` first."""
        ...


# Preference order for `--backend auto`, best first.
BACKENDS = ("tensorrt", "ort-trt", "ort-cuda", "ort-cpu")
