"""The shipped shapes-world checkpoints -> cached bundles for ``edgefm demo``.

The checkpoints (``models/weights``) are exported through the same loaders and exporters as real ones. A
bundle is re-exported only when one of its checkpoint files or the exporting code changed (a stamp keeps the
checkpoints' sha256 and one over the sources of ``edgefm.export`` and ``edgefm.models``), so a newer edgefm
never runs the demo on a bundle an older one wrote.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from edgefm.models.checkpoint import sha256_file
from edgefm.models.sam import SamConfig


def weights_dir() -> Path:
    """Where the shipped checkpoints are: the installed package's data, or the source tree's folder."""
    import edgefm.models

    return Path(edgefm.models.__file__).resolve().parent / "weights"


def exporter_digest() -> str:
    """sha256 over the Python sources that turn a checkpoint into a bundle (``edgefm.export``, ``edgefm.models``)."""
    import edgefm.export
    import edgefm.models

    h = hashlib.sha256()
    for package in (edgefm.export, edgefm.models):
        root = Path(package.__file__).resolve().parent
        for f in sorted(root.rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def sam_config_beside(path: Path) -> SamConfig:
    """The SamConfig recorded in the JSON beside a checkpoint (``x.safetensors`` -> ``x.json``, key "config"),
    as the project's shipped weights keep theirs."""
    cfg = json.loads(path.with_suffix(".json").read_text())["config"]
    return SamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


def _export_sam(out: Path, w: Path) -> None:
    from .sam import export_sam

    ckpt = w / "sam_shapes.safetensors"
    export_sam(ckpt, out, sam_config_beside(ckpt), overwrite=True)


def _export_clip(out: Path, w: Path) -> None:
    from .clip import export_clip

    export_clip(w / "clip_shapes.safetensors", out, overwrite=True)


def _export_dalle(out: Path, w: Path) -> None:
    from .dalle import export_dalle

    export_dalle(out, dvae_decoder=w / "dvae_shapes_decoder.safetensors",
                 dvae_encoder=w / "dvae_shapes_encoder.safetensors", prior=w / "prior_shapes.safetensors",
                 overwrite=True)


# bundle name -> (checkpoint files it is made from, exporter)
DEMO_MODELS: dict[str, tuple[tuple[str, ...], Callable[[Path, Path], None]]] = {
    "sam": (("sam_shapes.safetensors", "sam_shapes.json"), _export_sam),
    "clip": (("clip_shapes.safetensors",), _export_clip),
    "dalle": (("dvae_shapes_decoder.safetensors", "dvae_shapes_encoder.safetensors", "prior_shapes.safetensors",
               "prior_shapes.json"), _export_dalle),
}


def ensure_demo_bundles(folder: Path, progress: Callable[[str], None] = print) -> dict[str, Path]:
    """Export each demo model whose bundle is missing or stale; returns name -> bundle folder."""
    w, code = weights_dir(), exporter_digest()
    out: dict[str, Path] = {}
    for name, (files, export) in DEMO_MODELS.items():
        stamp = {**{f: sha256_file(w / f) for f in files}, "exporter": code}
        bundle, stamp_file = folder / f"{name}_shapes", folder / f"{name}_shapes.stamp.json"
        fresh = (bundle / "manifest.json").is_file() and stamp_file.is_file() and \
            json.loads(stamp_file.read_text()) == stamp
        if not fresh:
            progress(f"exporting the demo {name} to {bundle} (once; cached while its checkpoint and edgefm's "
                     "exporters are unchanged)")
            export(bundle, w)
            stamp_file.write_text(json.dumps(stamp, indent=1))
        out[name] = bundle
    # The prompt templates the demo CLIP was trained with travel beside the bundles (the runtime reads them).
    meta = json.loads((w / "clip_shapes.json").read_text())
    (folder / "clip_templates.json").write_text(json.dumps(meta.get("templates", ["a {}."])))
    return out
