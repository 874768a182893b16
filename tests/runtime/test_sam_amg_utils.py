"""edgefm.runtime.sam.amg_utils (numpy) against segment_anything.utils.amg (torch) on random inputs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ref = pytest.importorskip("segment_anything.utils.amg")
tv_ops = pytest.importorskip("torchvision.ops")

from edgefm.runtime.sam import amg_utils as ours  # noqa: E402


def random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Blobby masks (thresholded smooth noise) with some empty and some full ones, plus edge pixels set."""
    masks = np.zeros((n, h, w), bool)
    ys, xs = np.mgrid[0:h, 0:w]
    for i in range(n):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1, max(h, w) / 2)
        masks[i] = (xs - cx) ** 2 + ((ys - cy) * rng.uniform(0.5, 2)) ** 2 < r**2
        masks[i] ^= rng.random((h, w)) < 0.02  # speckle: holes, islands, isolated pixels
    masks[0] = False
    masks[1] = True
    masks[2, 0, 0] = True  # a run starting at the first pixel in Fortran order
    return masks


@pytest.mark.parametrize("n,layers,scale", [(1, 0, 1), (7, 0, 1), (32, 2, 2), (27, 2, 3)])
def test_point_grids_identical(n: int, layers: int, scale: int) -> None:
    np.testing.assert_array_equal(ours.build_point_grid(n), ref.build_point_grid(n))
    mine, theirs = (
        ours.build_all_layer_point_grids(n, layers, scale),
        ref.build_all_layer_point_grids(n, layers, scale),
    )
    assert len(mine) == len(theirs) == layers + 1
    for a, b in zip(mine, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size", [(200, 300), (1500, 2250), (1024, 1024), (37, 501)])
@pytest.mark.parametrize("layers,ratio", [(0, 512 / 1500), (1, 512 / 1500), (3, 0.25)])
def test_crop_boxes_identical(size: tuple[int, int], layers: int, ratio: float) -> None:
    assert ours.generate_crop_boxes(size, layers, ratio) == ref.generate_crop_boxes(size, layers, ratio)


def test_stability_score_matches() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((2, 5, 40, 60)) * 3).astype(np.float32)
    logits[0, 0] = -5.0  # all below both cutoffs: 0/0
    mine = ours.calculate_stability_score(logits, 0.0, 1.0)
    theirs = ref.calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
    assert mine.dtype == theirs.dtype == np.float32 and mine.shape == (2, 5)
    np.testing.assert_array_equal(mine, theirs)  # both count exactly, then one float32 division
    assert np.isnan(mine[0, 0])


@pytest.mark.parametrize("shape", [(23, 31, 47), (2, 3, 16, 9), (19, 28)])
def test_batched_mask_to_box_identical(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    masks = rng.random(shape) < 0.002
    masks.reshape(-1, *shape[-2:])[0] = False
    mine = ours.batched_mask_to_box(masks)
    theirs = ref.batched_mask_to_box(torch.from_numpy(masks)).numpy()
    assert mine.dtype == np.int64 and mine.shape == (*shape[:-2], 4)
    np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(ours.batched_mask_to_box(masks[..., :0, :]), np.zeros((*shape[:-2], 4)))


def test_edge_filter_and_uncrop_identical() -> None:
    rng = np.random.default_rng(2)
    crop, orig = [100, 50, 400, 300], [0, 0, 420, 300]
    x0y0 = rng.integers(0, 250, (500, 2))
    boxes = np.concatenate([x0y0, x0y0 + rng.integers(0, 60, (500, 2))], axis=1)  # crop frame, int64
    t_boxes = torch.from_numpy(boxes)
    np.testing.assert_array_equal(
        ours.is_box_near_crop_edge(boxes, crop, orig), ref.is_box_near_crop_edge(t_boxes, crop, orig).numpy()
    )
    np.testing.assert_array_equal(ours.uncrop_boxes_xyxy(boxes, crop), ref.uncrop_boxes_xyxy(t_boxes, crop))
    np.testing.assert_array_equal(
        ours.uncrop_boxes_xyxy(boxes[None], crop), ref.uncrop_boxes_xyxy(t_boxes[None], crop)
    )
    points = rng.uniform(0, 300, (64, 2))
    np.testing.assert_array_equal(
        ours.uncrop_points(points, crop), ref.uncrop_points(torch.from_numpy(points), crop)
    )
    for box in boxes[:20]:
        np.testing.assert_array_equal(ours.box_xyxy_to_xywh(box), ref.box_xyxy_to_xywh(torch.from_numpy(box)))
    masks = rng.random((3, 250, 300)) < 0.5
    for cb in (crop, [0, 0, 300, 250]):
        oh, ow = (300, 420) if cb is crop else (250, 300)
        mine = ours.uncrop_masks(masks, cb, oh, ow)
        np.testing.assert_array_equal(mine, ref.uncrop_masks(torch.from_numpy(masks), cb, oh, ow).numpy())


def test_rle_round_trip_identical() -> None:
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 12, 45, 67)
    mine = ours.mask_to_rle(masks)
    theirs = ref.mask_to_rle_pytorch(torch.from_numpy(masks))
    assert mine == theirs  # same sizes and counts, including the leading 0 of masks starting with a 1
    assert all(type(c) is int for c in mine[3]["counts"])
    for rle, mask in zip(mine, masks, strict=True):
        np.testing.assert_array_equal(ours.rle_to_mask(rle), ref.rle_to_mask(rle))
        np.testing.assert_array_equal(ours.rle_to_mask(rle), mask)
        assert ours.area_from_rle(rle) == ref.area_from_rle(rle) == int(mask.sum())
    assert ours.mask_to_rle(masks[:0]) == []


@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("area", [1, 10, 60, 10_000])
def test_remove_small_regions_identical(mode: str, area: int) -> None:
    rng = np.random.default_rng(4)
    for mask in random_masks(rng, 8, 60, 80):
        mine, changed = ours.remove_small_regions(mask, area, mode)
        theirs, ref_changed = ref.remove_small_regions(mask, area, mode)
        assert changed == ref_changed
        np.testing.assert_array_equal(mine, theirs)


def random_boxes(rng: np.random.Generator, n: int, integer: bool) -> np.ndarray:
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(0, 80, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    return np.round(boxes) if integer else boxes


@pytest.mark.parametrize("n", [0, 1, 50, 600, 1500])
@pytest.mark.parametrize("thresh", [0.3, 0.7])
@pytest.mark.parametrize("integer", [False, True])
def test_nms_matches_torchvision(n: int, thresh: float, integer: bool) -> None:
    rng = np.random.default_rng(n)
    boxes = random_boxes(rng, n, integer).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32) / max(n, 1)  # distinct scores
    mine = ours.nms(boxes, scores, thresh)
    t_boxes, t_scores = torch.from_numpy(boxes), torch.from_numpy(scores)
    theirs = tv_ops.batched_nms(t_boxes, t_scores, torch.zeros(n), thresh).numpy()
    np.testing.assert_array_equal(mine, theirs)  # same kept indices, in the same (score) order
    assert mine.dtype == np.int64
    if n >= 600:
        assert 0 < len(mine) < n  # the case exercises suppression


@pytest.mark.parametrize("n", [100, 800])
def test_nms_ties_follow_index_order(n: int) -> None:
    """Tied scores (the AMG's crop-area and changed/unchanged scores) are visited in index order, as
    torchvision.ops.nms does; keep sets and order both equal."""
    rng = np.random.default_rng(5)
    boxes = random_boxes(rng, n, True).astype(np.float32)
    scores = rng.integers(0, 3, n).astype(np.float32)
    np.testing.assert_array_equal(
        ours.nms(boxes, scores, 0.5),
        tv_ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy(),
    )
