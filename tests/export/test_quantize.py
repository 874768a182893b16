"""``edgefm quantize``: calibrated int8 Q/DQ image encoders for TensorRT, on the shipped shapes-world models.

The bundles are exported from the shipped SAM and CLIP checkpoints and calibrated on scenes of the shapes
generator's seed-2000 stream (training used 0 and 1, the accuracy tests 1000). The checks: the graph follows
TensorRT's explicit-quantization rules, the parity gate measures what it says, and the task accuracy against
the generator's ground truth stays where fp32 has it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # exporting the shipped checkpoints needs the [export] extra
import onnx  # noqa: E402
from edgefm.export import tensorrt as ext  # noqa: E402
from edgefm.export.bundle import commit_components  # noqa: E402
from edgefm.export.quantize import calibration_images, quantize_bundle, split_holdout  # noqa: E402
from edgefm.export.trt_compat import check_tensorrt_compat  # noqa: E402
from edgefm.runtime.cli import main  # noqa: E402
from edgefm.runtime.clip import ClipModel  # noqa: E402
from edgefm.runtime.draw import read_image, write_image  # noqa: E402
from edgefm.runtime.errors import InputError, ParityError  # noqa: E402
from edgefm.runtime.manifest import ComponentEntry, Manifest, read_manifest  # noqa: E402
from edgefm.runtime.sam import SamPredictor  # noqa: E402
from edgefm.runtime.shapes import CLASSES, interior_point, random_scene, single_object  # noqa: E402
from tensorrt_fixtures import snapshot  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"
SAM_SIZES = [(160, 224), (256, 192), (128, 128)]


@pytest.fixture(scope="module")
def fp32_bundles(tmp_path_factory) -> dict[str, Path]:
    from edgefm.export.clip import export_clip
    from edgefm.export.sam import export_sam
    from edgefm.models.sam import SamConfig

    root = tmp_path_factory.mktemp("quantize")
    meta = json.loads((WEIGHTS / "sam_shapes.json").read_text())
    cfg = SamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    return {"sam": export_sam(WEIGHTS / "sam_shapes.safetensors", root / "sam", variant=cfg),
            "clip": export_clip(WEIGHTS / "clip_shapes.safetensors", root / "clip")}


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("calibration")
    for i in range(40):
        write_image(root / "sam" / f"{i:03d}.png", random_scene(2000, i, SAM_SIZES[i % 3]).image)
        write_image(root / "clip" / f"{i:03d}.png", single_object(2000, i, (64, 96)[i % 2]).image)
        write_image(root / "dalle" / f"{i:03d}.png", single_object(2000, 100 + i, 64).image)
    return {"sam": root / "sam", "clip": root / "clip", "dalle": root / "dalle"}


@pytest.fixture(scope="module")
def quantized(fp32_bundles, calibration, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for family, src in fp32_bundles.items():
        out[family] = tmp_path_factory.mktemp("q") / family
        shutil.copytree(src, out[family])
        entries = quantize_bundle(out[family], calibration[family])
        assert [(e.name, e.format, e.precision) for e in entries] == [("image_encoder", "onnx", "int8")]
    return out


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


@pytest.mark.parametrize("family", ["sam", "clip"])
def test_graph_follows_tensorrt_explicit_quantization(quantized, family):
    entry = read_manifest(quantized[family]).find("image_encoder", precision="int8")[0]
    assert entry.info["quantization"]["format"] == "QDQ" and entry.info["opset"] == 19
    path = quantized[family] / entry.file
    assert check_tensorrt_compat(path) == []
    model = onnx.load(str(path))
    inits = _inits(model)
    consumers = {i: n for n in model.graph.node for i in n.input}
    producer = {o: n for n in model.graph.node for o in n.output}
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    # Every MatMul / Gemm / Conv with a constant weight reads int8 weights through a DequantizeLinear, per output
    # channel (MatMul [K, N]: axis 1; Gemm transB [N, K] and Conv [O, I, kh, kw]: axis 0), except the first Conv
    # (a patch embedding, a ResNet stem), kept fp16.
    for n in weights:
        w, user = inits[n.input[0]], consumers[n.output[0]]
        axis = next(a.i for a in n.attribute if a.name == "axis")
        trans_b = next((a.i for a in user.attribute if a.name == "transB"), 0)
        assert w.data_type == onnx.TensorProto.INT8 and user.input[1] == n.output[0]
        assert axis == {"MatMul": 1, "Gemm": 1 - trans_b, "Conv": 0}[user.op_type]
        assert len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] == w.dims[axis]
        assert inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16  # fp16 scales: no Cast before the op
    linear = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    first_conv = next(n for n in linear if n.op_type == "Conv")
    assert inits[first_conv.input[1]].data_type == onnx.TensorProto.FLOAT16
    assert [n for n in linear if n.input[1] in inits] == [first_conv]
    expected = {"sam": {"MatMul", "Conv"}, "clip": {"Conv", "Gemm", "MatMul"}}[family]  # CLIP here: a ResNet
    assert {consumers[n.output[0]].op_type for n in weights} == expected
    # Activations: quantized where a weighted layer reads them, never where one writes them, and attention's
    # activation x activation products stay fp16.
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    q_in = [producer.get(n.input[0]) for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q_in and not [p for p in q_in if p is not None and p.op_type in ("MatMul", "Gemm", "Conv")]
    weight_out = {n.output[0] for n in weights}
    products = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weight_out]
    assert len(products) == {"sam": 6, "clip": 2}[family]  # 3 blocks x 2 (SAM); the attention pool (CLIP)
    assert not [n for n in products if set(n.input) & dq_out]


def test_sam_parity_gate_and_task_accuracy(quantized, fp32_bundles):
    rep = read_manifest(quantized["sam"]).parity["image_encoder.int8"]
    assert rep["passed"] and rep["calibration"] == {"images": 32, "held_out": 8, "method": "percentile",
                                                     "folder": "sam"}
    emb = rep["outputs"]["image_embeddings"]
    assert emb["cosine"] >= 0.99 and emb["mask_iou"] >= 0.95 and len(rep["images"]) == 8  # the policy
    assert emb["cosine"] >= 0.9995 and emb["mask_iou"] >= 0.98  # what this recipe gives here (README)
    assert rep["written_graph"]["outputs"]["image_embeddings"]["cosine"] >= 0.99
    # The int8 policy is against fp32; the task is against the generator's ground truth: one click inside
    # each object of 30 held-out scenes, single-mask output.
    ious = {}
    for precision in (None, "int8"):
        predictor = SamPredictor(quantized["sam"], "ort-cpu", threads=1, precision=precision)
        assert [predictor.bundle.entry(n).precision for n in ("image_encoder", "mask_decoder")] == [
            precision or "fp32", "fp32"]
        scores = []
        for i in range(30):
            scene = random_scene(1000, i, SAM_SIZES[i % 3])
            predictor.set_image(scene.image)
            for obj in scene.objects:
                masks, _, _ = predictor.predict(point_coords=interior_point(obj.mask), point_labels=np.array([1]),
                                                multimask_output=False)
                scores.append((masks[0] & obj.mask).sum() / max(1, (masks[0] | obj.mask).sum()))
        ious[precision] = float(np.mean(scores))
    print(f"SAM one-point mIoU: fp32 {ious[None]:.4f}, int8 Q/DQ {ious['int8']:.4f}")
    assert ious["int8"] >= ious[None] - 0.01


def test_clip_parity_gate_and_zero_shot(quantized):
    rep = read_manifest(quantized["clip"]).parity["image_encoder.int8"]
    assert rep["passed"] and rep["outputs"]["image_embeds"]["cosine"] >= 0.999  # policy 0.99; README 0.9998
    templates = json.loads((WEIGHTS / "clip_shapes.json").read_text())["templates"]
    scenes = [single_object(1000, i, 96) for i in range(216)]
    truth = np.array([CLASSES.index(s.objects[0].label) for s in scenes])
    top1 = {}
    for precision in (None, "int8"):
        model = ClipModel(quantized["clip"], "ort-cpu", threads=1, precision=precision)
        assert model.bundle.entry("image_encoder").precision == (precision or "fp32")
        probs = model.zero_shot([s.image for s in scenes], list(CLASSES), templates=templates)
        top1[precision] = float((probs.argmax(1) == truth).mean())
    print(f"CLIP zero-shot top-1 at 96 px: fp32 {top1[None]:.4f}, int8 Q/DQ {top1['int8']:.4f}")
    assert top1["int8"] >= top1[None] - 0.01


def test_gate_refuses_and_leaves_the_bundle(fp32_bundles, tmp_path):
    """Calibrated on black frames, the activation scales are far too small for a real scene: the held-out
    image (the fifth) fails the policy, and nothing is written."""
    bundle = tmp_path / "clip"
    shutil.copytree(fp32_bundles["clip"], bundle)
    before = snapshot(bundle)
    cal = tmp_path / "cal"
    for i in range(4):
        write_image(cal / f"{i}.png", np.zeros((64, 64, 3), np.uint8))
    write_image(cal / "4.png", single_object(1000, 0, 64).image)
    assert [p.name for p in split_holdout(calibration_images(cal, 10))[1]] == ["4.png"]
    with pytest.raises(ParityError, match=r"image_embeds: cosine 0\.\d+ < 0\.99; image_embeds \(written graph, "
                       r"4\.png\): cosine 0\.\d+ < 0\.99\. Nothing was written"):
        quantize_bundle(bundle, cal, method="minmax")
    assert snapshot(bundle) == before
    quantize_bundle(bundle, cal, method="minmax", parity_gate=False)  # the user's call, recorded
    rep = read_manifest(bundle).parity["image_encoder.int8"]
    assert not rep["passed"] and rep["gate"] is False and rep["failures"]


def test_input_errors(fp32_bundles, tmp_path):
    bundle = fp32_bundles["sam"]
    with pytest.raises(InputError, match="--calibration .*nowhere: no such folder"):
        quantize_bundle(bundle, tmp_path / "nowhere")
    write_image(tmp_path / "one" / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InputError, match=r"holds 1 image\(s\) .*give at least 2"):
        quantize_bundle(bundle, tmp_path / "one")
    with pytest.raises(InputError, match=r"image encoders of SAM and CLIP and DALL·E's dVAE decoder "
                       r"\(\['image_encoder'\] in this sam bundle\), not \['mask_decoder'\]"):
        quantize_bundle(bundle, tmp_path / "one", components=["mask_decoder"])
    fused = tmp_path / "fused"
    shutil.copytree(bundle, fused)
    m = read_manifest(fused)
    m.components[0].info["fused_attention"] = 3  # what export --attention fused records: rewritten nodes
    m.write(fused)
    write_image(tmp_path / "one" / "b.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="exported with --attention fused .* export with --attention plain"):
        quantize_bundle(fused, tmp_path / "one")


def test_cli_writes_and_bench_times_int8(fp32_bundles, calibration, tmp_path, capsys):
    bundle = tmp_path / "clip"
    shutil.copytree(fp32_bundles["clip"], bundle)
    assert main(["quantize", str(bundle), "--calibration", str(calibration["clip"]), "--max-images", "10"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {bundle / 'image_encoder.int8.onnx'}  (int8 Q/DQ; worst of 2 held-out image(s)" in out
    assert main(["bench", str(bundle), "--backend", "ort-cpu", "--precision", "int8", "--iters", "2", "--warmup",
                 "0", "--no-pipelines", "--json", str(tmp_path / "b.json")]) == 0
    comps = json.loads((tmp_path / "b.json").read_text())["components"]
    assert (comps["image_encoder"]["precision"], comps["text_encoder"]["precision"]) == ("int8", "fp32")
    assert main(["bench", str(bundle), "--backend", "ort-cpu", "--precision", "fp16"]) == 2
    assert "--precision 'fp16': no onnx component of" in capsys.readouterr().err


def test_segment_and_classify_cli_run_the_int8_encoder(quantized, tmp_path, capsys):
    """--precision int8 reaches the runtime commands: the same click gives (nearly) the same mask through
    the int8 encoder, and the same label."""
    scene = random_scene(1000, 3, (192, 256))
    obj = scene.objects[0]
    write_image(tmp_path / "scene.png", scene.image)
    x, y = interior_point(obj.mask)[0]
    masks = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.npz"
        assert main(["segment", str(quantized["sam"]), str(tmp_path / "scene.png"), "--point", f"{x},{y}",
                     "--backend", "ort-cpu", "--precision", precision, "--out", str(tmp_path / f"{precision}.png"),
                     "--masks-out", str(out)]) == 0
        assert f"on ort-cpu, {precision} image encoder)" in capsys.readouterr().out
        masks[precision] = np.load(out)["masks"][0]
    iou = (masks["fp32"] & masks["int8"]).sum() / (masks["fp32"] | masks["int8"]).sum()
    assert iou >= 0.95 and (masks["int8"] & obj.mask).sum() / (masks["int8"] | obj.mask).sum() >= 0.8
    single = single_object(1000, 5, 96)
    write_image(tmp_path / "object.png", single.image)
    capsys.readouterr()
    assert main(["classify", str(quantized["clip"]), str(tmp_path / "object.png"), "--labels",
                 ",".join(CLASSES), "--backend", "ort-cpu", "--precision", "int8", "--top-k", "1"]) == 0
    assert capsys.readouterr().out.split("\n")[1].split("  ")[-1] == single.objects[0].label


def test_dvae_decoder(fp32_bundles, calibration, tmp_path):
    """The dVAE decoder, calibrated on the codes of the bundle's own encoder: PSNR against fp32 (stricter than
    the cosine of a picture), and the reconstructions keep their class as often as fp32's do."""
    from edgefm.export.dalle import export_dalle
    from edgefm.runtime.dalle.generator import DvaeCodec

    bundle = export_dalle(tmp_path / "dalle", WEIGHTS / "dvae_shapes_decoder.safetensors",
                          WEIGHTS / "dvae_shapes_encoder.safetensors", image_size=64)  # the prior's 8 x 8 codes
    entries = quantize_bundle(bundle, calibration["dalle"])
    assert [(e.name, e.precision) for e in entries] == [("dvae_decoder", "int8")]
    assert check_tensorrt_compat(bundle / entries[0].file) == []
    rep = read_manifest(bundle).parity["dvae_decoder.int8"]
    image = rep["outputs"]["image"]
    assert rep["passed"] and image["cosine"] >= 0.99 and image["psnr_db"] >= 40  # gate 30 dB; README 45
    templates = json.loads((WEIGHTS / "clip_shapes.json").read_text())["templates"]
    clip = ClipModel(fp32_bundles["clip"], "ort-cpu", threads=1)
    scenes = [single_object(1000, i, 64) for i in range(72)]
    truth = np.array([CLASSES.index(s.objects[0].label) for s in scenes])
    top1 = {}
    for precision in (None, "int8"):
        codec = DvaeCodec(bundle, "ort-cpu", threads=1, precision=precision)
        assert codec.bundle.entry("dvae_decoder").precision == (precision or "fp32")
        rebuilt = list(codec.decode(codec.encode(np.stack([s.image for s in scenes]))))
        probs = clip.zero_shot(rebuilt, list(CLASSES), templates=templates)
        top1[precision] = float((probs.argmax(1) == truth).mean())
    print(f"CLIP top-1 on dVAE reconstructions: fp32 decoder {top1[None]:.3f}, int8 Q/DQ {top1['int8']:.3f}")
    assert top1["int8"] >= top1[None] - 0.03  # 72 images: 0.014 each
    write_image(tmp_path / "object.png", scenes[0].image)  # the CLI reaches the int8 decoder too
    pictures = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"dvae_{precision}.png"
        assert main(["dvae", str(bundle), str(tmp_path / "object.png"), "--out", str(out), "--backend", "ort-cpu",
                     "--precision", precision]) == 0
        pictures[precision] = read_image(out).astype(np.float64)
    mse = np.mean((pictures["fp32"] - pictures["int8"]) ** 2)
    assert mse > 0 and 10 * np.log10(255**2 / mse) >= 30  # a different decoder ran, and it is close
    decoder_only = export_dalle(tmp_path / "decoder_only", WEIGHTS / "dvae_shapes_decoder.safetensors", image_size=64)
    with pytest.raises(InputError, match="needs the bundle's dvae_encoder .* export with --dvae-encoder"):
        quantize_bundle(decoder_only, calibration["dalle"])


def test_quantize_imports_no_torch(fp32_bundles, calibration, tmp_path):
    bundle = tmp_path / "clip"
    shutil.copytree(fp32_bundles["clip"], bundle)
    code = ("import sys; from edgefm.export.quantize import quantize_bundle; "
            f"quantize_bundle({str(bundle)!r}, {str(calibration['clip'])!r}, max_images=10); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_older_onnxruntime_path_gives_the_same_graph(fp32_bundles, calibration, tmp_path, monkeypatch):
    """Where onnxruntime has no calibration cache, its quantizer calibrates on one image and edgefm's ranges
    override what it measured: the written graph must be the same as with the cache."""
    from edgefm.export import quantize as q

    graphs = {}
    for cached in (True, False):
        monkeypatch.setattr(q, "_takes_calibration_cache", lambda fn, _c=cached: _c)
        bundle = tmp_path / f"clip-{cached}"
        shutil.copytree(fp32_bundles["clip"], bundle)
        quantize_bundle(bundle, calibration["clip"], max_images=10)
        model = onnx.load(str(bundle / "image_encoder.int8.onnx"))
        graphs[cached] = ([(n.op_type, list(n.input)) for n in model.graph.node],
                          {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in model.graph.initializer})
    assert graphs[True] == graphs[False]


def test_ort_tensorrt_provider_builds_the_qdq_graph_in_int8(quantized, monkeypatch):
    """On ort-trt, TensorRT's builder refuses a Q/DQ graph unless int8 is enabled: the flag goes with the Q/DQ
    component only (recorded through open_runner; the provider itself needs a GPU)."""
    from edgefm.runtime.backends import onnxruntime as ortb
    from edgefm.runtime.backends import open_runner

    made = {}
    monkeypatch.setattr(ortb, "OrtRunner", lambda path, spec, backend, explicit_int8, **kw: made.setdefault(
        Path(path).name, (explicit_int8, dict(ortb._provider_options(backend, None, None, explicit_int8)))))
    m = read_manifest(quantized["sam"])
    for entry in m.components:
        open_runner(entry, quantized["sam"], "ort-trt")
    trt = "TensorrtExecutionProvider"
    assert made["image_encoder.int8.onnx"][0] and made["image_encoder.int8.onnx"][1][trt]["trt_int8_enable"]
    assert made["image_encoder.onnx"] == (False, made["image_encoder.onnx"][1])
    assert "trt_int8_enable" not in made["image_encoder.onnx"][1][trt]
    assert made["image_encoder.onnx"][1][trt]["trt_fp16_enable"]


def test_int8_engine_plan(quantized, fp32_bundles, tmp_path):
    """build-engine --precision int8: the Q/DQ encoder int8, the rest fp16; ONNX Runtime's dynamic int8 and
    a bundle without Q/DQ graphs are refused with what to do."""
    m = read_manifest(quantized["sam"])
    steps = ext.plan_sources(m, "int8", has_fp16_flag=True)
    assert [(s.source.name, s.source.precision, s.precision, s.fp16_flag) for s in steps] == [
        ("image_encoder", "int8", "int8", False), ("prompt_encoder", "fp32", "fp16", True),
        ("mask_decoder", "fp32", "fp16", True), ("decoder_context", "fp32", "fp16", True),
        ("prompt_decoder", "fp32", "fp16", True)]
    # TensorRT 11 (no FP16 flag) and only fp32 ONNX beside the Q/DQ encoder: the small components build fp32.
    steps = ext.plan_sources(m, "int8", has_fp16_flag=False)
    assert [(s.source.name, s.precision, s.fp16_flag) for s in steps] == [
        ("image_encoder", "int8", False), ("prompt_encoder", "fp32", False), ("mask_decoder", "fp32", False),
        ("decoder_context", "fp32", False), ("prompt_decoder", "fp32", False)]
    with pytest.raises(InputError, match="run `edgefm quantize BUNDLE --calibration IMAGES` first"):
        ext.plan_sources(read_manifest(fp32_bundles["sam"]), "int8", True)
    entry = m.find("image_encoder", precision="int8")[0]
    dynamic = Manifest("sam", "t", {}, {}, [ComponentEntry(
        entry.name, entry.file, entry.sha256, "onnx", "int8", entry.spec,
        info={"quantization": {"method": "onnxruntime dynamic quantization"}})])
    with pytest.raises(InputError, match="dynamic quantization \\(MatMulInteger, for CPUs\\), which TensorRT cannot"):
        ext.plan_sources(dynamic, "int8", True)


def test_requantizing_replaces_the_int8_onnx_and_its_engines(quantized, calibration, tmp_path):
    """A stale engine built from the replaced Q/DQ graph goes with it; an engine of another source stays."""
    bundle = tmp_path / "sam"
    shutil.copytree(quantized["sam"], bundle)
    m = read_manifest(bundle)
    old = m.find("image_encoder", precision="int8")[0]
    (bundle / "ie.engine").write_bytes(b"x")
    (bundle / "pe.engine").write_bytes(b"y")
    spec = old.spec
    m.components += [
        ComponentEntry("image_encoder", "ie.engine", "0", "tensorrt", "int8", spec, info={"source": old.file}),
        ComponentEntry("prompt_encoder", "pe.engine", "0", "tensorrt", "fp16", spec,
                           info={"source": "prompt_encoder.onnx"}),
    ]
    commit_components(bundle, m, [], {})
    quantize_bundle(bundle, calibration["sam"], max_images=10, method="minmax", parity_gate=False)  # not the point here
    after = read_manifest(bundle)
    assert [(c.name, c.format, c.precision) for c in after.components if c.precision == "int8"] == [
        ("image_encoder", "onnx", "int8")]
    assert after.find("image_encoder", precision="int8")[0].info["quantization"]["calibration"]["method"] == "minmax"
    assert not (bundle / "ie.engine").exists() and (bundle / "pe.engine").exists()
    assert not [p for p in bundle.iterdir() if p.name.startswith(".")]
