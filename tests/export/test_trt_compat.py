"""The static TensorRT-compatibility check: every graph edgefm exports passes, and violations are named exactly.

The exported bundles are the tiny seeded ones other export tests build (session-cached); the violating graphs
are hand-made with ``onnx.helper`` plus SAM's ``--attention fused`` export, which writes ONNX Runtime's
``com.microsoft.MultiHeadAttention`` and must be refused before TensorRT is ever needed.
"""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")
import clip_fixtures  # noqa: E402
import dalle_fixtures  # noqa: E402
import onnx  # noqa: E402
from dalle_fixtures import one_torch_thread  # noqa: E402,F401 (autouse fixture)
from edgefm.export import tensorrt as ext  # noqa: E402
from edgefm.export.trt_compat import (  # noqa: E402
    SUPPORTED_OPS,
    Violation,
    assert_tensorrt_compatible,
    check_tensorrt_compat,
)
from edgefm.runtime.errors import BackendError, BundleError, InputError  # noqa: E402
from edgefm.runtime.manifest import read_manifest  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

F32 = TensorProto.FLOAT


def onnx_files(folder) -> dict[str, object]:
    """component name -> ONNX file of a bundle (one precision per bundle here)."""
    return {c.name: folder / c.file for c in read_manifest(folder).components if c.format == "onnx"}


def model(nodes, inputs, outputs, opset: int = 17, **kw):
    graph = helper.make_graph(nodes, "g", inputs, outputs, **kw)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(
        "com.microsoft", 1)])


def io(name: str, dtype: int = F32, shape=("n", 4)):
    return helper.make_tensor_value_info(name, dtype, shape)


# --- every graph the project exports ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sam_fp16_bundle(sam_tiny, tmp_path_factory):
    from edgefm.export.sam import export_sam

    return export_sam(sam_tiny, tmp_path_factory.mktemp("trt") / "sam_fp16", "tiny", precision="fp16")


@pytest.fixture(scope="module")
def sam_fused_bundle(sam_tiny, tmp_path_factory):
    from edgefm.export.sam import export_sam

    return export_sam(sam_tiny, tmp_path_factory.mktemp("trt") / "sam_fused", "tiny", attention="fused")


@pytest.fixture(scope="module")
def dalle_fp16_bundle(tmp_path_factory):
    from edgefm.export.dalle import export_dalle

    decoder, encoder, prior = dalle_fixtures.tiny_models()
    return export_dalle(tmp_path_factory.mktemp("trt") / "dalle_fp16", decoder, encoder, prior, precision="fp16")


@pytest.mark.parametrize("which, components", [
    ("sam-fp32", {"image_encoder", "prompt_encoder", "mask_decoder", "decoder_context", "prompt_decoder"}),
    ("sam-fp16", {"image_encoder", "prompt_encoder", "mask_decoder", "decoder_context", "prompt_decoder"}),
    ("clip-tiny-vit", {"image_encoder", "text_encoder"}),
    ("clip-tiny-vit-fp16", {"image_encoder", "text_encoder"}),
    ("clip-tiny-rn", {"image_encoder", "text_encoder"}),
    ("dalle-fp32", {"dvae_decoder", "dvae_encoder", "prior_prefill", "prior_step"}),
    ("dalle-fp16", {"dvae_decoder", "dvae_encoder", "prior_prefill", "prior_step"}),
])
def test_exported_graphs_are_compatible(which, components, request, tmp_path_factory):
    folder = {
        "sam-fp32": lambda: request.getfixturevalue("sam_tiny_bundle"),
        "sam-fp16": lambda: request.getfixturevalue("sam_fp16_bundle"),
        "clip-tiny-vit": lambda: clip_fixtures.tiny_bundle("tiny-vit"),
        "clip-tiny-vit-fp16": lambda: clip_fixtures.tiny_bundle("tiny-vit", "fp16"),
        "clip-tiny-rn": lambda: clip_fixtures.tiny_bundle("tiny-rn"),
        "dalle-fp32": lambda: dalle_fixtures.tiny_bundle(tmp_path_factory),
        "dalle-fp16": lambda: request.getfixturevalue("dalle_fp16_bundle"),
    }[which]()
    files = onnx_files(folder)
    assert set(files) == components  # nothing skipped: each component's graph is checked
    found = {name: [str(v) for v in check_tensorrt_compat(path)] for name, path in files.items()}
    assert found == {name: [] for name in components}
    for path in files.values():
        assert_tensorrt_compatible(path)  # no raise
    # Nor a control-flow node, which TensorRT would take but ONNX Runtime would not capture in a CUDA graph.
    for name, path in files.items():
        assert not {n.op_type for n in onnx.load(str(path)).graph.node} & {"If", "Loop", "Scan"}, name


# --- SAM's fused attention: ONNX Runtime's operator, refused before TensorRT --------------------------------


def test_sam_fused_attention_is_refused(sam_fused_bundle):
    files = onnx_files(sam_fused_bundle)
    assert check_tensorrt_compat(files["prompt_encoder"]) == []
    decoder = check_tensorrt_compat(files["mask_decoder"])  # tiny: 2 two-way blocks x 3 attentions + the final
    assert [(v.op_type, v.domain) for v in decoder if v.op_type == "MultiHeadAttention"] == [
        ("MultiHeadAttention", "com.microsoft")] * 7
    # and 3 + 4 residual adds fused with their norms (the first block's self-attention has no residual) + the final
    assert [(v.op_type, v.domain) for v in decoder if v.op_type != "MultiHeadAttention"] == [
        ("SkipLayerNormalization", "com.microsoft")] * 8
    found = check_tensorrt_compat(files["image_encoder"])
    # tiny: 4 blocks, each one attention node and two residual adds fused with their LayerNorms (the last one one)
    assert ([(v.op_type, v.domain) for v in found if v.op_type == "MultiHeadAttention"]
            == [("MultiHeadAttention", "com.microsoft")] * 4)
    assert [(v.op_type, v.domain) for v in found if v.op_type != "MultiHeadAttention"] == [
        ("SkipLayerNormalization", "com.microsoft")] * 7
    assert found[0] == Violation(
        "/encoder/blocks.0/attn/FusedAttention", "MultiHeadAttention", "com.microsoft",
        "operator of domain com.microsoft, not the ONNX domain: TensorRT's parser would only look for a plugin "
        "of that name, and edgefm ships none")
    with pytest.raises(BundleError) as err:
        assert_tensorrt_compatible(files["image_encoder"])
    text = str(err.value)
    assert text.startswith(f"{files['image_encoder']} cannot become a TensorRT 10.x engine: 11 problem(s)")
    assert ("4 x com.microsoft.MultiHeadAttention (e.g. node '/encoder/blocks.0/attn/FusedAttention')" in text)
    assert ("7 x com.microsoft.SkipLayerNormalization (e.g. node '/encoder/blocks.0/SkipLayerNorm')" in text)
    assert "re-export a SAM or CLIP bundle made with --attention fused with --attention plain" in text


def test_build_engine_checks_before_tensorrt(sam_fused_bundle, sam_tiny_bundle, monkeypatch):
    """build_engine refuses the fused bundle with the compatibility error, not 'TensorRT is not installed'."""
    with pytest.raises(BundleError, match=r"image_encoder\.onnx cannot become .* com\.microsoft\.MultiHeadAttention"):
        ext.build_engine(sam_fused_bundle, "fp32")
    # a compatible bundle passes the check and only then needs TensorRT (absent here, or faked away)
    import builtins

    real_import = builtins.__import__

    def no_tensorrt(name, *args, **kwargs):
        if name == "tensorrt":
            raise ModuleNotFoundError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    with pytest.raises(BackendError, match="needs TensorRT"):
        ext.build_engine(sam_tiny_bundle, "fp32")


# --- hand-made violations, exact messages --------------------------------------------------------------------


def test_nonzero_is_data_dependent():
    m = model([helper.make_node("NonZero", ["x"], ["idx"], name="nz")], [io("x")],
              [io("idx", TensorProto.INT64, (2, "k"))])
    assert check_tensorrt_compat(m) == [Violation(
        "nz", "NonZero", "", "data-dependent output shape: it depends on input values, not shapes, and edgefm "
        "engines need outputs sized from input shapes")]
    unique = model([helper.make_node("Unique", ["x"], ["y"], name="u")], [io("x")], [io("y", F32, ("k",))])
    assert [str(v) for v in check_tensorrt_compat(unique)] == [
        "Unique node 'u': data-dependent output shape: it depends on input values, not shapes, and edgefm engines "
        "need outputs sized from input shapes (and TensorRT's ONNX parser does not import it)"]


def test_float64_and_io_types():
    m = model([helper.make_node("Cast", ["x"], ["y"], name="c", to=TensorProto.BFLOAT16)],
              [io("x", TensorProto.DOUBLE)], [io("y", TensorProto.BFLOAT16)],
              initializer=[helper.make_tensor("w", TensorProto.COMPLEX64, [1], [1 + 0j])])
    assert [str(v) for v in check_tensorrt_compat(m)] == [
        "x: graph input has element type DOUBLE, which TensorRT has no DataType for",
        "y: graph output has element type BFLOAT16, which edgefm's TensorRT runner cannot bind (no numpy type)",
        "w: initializer has element type COMPLEX64, which TensorRT has no DataType for",
    ]
    cast64 = model([helper.make_node("Cast", ["x"], ["y"], name="c", to=TensorProto.DOUBLE)], [io("x")],
                   [io("y")])
    assert [str(v) for v in check_tensorrt_compat(cast64)] == [
        "Cast node 'c': Cast to DOUBLE, a type TensorRT has no DataType for"]


def test_custom_domain_and_unsupported_ops():
    m = model([helper.make_node("Gelu", ["x"], ["g"], name="ms", domain="com.microsoft"),
               helper.make_node("Det", ["g"], ["y"], name="det")], [io("x")], [io("y")])
    assert [str(v) for v in check_tensorrt_compat(m)] == [
        "com.microsoft.Gelu node 'ms': operator of domain com.microsoft, not the ONNX domain: TensorRT's parser "
        "would only look for a plugin of that name, and edgefm ships none",
        "Det node 'det': not supported by TensorRT 10's ONNX parser",
    ]
    assert {"MatMul", "LayerNormalization", "Einsum", "If"} <= SUPPORTED_OPS
    assert "MultiHeadAttention" not in SUPPORTED_OPS


def test_rank_restrictions_and_subgraphs():
    no_shape = helper.make_tensor_value_info("x", F32, None)
    resize = helper.make_node("Resize", ["x", "", "s"], ["r"], name="rs", mode="cubic",
                              coordinate_transformation_mode="tf_crop_and_resize", antialias=1)
    einsum = helper.make_node("Einsum", ["r", "r"], ["e"], name="es", equation="ij,JK->iK")
    then_g = helper.make_graph([helper.make_node("Det", ["e"], ["t"], name="det")], "then", [], [io("t")])
    else_g = helper.make_graph([helper.make_node("Identity", ["e"], ["f"], name="id")], "else", [], [io("f")])
    cond = helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)
    m = model([resize, einsum, cond], [no_shape, io("c", TensorProto.BOOL, ())], [io("y")],
              initializer=[helper.make_tensor("s", F32, [2], [2.0, 2.0])])
    assert [str(v) for v in check_tensorrt_compat(m)] == [
        "x: graph input has no shape (unknown rank); TensorRT needs the rank of every input and output",
        "Resize node 'rs': Resize coordinate_transformation_mode 'tf_crop_and_resize' is not supported (TensorRT "
        "takes half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric, align_corners)",
        "Resize node 'rs': Resize antialias=1 is not supported",
        "Einsum node 'es': Einsum equation 'ij,JK->iK' uses 'JK'; TensorRT takes lower-case subscripts only",
        "Det node 'if > then_branch > det': not supported by TensorRT 10's ONNX parser",
    ]


def test_quantize_dequantize_rules():
    """TensorRT's explicit quantization: signed symmetric (zero point 0), build-time scales, per-channel only on
    constant weights, no int32 bias dequantization. ONNX Runtime's default static quantization (uint8
    activations with zero points, int32 biases) breaks three of them."""
    t = helper.make_tensor
    inits = [t("s", F32, [], [0.1]), t("s4", F32, [4], [0.1] * 4), t("z8", TensorProto.INT8, [], [0]),
             t("zu8", TensorProto.UINT8, [], [128]), t("z3", TensorProto.INT8, [], [3]),
             t("w", TensorProto.INT8, [4, 4], [1] * 16), t("z8x4", TensorProto.INT8, [4], [0] * 4),
             t("b", TensorProto.INT32, [4], [5] * 4), t("z32", TensorProto.INT32, [4], [0] * 4)]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z8"], ["q_ok"], name="ok"),
        helper.make_node("DequantizeLinear", ["w", "s4", "z8x4"], ["w_ok"], name="weights", axis=1),
        helper.make_node("QuantizeLinear", ["x", "s", "zu8"], ["q_u8"], name="uint8"),
        helper.make_node("QuantizeLinear", ["x", "s", "z3"], ["q_z3"], name="offset"),
        helper.make_node("QuantizeLinear", ["x", "s4", "z8x4"], ["q_pc"], name="per_channel", axis=1),
        helper.make_node("QuantizeLinear", ["x", "x_scale"], ["q_dyn"], name="runtime_scale"),
        helper.make_node("DequantizeLinear", ["b", "s4", "z32"], ["b_f"], name="bias"),
    ]
    m = model(nodes, [io("x"), io("x_scale", F32, ())], [io("q_ok", TensorProto.INT8), io("w_ok", F32, (4, 4))],
              initializer=inits)
    assert [str(v) for v in check_tensorrt_compat(m)] == [
        "QuantizeLinear node 'uint8': zero point of type UINT8: TensorRT's quantized types are signed (int8, fp8, "
        "int4), so quantize symmetrically to int8",
        "QuantizeLinear node 'offset': non-zero zero point: TensorRT quantizes symmetrically (zero point 0)",
        "QuantizeLinear node 'per_channel': per-channel scale on an activation: TensorRT quantizes activations per "
        "tensor (per-channel scales are for constant weights)",
        "QuantizeLinear node 'runtime_scale': its scale 'x_scale' is computed at run time; TensorRT needs int8 "
        "scales at build time",
        "DequantizeLinear node 'bias': dequantizes an int32 tensor (a quantized bias): TensorRT dequantizes int8, "
        "fp8 and int4 only; keep biases in floating point (onnxruntime's QuantizeBias=False)",
    ]
    # A scale from a Constant's value_float (a scalar, so per tensor) is a build-time scale like any other.
    scalar = model([helper.make_node("Constant", [], ["sf"], name="sf", value_float=0.1),
                    helper.make_node("QuantizeLinear", ["x", "sf", "z8"], ["q"], name="q")], [io("x")],
                   [io("q", TensorProto.INT8)], initializer=[t("z8", TensorProto.INT8, [], [0])])
    assert check_tensorrt_compat(scalar) == []


def test_loop_with_computed_trip_count():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Constant", [], ["scan"], value=helper.make_tensor("v", F32, [4], [0.0] * 4))],
        "body", [io("i", TensorProto.INT64, ()), io("cond_in", TensorProto.BOOL, ())],
        [io("cond_out", TensorProto.BOOL, ()), io("scan", F32, (4,))])
    loop = helper.make_node("Loop", ["m", "c"], ["out"], name="loop", body=body)
    counted = model([helper.make_node("ArgMax", ["x"], ["m"], keepdims=0, axis=0), loop],
                    [io("x", F32, (3,)), io("c", TensorProto.BOOL, ())], [io("out", F32, ("k", 4))])
    assert [str(v) for v in check_tensorrt_compat(counted)] == [
        "Loop node 'loop': data-dependent output shape: its scan outputs are as long as a trip count computed at "
        "run time"]
    fixed = model([loop], [io("c", TensorProto.BOOL, ())], [io("out", F32, (3, 4))],
                  initializer=[helper.make_tensor("m", TensorProto.INT64, [], [3])])
    assert check_tensorrt_compat(fixed) == []


def test_versions_opset_and_message_cap(tmp_path):
    attn = model([helper.make_node("Attention", ["x", "x", "x"], ["y"], name="a")], [io("x")], [io("y")], opset=23)
    assert check_tensorrt_compat(attn) == []
    assert [str(v) for v in check_tensorrt_compat(attn, trt_minor=13)] == [
        "Attention node 'a': imported by TensorRT's parser only since 10.14"]
    with pytest.raises(InputError, match="trt_major=8: only TensorRT 10.x"):
        check_tensorrt_compat(attn, trt_major=8)
    old = model([helper.make_node("Relu", ["x"], ["y"])], [io("x")], [io("y")], opset=8)
    assert [str(v) for v in check_tensorrt_compat(old)] == [
        "ONNX opset 8 is older than 9, the oldest TensorRT 10 parses; re-export with a newer opset"]
    many = model([helper.make_node(op, ["x"], [f"y{i}"], name=f"n{i}") for i, op in enumerate(
        ["Det", "Det", "Multinomial", "MaxUnpool", "ConvInteger", "DFT", "Col2Im", "BitShift", "Hardmax"])],
        [io("x")], [io(f"y{i}") for i in range(9)])
    with pytest.raises(BundleError) as err:
        assert_tensorrt_compatible(many)
    assert "8 problem(s)" in str(err.value) and "2 x Det (e.g. node 'n0')" in str(err.value)
    assert "; and 1 more kind(s). To fix: re-export" in str(err.value)


def test_unreadable_file(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_text('{"inputs": []}')
    with pytest.raises(BundleError, match=r"x\.onnx is not a readable ONNX model"):
        check_tensorrt_compat(bad)
    assert_tensorrt_compatible(bad, skip_unreadable=True)  # left to TensorRT's parser
    with pytest.raises(BundleError, match="does not exist"):
        check_tensorrt_compat(tmp_path / "missing.onnx")
