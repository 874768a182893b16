"""Demo checkpoints -> cached bundles. The checkpoint is written in the official format and exported through
the same loader and exporter as a real one; a bundle is re-exported only when its checkpoint changes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from edgefm.models.checkpoint import sha256_file
from edgefm.models.sam import SAM_CONFIGS, build_sam

from .sam import export_sam


def _seeded_sam_checkpoint(path: Path) -> Path:
    """Seeded random tiny SAM (trained demo weights replace this once the project ships them)."""
    if not path.is_file():
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = build_sam(SAM_CONFIGS["tiny"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "pos" in name.split(".")[-1]:
                    p.normal_(0.0, 0.1)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _fresh(bundle: Path, checkpoint: Path) -> bool:
    manifest = bundle / "manifest.json"
    if not manifest.is_file():
        return False
    return json.loads(manifest.read_text()).get("source", {}).get("sha256") == sha256_file(checkpoint)


def ensure_demo_bundles(folder: Path, progress=print) -> dict[str, Path]:
    ckpt = _seeded_sam_checkpoint(folder / "checkpoints" / "sam_tiny.safetensors")
    bundle = folder / "sam_tiny"
    if not _fresh(bundle, ckpt):
        progress(f"exporting the demo SAM to {bundle} (once)")
        export_sam(ckpt, bundle, "tiny", overwrite=True)
    return {"sam": bundle}
