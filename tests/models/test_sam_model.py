"""SAM port vs the official segment-anything package on the same random weights, and checkpoint loading.

The reference is wired with segment_anything.modeling classes from the same SamConfig numbers and
filled with ``load_state_dict(ours.state_dict(), strict=True)``, which also proves key/shape identity.
Tolerance: max abs diff <= 1e-5 * max(1, max|ref|).
"""

from __future__ import annotations

import dataclasses
import hashlib
from functools import partial

import pytest
import segment_anything.modeling as sam_ref
import torch
from edgefm.models.checkpoint import check_state_dict, load_strict, read_state_dict, sha256_file
from edgefm.models.sam import SAM_CONFIGS, Sam, SamConfig, build_sam, load_sam, sam_variant_hint
from edgefm.models.sam.image_encoder import add_decomposed_rel_pos, get_rel_pos, window_partition
from edgefm.runtime.errors import CheckpointError
from segment_anything import sam_model_registry
from torch import nn

TINY = SAM_CONFIGS["tiny"]
# 16 x 16 token grid with 5 x 5 windows: every windowed block pads the grid to 20 x 20
TINY_W5 = dataclasses.replace(TINY, window_size=5)
CONFIGS = {"tiny": TINY, "tiny_w5": TINY_W5}


def build_reference(cfg: SamConfig) -> sam_ref.Sam:
    """The official classes wired with ``cfg``'s numbers (as segment_anything.build_sam does)."""
    grid = cfg.image_embedding_size
    return sam_ref.Sam(
        image_encoder=sam_ref.ImageEncoderViT(
            depth=cfg.encoder_depth,
            embed_dim=cfg.encoder_embed_dim,
            img_size=cfg.image_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=cfg.encoder_num_heads,
            patch_size=cfg.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(cfg.encoder_global_attn_indexes),
            window_size=cfg.window_size,
            out_chans=cfg.prompt_embed_dim,
        ),
        prompt_encoder=sam_ref.PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=sam_ref.MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=sam_ref.TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_num_heads,
            ),
            transformer_dim=cfg.prompt_embed_dim,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=list(cfg.pixel_mean),
        pixel_std=list(cfg.pixel_std),
    ).eval()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter and persistent buffer with non-trivial seeded values (rel_pos, pos_embed,
    embeddings and the Fourier matrix included), so that any wiring difference changes the outputs.
    Weight matrices get std 1/sqrt(fan_in) so that activations and mask logits stay of order 1."""
    gen = torch.Generator().manual_seed(seed)
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for name, t in model.state_dict().items():
        noise = torch.randn(t.shape, generator=gen)
        if name.endswith("positional_encoding_gaussian_matrix"):
            t.copy_(noise)
        elif name in embeddings or name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
            t.copy_(0.5 * noise)
        elif t.ndim == 1 and name.endswith("weight"):
            t.copy_(1.0 + 0.1 * noise)  # LayerNorm gains near 1
        elif t.ndim >= 2:
            t.copy_(noise / t[0].numel() ** 0.5)
        else:
            t.copy_(0.1 * noise)  # biases
    return model


def make_pair(cfg: SamConfig, seed: int = 0) -> tuple[Sam, sam_ref.Sam]:
    ours = randomize_(build_sam(cfg), seed)
    ref = build_reference(cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs reference {tuple(ref.shape)}"
    tol = 1e-5 * max(1.0, ref.abs().max().item())
    diff = (out - ref).abs().max().item() if ref.numel() else 0.0
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:.3g}"


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny_pair(request) -> tuple[SamConfig, Sam, sam_ref.Sam]:
    cfg = CONFIGS[request.param]
    ours, ref = make_pair(cfg, seed=1)
    return cfg, ours, ref


def prompt_cases(cfg: SamConfig) -> dict[str, dict]:
    """Prompt sets for a batch of 3: points with every label (incl. pad -1), box, points + box, mask."""
    gen = torch.Generator().manual_seed(7)
    s, m = cfg.image_size, cfg.low_res_mask_size
    coords = torch.rand(3, 4, 2, generator=gen) * s
    labels = torch.tensor([[1, 0, -1, 1], [0, 0, 1, -1], [1, -1, -1, -1]])
    boxes = torch.sort(torch.rand(3, 2, 2, generator=gen) * s, dim=1).values.reshape(3, 4)
    masks = torch.randn(3, 1, m, m, generator=gen) * 3
    return {
        "points": {"points": (coords, labels), "boxes": None, "masks": None},
        "box": {"points": None, "boxes": boxes, "masks": None},
        "points_box": {"points": (coords, labels), "boxes": boxes, "masks": None},
        "points_mask": {"points": (coords, labels), "boxes": None, "masks": masks},
        "box_mask": {"points": None, "boxes": boxes, "masks": masks},
    }


@torch.no_grad()
def test_image_encoder_matches_reference(tiny_pair):
    cfg, ours, ref = tiny_pair
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(3))
    out = ours.image_encoder(x)
    g = cfg.image_embedding_size
    assert out.shape == (2, cfg.prompt_embed_dim, g, g)
    assert_close(out, ref.image_encoder(x), "image embeddings")


@torch.no_grad()
def test_prompt_encoder_matches_reference(tiny_pair):
    cfg, ours, ref = tiny_pair
    assert_close(ours.prompt_encoder.get_dense_pe(), ref.prompt_encoder.get_dense_pe(), "dense pe")
    for name, case in prompt_cases(cfg).items():
        sparse, dense = ours.prompt_encoder(**case)
        ref_sparse, ref_dense = ref.prompt_encoder(**case)
        assert_close(sparse, ref_sparse, f"{name}: sparse")
        assert_close(dense, ref_dense, f"{name}: dense")
    # the not-a-point token replaces the encoding entirely
    sparse, _ = ours.prompt_encoder(**prompt_cases(cfg)["points"])
    assert torch.equal(sparse[2, 1], ours.prompt_encoder.not_a_point_embed.weight[0])


@torch.no_grad()
def test_box_corner_labels_match_official_box_embedding(tiny_pair):
    """Labels 2/3 (box corners as points, the official ONNX convention) embed like the box prompt."""
    cfg, ours, ref = tiny_pair
    boxes = prompt_cases(cfg)["box"]["boxes"]
    corners = boxes.reshape(3, 2, 2)
    labels = torch.tensor([[2, 3]] * 3)
    sparse, _ = ours.prompt_encoder(points=(corners, labels), boxes=None, masks=None)
    ref_sparse, _ = ref.prompt_encoder(points=None, boxes=boxes, masks=None)
    assert_close(sparse[:, :2], ref_sparse, "box corners as points")


@pytest.mark.parametrize("multimask", [True, False])
@torch.no_grad()
def test_mask_decoder_matches_reference(tiny_pair, multimask):
    cfg, ours, ref = tiny_pair
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(5))
    embedding = ref.image_encoder(x)
    image_pe = ref.prompt_encoder.get_dense_pe()
    n_out = cfg.num_multimask_outputs if multimask else 1
    for name, case in prompt_cases(cfg).items():
        sparse, dense = ref.prompt_encoder(**case)
        masks, iou = ours.mask_decoder(embedding, image_pe, sparse, dense, multimask_output=multimask)
        ref_masks, ref_iou = ref.mask_decoder(embedding, image_pe, sparse, dense, multimask_output=multimask)
        m = cfg.low_res_mask_size
        assert masks.shape == (3, n_out, m, m) and iou.shape == (3, n_out)
        assert_close(masks, ref_masks, f"{name}: mask logits")
        assert_close(iou, ref_iou, f"{name}: iou predictions")


def test_sam_forward_matches_reference(tiny_pair):
    """End to end: preprocess (normalise + pad), encoder, prompts, decoder, postprocess to original size."""
    cfg, ours, ref = tiny_pair
    gen = torch.Generator().manual_seed(11)
    s = cfg.image_size
    image = torch.rand(3, s * 3 // 4, s, generator=gen) * 255  # resized landscape image, padded at the bottom
    case = prompt_cases(cfg)["points_box"]
    record = {
        "image": image,
        "original_size": (150, 200),
        "point_coords": case["points"][0],
        "point_labels": case["points"][1],
        "boxes": case["boxes"],
    }
    out, ref_out = ours([record], multimask_output=True)[0], ref([record], multimask_output=True)[0]
    assert_close(out["low_res_logits"], ref_out["low_res_logits"], "low-res logits")
    assert_close(out["iou_predictions"], ref_out["iou_predictions"], "iou predictions")
    assert out["masks"].shape == (3, 3, 150, 200)
    assert (out["masks"] != ref_out["masks"]).float().mean().item() < 1e-4


@pytest.mark.parametrize(("q_size", "k_size", "length"), [(5, 5, 9), (5, 7, 9), (7, 5, 13), (4, 4, 11)])
def test_get_rel_pos_and_decomposed_rel_pos_match_reference(q_size, k_size, length):
    """Includes the linear resize of the table (length != 2 * max(q, k) - 1) and q/k of different sizes."""
    gen = torch.Generator().manual_seed(13)
    table = torch.randn(length, 8, generator=gen)
    assert torch.equal(get_rel_pos(q_size, k_size, table), sam_ref.image_encoder.get_rel_pos(q_size, k_size, table))
    q = torch.randn(2, q_size * (q_size + 1), 8, generator=gen)
    attn = torch.randn(2, q_size * (q_size + 1), k_size * (k_size + 1), generator=gen)
    table_w = torch.randn(length + 2, 8, generator=gen)
    args = (attn, q, table, table_w, (q_size, q_size + 1), (k_size, k_size + 1))
    assert_close(add_decomposed_rel_pos(*args), sam_ref.image_encoder.add_decomposed_rel_pos(*args), "rel pos")


def test_window_partition_pads_like_reference():
    x = torch.randn(2, 16, 13, 8, generator=torch.Generator().manual_seed(17))
    windows, pad_hw = window_partition(x, 5)
    ref_windows, ref_pad_hw = sam_ref.image_encoder.window_partition(x, 5)
    assert pad_hw == ref_pad_hw == (20, 15)
    assert torch.equal(windows, ref_windows)


def test_config_numbers():
    assert (TINY.image_embedding_size, TINY.low_res_mask_size) == (16, 64)
    b = SAM_CONFIGS["vit_b"]
    assert (b.image_embedding_size, b.low_res_mask_size) == (64, 256)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.window_size = 7  # type: ignore[misc]


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_official_variants_have_identical_keys_and_shapes(variant):
    with torch.device("meta"):  # no memory used
        ours = build_sam(SAM_CONFIGS[variant]).state_dict()
        ref = sam_model_registry[variant]().state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert "pixel_mean" not in ours  # non-persistent, as in the official checkpoints


@pytest.mark.slow
@torch.no_grad()
def test_vit_b_matches_reference_at_1024():
    """The real vit_b at 1024 x 1024 against the official model, every component, full depth (windowed
    blocks with the 64 x 64 grid padded to 70 x 70, global blocks with 127-long rel-pos tables, the neck)."""
    ours = randomize_(build_sam(SAM_CONFIGS["vit_b"]), seed=2)
    ref = sam_model_registry["vit_b"]()
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert [blk.window_size for blk in ours.image_encoder.blocks[:3]] == [14, 14, 0]
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(19))
    with torch.inference_mode():
        embedding = ours.image_encoder(x)
        ref_embedding = ref.image_encoder(x)
    assert embedding.shape == (1, 256, 64, 64)
    assert_close(embedding, ref_embedding, "vit_b image embeddings")

    coords = torch.tensor([[[500.0, 375.0], [100.0, 900.0]]])
    case = {"points": (coords, torch.tensor([[1, 0]])), "boxes": torch.tensor([[50.0, 80.0, 700.0, 640.0]])}
    sparse, dense = ours.prompt_encoder(**case, masks=None)
    ref_sparse, ref_dense = ref.prompt_encoder(**case, masks=None)
    assert_close(sparse, ref_sparse, "vit_b sparse")
    assert_close(dense, ref_dense, "vit_b dense")
    pe = ref.prompt_encoder.get_dense_pe()
    masks, iou = ours.mask_decoder(ref_embedding, pe, ref_sparse, ref_dense, multimask_output=True)
    ref_masks, ref_iou = ref.mask_decoder(ref_embedding, pe, ref_sparse, ref_dense, multimask_output=True)
    assert masks.shape == (1, 3, 256, 256)
    assert_close(masks, ref_masks, "vit_b mask logits")
    assert_close(iou, ref_iou, "vit_b iou")


# --- checkpoint loading --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> Sam:
    return randomize_(build_sam(TINY), seed=3)


@pytest.fixture(scope="module")
def tiny_pth(tiny_model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(tiny_model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped"])
@torch.no_grad()
def test_load_sam_gives_identical_outputs(tiny_model, tmp_path, fmt):
    path = tmp_path / f"sam_tiny.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    state = tiny_model.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"model": state, "epoch": 3} if fmt == "wrapped" else state, path)
    loaded = load_sam(path, "tiny")
    assert not loaded.training
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(23))
    assert torch.equal(loaded.image_encoder(x), tiny_model.image_encoder(x))
    case = prompt_cases(TINY)["points_mask"]
    for a, b in zip(loaded.prompt_encoder(**case), tiny_model.prompt_encoder(**case), strict=True):
        assert torch.equal(a, b)
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_checkpoint_as_vit_b_suggests_tiny(tiny_pth):
    with pytest.raises(CheckpointError) as err:
        load_sam(tiny_pth, "vit_b")
    msg = str(err.value)
    assert tiny_pth in msg
    assert "image_encoder.pos_embed: checkpoint (1, 16, 16, 64) vs model (1, 64, 64, 768)" in msg
    assert "this looks like a tiny checkpoint; pass --variant tiny" in msg.lower()


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_official_checkpoint_as_tiny_suggests_its_variant(variant):
    with torch.device("meta"):  # shapes only: an official-sized state dict without allocating it
        state = build_sam(SAM_CONFIGS[variant]).state_dict()
        model = build_sam(TINY)
    with pytest.raises(CheckpointError) as err:
        check_state_dict(model, state, source=f"sam_{variant}.pth", hint=sam_variant_hint(TINY))
    msg = str(err.value)
    assert f"sam_{variant}.pth" in msg and f"pass --variant {variant}" in msg
    assert "keys are not in the model" in msg and "more" in msg  # long lists are truncated with a count


def test_missing_and_unexpected_keys_are_listed(tiny_model, tmp_path):
    state = dict(tiny_model.state_dict())
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_sam(path, "tiny")
    msg = str(err.value)
    assert str(path) in msg
    assert "1 keys of the model are missing (mask_decoder.iou_token.weight)" in msg
    assert "1 keys are not in the model (mask_decoder.extra_head.weight)" in msg
    assert "pass --variant" not in msg  # the encoder is tiny-shaped: no other variant to suggest


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_raises_checkpoint_error(tiny_pth, tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(read_state_dict(tiny_pth), str(path))
    else:
        path.write_bytes(open(tiny_pth, "rb").read())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        read_state_dict(path)
    assert str(path) in str(err.value)


def test_missing_file_unknown_variant_and_pickled_objects(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_sam(tmp_path / "nope.pth", "tiny")
    with pytest.raises(CheckpointError, match="Known variants: vit_b, vit_l, vit_h, tiny"):
        load_sam(tmp_path / "nope.pth", "vit_x")
    pickled = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), pickled)  # a whole pickled module, not a state dict
    with pytest.raises(CheckpointError, match="pickled Python objects other than tensors"):
        read_state_dict(pickled)


def test_load_strict_reports_shape_before_loading():
    model = nn.Linear(4, 3)
    before = model.weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"weight: checkpoint \(3, 5\) vs model \(3, 4\)"):
        load_strict(model, {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}, source="lin.pth")
    assert torch.equal(model.weight, before)
    load_strict(model, {"weight": torch.ones(3, 4), "bias": torch.zeros(3)}, source="lin.pth")
    assert torch.equal(model.weight, torch.ones(3, 4))
