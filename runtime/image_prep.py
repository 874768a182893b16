"""Image preprocessing on the device: PIL's resize, a crop, normalization and padding as one ONNX graph.

On a GPU the host preprocessing is a large part of an image encoder call: the stop-9 H100 run measured
``SamPredictor.set_image`` on a 1500 x 2250 photo at ~117 ms (fp16), of which the encoder was ~26 ms; the rest
is host work (the resize, normalization, a 12 MiB float32 upload). Run where the encoder runs, the same
arithmetic needs only the uint8 image uploaded.

The graph does what :mod:`edgefm.runtime.resample` does in numpy, so its pixels are PIL's exactly: each pass
(horizontal, then vertical) gathers the taps of every output pixel, multiplies them by PIL's 22-bit fixed-point
weights, sums, adds half a unit, divides by 2**22 and clips to 0..255. The tap indices and weights come from
:func:`edgefm.runtime.resample.coefficients` on the host (cached per size) and restricted to the crop, so the
graph holds no resize rule of its own: one graph serves SAM's bilinear and CLIP's bicubic. Exactness without
integer reductions (ONNX Runtime's CUDA ReduceSum on int32 casts to float32 and back, read in its source, which
would round these sums of up to 2**30): each weight is split as ``hi * 2**8 + lo`` (``lo`` in 0..255), the two
products summed in float32, where every partial sum is an integer below 2**24 and so exact in any order, and
only then combined in int32 elementwise. (ONNX's ``Resize`` with ``antialias=1`` follows PIL's filter with
float weights: on "round" scales such as 1280 -> 1024, ties round the other way in up to 4% of the pixels, by
up to two levels; TensorRT does not implement antialiasing at all.) Then ``(pixel - mean) / std`` in float32,
as the host's lookup table computes it, CHW, and zero padding at the bottom and right.

The graph is ``image_prep.onnx`` beside this module, written by :func:`build` (which needs the ``onnx``
package; the runtime only loads the file). Inputs: ``image`` (H, W, 3) uint8 RGB; ``cols`` (w, kw) int64
and ``col_weights`` (2, w, kw) float32 (the ``hi`` and ``lo`` parts), ``rows`` / ``row_weights`` the same for
the (h, kh) vertical pass; ``norm`` float32 (2, 3), the mean row then the std row in pixel units (CLIP's 0..1
statistics times 255); ``out_hw`` int64 [2]. Output: ``pixels`` (1, 3, out_h, out_w) float32, the (h, w)
picture at the top left.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import resample
from .errors import BackendError, InputError

GRAPH = Path(__file__).with_name("image_prep.onnx")
PREPROCESS = ("auto", "host", "device")  # a pipeline's ``preprocess`` argument
_BITS = 22  # PIL's fixed point for 8-bit images (resample._PRECISION_BITS)
# Weights (|w| < 2**22) split as hi * 2**8 + lo: 255 * 255 * taps < 2**24 up to 258 taps (a 128x shrink,
# bilinear; 64x bicubic), and 255 * sum(|hi|) < 2**24 since the |weights| sum to ~1.2 * 2**22 at most.
_LO_BITS = 8
MAX_TAPS = ((1 << 24) - 1) // (255 * ((1 << _LO_BITS) - 1))


def build() -> bytes:
    """The graph's serialized bytes (deterministic: ``python -m edgefm.runtime.image_prep`` rewrites the
    shipped file, and a test checks that the two agree)."""
    import onnx
    from onnx import TensorProto, helper

    i32, i64, f32 = TensorProto.INT32, TensorProto.INT64, TensorProto.FLOAT

    def const(name: str, values: list, dtype: int = i64, dims: list[int] | None = None) -> Any:
        dims = [len(values)] if dims is None else dims
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, values))

    def one_pass(src: str, index: str, weights: str, axis: int, w_axes: str, tap_axis: str, out: str) -> list:
        """PIL's pass along ``axis`` of a float32 HWC tensor of integers: gather the taps, weigh with the hi
        and lo parts (a leading axis of 2), sum each exactly, combine in int32, round, clip."""
        return [
            helper.make_node("Gather", [src, index], [f"{out}_taps"], axis=axis),  # taps on axis + 1
            helper.make_node("Unsqueeze", [weights, w_axes], [f"{out}_w"]),
            helper.make_node("Mul", [f"{out}_taps", f"{out}_w"], [f"{out}_prod"]),  # (2, ...): below 2**22, exact
            helper.make_node("ReduceSum", [f"{out}_prod", tap_axis], [f"{out}_sums"], keepdims=0),
            helper.make_node("Cast", [f"{out}_sums"], [f"{out}_isums"], to=i32),
            helper.make_node("Split", [f"{out}_isums"], [f"{out}_hi", f"{out}_lo"], axis=0),
            helper.make_node("Mul", [f"{out}_hi", "lo_unit"], [f"{out}_hi_scaled"]),
            helper.make_node("Add", [f"{out}_hi_scaled", f"{out}_lo"], [f"{out}_total"]),
            helper.make_node("Add", [f"{out}_total", "half_unit"], [f"{out}_rounded"]),
            # Div truncates where PIL's shift floors: they differ only below zero, which the clip makes 0.
            helper.make_node("Div", [f"{out}_rounded", "unit"], [f"{out}_int"]),
            helper.make_node("Squeeze", [f"{out}_int", "axis0"], [f"{out}_level"]),
            helper.make_node("Cast", [f"{out}_level"], [f"{out}_f"], to=f32),
            helper.make_node("Clip", [f"{out}_f", "lo", "hi"], [out]),
        ]

    nodes = [
        const("half_unit", [1 << (_BITS - 1)], i32, []), const("unit", [1 << _BITS], i32, []),
        const("lo_unit", [1 << _LO_BITS], i32, []), const("lo", [0.0], f32, []), const("hi", [255.0], f32, []),
        const("axis0", [0]), const("wide_w_axes", [1, 4]), const("tall_w_axes", [3, 4]),
        const("wide_tap_axis", [3]), const("tall_tap_axis", [2]), const("zeros6", [0] * 6),
        const("hw_start", [2]), const("hw_end", [4]), const("r0", [0]), const("r1", [1]), const("r2", [2]),
        helper.make_node("Cast", ["image"], ["as_float"], to=f32),
        # Horizontal: [H, W, 3] -> taps [H, w, kw, 3] x weights [2, 1, w, kw, 1] -> sums [2, H, w, 3] -> [H, w, 3].
        *one_pass("as_float", "cols", "col_weights", 1, "wide_w_axes", "wide_tap_axis", "wide"),
        # Vertical: taps [h, kh, w, 3] x weights [2, h, kh, 1, 1] -> sums [2, h, w, 3] -> [h, w, 3].
        *one_pass("wide", "rows", "row_weights", 0, "tall_w_axes", "tall_tap_axis", "tall"),
        *[helper.make_node("Slice", ["norm", s, e, "axis0"], [n])
          for n, s, e in (("mean", "r0", "r1"), ("std", "r1", "r2"))],
        helper.make_node("Sub", ["tall", "mean"], ["centered"]),  # (1, 3) broadcasts over [h, w, 3]
        helper.make_node("Div", ["centered", "std"], ["normalized"]),
        helper.make_node("Transpose", ["normalized"], ["chw"], perm=[2, 0, 1]),
        helper.make_node("Unsqueeze", ["chw", "axis0"], ["nchw"]),
        helper.make_node("Shape", ["nchw"], ["shape"]),
        helper.make_node("Slice", ["shape", "hw_start", "hw_end"], ["hw"]),
        helper.make_node("Sub", ["out_hw", "hw"], ["pad_hw"]),
        helper.make_node("Concat", ["zeros6", "pad_hw"], ["pads"], axis=0),
        helper.make_node("Pad", ["nchw", "pads"], ["pixels"], mode="constant"),
    ]
    graph = helper.make_graph(
        nodes, "image_prep",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["height", "width", 3]),
         helper.make_tensor_value_info("cols", i64, ["w", "kw"]),
         helper.make_tensor_value_info("col_weights", f32, [2, "w", "kw"]),
         helper.make_tensor_value_info("rows", i64, ["h", "kh"]),
         helper.make_tensor_value_info("row_weights", f32, [2, "h", "kh"]),
         helper.make_tensor_value_info("norm", f32, [2, 3]),
         helper.make_tensor_value_info("out_hw", i64, [2])],
        [helper.make_tensor_value_info("pixels", f32, [1, 3, "out_h", "out_w"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="edgefm")
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


@functools.lru_cache(maxsize=64)
def taps(in_size: int, out_size: int, start: int, stop: int, resize: str) -> tuple[np.ndarray, np.ndarray]:
    """One pass's tap indices (int64, (n, k)) and PIL weights split as ``hi * 2**8 + lo`` (float32, (2, n, k))
    for output pixels ``start..stop-1``."""
    resample.check_rule(resize)
    index, weights = resample.coefficients(in_size, out_size, start, stop, resize)
    if weights.shape[1] > MAX_TAPS:
        raise InputError(f"resizing {in_size} pixels to {out_size} takes {weights.shape[1]} taps per pixel, more than "
                         f"the device preprocessing sums exactly ({MAX_TAPS}); use preprocess='host'")
    hi = np.floor_divide(weights, 1 << _LO_BITS)
    lo = weights - hi * (1 << _LO_BITS)
    return index.astype(np.int64), np.stack([hi, lo]).astype(np.float32)


class ImagePrep:
    """The graph in one ONNX Runtime session on an encoder's providers, writing into one device buffer.

    ``pixels`` is allocated once, on ``device``, with the encoder input's shape (1, 3, *out_hw*); every call
    overwrites it, so a CUDA-graph encoder can be captured reading it. Per call, the uint8 image and the
    taps (a few hundred KiB) are the uploads. The gathered taps are the transient memory: 3 x 4 bytes x
    H x w x taps x 3 for the wide pass (~260 MiB for a 1500 x 2250 photo into SAM, ~1.2 GiB for a 3000 x 4000
    one into CLIP's 224 pixels, where each output pixel reads 54 input columns); :meth:`fits` says whether a
    picture stays under ``max_bytes``, and the pipelines preprocess the ones that do not on the host."""

    max_bytes = 1 << 30

    def __init__(self, providers: list[tuple[str, dict[str, Any]]], device: str, mean, std,
                 out_hw: tuple[int, int], resize: str = "bilinear_antialias") -> None:
        import onnxruntime as ort

        resample.check_rule(resize)
        # Plain CUDA (or CPU) kernels: one small graph per image size is not worth a TensorRT engine.
        providers = [p for p in providers if p[0] != "TensorrtExecutionProvider"]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(GRAPH), sess_options=so, providers=providers)
        except Exception as exc:  # a broken install; the graph itself is checked by the tests
            raise BackendError(f"ONNX Runtime {ort.__version__} could not load {GRAPH} "
                               f"({type(exc).__name__}: {str(exc)[:200]}); use preprocess='host'") from exc
        self.resize, self.device, self.out_hw = resize, device, (int(out_hw[0]), int(out_hw[1]))
        self.norm = ort.OrtValue.ortvalue_from_numpy(np.array([mean, std], np.float32), device, 0)
        self.out_size = np.array(self.out_hw, np.int64)
        self.pixels = ort.OrtValue.ortvalue_from_shape_and_type([1, 3, *self.out_hw], np.float32, device, 0)

    def fits(self, hw: tuple[int, int], resized: tuple[int, int],
             crop: tuple[int, int, int, int] | None = None) -> bool:
        """Whether an (H, W) picture's passes stay within :attr:`max_bytes` and :data:`MAX_TAPS`."""
        (h, w), (rh, rw) = hw, resized
        top, left, ch, cw = crop if crop is not None else (0, 0, rh, rw)
        kw = resample.coefficients(w, rw, left, left + cw, self.resize)[1].shape[1]
        kh = resample.coefficients(h, rh, top, top + ch, self.resize)[1].shape[1]
        # Taps, then their hi and lo products: three float32 copies per pass.
        peak = 3 * 4 * 3 * cw * max(h * kw, ch * kh)
        return max(kw, kh) <= MAX_TAPS and peak <= self.max_bytes

    def __call__(self, image: np.ndarray, resized: tuple[int, int],
                 crop: tuple[int, int, int, int] | None = None, into: tuple[Any, int] | None = None) -> Any:
        """HWC uint8 RGB, resized to ``resized`` (H, W), cropped to ``crop`` (top, left, H, W; default all of
        it), normalized, padded: :attr:`pixels`, an ``OrtValue`` on the device. ``into=(batch, i)`` writes
        item ``i`` of ``batch`` (an ``OrtValue`` (N, 3, out_h, out_w) float32 on the device) instead."""
        (h, w), (rh, rw) = image.shape[:2], resized
        top, left, ch, cw = crop if crop is not None else (0, 0, rh, rw)
        if not (0 <= top and 0 <= left and top + ch <= rh and left + cw <= rw and ch <= self.out_hw[0]
                and cw <= self.out_hw[1]):
            raise InputError(f"crop {(top, left, ch, cw)} of a {rh}x{rw} resize does not fit the "
                             f"{self.out_hw[0]}x{self.out_hw[1]} output")
        cols, col_weights = taps(w, rw, left, left + cw, self.resize)
        rows, row_weights = taps(h, rh, top, top + ch, self.resize)
        binding = self.session.io_binding()
        for name, value in (("image", np.ascontiguousarray(image)), ("cols", cols), ("col_weights", col_weights),
                            ("rows", rows), ("row_weights", row_weights), ("out_hw", self.out_size)):
            binding.bind_cpu_input(name, value)
        binding.bind_ortvalue_input("norm", self.norm)
        if into is None:
            out = self.pixels
            binding.bind_ortvalue_output("pixels", out)
        else:
            out, i = into
            if tuple(out.shape()[1:]) != (3, *self.out_hw) or not 0 <= i < out.shape()[0]:
                raise InputError(f"into: item {i} of a {tuple(out.shape())} batch; this ImagePrep writes "
                                 f"(3, {self.out_hw[0]}, {self.out_hw[1]}) items")
            item = 3 * self.out_hw[0] * self.out_hw[1]
            binding.bind_output("pixels", self.device, 0, np.float32, [1, 3, *self.out_hw],
                                out.data_ptr() + i * item * 4)
        self.session.run_with_iobinding(binding)
        return out


def asked_preprocess(preprocess: str, runner: Any, backend: str) -> str:
    """A pipeline's ``preprocess`` argument, checked against the runner of its image encoder's backend:
    "device" (required), "auto" (the device if it checks out: only on an ONNX Runtime GPU backend) or
    "host"."""
    if preprocess not in PREPROCESS:
        raise InputError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
    if not hasattr(runner, "run_on_device"):  # the native TensorRT backend, or a wrapped runner
        if preprocess == "device":
            raise InputError(f"preprocess='device' runs an ONNX Runtime graph beside the encoder: it needs an "
                             f"ONNX Runtime backend, not {backend!r}; use preprocess='host'")
        return "host"
    return preprocess if preprocess == "device" or runner.device == "cuda" else "host"


def open_checked(runner: Any, mean, std, out_hw: tuple[int, int], resize: str,
                 host: Callable[[np.ndarray], np.ndarray],
                 geometry: Callable[[int, int], tuple[tuple[int, int], tuple[int, int, int, int] | None]],
                 required: bool) -> ImagePrep | None:
    """An :class:`ImagePrep` on ``runner``'s providers, checked once against the ``host`` preprocessing on
    two synthetic pictures (one enlarged, one shrunk; ``geometry(h, w)`` gives the resize and crop). Its
    integer arithmetic should give the host's pixels on any provider; one that does not is found here, not
    in the results. A disagreement is an error when ``required``, else a warning and ``None`` (the host)."""
    prep = ImagePrep(runner.providers, runner.device, mean, std, out_hw, resize)
    for h, w in ((300, 500), (1300, 900)):
        yy, xx = np.mgrid[0:h, 0:w]
        pic = np.stack([xx * 255 // w, yy * 255 // h, (xx * 7 + yy * 13) % 256], -1).astype(np.uint8)
        got = prep(pic, *geometry(h, w)).numpy()
        # In uint8 levels (one level is 1/std after normalization); float32 division leaves ~1e-5.
        err = float((np.abs(got - host(pic).reshape(got.shape)) * np.asarray(std, np.float32)[:, None, None]).max())
        if err > 1e-3:
            import onnxruntime as ort

            msg = (f"the device preprocessing graph disagrees with the host path on a {h}x{w} picture (by up to "
                   f"{err:.1f} levels) on {runner.providers[0][0]} of onnxruntime {ort.__version__}")
            if required:
                raise BackendError(msg + "; use preprocess='host'")
            warnings.warn(msg + "; preprocessing on the host instead", RuntimeWarning, stacklevel=4)
            return None
    return prep


if __name__ == "__main__":
    GRAPH.write_bytes(build())
    print(f"wrote {GRAPH}")
