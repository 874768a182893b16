"""The training loops run, resume and are deterministic (a few steps each), and their losses are the papers'."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from edgefm.models.train import clip as train_clip
from edgefm.models.train import sam as train_sam
from edgefm.models.train.common import cosine_lr
from edgefm.runtime.shapes import CLASSES, COLORS, random_scene, single_object
from safetensors.torch import load_file


def test_contrastive_loss_is_clips_with_distinct_captions():
    torch.manual_seed(0)
    img, txt, scale = torch.randn(6, 8), torch.randn(6, 8), torch.tensor(2.0)
    loss, _ = train_clip.contrastive_loss(img, txt, scale, [f"caption {i}" for i in range(6)])
    logits = scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    ref = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    assert abs(float(loss) - float(ref)) < 1e-6


def test_contrastive_loss_spreads_targets_over_a_class():
    # two pairs of the same class: a row whose two positives get equal logits has the minimum (log 2) loss
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss, acc = train_clip.contrastive_loss(feats, feats, torch.tensor(np.log(100.0)), ["a", "a", "b"])
    assert abs(float(loss) - 2 / 3 * np.log(2)) < 1e-4
    assert float(acc) == 1.0


def test_mask_loss_weights_and_perfect_prediction():
    target = torch.zeros(1, 8, 8)
    target[0, 2:6, 2:6] = 1
    perfect = train_sam.mask_loss((target * 2 - 1) * 50, target)
    assert float(perfect) < 1e-6
    zero = train_sam.mask_loss(torch.zeros(1, 8, 8), target)
    # logits 0: p = 0.5, ce = log 2, (1 - p_t)^2 = 1/4; alpha 0.25 on 16 fg pixels, 0.75 on 48 bg pixels
    focal = (0.25 * 16 + 0.75 * 48) / 64 * np.log(2) / 4
    dice = 1 - (2 * 8 + 1) / (32 + 16 + 1)
    assert abs(float(zero) - (20 * focal + dice)) < 1e-5


def test_cosine_schedule():
    assert cosine_lr(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, 10) == pytest.approx(0.05)


def test_generator_is_deterministic_with_exact_masks():
    a, b = random_scene(3, 5, (96, 128)), random_scene(3, 5, (96, 128))
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert a.masks.sum(0).max() <= 1  # instances never overlap
    for obj in a.objects:  # the mask's pixels carry the object's color (up to jitter and noise)
        assert np.abs(a.image[obj.mask].mean(0) - np.array(COLORS[obj.color])).max() < 25
        ys, xs = np.nonzero(obj.mask)
        assert obj.box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    s = single_object(0, 1, 64, color="orange", shape="star")
    assert s.caption == "an orange star" and s.objects[0].label in CLASSES


def _run(module, tmp_path, steps: int, extra: list[str]):
    args = ["--out", str(tmp_path / "run"), "--steps", str(steps), "--eval-every", "2", "--save-every", "1",
            "--eval-n", "4", "--weights", str(tmp_path / "w.safetensors"), *extra]
    module.main(args)
    return load_file(str(tmp_path / "w.safetensors"))


@pytest.mark.parametrize("module,extra", [(train_clip, ["--batch", "6", "--variant", "shapes-rn"]),
                                          (train_sam, ["--batch", "2"])], ids=["clip", "sam"])
def test_loop_runs_resumes_and_is_deterministic(module, extra, tmp_path):
    full = _run(module, tmp_path / "a", 3, extra)
    _run(module, tmp_path / "b", 2, extra)
    resumed = _run(module, tmp_path / "b", 3, extra)  # same folder: continues from step 2
    assert set(full) == set(resumed)
    worst = max(float((full[k].float() - resumed[k].float()).abs().max()) for k in full)
    assert worst < 1e-3  # fp16 storage; threaded kernels may differ in the last bits
    meta = json.loads((tmp_path / "a" / "w.json").read_text())
    assert meta["steps"] == 3 and "command" in meta and meta["eval"]["step"] == 3


def test_sam_fine_tuning_leg_starts_from_given_weights(tmp_path):
    """``--init`` loads weights (a fresh optimizer and schedule follow): with a zero learning rate the written
    weights are exactly the initial ones, and the JSON records where they came from."""
    first = _run(train_sam, tmp_path / "a", 1, ["--batch", "2"])
    init = tmp_path / "a" / "w.safetensors"
    again = _run(train_sam, tmp_path / "b", 1, ["--batch", "2", "--lr", "0", "--seed", "3", "--init", str(init)])
    assert max(float((first[k].float() - again[k].float()).abs().max()) for k in first) == 0.0
    meta = json.loads((tmp_path / "b" / "w.json").read_text())
    assert meta["init"]["path"] == str(init) and len(meta["init"]["sha256"]) == 64
