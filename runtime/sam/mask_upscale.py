"""Mask upscaling on the device: the official ``postprocess_masks`` as a small ONNX graph for ONNX Runtime.

On a GPU, ``SamPredictor.predict`` spent most of its time on the host: the low-res logits came back and
OpenCV resized three of them to the full image (15 ms for 1500 x 2250 on the 2-core development CPU) while the
decoder itself took a few milliseconds. Run where the logits already are, the same two bilinear resizes
(to the padded square, crop, to the original size; half-pixel centers, as ``F.interpolate`` with
``align_corners=False`` and ``cv2.INTER_LINEAR``) and the threshold leave only the boolean masks to copy back.

The graph is the file ``mask_upscale.onnx`` beside this module, written by :func:`build` (which needs the
``onnx`` package; the runtime only loads the file). Inputs: ``low_res_masks`` (B, M, h0, w0) float32; ``plan``
int64 [S, S, h, w, H, W, c0, c1] (padded square, resized image, original image, the channel range kept);
``threshold`` float32 [1]; ``stability_offset`` float32 [1]. Outputs: ``logits`` and ``masks`` (B, c1 - c0, H, W),
float32 and bool, and ``stability`` (B, c1 - c0): the official stability score of each, for the automatic mask
generator, which then never copies full-size logits to the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

GRAPH = Path(__file__).with_name("mask_upscale.onnx")


def build() -> bytes:
    """The graph's serialized bytes (deterministic: ``python -m edgefm.runtime.sam.mask_upscale`` rewrites
    the shipped file, and a test checks that the two agree)."""
    import onnx
    from onnx import TensorProto, helper

    def const(name: str, values: list[int]) -> Any:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                                 [len(values)], values))

    def part(name: str, start: int, end: int) -> list[Any]:  # plan[start:end]
        return [const(f"{name}_s", [start]), const(f"{name}_e", [end]),
                helper.make_node("Slice", ["plan", f"{name}_s", f"{name}_e"], [name])]

    def lead_dims(src: str, name: str) -> list[Any]:  # Shape(src)[0:2]: batch and channels
        return [helper.make_node("Shape", [src], [f"{name}_shape"]),
                helper.make_node("Slice", [f"{name}_shape", "zero", "two"], [name])]

    nodes = [const("zero", [0]), const("two", [2]), const("axis1", [1]), const("axes23", [2, 3]),
             const("zeros2", [0, 0]),
             *part("square", 0, 2), *part("resized", 2, 4), *part("original", 4, 6),
             *part("c0", 6, 7), *part("c1", 7, 8),
             helper.make_node("Slice", ["low_res_masks", "c0", "c1", "axis1"], ["kept"]),
             *lead_dims("kept", "bc"),
             helper.make_node("Concat", ["bc", "square"], ["size1"], axis=0),
             helper.make_node("Resize", ["kept", "", "", "size1"], ["up"], mode="linear",
                              coordinate_transformation_mode="half_pixel"),
             helper.make_node("Slice", ["up", "zeros2", "resized", "axes23"], ["cropped"]),
             helper.make_node("Concat", ["bc", "original"], ["size2"], axis=0),
             helper.make_node("Resize", ["cropped", "", "", "size2"], ["logits"], mode="linear",
                              coordinate_transformation_mode="half_pixel"),
             helper.make_node("Greater", ["logits", "threshold"], ["masks"]),
             # The official stability score: count(logits > t + offset) / count(logits > t - offset). Counts
             # below 2**24 are exact in float32, and 0 / 0 is NaN as in the reference.
             const("hw_axes", [2, 3]),
             helper.make_node("Add", ["threshold", "stability_offset"], ["t_high"]),
             helper.make_node("Sub", ["threshold", "stability_offset"], ["t_low"]),
             *[node for name in ("high", "low") for node in (
                 helper.make_node("Greater", ["logits", f"t_{name}"], [f"above_{name}"]),
                 helper.make_node("Cast", [f"above_{name}"], [f"ones_{name}"], to=TensorProto.FLOAT),
                 helper.make_node("ReduceSum", [f"ones_{name}", "hw_axes"], [f"count_{name}"], keepdims=0))],
             helper.make_node("Div", ["count_high", "count_low"], ["stability"])]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    graph = helper.make_graph(
        nodes, "sam_mask_upscale",
        [helper.make_tensor_value_info("low_res_masks", f32, ["batch", "masks", "low_h", "low_w"]),
         helper.make_tensor_value_info("plan", i64, [8]), helper.make_tensor_value_info("threshold", f32, [1]),
         helper.make_tensor_value_info("stability_offset", f32, [1])],
        [helper.make_tensor_value_info("logits", f32, ["batch", "kept", "height", "width"]),
         helper.make_tensor_value_info("masks", TensorProto.BOOL, ["batch", "kept", "height", "width"]),
         helper.make_tensor_value_info("stability", f32, ["batch", "kept"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="edgefm")
    onnx.checker.check_model(model)
    return model.SerializeToString()


class MaskUpscaler:
    """The graph in an ONNX Runtime session on a runner's providers; inputs may be device ``OrtValue``s."""

    def __init__(self, providers: list[tuple[str, dict[str, Any]]], device: str) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(GRAPH), sess_options=so, providers=providers)
        self.device = device

    def __call__(self, low_res: Any, channels: slice, input_size: tuple[int, int], original_size: tuple[int, int],
                 image_size: int, threshold: float, return_logits: bool = False,
                 stability_offset: float | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """(B, C, H, W) boolean masks (or float logits) of ``low_res[:, channels]`` at the original size; with
        ``stability_offset``, also their (B, C) stability scores (the automatic mask generator's filter)."""
        import onnxruntime as ort

        n = low_res.shape()[1] if isinstance(low_res, ort.OrtValue) else low_res.shape[1]
        c0, c1, _ = channels.indices(n)
        plan = np.array([image_size, image_size, *input_size, *original_size, c0, c1], np.int64)
        binding = self.session.io_binding()
        if not isinstance(low_res, ort.OrtValue):
            low_res = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(low_res, np.float32), self.device, 0)
        binding.bind_ortvalue_input("low_res_masks", low_res)
        binding.bind_cpu_input("plan", plan)
        binding.bind_cpu_input("threshold", np.array([threshold], np.float32))
        binding.bind_cpu_input("stability_offset", np.array([stability_offset or 0.0], np.float32))
        wanted, other = ("logits", "masks") if return_logits else ("masks", "logits")
        binding.bind_output(wanted, "cpu")
        binding.bind_output(other, self.device, 0)  # computed alongside, left where it is
        binding.bind_output("stability", "cpu" if stability_offset is not None else self.device, 0)
        self.session.run_with_iobinding(binding)
        out = binding.get_outputs()  # in binding order: the wanted one first
        return (out[0].numpy(), out[2].numpy()) if stability_offset is not None else out[0].numpy()


if __name__ == "__main__":
    GRAPH.write_bytes(build())
    print(f"wrote {GRAPH}")
