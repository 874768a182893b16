"""Component I/O specs: the one place a component's tensor names, dtypes and shapes are written.

The exporter reads a :class:`ComponentSpec` for input/output names, dynamic axes and dummy inputs; the
TensorRT builder reads it for optimization profiles; the runtime reads it back from the manifest to check
feeds before they reach a backend. Shapes mix fixed sizes (int) and symbolic dims (str); every symbolic dim
has a (min, opt, max) range in ``ComponentSpec.dims``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError, ManifestError

Dim = int | str
_DTYPES = ("float32", "float16", "int64", "int32", "uint8", "bool")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, numpy dtype name and shape (ints fixed, strings symbolic)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"tensor {self.name!r}: unsupported dtype {self.dtype!r}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        try:
            return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"invalid tensor entry {data!r}: {exc}") from exc


@dataclass(frozen=True)
class DimRange:
    """Range of one symbolic dim; ``opt`` is the size engines are tuned for and dummy inputs use."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"dim range must satisfy 1 <= min <= opt <= max, got {self}")


@dataclass(frozen=True)
class ComponentSpec:
    """The I/O contract of one exported component."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, DimRange] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [t.name for t in self.inputs + self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"component {self.name!r}: duplicate tensor names {names}")
        for t in self.inputs + self.outputs:
            for d in t.shape:
                if isinstance(d, str) and d not in self.dims:
                    raise ValueError(f"component {self.name!r}: dim {d!r} of {t.name!r} has no range")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``-style dynamic axes: tensor name -> {axis: dim name}."""
        out: dict[str, dict[int, str]] = {}
        for t in self.inputs + self.outputs:
            axes = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if axes:
                out[t.name] = axes
        return out

    def concrete_shape(self, tensor: TensorSpec, which: str = "opt", **sizes: int) -> tuple[int, ...]:
        """Shape of ``tensor`` with symbolic dims at their min/opt/max (or as given in ``sizes``)."""
        return tuple(
            d if isinstance(d, int) else sizes.get(d, getattr(self.dims[d], which)) for d in tensor.shape
        )

    def profile(self, which: str = "opt") -> dict[str, tuple[int, ...]]:
        """Input shapes at one end of the ranges; min/opt/max together form a TensorRT profile."""
        return {t.name: self.concrete_shape(t, which) for t in self.inputs}

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate names, dtypes, ranks, fixed sizes and shared symbolic dims of ``feeds``.

        Returns the feeds made C-contiguous. Raises :class:`InputError` naming the tensor at fault.
        """
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise InputError(
                f"component {self.name!r} expects inputs {self.input_names}; "
                f"missing {missing}, unexpected {extra}"
            )
        bound: dict[str, tuple[int, str]] = {}
        out: dict[str, np.ndarray] = {}
        for t in self.inputs:
            a = feeds[t.name]
            if not isinstance(a, np.ndarray):
                raise InputError(f"{self.name}.{t.name}: expected a numpy array, got {type(a).__name__}")
            if a.dtype != np.dtype(t.dtype):
                raise InputError(f"{self.name}.{t.name}: expected dtype {t.dtype}, got {a.dtype}")
            if a.ndim != len(t.shape):
                raise InputError(
                    f"{self.name}.{t.name}: expected shape {list(t.shape)} (rank {len(t.shape)}), "
                    f"got {list(a.shape)}"
                )
            for axis, (want, got) in enumerate(zip(t.shape, a.shape)):
                if isinstance(want, int):
                    if want != got:
                        raise InputError(
                            f"{self.name}.{t.name}: axis {axis} must be {want}, got shape {list(a.shape)}"
                        )
                    continue
                r = self.dims[want]
                if not r.min <= got <= r.max:
                    raise InputError(
                        f"{self.name}.{t.name}: axis {axis} ({want}) must be in [{r.min}, {r.max}], "
                        f"got {got}"
                    )
                if want in bound and bound[want][0] != got:
                    raise InputError(
                        f"{self.name}: dim {want!r} is {bound[want][0]} in {bound[want][1]} "
                        f"but {got} in {t.name}"
                    )
                bound[want] = (got, t.name)
            out[t.name] = np.ascontiguousarray(a)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "dims": {k: [r.min, r.opt, r.max] for k, r in self.dims.items()},
        }

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> ComponentSpec:
        try:
            return cls(
                name=name,
                inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
                outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
                dims={k: DimRange(*v) for k, v in data.get("dims", {}).items()},
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"component {name!r}: invalid I/O spec ({exc})") from exc
