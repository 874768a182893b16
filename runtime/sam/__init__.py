"""SAM runtime: ``SamPredictor`` and ``SamAutomaticMaskGenerator`` on exported bundles (no torch)."""

from .predictor import SamPredictor

__all__ = ["SamPredictor", "SamAutomaticMaskGenerator"]


def __getattr__(name: str):
    if name == "SamAutomaticMaskGenerator":
        from .amg import SamAutomaticMaskGenerator

        return SamAutomaticMaskGenerator
    raise AttributeError(name)
