"""Device-side preprocessing (``runtime/image_prep.py``) against the host path, which is PIL-exact: the graph
run here on ONNX Runtime's CPU provider is the one a GPU runs, and ``SamPredictor(preprocess="device")``
takes the same code path as on ort-cuda (buffers bound with IO binding, the encoder fed the device buffer)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import scene
from edgefm.runtime.errors import BackendError, InputError
from edgefm.runtime.image_prep import GRAPH, ImagePrep, build
from edgefm.runtime.sam import SamPredictor
from edgefm.runtime.sam.transforms import normalize_and_pad, resize_longest_side, resized_shape

CPU = [("CPUExecutionProvider", {})]
SAM_MEAN, SAM_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def test_the_shipped_graph_is_what_build_writes():
    pytest.importorskip("onnx")
    assert GRAPH.read_bytes() == build(), "run: python -m edgefm.runtime.image_prep"


def test_the_graph_sums_in_float32_only():
    """ONNX Runtime's CUDA provider casts int32 ReduceSum to float32 and back (reduction_ops.cc), which would
    round these sums of up to 2**30; ORT's CPU provider sums int32 exactly, so the CPU tests below could not
    catch an integer reduction coming back. Every reduction must take float32, and weights must be split."""
    onnx = pytest.importorskip("onnx")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(GRAPH)), strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    reductions = [n for n in model.graph.node if n.op_type.startswith("Reduce")]
    assert len(reductions) == 2 and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in reductions)
    weights = {i.name: i for i in model.graph.input}["col_weights"].type.tensor_type
    assert weights.elem_type == onnx.TensorProto.FLOAT and weights.shape.dim[0].dim_value == 2  # hi, lo


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    """Every pixel independent: the picture where PIL's rounding is most often a tie (a float32-weight
    resize, ONNX's Resize with antialias=1, differs from PIL in up to 4% of these pixels)."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# Enlarged, shrunk (1280 -> 1024 is the "round" scale 1.25), already the size, a sliver, odd sizes.
@pytest.mark.parametrize("hw", [(480, 640), (1500, 2250), (720, 1280), (1024, 700), (2000, 37), (333, 517)])
def test_sam_preprocessing_is_the_host_s_exactly(hw):
    prep = ImagePrep(CPU, "cpu", SAM_MEAN, SAM_STD, (1024, 1024))
    size = resized_shape(*hw, 1024)
    for image in (scene(*hw, seed=hw[0]), _noise(*hw, seed=hw[1])):
        want = normalize_and_pad(resize_longest_side(image, 1024), 1024, SAM_MEAN, SAM_STD)
        got = prep(image, size).numpy()
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)  # the padding included


def test_clip_resize_and_crop_is_the_host_s_exactly():
    """The bicubic rule and a center crop, against CLIP's PIL-exact host preprocessing (the graph works in
    0..255 units: CLIP's statistics times 255, so only the float normalization may differ, by an ulp)."""
    from edgefm.runtime.clip.preprocess import (
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        crop_offset,
        preprocess,
        resize_center_crop,
        resized_size,
    )

    zero = ImagePrep(CPU, "cpu", (0, 0, 0), (1, 1, 1), (224, 224), "bicubic_antialias")
    norm = ImagePrep(CPU, "cpu", np.array(OPENAI_CLIP_MEAN) * 255, np.array(OPENAI_CLIP_STD) * 255, (224, 224),
                     "bicubic_antialias")
    for hw in ((480, 640), (720, 1280), (150, 100), (1000, 999)):
        image = _noise(*hw, seed=5)
        rh, rw = resized_size(*hw, 224)
        crop = (crop_offset(rh, 224), crop_offset(rw, 224), 224, 224)
        pixels = zero(image, (rh, rw), crop).numpy()[0].transpose(1, 2, 0)
        np.testing.assert_array_equal(pixels, resize_center_crop(image, 224))
        np.testing.assert_allclose(norm(image, (rh, rw), crop).numpy()[0], preprocess(image, 224), atol=2e-6)


def test_a_crop_that_does_not_fit_is_refused():
    prep = ImagePrep(CPU, "cpu", SAM_MEAN, SAM_STD, (64, 64))
    with pytest.raises(InputError, match="crop \\(0, 0, 40, 80\\) of a 40x80 resize does not fit the 64x64 output"):
        prep(scene(20, 30), (40, 80))
    with pytest.raises(InputError, match="Unknown resize rule 'nearest'"):
        ImagePrep(CPU, "cpu", SAM_MEAN, SAM_STD, (64, 64), "nearest")


def test_predictor_with_device_preprocessing_gives_the_host_masks(sam_tiny_bundle):
    host = SamPredictor(sam_tiny_bundle, backend="ort-cpu")
    dev = SamPredictor(sam_tiny_bundle, backend="ort-cpu", preprocess="device")
    assert host.preprocess_on == "host"  # "auto" on the CPU: the exact path
    assert dev.preprocess_on == "device"
    point, label = np.array([[70, 50]], np.float32), np.array([1], np.float32)
    for hw in ((96, 160), (300, 140)):
        image = scene(*hw, seed=7)
        host.set_image(image)
        dev.set_image(image)
        a, b = host.get_image_embedding(), dev.get_image_embedding()
        np.testing.assert_array_equal(b, a)  # the same pixels: the same embedding
        m_host, s_host, _ = host.predict(point, label)
        m_dev, s_dev, _ = dev.predict(point, label)
        np.testing.assert_array_equal(m_dev, m_host)
        np.testing.assert_array_equal(s_dev, s_host)


def test_device_preprocessing_feeds_a_captured_encoder(sam_tiny_bundle):
    """The cuda_graphs path (as test_ort_binding drives it on ort-cpu): the encoder is captured reading the
    preprocessing graph's buffer, so later images are one preprocessing run and one replay."""
    host = SamPredictor(sam_tiny_bundle, backend="ort-cpu")
    graphs = SamPredictor(sam_tiny_bundle, backend="ort-cpu", preprocess="device")
    graphs._on_device = graphs._graphs = True  # what cuda_graphs=True switches on with ort-cuda runners
    for seed in (3, 4):
        image = scene(96, 160, seed=seed)
        host.set_image(image)
        graphs.set_image(image)
        assert graphs._encoder_graph.inputs["image"] is graphs._prep.pixels
        np.testing.assert_array_equal(graphs.get_image_embedding(), host.get_image_embedding())
    # A host-made input (a camera stage's) goes into the same buffer.
    x = normalize_and_pad(resize_longest_side(scene(96, 160, seed=5), graphs.image_size), graphs.image_size,
                          graphs.mean, graphs.std)
    host.set_preprocessed(x, (96, 160), resized_shape(96, 160, host.image_size))
    graphs.set_preprocessed(x, (96, 160), resized_shape(96, 160, graphs.image_size))
    np.testing.assert_array_equal(graphs.get_image_embedding(), host.get_image_embedding())


def _broken(monkeypatch):
    """ImagePrep writing 3 levels too bright in one corner, as a faulty resize kernel might."""
    real = ImagePrep.__call__

    def call(self, image, resized, crop=None):
        out = real(self, image, resized, crop)
        arr = out.numpy()
        arr[..., :8, :8] += 3.0 / np.asarray(SAM_STD, np.float32)[:, None, None]
        out.update_inplace(arr)
        return out

    monkeypatch.setattr(ImagePrep, "__call__", call)


def test_a_disagreeing_graph_is_refused_or_replaced(sam_tiny_bundle, monkeypatch):
    _broken(monkeypatch)
    with pytest.raises(BackendError, match=r"device preprocessing graph disagrees with the host path on a "
                                           r"300x500 picture \(by up to 3\.0 levels\) on CPUExecutionProvider "
                                           r"of onnxruntime .*; use preprocess='host'"):
        _ = SamPredictor(sam_tiny_bundle, backend="ort-cpu", preprocess="device").preprocess_on
    auto = SamPredictor(sam_tiny_bundle, backend="ort-cpu", preprocess="device")
    auto._preprocess_asked = "auto"  # what "auto" is on a GPU backend
    with pytest.warns(RuntimeWarning, match="preprocessing on the host instead"):
        assert auto.preprocess_on == "host"
    auto.set_image(scene(96, 160))  # and it works, on the host
    assert auto.is_image_set


def test_preprocess_argument_is_checked(sam_tiny_bundle):
    with pytest.raises(InputError, match=r"preprocess must be one of \('auto', 'host', 'device'\), got 'gpu'"):
        SamPredictor(sam_tiny_bundle, backend="ort-cpu", preprocess="gpu")


def test_clip_model_with_device_preprocessing_gives_the_host_embeddings():
    from clip_fixtures import tiny_bundle
    from edgefm.runtime.clip import ClipModel

    bundle = tiny_bundle("tiny-vit")
    host = ClipModel(bundle, backend="ort-cpu")
    dev = ClipModel(bundle, backend="ort-cpu", preprocess="device")
    assert (host.preprocess_on, dev.preprocess_on) == ("host", "device")
    rgba = np.dstack([scene(50, 70, seed=3), np.full((50, 70), 200, np.uint8)])
    gray = scene(120, 90, seed=4)[..., 0]
    # Batches of two: odd sizes and a gray picture on the device, the RGBA one's batch on the host.
    images = [scene(90, 120, seed=1), _noise(333, 517, seed=2), gray, scene(70, 70, seed=5), rgba]
    want, got = host.encode_images(images, batch_size=2), dev.encode_images(images, batch_size=2)
    assert got.shape == want.shape == (5, host.embed_dim)
    # The same pixels; the 0..255-unit normalization leaves float32 rounding in the input.
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(InputError, match=r"preprocess must be one of \('auto', 'host', 'device'\), got 'cpu'"):
        ClipModel(bundle, backend="ort-cpu", preprocess="cpu")


def test_camera_tasks_preprocess_on_the_infer_stage_when_on_the_device(sam_tiny_bundle):
    """With device preprocessing, the preprocess stage hands the frame on and the infer stage gives the
    host path's result (classify: the same labels and scores; segment: the same mask)."""
    from clip_fixtures import tiny_bundle
    from edgefm.runtime.camera.sources import Frame
    from edgefm.runtime.camera.tasks import ClassifyTask, SegmentTask
    from edgefm.runtime.clip import ClipModel

    frame = Frame(0, 0.0, scene(96, 160, seed=9))
    labels = ["a red square", "a blue circle", "a green line"]
    results = []
    for where in ("host", "device"):
        clip = ClipModel(tiny_bundle("tiny-vit"), backend="ort-cpu", preprocess=where)
        sam = SamPredictor(sam_tiny_bundle, backend="ort-cpu", preprocess=where)
        tasks = ClassifyTask(clip, labels, templates=["{}"]), SegmentTask(sam, point=np.array([70, 50]))
        pre = [t.preprocess(frame.image) for t in tasks]
        assert all((p is frame.image) == (where == "device") for p in pre)
        results.append([t.infer(frame, p) for t, p in zip(tasks, pre)])
    (c_host, s_host), (c_dev, s_dev) = results
    assert c_dev.labels == c_host.labels
    np.testing.assert_allclose(c_dev.scores, c_host.scores, atol=1e-5)
    np.testing.assert_array_equal(s_dev.masks, s_host.masks)


def test_sums_stay_exact_up_to_the_tap_limit_and_beyond_it_the_host_is_named():
    """The float32 partial sums are exact for up to MAX_TAPS taps: a 60x bicubic shrink (245 taps) of a
    picture at full brightness with noise equals the host's; a shrink past the limit is refused."""
    from edgefm.runtime import resample
    from edgefm.runtime.image_prep import MAX_TAPS

    image = _noise(4, 20000, seed=11)
    image[:, ::2] = 255  # the largest sums
    prep = ImagePrep(CPU, "cpu", (0, 0, 0), (1, 1, 1), (4, 330), "bicubic_antialias")
    got = prep(image, (4, 330)).numpy()[0].transpose(1, 2, 0)
    np.testing.assert_array_equal(got, resample.resize(image, (4, 330), "bicubic_antialias"))
    assert 240 <= resample.coefficients(20000, 330, 0, 330, "bicubic_antialias")[1].shape[1] <= MAX_TAPS == 258
    with pytest.raises(InputError, match=r"resizing 20000 pixels to 70 takes \d+ taps per pixel, more than the "
                                         r"device preprocessing sums exactly \(258\); use preprocess='host'"):
        prep(image, (4, 70))


def test_pictures_too_large_for_the_device_budget_go_to_the_host(sam_tiny_bundle, monkeypatch):
    prep = ImagePrep(CPU, "cpu", SAM_MEAN, SAM_STD, (1024, 1024))
    assert prep.fits((1500, 2250), (683, 1024)) and prep.fits((2160, 3840), (576, 1024))
    assert not prep.fits((4000, 6000), (683, 1024))  # over 1 GiB of gathered taps in the wide pass
    dev = SamPredictor(sam_tiny_bundle, backend="ort-cpu", preprocess="device")
    host = SamPredictor(sam_tiny_bundle, backend="ort-cpu", preprocess="host")
    assert dev.preprocess_on == "device"
    calls, real = [], ImagePrep.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ImagePrep, "__call__", counting)
    image = scene(96, 160, seed=2)
    dev.set_image(image)
    assert calls == [1]
    dev._prep.max_bytes = 1  # nothing fits: this picture is preprocessed on the host
    dev.set_image(image)
    host.set_image(image)
    assert calls == [1]
    np.testing.assert_array_equal(dev.get_image_embedding(), host.get_image_embedding())


def test_camera_pipeline_runs_and_reports_device_preprocessing(sam_tiny_bundle):
    from edgefm.runtime.camera import GeneratorSource, Pipeline, SegmentTask

    frames = [scene(96, 160, seed=s) for s in range(4)]
    task = SegmentTask(SamPredictor(sam_tiny_bundle, backend="ort-cpu", preprocess="device"),
                       point=np.array([70, 50]))
    source = GeneratorSource(lambda i: frames[i] if i < len(frames) else None)
    stats = Pipeline(task, source, drop=False, pace=False).run()
    assert stats.processed == 4 and stats.ended == "end of stream"
    assert stats.to_dict()["preprocess"] == "device" and re.search(r"preprocessing\s+on the device", stats.summary())
