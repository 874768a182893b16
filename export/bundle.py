"""Writing a bundle folder atomically: components go into a temporary sibling folder, which is renamed
into place only once every file, checksum and the manifest are written. A failure leaves nothing behind."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgefm.runtime.bundle import sha256_file
from edgefm.runtime.errors import EdgefmError
from edgefm.runtime.manifest import ComponentEntry, Manifest
from edgefm.runtime.spec import ComponentSpec


def edgefm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgefm")
    except PackageNotFoundError:  # running from a source tree without installing
        return "0+unknown"


class BundleWriter:
    """Context manager: ``with BundleWriter(out) as w: w.add(...); w.manifest(...)``."""

    def __init__(self, out: str | Path, overwrite: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not overwrite and any(self.out.iterdir()):
            raise EdgefmError(
                f"output folder {str(self.out)!r} already exists and is not empty; choose another --out "
                "or pass --overwrite"
            )
        self.overwrite = overwrite
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self.components: list[ComponentEntry] = []

    def workdir(self, name: str) -> Path:
        """A fresh scratch folder for one export (exporters may spill files beside the graph)."""
        d = self.tmp / ".work" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def add(self, src: Path, spec: ComponentSpec, fmt: str, precision: str,
            extra: list[str] = (), info: dict[str, Any] | None = None) -> ComponentEntry:
        """Move ``src`` (and its ``extra`` files from the same folder) into the bundle and record them."""
        src = Path(src)
        shutil.move(str(src), self.tmp / src.name)
        for name in extra:
            shutil.move(str(src.parent / name), self.tmp / name)
        entry = ComponentEntry(
            name=spec.name, file=src.name, sha256=sha256_file(self.tmp / src.name), format=fmt,
            precision=precision, spec=spec,
            extra_files={n: sha256_file(self.tmp / n) for n in extra}, info=dict(info or {}),
        )
        self.components.append(entry)
        return entry

    def copy_asset(self, src: Path, name: str | None = None) -> str:
        name = name or Path(src).name
        shutil.copyfile(src, self.tmp / name)
        return name

    def finish(self, manifest: Manifest) -> Path:
        manifest.components = self.components
        manifest.edgefm_version = edgefm_version()
        manifest.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        shutil.rmtree(self.tmp / ".work", ignore_errors=True)
        manifest.write(self.tmp)
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            self.out.rename(old)
            self.tmp.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.out)
        return self.out

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def commit_components(folder: Path, manifest: Manifest, entries: list[ComponentEntry], files: dict[str, Path]
                      ) -> None:
    """Add ``entries`` to the bundle: move ``files`` (bundle file name -> temporary path) into place, then swap
    the manifest by rename. An entry replaces any of the same component, format and precision, and with an
    ONNX replaced go the engines built from it; files no longer listed are deleted."""
    replaced = {(e.name, e.format, e.precision) for e in entries}
    keep = [c for c in manifest.components if (c.name, c.format, c.precision) not in replaced]
    gone = {c.file for c in manifest.components} - {c.file for c in keep}
    keep = [c for c in keep if not (c.format == "tensorrt" and c.info.get("source") in gone)]
    old_files = {f for c in manifest.components for f in (c.file, *c.extra_files)}
    for name, tmp in files.items():
        os.replace(tmp, folder / name)
    manifest.components = keep + list(entries)
    manifest.write(folder)
    listed = {f for c in manifest.components for f in (c.file, *c.extra_files)}
    for name in old_files - listed:
        (folder / name).unlink(missing_ok=True)
