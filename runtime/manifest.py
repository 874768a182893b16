"""The bundle manifest: the one contract between export and runtime.

A bundle is a folder holding ``manifest.json``, the component files and assets. The manifest is versioned
(``schema_version``) and validated on load; see DESIGN.md for the meaning of every field. Validation is
hand-written (no jsonschema dependency) and every failure names the manifest file and the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ManifestError
from .spec import ComponentSpec

SCHEMA_VERSION = 1
FAMILIES = ("sam", "clip", "dalle")
FORMATS = ("onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8", "mixed")
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ComponentEntry:
    """One component file of a bundle (a component may appear once per format/precision)."""

    name: str
    file: str
    sha256: str
    format: str
    precision: str
    spec: ComponentSpec
    extra_files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 (ONNX external data)
    info: dict[str, Any] = field(default_factory=dict)  # opset, TensorRT version, GPU, profiles...

    @property
    def explicitly_quantized(self) -> bool:
        """A Q/DQ graph (``edgefm quantize``), as TensorRT builds int8 from; not ONNX Runtime's dynamic int8."""
        return self.info.get("quantization", {}).get("format") == "QDQ"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "sha256": self.sha256,
            "format": self.format,
            "precision": self.precision,
            **self.spec.to_json(),
            "extra_files": dict(self.extra_files),
            "info": dict(self.info),
        }


@dataclass
class Manifest:
    family: str
    variant: str
    source: dict[str, Any]
    preprocess: dict[str, Any]
    components: list[ComponentEntry]
    config: dict[str, Any] = field(default_factory=dict)  # family-specific constants (thresholds, sizes)
    parity: dict[str, Any] = field(default_factory=dict)
    edgefm_version: str = ""
    schema_version: int = SCHEMA_VERSION
    created: str = ""

    def find(self, name: str, format: str | None = None, precision: str | None = None) -> list[ComponentEntry]:
        return [
            c
            for c in self.components
            if c.name == name
            and (format is None or c.format == format)
            and (precision is None or c.precision == precision)
        ]

    @property
    def component_names(self) -> list[str]:
        return list(dict.fromkeys(c.name for c in self.components))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "edgefm_version": self.edgefm_version,
            "created": self.created,
            "family": self.family,
            "variant": self.variant,
            "source": self.source,
            "preprocess": self.preprocess,
            "config": self.config,
            "components": [c.to_json() for c in self.components],
            "parity": self.parity,
        }

    def write(self, folder: Path) -> Path:
        """Write ``manifest.json`` into ``folder`` by rename, so a reader never sees half of it."""
        path = Path(folder) / MANIFEST_NAME
        write_json_atomic(path, self.to_json())
        return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON (keys in their order), written by :func:`write_atomic`."""
    write_atomic(Path(path), (json.dumps(data, indent=2) + "\n").encode())


def _need(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise ManifestError(f"{where}: missing required field {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ManifestError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _one_of(value: str, allowed: tuple[str, ...], where: str, key: str) -> str:
    if value not in allowed:
        raise ManifestError(f"{where}: field {key!r} is {value!r}; expected one of {list(allowed)}")
    return value


def parse_manifest(data: Any, where: str = MANIFEST_NAME) -> Manifest:
    """Validate a decoded manifest and build a :class:`Manifest`; raises :class:`ManifestError`."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: the manifest must be a JSON object")
    version = _need(data, "schema_version", int, where)
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"{where}: schema_version {version} is not supported by this edgefm (it reads version "
            f"{SCHEMA_VERSION}); re-export the bundle with this edgefm or install the version that wrote it"
        )
    family = _one_of(_need(data, "family", str, where), FAMILIES, where, "family")
    components = []
    for i, raw in enumerate(_need(data, "components", list, where)):
        cw = f"{where}: components[{i}]"
        if not isinstance(raw, dict):
            raise ManifestError(f"{cw} must be an object")
        name = _need(raw, "name", str, cw)
        spec = ComponentSpec.from_json(name, raw)
        components.append(
            ComponentEntry(
                name=name,
                file=_need(raw, "file", str, cw),
                sha256=_need(raw, "sha256", str, cw),
                format=_one_of(_need(raw, "format", str, cw), FORMATS, cw, "format"),
                precision=_one_of(_need(raw, "precision", str, cw), PRECISIONS, cw, "precision"),
                spec=spec,
                extra_files=dict(raw.get("extra_files", {})),
                info=dict(raw.get("info", {})),
            )
        )
    if not components:
        raise ManifestError(f"{where}: the bundle lists no components")
    return Manifest(
        family=family,
        variant=_need(data, "variant", str, where),
        source=_need(data, "source", dict, where),
        preprocess=_need(data, "preprocess", dict, where),
        components=components,
        config=dict(data.get("config", {})),
        parity=dict(data.get("parity", {})),
        edgefm_version=str(data.get("edgefm_version", "")),
        schema_version=version,
        created=str(data.get("created", "")),
    )


def read_manifest(folder: str | Path) -> Manifest:
    """Read and validate ``folder/manifest.json``."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(
            f"bundle folder {str(folder)!r} does not exist; export one with `edgefm export ...` "
            "or pass the folder that holds manifest.json"
        )
    if not path.is_file():
        raise ManifestError(f"{str(folder)!r} is not an edgefm bundle: it has no {MANIFEST_NAME}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: cannot be read as JSON ({exc}); re-export the bundle") from exc
    return parse_manifest(data, str(path))


def add_precision_arg(parser: Any, verb: str = "run") -> None:
    """``--precision`` for a command that opens bundles (see ``Bundle``'s ``precision``)."""
    parser.add_argument("--precision", default=None, choices=list(PRECISIONS),
                        help=f"{verb} this precision of the components that have it, e.g. the int8 image encoder "
                             "of `edgefm quantize` (default: fp16 on a GPU, fp32 on the CPU)")
