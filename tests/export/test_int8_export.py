"""int8 (dynamic quantization) bundles: parity gate, quantized ops in the graphs, manifest, and the runtime
on them agreeing with the fp32 bundles (tiny CLIP and tiny SAM with seeded random weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from clip_fixtures import picture, tiny_bundle, tiny_pair  # noqa: E402
from conftest import scene  # noqa: E402

# What onnxruntime's quantize_dynamic writes for a MatMul with int8 weights.
QUANT_OPS = {"DynamicQuantizeLinear", "MatMulInteger"}
LABELS = ["cat", "dog", "car", "tree", "house", "boat", "bird", "flower"]


def op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def int8_initializers(path: Path) -> int:
    return sum(t.data_type == onnx.TensorProto.INT8 for t in onnx.load(str(path)).graph.initializer)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_clip_int8_bundle_passes_gate_and_is_quantized(name):
    path = tiny_bundle(name, "int8")
    manifest = json.loads((path / "manifest.json").read_text())
    assert {c["name"]: c["precision"] for c in manifest["components"]} == {
        "image_encoder": "int8", "text_encoder": "int8"}
    for c in manifest["components"]:
        assert c["info"]["quantization"]["ops"] == ["MatMul", "Gemm"]
        assert QUANT_OPS <= op_types(path / c["file"]), c["name"]
        assert int8_initializers(path / c["file"]) > 0, c["name"]
        report = manifest["parity"][c["name"]]
        assert report["precision"] == "int8" and report["passed"]
        (out,) = report["outputs"].values()
        assert 0.999 <= out["cosine"] < 1.0  # quantized: close, yet not bit-identical to fp32
    # Graph inputs and outputs stay fp32: the runtime needs no change.
    graph = onnx.load(str(path / "image_encoder.onnx"), load_external_data=False).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_clip_int8_runtime_agrees_with_fp32():
    import torch
    from edgefm.runtime.clip.model import ClipModel

    model, _ = tiny_pair("tiny-vit")
    fp32 = ClipModel(tiny_bundle("tiny-vit"), backend="ort-cpu", threads=1)
    int8 = ClipModel(tiny_bundle("tiny-vit", "int8"), backend="ort-cpu", threads=1)
    pictures = [picture(s) for s in range(8)]
    img32, img8 = fp32.encode_images(pictures), int8.encode_images(pictures)
    assert cosine(img32, img8).min() >= 0.999
    # Retrieval across precisions: each int8 embedding's nearest fp32 neighbour is its own picture. (Random
    # tiny CLIPs map every input near one shared direction, pairwise cosine >= 0.998, so this is strict; a
    # zero-shot argmax over such near-uniform probabilities would compare ties.)
    assert np.array_equal((img8 @ img32.T).argmax(1), np.arange(8))
    # Against PyTorch fp32 on a batch size the gate did not see (dynamic batch survives quantization).
    pixels = np.stack([int8.preprocess(p) for p in pictures[:3]])
    with torch.no_grad():
        ref = model.encode_image(torch.from_numpy(pixels)).numpy()
    assert cosine(int8.encode_pixels(pixels), ref).min() >= 0.999
    # Variable token length (cut to the longest prompt) works on the quantized text encoder too.
    prompts = [f"a photo of a {label}" for label in LABELS] + ["a very long prompt " * 8]
    txt32, txt8 = fp32.encode_texts(prompts), int8.encode_texts(prompts)
    assert cosine(txt32, txt8).min() >= 0.999
    assert np.array_equal((txt8 @ txt32.T).argmax(1), np.arange(len(prompts)))
    p32 = fp32.zero_shot(img32, LABELS, templates=["a photo of a {}."])
    p8 = int8.zero_shot(img8, LABELS, templates=["a photo of a {}."])
    assert np.abs(p32 - p8).max() < 0.01


@pytest.fixture(scope="module")
def sam_int8_bundle(sam_tiny, tmp_path_factory):
    from edgefm.export.sam import export_sam

    return export_sam(sam_tiny, tmp_path_factory.mktemp("bundles") / "sam_tiny_int8", "tiny", precision="int8")


def test_sam_int8_bundle_passes_gate_and_records_precisions(sam_int8_bundle):
    manifest = json.loads((sam_int8_bundle / "manifest.json").read_text())
    written = {c["name"]: c["precision"] for c in manifest["components"]}
    # The prompt encoder and the decoder context stay fp32 by design; the decoders passed the int8 policy.
    assert written == {"image_encoder": "int8", "prompt_encoder": "fp32", "mask_decoder": "int8",
                       "decoder_context": "fp32", "prompt_decoder": "int8"}
    for c in manifest["components"]:
        report = manifest["parity"][c["name"]]
        assert report["passed"] and report["precision"] == c["precision"], c["name"]
        assert ("quantization" in c["info"]) == (c["precision"] == "int8")
        ops = op_types(sam_int8_bundle / c["file"])
        assert (QUANT_OPS <= ops) == (c["precision"] == "int8"), (c["name"], ops)
    assert manifest["parity"]["image_encoder"]["outputs"]["image_embeddings"]["cosine"] >= 0.999
    masks = manifest["parity"]["mask_decoder"]["outputs"]["low_res_masks"]
    assert masks["mask_iou"] >= 0.98 and masks["cosine"] >= 0.999
    assert "int8_rejected" not in manifest["parity"]["mask_decoder"]


def test_sam_int8_predictor_agrees_with_fp32(sam_int8_bundle, sam_tiny_bundle):
    from edgefm.runtime.sam.predictor import SamPredictor

    image = scene(96, 128, seed=3)
    preds = [SamPredictor(b, backend="ort-cpu", threads=1) for b in (sam_tiny_bundle, sam_int8_bundle)]
    for p in preds:
        p.set_image(image)
    e32, e8 = (p.get_image_embedding().ravel() for p in preds)
    assert cosine(e32, e8) >= 0.999
    for point, label in (([[40.0, 30.0]], [1]), ([[100.0, 70.0], [20.0, 20.0]], [1, 0])):
        (m32, s32, _), (m8, s8, _) = (p.predict(np.array(point), np.array(label)) for p in preds)
        assert m32.shape == m8.shape == (3, 96, 128)
        for a, b in zip(m32, m8):
            union = np.logical_or(a, b).sum()
            assert union == 0 or np.logical_and(a, b).sum() / union >= 0.95
        assert np.abs(s32 - s8).max() < 0.01


def test_sam_mask_decoder_falls_back_to_fp32(sam_tiny, tmp_path, monkeypatch):
    """A decoder that misses the int8 mask IoU policy is written in fp32, with the failed report kept."""
    from edgefm.export import sam as sam_export
    from edgefm.export.parity import POLICIES, Policy

    monkeypatch.setitem(POLICIES, "int8", Policy(0.99, None, 1.01))  # no int8 mask can reach IoU 1.01
    out = sam_export.export_sam(sam_tiny, tmp_path / "fallback", "tiny", precision="int8")
    manifest = json.loads((out / "manifest.json").read_text())
    written = {c["name"]: c["precision"] for c in manifest["components"]}
    assert written == {"image_encoder": "int8", "prompt_encoder": "fp32", "mask_decoder": "fp32",
                       "decoder_context": "fp32", "prompt_decoder": "fp32"}
    for name in ("mask_decoder", "prompt_decoder"):
        dec = manifest["parity"][name]
        assert dec["passed"] and dec["precision"] == "fp32"
        assert not dec["int8_rejected"]["passed"] and dec["int8_rejected"]["precision"] == "int8"
        assert "mask IoU" in dec["int8_rejected"]["outputs"]["low_res_masks"]["failures"][0]
        assert not QUANT_OPS & op_types(out / f"{name}.onnx")


def test_int8_external_data_for_large_graphs(tmp_path, monkeypatch):
    """Over 2 GB (SAM ViT-H) the int8 graph keeps one data file beside it; exercised with a lowered limit."""
    from edgefm.export import onnx as onnx_export

    src = tiny_bundle("tiny-vit") / "image_encoder.onnx"
    monkeypatch.setattr(onnx_export, "_TWO_GB", 1000)
    assert onnx_export.int8_from_onnx(src, tmp_path / "q.onnx") == ["q.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.onnx.data"]
    assert QUANT_OPS <= op_types(tmp_path / "q.onnx")
    assert int8_initializers(tmp_path / "q.onnx") > 0


def test_cli_accepts_int8():
    from edgefm.runtime.cli import build_parser

    args = build_parser().parse_args(["export", "clip", "--checkpoint", "x.pt", "--out", "b", "--precision", "int8"])
    assert args.precision == "int8"
