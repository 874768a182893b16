"""Opening a bundle: manifest validation, file integrity, and one runner per component, created once."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from .backends import Runner, open_runner, resolve_backend
from .errors import BundleError, InputError
from .manifest import ComponentEntry, Manifest, read_manifest
from .spec import ComponentSpec


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class TimedRunner:
    """A runner that records the wall time of every ``run`` call (for summaries such as ``edgefm demo``)."""

    def __init__(self, runner: Runner, log: list[float]) -> None:
        self.inner, self.log = runner, log
        self.spec, self.backend = runner.spec, runner.backend

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        t = time.perf_counter()
        out = self.inner.run(feeds)
        self.log.append(time.perf_counter() - t)
        return out


def choose_entry(manifest: Manifest, folder: Path, name: str, fmt: str, precision: str | None,
                 on_gpu: bool) -> ComponentEntry:
    """The ``fmt`` file of component ``name`` to run: ``precision`` where it exists, else fp16 on a GPU and fp32
    on the CPU when both exist."""
    found = manifest.find(name, format=fmt)
    if not found:
        raise BundleError(f"{folder}: no {fmt} file for component {name!r} (the bundle has "
                          f"{manifest.component_names})")
    order = ("fp16", "mixed", "fp32", "int8") if on_gpu else ("fp32", "mixed", "fp16", "int8")
    return sorted(found, key=lambda c: (c.precision != precision, order.index(c.precision)))[0]


def check_precision(manifest: Manifest, folder: Path, fmt: str, precision: str | None) -> None:
    """``precision``, when asked for, is that of at least one ``fmt`` file of the bundle."""
    have = sorted({c.precision for c in manifest.components if c.format == fmt})
    if precision is not None and precision not in have:
        raise InputError(f"--precision {precision!r}: no {fmt} component of {folder} has it (it has {have}); build "
                         "or quantize one, or leave --precision out")


def check_files(folder: Path, entry: ComponentEntry, verify: bool = True) -> None:
    """Every file of ``entry`` is in ``folder`` and, when ``verify``, matches its manifest sha256."""
    for file, digest in {entry.file: entry.sha256, **entry.extra_files}.items():
        path = folder / file
        if not path.is_file():
            raise BundleError(f"{path} is missing from the bundle; re-export it")
        if verify and sha256_file(path) != digest:
            raise BundleError(
                f"{path} does not match the sha256 in {folder / 'manifest.json'}: the file was "
                "changed or truncated after export; re-export the bundle"
            )


class Bundle:
    """An exported bundle folder. ``Bundle(path).runner("image_encoder")`` gives a ready component."""

    def __init__(
        self,
        path: str | Path,
        backend: str = "auto",
        verify: bool = True,
        threads: int | None = None,
        family: str | None = None,
        timed: bool = False,
        precision: str | None = None,
        tf32: bool = False,
    ) -> None:
        """``precision``: run that precision of every component that has it (e.g. the int8 engine of an image
        encoder beside its fp16 one); the other components, and all of them when it is ``None``, take the
        backend's default (fp16 on a GPU, fp32 on the CPU). ``tf32``: let ONNX Runtime's CUDA provider run fp32
        MatMul/Conv in TF32 (faster on Ampere and later, about fp16's precision); off by default, so fp32 is
        fp32."""
        self.path = Path(path)
        self.manifest: Manifest = read_manifest(self.path)
        if family is not None and self.manifest.family != family:
            raise BundleError(
                f"{self.path} holds a {self.manifest.family!r} bundle, but a {family!r} bundle is needed here"
            )
        formats = {c.format for c in self.manifest.components}
        self.backend = resolve_backend(backend, formats)
        self.verify = verify
        self.threads = threads
        self.precision = precision
        if tf32 and self.backend not in ("ort-cuda", "ort-trt"):
            how = ("a TensorRT engine's math is fixed when it is built (fp32 engines without TF32; fp16 engines "
                   "need none)" if self.backend == "tensorrt" else "CPUs have no TF32")
            raise InputError(f"--tf32 is a math mode of ONNX Runtime's CUDA provider (--backend ort-cuda or "
                             f"ort-trt), not of {self.backend!r}: {how}")
        self.tf32 = tf32
        check_precision(self.manifest, self.path, self._format(), precision)
        self._runners: dict[str, Runner] = {}
        # component name -> seconds of each run call, filled when ``timed``
        self.timings: dict[str, list[float]] | None = {} if timed else None

    @property
    def family(self) -> str:
        return self.manifest.family

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.manifest.preprocess

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.config

    def entry(self, name: str) -> ComponentEntry:
        """The component file this bundle's backend runs: an engine for TensorRT, else ONNX."""
        return choose_entry(self.manifest, self.path, name, self._format(), self.precision,
                            on_gpu=self.backend != "ort-cpu")

    def has(self, name: str) -> bool:
        """Whether the bundle has a file of component ``name`` that this backend runs (an engine for TensorRT)."""
        return bool(self.manifest.find(name, format=self._format()))

    def _format(self) -> str:
        return "tensorrt" if self.backend == "tensorrt" else "onnx"

    def spec(self, name: str) -> ComponentSpec:
        return self.entry(name).spec

    def check_files(self, entry: ComponentEntry) -> None:
        check_files(self.path, entry, self.verify)

    def runner(self, name: str) -> Runner:
        if name not in self._runners:
            entry = self.entry(name)
            self.check_files(entry)
            options: dict[str, Any] = {}
            if self.backend.startswith("ort"):
                options = {"threads": self.threads, "cache_dir": self.path / ".cache"}
                if self.tf32:
                    options["cuda_options"] = {"use_tf32": "1"}
            runner = open_runner(entry, self.path, self.backend, **options)
            if self.timings is not None:
                runner = TimedRunner(runner, self.timings.setdefault(name, []))
            self._runners[name] = runner
        return self._runners[name]
