"""CLIP export: ORT vs PyTorch parity per component (fp32, fp16), dynamic batch and token length, manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
from clip_fixtures import tiny_bundle, tiny_pair  # noqa: E402
from edgefm.runtime.bundle import Bundle  # noqa: E402
from edgefm.runtime.clip.tokenizer import ClipTokenizer  # noqa: E402

PROMPTS = ["a photo of a cat", "", "A DIAGRAM of the Eiffel tower, 1889 &amp; today!", "word " * 100]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def assert_fp32_parity(got: np.ndarray, ref: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= 1e-5 * scale, f"max abs {err:.3g} > 1e-5 * {scale:.3g}"
    assert cosine(got, ref).min() >= 0.99999


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_fp32_parity_dynamic_batch_and_length(name):
    model, _ = tiny_pair(name)
    bundle = Bundle(tiny_bundle(name), backend="ort-cpu")
    s = model.config.image_size
    for batch in (1, 3):  # traced at 2: both other sizes must run
        images = np.random.default_rng(batch).normal(0, 1, (batch, 3, s, s)).astype(np.float32)
        got = bundle.runner("image_encoder").run({"image": images})["image_embeds"]
        with torch.no_grad():
            ref = model.encode_image(torch.from_numpy(images)).numpy()
        assert_fp32_parity(got, ref)
    tokens = ClipTokenizer()(PROMPTS)
    with torch.no_grad():
        ref = model.encode_text(torch.from_numpy(tokens)).numpy()
    text = bundle.runner("text_encoder")
    assert_fp32_parity(text.run({"tokens": tokens})["text_embeds"], ref)  # L = 77
    short = tokens[:2, :5]  # "a photo of a cat" is 7 tokens: a 5-token prefix of both rows at L = 5
    with torch.no_grad():
        ref_short = model.encode_text(torch.from_numpy(short)).numpy()
    assert_fp32_parity(text.run({"tokens": short})["text_embeds"], ref_short)
    assert text.run({"tokens": tokens[:1, :1]})["text_embeds"].shape == (1, model.config.embed_dim)


def test_manifest_records_config_preprocess_and_parity():
    model, _ = tiny_pair("tiny-vit")
    path = tiny_bundle("tiny-vit")
    manifest = json.loads((path / "manifest.json").read_text())
    cfg = manifest["config"]
    assert manifest["family"] == "clip" and manifest["variant"] == "tiny-vit"
    assert cfg["embed_dim"] == 64 and cfg["context_length"] == 77 and cfg["quick_gelu"] is True
    assert cfg["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)
    assert (path / cfg["tokenizer"]).is_file()
    pre = manifest["preprocess"]
    assert pre["image_size"] == 224 and pre["resize"] == "bicubic_antialias" and pre["crop"] == "center"
    assert pre["mean"] == pytest.approx(list(model.config.mean))
    for comp in ("image_encoder", "text_encoder"):
        assert manifest["parity"][comp]["passed"]
        assert manifest["parity"][comp]["outputs"][comp.replace("encoder", "embeds")]["cosine"] >= 0.99999


def test_export_from_checkpoint_records_sha256(tmp_path):
    from edgefm.export.clip import export_clip
    from edgefm.models.checkpoint import sha256_file
    from safetensors.torch import save_file

    model, _ = tiny_pair("tiny-rn")
    ckpt = tmp_path / "tiny_rn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    out = export_clip(ckpt, tmp_path / "bundle", quick_gelu=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == sha256_file(ckpt)
    assert manifest["config"]["quick_gelu"] is False
    assert "argument quick_gelu=False" in manifest["config"]["quick_gelu_source"]


@pytest.mark.slow
def test_fp16_cosine():
    model, _ = tiny_pair("tiny-vit")
    bundle = Bundle(tiny_bundle("tiny-vit", "fp16"), backend="ort-cpu")
    assert {c.precision for c in bundle.manifest.components} == {"fp16"}
    images = np.random.default_rng(0).normal(0, 1, (2, 3, 224, 224)).astype(np.float32)
    tokens = ClipTokenizer()(PROMPTS)[:, :20]
    with torch.no_grad():
        ref_i = model.encode_image(torch.from_numpy(images)).numpy()
        ref_t = model.encode_text(torch.from_numpy(tokens)).numpy()
    got_i = bundle.runner("image_encoder").run({"image": images})["image_embeds"]
    got_t = bundle.runner("text_encoder").run({"tokens": tokens})["text_embeds"]
    assert cosine(got_i, ref_i).min() >= 0.999
    assert cosine(got_t, ref_t).min() >= 0.999
