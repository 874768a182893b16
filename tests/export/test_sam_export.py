"""SAM export: per-component parity PyTorch vs ONNX Runtime (fp32, fp16), the manifest, and failures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_scaled_close
from edgefm.runtime.bundle import Bundle
from edgefm.runtime.errors import BundleError, ManifestError, ParityError


def test_fp32_bundle_parity_and_manifest(sam_tiny_bundle):
    manifest = json.loads((sam_tiny_bundle / "manifest.json").read_text())
    assert manifest["family"] == "sam" and manifest["schema_version"] == 1
    names = ["image_encoder", "prompt_encoder", "mask_decoder", "decoder_context", "prompt_decoder"]
    assert [c["name"] for c in manifest["components"]] == names
    for name in names:
        report = manifest["parity"][name]
        assert report["passed"]
        for out in report["outputs"].values():
            assert out["cosine"] >= 0.99999
            assert out["max_abs"] <= 1e-4 * max(1.0, out["ref_max_abs"])
    assert manifest["parity"]["mask_decoder"]["outputs"]["low_res_masks"]["mask_iou"] >= 0.999
    dec = next(c for c in manifest["components"] if c["name"] == "mask_decoder")
    assert dec["dims"]["batch"] == [1, 1, 128]  # dynamic prompt batch, ranges from the one spec
    assert manifest["preprocess"]["image_size"] == 256


def test_dynamic_batch_and_points(sam_tiny_bundle, sam_tiny):
    """Shapes other than the traced ones run and still match PyTorch."""
    import torch
    from edgefm.export.sam import PromptEncoderGraph

    bundle = Bundle(sam_tiny_bundle, backend="ort-cpu")
    rng = np.random.default_rng(3)
    feeds = {
        "point_coords": rng.uniform(0, 256, (5, 7, 2)).astype(np.float32),
        "point_labels": rng.integers(-1, 4, (5, 7)).astype(np.float32),
        "mask_input": rng.normal(0, 3, (5, 1, 64, 64)).astype(np.float32),
        "has_mask_input": np.array([1, 0, 1, 0, 0], np.float32),
    }
    got = bundle.runner("prompt_encoder").run(feeds)
    with torch.no_grad():
        ref = PromptEncoderGraph(sam_tiny)(*(torch.from_numpy(v) for v in feeds.values()))
    assert_scaled_close(got["sparse_embeddings"], ref[0].numpy())
    assert_scaled_close(got["dense_embeddings"], ref[1].numpy())
    img = rng.normal(0, 1, (2, 3, 256, 256)).astype(np.float32)
    emb = bundle.runner("image_encoder").run({"image": img})["image_embeddings"]
    with torch.no_grad():
        ref_emb = sam_tiny.image_encoder(torch.from_numpy(img)).numpy()
    assert_scaled_close(emb, ref_emb, rel=1e-4)


def test_prompt_graph_matches_official_prompt_encoder(sam_tiny_official, sam_tiny):
    """The branch-free prompt graph equals the official encoder for points (+pad) and boxes."""
    import torch
    from edgefm.export.sam import PromptEncoderGraph

    coords = torch.tensor([[[10.0, 20.0], [100.0, 30.0]]])
    labels = torch.tensor([[1.0, 0.0]])
    box = torch.tensor([[5.0, 6.0, 200.0, 180.0]])
    graph = PromptEncoderGraph(sam_tiny)
    pe = sam_tiny_official.prompt_encoder
    with torch.no_grad():
        ref_sparse, ref_dense = pe(points=(coords, labels), boxes=box, masks=None)
        ours = graph(torch.cat([coords, box.reshape(1, 2, 2)], 1), torch.tensor([[1.0, 0.0, 2.0, 3.0]]),
                     torch.zeros(1, 1, 64, 64), torch.zeros(1))
        assert_scaled_close(ours[0].numpy(), ref_sparse.numpy())
        assert_scaled_close(ours[1].numpy(), ref_dense.numpy())
        ref_sparse, _ = pe(points=(coords, labels), boxes=None, masks=None)  # official pads with label -1
        ours = graph(torch.cat([coords, torch.zeros(1, 1, 2)], 1), torch.tensor([[1.0, 0.0, -1.0]]),
                     torch.zeros(1, 1, 64, 64), torch.zeros(1))
        assert_scaled_close(ours[0].numpy(), ref_sparse.numpy())


@pytest.mark.slow
def test_fp16_bundle_meets_policy(sam_tiny, tmp_path):
    from edgefm.export.sam import export_sam

    out = export_sam(sam_tiny, tmp_path / "fp16", "tiny", precision="fp16")
    manifest = json.loads((out / "manifest.json").read_text())
    assert {c["precision"] for c in manifest["components"]} == {"fp16"}
    for name in ("image_encoder", "prompt_encoder", "mask_decoder"):
        for out_name, m in manifest["parity"][name]["outputs"].items():
            assert m["cosine"] >= 0.999, (name, out_name)
    assert manifest["parity"]["mask_decoder"]["outputs"]["low_res_masks"]["mask_iou"] >= 0.99
    import onnx

    graph = onnx.load(str(out / "image_encoder.onnx")).graph
    kinds = {i.data_type for i in graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds  # weights really are half
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O stays fp32


def test_parity_gate_refuses_and_writes_nothing(sam_tiny, tmp_path, monkeypatch):
    from edgefm.export import sam as sam_export
    from edgefm.export.parity import POLICIES, Policy

    monkeypatch.setitem(POLICIES, "fp32", Policy(1.1, 1e-4, 0.999))  # an impossible cosine bound
    with pytest.raises(ParityError, match="image_encoder.*misses the parity policy.*Nothing was written"):
        sam_export.export_sam(sam_tiny, tmp_path / "refused", "tiny")
    assert list(tmp_path.iterdir()) == []  # no bundle, no temporary folder left behind
    out = sam_export.export_sam(sam_tiny, tmp_path / "ungated", "tiny", parity_gate=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["gate"] is False and not manifest["parity"]["image_encoder"]["passed"]


def test_corrupt_bundles_are_refused(sam_tiny_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(sam_tiny_bundle, bad)
    onnx_file = bad / "mask_decoder.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 2])
    with pytest.raises(BundleError, match="mask_decoder.onnx does not match the sha256"):
        Bundle(bad, backend="ort-cpu").runner("mask_decoder")
    with pytest.raises(BundleError, match="corrupt or truncated"):
        Bundle(bad, backend="ort-cpu", verify=False).runner("mask_decoder")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="schema_version 99 is not supported"):
        Bundle(bad)
    del manifest["family"]
    manifest["schema_version"] = 1
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="missing required field 'family'"):
        Bundle(bad)
    with pytest.raises(ManifestError, match="has no manifest.json"):
        Bundle(tmp_path)


def test_external_data_path_for_large_models(sam_tiny, tmp_path, monkeypatch):
    """ViT-H fp32 is over protobuf's 2 GB limit; the same path is exercised here with a lowered limit."""
    from edgefm.export import onnx as onnx_export
    from edgefm.export.sam import export_sam

    monkeypatch.setattr(onnx_export, "_TWO_GB", 1000)
    out = export_sam(sam_tiny, tmp_path / "ext", "tiny")
    manifest = json.loads((out / "manifest.json").read_text())
    enc = next(c for c in manifest["components"] if c["name"] == "image_encoder")
    assert list(enc["extra_files"]) == ["image_encoder.onnx.data"]
    assert (out / "image_encoder.onnx.data").stat().st_size > (out / "image_encoder.onnx").stat().st_size
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("image_encoder")) == [
        "image_encoder.onnx", "image_encoder.onnx.data"]  # one data file, not one per tensor
    assert manifest["parity"]["image_encoder"]["passed"]
    (out / "image_encoder.onnx.data").write_bytes(b"0" * 10)
    with pytest.raises(BundleError, match="image_encoder.onnx.data does not match the sha256"):
        Bundle(out, backend="ort-cpu").runner("image_encoder")
