"""edgefm's SamPredictor (exported ONNX, OpenCV pre/post) against segment-anything's SamPredictor (PyTorch)
on the same random weights, on non-square images, for every prompt kind."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_scaled_close, scene
from edgefm.runtime.errors import InputError


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _prompts(h: int, w: int) -> dict[str, dict]:
    pt, neg = [w * 0.4, h * 0.5], [w * 0.7, h * 0.3]
    box = np.array([w * 0.2, h * 0.2, w * 0.6, h * 0.7])
    return {
        "one_point": dict(point_coords=np.array([pt]), point_labels=np.array([1])),
        "point_and_negative": dict(point_coords=np.array([pt, neg]), point_labels=np.array([1, 0])),
        "box": dict(box=box),
        "box_and_point": dict(box=box, point_coords=np.array([pt]), point_labels=np.array([1])),
    }


@pytest.fixture(scope="module")
def predictors(sam_tiny_bundle, sam_tiny_official):
    from edgefm.runtime.sam import SamPredictor
    from segment_anything import SamPredictor as OfficialPredictor

    return SamPredictor(sam_tiny_bundle, backend="ort-cpu"), OfficialPredictor(sam_tiny_official)


@pytest.mark.parametrize("size", [(480, 640), (1500, 2250)])
def test_predict_matches_official(predictors, size):
    ours, ref = predictors
    h, w = size
    img = scene(h, w, seed=1)
    ours.set_image(img)
    ref.set_image(img)
    assert ours.original_size == ref.original_size and ours.input_size == ref.input_size
    # PIL-exact resizing: the encoder sees the official pixels, so embeddings agree to fp32 export noise.
    assert_scaled_close(ours.features, ref.features.numpy(), rel=1e-4, what="image embeddings")
    for name, prompt in _prompts(h, w).items():
        for multimask in (True, False):
            m1, s1, low1 = ours.predict(multimask_output=multimask, **prompt)
            m2, s2, low2 = ref.predict(multimask_output=multimask, **prompt)
            assert m1.shape == m2.shape == ((3 if multimask else 1), h, w), name
            assert m1.dtype == np.bool_
            # Random weights still give masks that are neither empty nor full: the comparison means something.
            assert 0.02 < m2.mean() < 0.98, name
            for a, b in zip(m1, m2):
                assert _iou(a, b) >= 0.99, (name, multimask)
            np.testing.assert_allclose(s1, s2, atol=1e-3, err_msg=name)
        # A second pass with the previous low-res logits as the mask prompt.
        _, s1, low1 = ours.predict(multimask_output=False, **prompt)
        m1, s1b, _ = ours.predict(mask_input=low1, multimask_output=False, **prompt)
        _, _, low2 = ref.predict(multimask_output=False, **prompt)
        m2, s2b, _ = ref.predict(mask_input=low2, multimask_output=False, **prompt)
        assert _iou(m1[0], m2[0]) >= 0.99, name
        np.testing.assert_allclose(s1b, s2b, atol=1e-3)


def test_logits_and_batch(predictors):
    ours, ref = predictors
    img = scene(300, 200, seed=2)
    ours.set_image(img)
    ref.set_image(img)
    pts = np.array([[[50.0, 60.0]], [[120.0, 200.0]], [[150.0, 30.0]]])
    masks, iou, low = ours.predict_batch(pts, np.ones((3, 1)), return_logits=True)
    assert masks.dtype == np.float32 and masks.shape == (3, 3, 300, 200) and low.shape == (3, 3, 64, 64)
    for i in range(3):  # one batched decoder call == three single calls (ours exactly, official's scores)
        m, s, lo = ours.predict(pts[i], np.ones(1), return_logits=True)
        assert_scaled_close(masks[i], m, what="batched masks")
        assert_scaled_close(low[i], lo, what="batched low-res logits")
        _, s_ref, _ = ref.predict(pts[i], np.ones(1), return_logits=True)
        np.testing.assert_allclose(iou[i], s_ref, atol=1e-3)


def test_bad_prompts_have_clear_messages(predictors):
    ours, _ = predictors
    ours.reset_image()
    with pytest.raises(InputError, match="call set_image"):
        ours.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))
    ours.set_image(scene(100, 150))
    with pytest.raises(InputError, match=r"point \(151, 20\) is outside the image of size W=150, H=100"):
        ours.predict(point_coords=np.array([[151, 20]]), point_labels=np.array([1]))
    with pytest.raises(InputError, match="no prompt given"):
        ours.predict()
    with pytest.raises(InputError, match="point_labels must be given"):
        ours.predict(point_coords=np.array([[10, 10]]))
    with pytest.raises(InputError, match="XYXY"):
        ours.predict(box=np.array([50, 50, 10, 10]))
    with pytest.raises(InputError, match="mask_input must have shape"):
        ours.predict(box=np.array([1, 1, 50, 50]), mask_input=np.zeros((256, 256)))
    with pytest.raises(InputError, match="must be uint8"):
        ours.set_image(np.zeros((10, 10, 3), np.float32))


@pytest.mark.parametrize("hw", [(576, 1024), (1024, 683), (1024, 1024), (37, 64)])
def test_normalize_and_pad_is_the_per_pixel_formula_bit_for_bit(hw):
    from edgefm.runtime.sam.transforms import normalize_and_pad

    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    image = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    image[0, 0] = (0, 255, 128)  # both ends of the table
    got = normalize_and_pad(image, 1024, mean, std)
    want = np.zeros((1, 3, 1024, 1024), np.float32)
    want[0, :, : hw[0], : hw[1]] = ((image.astype(np.float32) - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)
    assert got.dtype == np.float32 and np.array_equal(got, want)


def test_masks_are_the_thresholded_logits_and_outlive_later_calls(predictors):
    """Boolean masks come from logits upscaled into a buffer reused between calls: never the buffer itself."""
    ours, _ = predictors
    ours.set_image(scene(300, 420, seed=6))
    prompts = _prompts(300, 420)
    masks, _, _ = ours.predict(**prompts["one_point"])
    kept = masks.copy()
    ours.predict(**prompts["box"])
    np.testing.assert_array_equal(masks, kept)
    logits, _, _ = ours.predict(**prompts["one_point"], return_logits=True)
    np.testing.assert_array_equal(logits > ours.mask_threshold, masks)
    kept = logits.copy()
    ours.predict(**prompts["box"])  # logits asked for are the caller's own: a later call leaves them alone
    np.testing.assert_array_equal(logits, kept)


def test_mask_input_components_open_at_the_first_mask_input(sam_tiny_bundle, predictors):
    """Clicks run the prompt decoder; the prompt encoder + mask decoder load only for a mask-input prompt."""
    from edgefm.runtime.sam import SamPredictor

    lazy, (_, official) = SamPredictor(sam_tiny_bundle, backend="ort-cpu"), predictors
    img = scene(300, 420, seed=5)
    lazy.set_image(img)
    official.set_image(img)
    click = _prompts(300, 420)["one_point"]
    _, scores, low_res = lazy.predict(**click)
    assert not {"prompt_encoder", "mask_decoder"} & set(lazy.bundle._runners)
    refine = dict(click, mask_input=low_res[np.argmax(scores)][None], multimask_output=False)
    masks, _, _ = lazy.predict(**refine)
    assert {"prompt_encoder", "mask_decoder"} <= set(lazy.bundle._runners)
    want, _, _ = official.predict(**refine)
    assert _iou(masks[0], want[0]) > 0.99


def test_embedding_from_elsewhere(sam_tiny_bundle, tmp_path):
    """The split deployment: a server encodes, an edge box without the encoder file only prompts."""
    import shutil

    from edgefm.runtime.errors import BundleError
    from edgefm.runtime.manifest import read_manifest
    from edgefm.runtime.sam import SamPredictor

    edge_dir = shutil.copytree(sam_tiny_bundle, tmp_path / "edge")
    encoders = [c for c in read_manifest(edge_dir).components if c.name == "image_encoder"]
    for c in encoders:
        for f in (c.file, *c.extra_files):
            (edge_dir / f).unlink()
    with pytest.raises(BundleError, match=f"{encoders[0].file} is missing from the bundle"):
        SamPredictor(edge_dir, backend="ort-cpu")  # by default the encoder opens now: a missing file fails here
    server = SamPredictor(sam_tiny_bundle, backend="ort-cpu")
    edge = SamPredictor(edge_dir, backend="ort-cpu", load_encoder=False)
    img = scene(300, 420, seed=4)
    server.set_image(img)
    edge.set_image_embedding(server.get_image_embedding()[0], img.shape[:2])  # (C, E, E) is taken too
    assert (edge.original_size, edge.input_size) == (server.original_size, server.input_size)
    prompt = _prompts(300, 420)["box_and_point"]
    for a, b in zip(server.predict(**prompt), edge.predict(**prompt)):
        np.testing.assert_array_equal(a, b)
    assert "image_encoder" not in edge.bundle._runners  # never opened
    with pytest.raises(BundleError, match=f"{encoders[0].file} is missing from the bundle"):
        edge.set_image(img)
    with pytest.raises(InputError, match=r"embedding has shape \(1, 8, 8\), but this bundle's mask decoder takes"):
        edge.set_image_embedding(np.zeros((1, 8, 8)), (300, 420))
    with pytest.raises(InputError, match="original_size must be the image's \\(H, W\\)"):
        edge.set_image_embedding(server.get_image_embedding(), (300, 0))
