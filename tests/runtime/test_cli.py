"""The edgefm command on a SAM bundle: pictures written, clear errors for user mistakes, nothing half-written."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import scene
from edgefm.runtime.cli import main
from edgefm.runtime.draw import read_image, write_image


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    return write_image(tmp_path_factory.mktemp("img") / "scene.png", scene(200, 300, seed=4))


def test_segment_writes_overlay_and_masks(sam_tiny_bundle, image_file, tmp_path, capsys):
    from edgefm.runtime.sam import SamPredictor

    out, npz = tmp_path / "overlay.png", tmp_path / "masks.npz"
    code = main(["segment", str(sam_tiny_bundle), str(image_file), "--point", "120,80", "--point", "250,150,0",
                 "--out", str(out), "--masks-out", str(npz), "--backend", "ort-cpu"])
    assert code == 0, capsys.readouterr().err
    overlay = read_image(out)
    assert overlay.shape == (200, 300, 3) and not np.array_equal(overlay, read_image(image_file))
    saved = np.load(npz)
    p = SamPredictor(sam_tiny_bundle, backend="ort-cpu")
    p.set_image(read_image(image_file))
    masks, scores, _ = p.predict(np.array([[120, 80], [250, 150]]), np.array([1, 0]), multimask_output=False)
    np.testing.assert_array_equal(saved["masks"][0], masks[0])
    np.testing.assert_allclose(saved["scores"], scores, atol=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.png", "--point", "1,1"], "image file 'missing.png' does not exist"),
        (["{img}", "--point", "400,10"], "point (400, 10) is outside the image of size W=300, H=200"),
        (["{img}"], "give a prompt: --point"),
        (["{img}", "--point", "1;2"], "--point '1;2' must be 2 or 3 comma-separated numbers"),
        (["{img}", "--box", "1,1", "--backend", "ort-cpu"], "--box '1,1' must be 4 comma-separated numbers"),
        (["{img}", "--point", "10,10", "--backend", "cuda9"], "unknown backend 'cuda9'"),
    ],
)
def test_segment_errors_are_one_clear_line(sam_tiny_bundle, image_file, tmp_path, capsys, args, message):
    out = tmp_path / "o.png"
    args = [a.replace("{img}", str(image_file)) for a in args]
    code = main(["segment", str(sam_tiny_bundle), *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_inspect_shows_components_and_parity(sam_tiny_bundle, capsys):
    assert main(["inspect", str(sam_tiny_bundle)]) == 0
    text = capsys.readouterr().out
    for expected in ("family   sam", "image_encoder", "point_coords", "batch=[1..128]", "PASS", "mask IoU 1.00000"):
        assert expected in text
    assert "FAIL" not in text


def test_export_cli_from_official_checkpoint(sam_tiny, tmp_path, capsys):
    import torch

    ckpt = tmp_path / "sam_tiny.pth"
    torch.save(sam_tiny.state_dict(), ckpt)
    code = main(["export", "sam", "--checkpoint", str(ckpt), "--variant", "tiny", "--out", str(tmp_path / "b")])
    assert code == 0, capsys.readouterr().err
    from edgefm.runtime.manifest import read_manifest

    m = read_manifest(tmp_path / "b")
    assert m.source["checkpoint"] == "sam_tiny.pth" and len(m.source["sha256"]) == 64
    # The wrong variant: a clear message naming the file, nothing written.
    code = main(["export", "sam", "--checkpoint", str(ckpt), "--variant", "vit_b", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "sam_tiny.pth" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_segment_auto_is_the_generator_with_the_given_thresholds(tmp_path, capsys):
    """``segment --auto`` on the shipped SAM: the masks the Python generator gives with the same settings, and
    the thresholds are the user's (the official 0.88 keeps fewer of the small model's masks than 0.5)."""
    from edgefm.runtime.demo import default_cache, demo_bundles, make_scene
    from edgefm.runtime.sam import SamAutomaticMaskGenerator, SamPredictor

    bundle = demo_bundles(default_cache())["sam"]
    image = write_image(tmp_path / "shapes.png", make_scene(240, 320, seed=2))
    counts = {}
    for thresh in ("0.5", "0.88"):
        npz = tmp_path / f"m{thresh}.npz"
        code = main(["segment", str(bundle), str(image), "--auto", "--points-per-side", "8", "--pred-iou-thresh",
                     thresh, "--stability-score-thresh", "0.8", "--out", str(tmp_path / "o.png"), "--masks-out",
                     str(npz), "--backend", "ort-cpu"])
        assert code == 0, capsys.readouterr().err
        counts[thresh] = len(np.load(npz)["masks"])
    assert f"{counts['0.88']} masks" in capsys.readouterr().out
    records = SamAutomaticMaskGenerator(SamPredictor(bundle, backend="ort-cpu"), points_per_side=8,
                                        pred_iou_thresh=0.5, stability_score_thresh=0.8).generate(read_image(image))
    np.testing.assert_array_equal(np.load(tmp_path / "m0.5.npz")["masks"], [r["segmentation"] for r in records])
    assert counts["0.5"] == len(records) >= 3 and counts["0.88"] < counts["0.5"]


def test_demo_latency_lines_show_only_the_components_a_click_ran():
    """The demo's latency table: a click and a box run ``decoder_context`` once and ``prompt_decoder`` per prompt;
    ``prompt_encoder`` and ``mask_decoder`` are opened but idle, and get no line (they printed "nan (0 calls)")."""
    from edgefm.runtime.bundle import Bundle
    from edgefm.runtime.demo import default_cache, demo_bundles, latency_lines, make_scene
    from edgefm.runtime.sam import SamPredictor

    bundle = Bundle(demo_bundles(default_cache())["sam"], "ort-cpu", family="sam", timed=True)
    predictor = SamPredictor(bundle)
    predictor.set_image(make_scene(160, 200, seed=3))
    predictor.predict(np.array([[60.0, 80.0]]), np.array([1]))
    predictor.predict(box=np.array([10.0, 20.0, 90.0, 120.0]))
    lines = latency_lines({"sam": bundle})
    assert [line.split()[0] for line in lines] == ["sam.image_encoder", "sam.decoder_context", "sam.prompt_decoder"]
    assert [line.split()[-2] for line in lines] == ["(1", "(1", "(2"]
    assert not any("nan" in line for line in lines)


def test_demo_runs_and_reports_what_it_found(tmp_path, capsys, caplog, recwarn):
    """``edgefm demo`` (the README's main job, otherwise run only by CI's set-up command) on the cached demo
    bundles: five pictures, the backend chosen once, mask IoUs the shipped SAM reaches, a latency line per
    component it called, and no warnings or NaN on the way."""
    import logging
    import re

    from edgefm.runtime.demo import default_cache, demo_bundles

    demo_bundles(default_cache())  # exported once per cache (and stamp), as the other demo-bundle tests do
    with caplog.at_level(logging.INFO, logger="edgefm"):
        code = main(["demo", "--out", str(tmp_path / "out"), "--backend", "auto"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "dalle_a_blue_star.png", "dalle_a_red_circle.png", "sam_auto.png", "sam_box.png", "sam_click.png"]
    assert sum("backend auto ->" in r.getMessage() for r in caplog.records) == 1
    ious = [float(v) for v in re.findall(r"mask IoU ([0-9.]+)", out)]
    assert len(ious) == 2 and min(ious) >= 0.75, out
    timed = [line.split()[0] for line in out.split("latency per component")[1].splitlines()[1:]]
    assert {"sam.image_encoder", "sam.prompt_decoder", "clip.image_encoder", "dalle.prior_step"} <= set(timed)
    assert "nan" not in out and not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], out


def test_segment_auto_with_no_masks_says_which_filter_dropped_them(tmp_path, capsys):
    """``segment --auto`` that keeps nothing says how many candidates each quality filter let through and the
    best predicted IoU seen (the shipped SAM keeps no mask at the official 0.88 / 0.95 defaults)."""
    import re

    from edgefm.runtime.demo import default_cache, demo_bundles, make_scene
    from edgefm.runtime.sam import SamAutomaticMaskGenerator, SamPredictor

    bundle = demo_bundles(default_cache())["sam"]
    image = write_image(tmp_path / "shapes.png", make_scene(240, 320, seed=2))
    code = main(["segment", str(bundle), str(image), "--auto", "--points-per-side", "4", "--pred-iou-thresh",
                 "0.99", "--stability-score-thresh", "0.99", "--out", str(tmp_path / "o.png"), "--backend", "ort-cpu"])
    captured = capsys.readouterr()
    assert code == 0 and "0 masks" in captured.out
    found = re.search(r"of (\d+) candidate masks, (\d+) had a predicted IoU above --pred-iou-thresh 0.99 "
                      r"\(best: ([0-9.]+)\) and (\d+) of those", captured.err)
    assert found, captured.err
    candidates, passed_iou, best, passed_stability = int(found[1]), int(found[2]), float(found[3]), int(found[4])
    assert candidates == 4 * 4 * 3 and candidates >= passed_iou >= passed_stability
    # Unfiltered, the same grid keeps the best-scored candidate (NMS never drops the top box).
    gen = SamAutomaticMaskGenerator(SamPredictor(bundle, backend="ort-cpu"), points_per_side=4, pred_iou_thresh=0,
                                    stability_score_thresh=0)
    records = gen.generate(read_image(image))
    assert gen.filter_counts == {"candidates": 48, "passed_iou": 48, "passed_stability": 48}
    assert best == pytest.approx(max(r["predicted_iou"] for r in records), abs=5e-4)
    assert (passed_iou > 0) == (best > 0.99)
