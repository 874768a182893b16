"""Training loops of the project's small "shapes world" models (CLIP, SAM), on scenes drawn by
:mod:`edgefm.runtime.shapes`. Each module is a CLI: ``python -m edgefm.models.train.<family> --out DIR``."""
