"""CLIP model and loader vs open_clip on the same random weights; OpenAI-style archives; bad checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import warnings
import zipfile

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from clip_fixtures import randomize_all_, reference_for  # noqa: E402
from edgefm.models.clip import (  # noqa: E402
    CLIP,
    CLIP_CONFIGS,
    build_clip,
    clip_from_state_dict,
    config_from_state_dict,
    load_clip,
    read_torchscript_weights,
)
from edgefm.runtime.errors import CheckpointError  # noqa: E402

PROMPTS = [
    "a photo of a cat",
    "",
    "A DIAGRAM of the Eiffel tower at night, 1889 &amp; today!",
    "word " * 100,  # truncated to 77 tokens, end token kept
]


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> float:
    err = (ours - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= 1e-5 * scale, f"max abs {err:.3g} > 1e-5 * {scale:.3g}"
    return err


def features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.mark.parametrize("name,quick_gelu", [("tiny-vit", True), ("tiny-vit", False), ("tiny-rn", False)])
def test_same_features_as_open_clip(name, quick_gelu):
    torch.manual_seed(0)
    config = dataclasses.replace(CLIP_CONFIGS[name], quick_gelu=quick_gelu)
    ref = randomize_all_(reference_for(config, quick_gelu), seed=1, logit_scale=True)
    ours = build_clip(config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    images = torch.randn(3, 3, config.image_size, config.image_size)
    tokens = open_clip.tokenize(PROMPTS)
    (img_ref, txt_ref), (img, txt) = features(ref, images, tokens), features(ours, images, tokens)
    assert_close(img, img_ref)
    assert_close(txt, txt_ref)
    # forward gives OpenAI's logits
    with torch.no_grad():
        per_image, per_text = ours(images, tokens)
        i, t = ref(images, tokens)[:2]
        assert_close(per_image, ref.logit_scale.exp() * i @ t.T)
        assert torch.equal(per_text, per_image.T)
        # Under the causal mask the end-token feature ignores later positions: 77 -> longest prompt.
        longest = int((tokens != 0).sum(dim=1).max())
        assert_close(ours.encode_text(tokens[:, :longest]), txt_ref)


def test_config_inferred_from_shapes_for_every_named_config():
    for name, config in CLIP_CONFIGS.items():
        with torch.device("meta"):  # shapes without allocating ViT-L
            sd = CLIP(config).state_dict()
        assert config_from_state_dict(sd) == config, name


def test_eot_pooling_picks_the_largest_id():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    text = torch.tensor([[49406, 7, 49407, 0, 0], [49406, 1, 2, 3, 49407]])
    assert torch.equal(CLIP.pool_eot(x, text), torch.stack([x[0, 2], x[1, 4]]))


@pytest.mark.slow
@pytest.mark.parametrize("open_clip_name,config_name", [("ViT-B-32-quickgelu", "ViT-B/32"), ("RN50", "RN50")])
def test_full_size_same_features_as_open_clip(open_clip_name, config_name):
    torch.manual_seed(0)
    ref = open_clip.create_model(open_clip_name, pretrained=None).eval()
    if config_name == "RN50":  # BN stats and zero-initialized bn3 would hide mistakes in the blocks
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, t in ref.visual.state_dict().items():
                if "bn" in name or "downsample.1" in name:
                    if name.endswith(("running_var", "weight")):
                        t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                    elif t.is_floating_point():
                        t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    quick_gelu = open_clip_name.endswith("quickgelu")
    ours, config = clip_from_state_dict(ref.state_dict(), quick_gelu=quick_gelu, source=open_clip_name)
    assert dataclasses.replace(CLIP_CONFIGS[config_name], quick_gelu=quick_gelu) == config
    images = torch.randn(1, 3, 224, 224)
    tokens = open_clip.tokenize(PROMPTS[:2])
    (img_ref, txt_ref), (img, txt) = features(ref, images, tokens), features(ours, images, tokens)
    assert_close(img, img_ref)
    assert_close(txt, txt_ref)


def openai_style_archive(name: str, path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Trace open_clip's model into an archive shaped like OpenAI's: same parameter names under the root,
    fp16 weights where OpenAI's are, metadata buffers. Returns the reference (with the fp16-rounded
    weights) and example inputs."""
    config = CLIP_CONFIGS[name]
    ref = randomize_all_(reference_for(config, quick_gelu=True), seed=3, logit_scale=True)
    for key, value in (
        ("input_resolution", config.image_size),
        ("context_length", 77),
        ("vocab_size", 49408),
    ):
        if hasattr(ref, key):
            delattr(ref, key)
        ref.register_buffer(key, torch.tensor(value))
    half = copy.deepcopy(ref)
    open_clip.model.convert_weights_to_lp(half)  # OpenAI's archives store conv/linear/proj weights in fp16
    rounded = copy.deepcopy(ref)
    rounded.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in half.state_dict().items()}
    )
    images = torch.randn(2, 3, config.image_size, config.image_size)
    tokens = open_clip.tokenize(PROMPTS)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(
            ref, dict(encode_image=(images,), encode_text=(tokens,)), check_trace=False
        )
    half_sd = half.state_dict()
    for key, param in traced.named_parameters():
        if half_sd[key].dtype == torch.float16:
            param.data = half_sd[key]
    traced.save(str(path))
    return rounded, images, tokens


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load, used only to list the expected keys
@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_openai_torchscript_archive_loads_without_running_it(name, tmp_path, monkeypatch):
    path = tmp_path / f"{name}.pt"
    ref, images, tokens = openai_style_archive(name, path)
    expected_keys = set(torch.jit.load(str(path)).state_dict())

    def forbidden(*args, **kwargs):
        raise AssertionError("the loader must not run TorchScript")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    assert set(read_torchscript_weights(path)) == expected_keys
    model, config, info = load_clip(path)
    assert info["format"] == "openai-torchscript" and info["variant"] == name
    assert info["quick_gelu"] is True and config.quick_gelu
    assert "float16" in info["stored_dtypes"]
    assert info["dropped_keys"] == ["attn_mask", "context_length", "input_resolution", "vocab_size"]
    (img_ref, txt_ref), (img, txt) = features(ref, images, tokens), features(model, images, tokens)
    assert_close(img, img_ref)
    assert_close(txt, txt_ref)


def test_archive_with_foreign_globals_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    good = tmp_path / "good.pt"
    openai_style_archive("tiny-vit", good)
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for entry in src.namelist():
            data = pickle.dumps(Payload(), protocol=2) if entry.endswith("/data.pkl") else src.read(entry)
            dst.writestr(entry, data)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*system.*only reads weights"):
        load_clip(evil)


@pytest.fixture(scope="module")
def tiny_state_dict():
    torch.manual_seed(0)
    ref = randomize_all_(reference_for(CLIP_CONFIGS["tiny-vit"], quick_gelu=False), seed=4, logit_scale=True)
    return ref.state_dict()


def test_open_clip_files_and_quick_gelu_decision(tiny_state_dict, tmp_path):
    from safetensors.torch import save_file

    images = torch.randn(1, 3, 224, 224)
    tokens = open_clip.tokenize(PROMPTS[:1])
    expected = features(clip_from_state_dict(tiny_state_dict, quick_gelu=False)[0], images, tokens)

    save_file(tiny_state_dict, tmp_path / "open_clip_model.safetensors")
    model, _, info = load_clip(tmp_path / "open_clip_model.safetensors")
    assert (info["format"], info["quick_gelu"]) == ("safetensors", False)
    assert "default" in info["quick_gelu_source"]
    for ours, ref in zip(features(model, images, tokens), expected, strict=True):
        assert torch.equal(ours, ref)

    # A training checkpoint: nested under "state_dict", DDP "module." prefixes, text tower under "text."
    nested = {
        "epoch": 3,
        "state_dict": {
            f"module.{k}": v
            for k, v in open_clip.model.convert_to_custom_text_state_dict(tiny_state_dict).items()
        },
    }
    torch.save(nested, tmp_path / "epoch_3-ViT-B-32-quickgelu.pt")
    model, _, info = load_clip(tmp_path / "epoch_3-ViT-B-32-quickgelu.pt")
    assert (info["format"], info["quick_gelu"]) == ("state-dict", True)
    assert "quickgelu" in info["quick_gelu_source"]
    model, _, info = load_clip(tmp_path / "epoch_3-ViT-B-32-quickgelu.pt", quick_gelu=False)
    assert info["quick_gelu"] is False and "argument" in info["quick_gelu_source"]
    for ours, ref in zip(features(model, images, tokens), expected, strict=True):
        assert torch.equal(ours, ref)


def test_missing_unexpected_and_misshapen_keys_are_named(tiny_state_dict, tmp_path):
    sd = dict(tiny_state_dict)
    del sd["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    sd["visual.ln_post.weight"] = torch.ones(7)
    sd["logit_bias"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as err:
        load_clip(tmp_path / "broken.pt")
    message = str(err.value)
    assert "broken.pt" in message
    assert "visual.transformer.resblocks.1.mlp.c_fc.bias" in message  # missing
    assert "visual.ln_post.weight: checkpoint (7) vs model (128)" in message  # shape
    assert "logit_bias" in message  # unexpected


def test_batchnorm_counters_may_be_absent():
    sd = randomize_all_(reference_for(CLIP_CONFIGS["tiny-rn"], quick_gelu=False), seed=5, logit_scale=True).state_dict()
    kept = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(kept) < len(sd)
    model, _ = clip_from_state_dict(kept, quick_gelu=False)
    assert set(model.state_dict()) == set(sd)


def test_not_a_clip_checkpoint_and_corrupt_files(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "sam.pth")
    with pytest.raises(CheckpointError, match=r"sam\.pth.*not a CLIP checkpoint.*encoder\.weight"):
        load_clip(tmp_path / "sam.pth")
    good = tmp_path / "tiny.pt"
    openai_style_archive("tiny-rn", good)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt.*corrupt"):
        load_clip(tmp_path / "truncated.pt")
