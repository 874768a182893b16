"""build-engine's parity check: each new engine against the bundle's ONNX on ONNX Runtime, before it is added.

The inputs and the judging run on real exported bundles and real ONNX Runtime sessions; an fp16 ONNX stands in
for an fp16 engine where the judging is tested. The wiring into ``build_engine`` is driven through the TensorRT
fake of ``tensorrt_fixtures`` (its engine multiplies ``x`` by ``trt.engine_factor``) on a real ONNX graph.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the parity check's tests export bundles (edgefm[export])")

import onnx  # noqa: E402
from edgefm.export import tensorrt as ext  # noqa: E402
from edgefm.export.onnx import fp16_from_onnx, int8_from_onnx  # noqa: E402
from edgefm.export.verify import PROMPTS, ParityInputs, check_runner, failure_message, judge  # noqa: E402
from edgefm.runtime.backends.onnxruntime import OrtRunner  # noqa: E402
from edgefm.runtime.bundle import sha256_file  # noqa: E402
from edgefm.runtime.cli import main  # noqa: E402
from edgefm.runtime.clip.tokenizer import ClipTokenizer  # noqa: E402
from edgefm.runtime.errors import ParityError  # noqa: E402
from edgefm.runtime.manifest import ComponentEntry, Manifest, read_manifest  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from tensorrt_fixtures import DOUBLE, install_fakes, snapshot  # noqa: E402


def _ort(folder, entry, threads=1):
    return OrtRunner(folder / entry.file, entry.spec, "ort-cpu", threads=threads)


class Noisy:
    """A runner whose outputs carry relative noise: what a broken engine would return."""

    def __init__(self, runner, rel: float) -> None:
        self.runner, self.rel = runner, rel

    def run(self, feeds):
        rng = np.random.default_rng(1)
        return {k: v + self.rel * v.std() * rng.standard_normal(v.shape).astype(v.dtype)
                for k, v in self.runner.run(feeds).items()}


def test_sam_inputs_chain_like_the_runtime(sam_tiny_bundle):
    m = read_manifest(sam_tiny_bundle)
    entry = {c.name: c for c in m.components if c.format == "onnx" and c.precision == "fp32"}
    inputs = ParityInputs(sam_tiny_bundle, m, threads=1)
    prompt = inputs.feeds(entry["prompt_encoder"].spec)
    spec = entry["prompt_encoder"].spec
    assert {k: v.shape for k, v in prompt.items()} == spec.profile("opt")
    coords = prompt["point_coords"]
    assert coords.min() >= 0 and coords.max() < m.preprocess["image_size"]
    assert prompt["point_labels"].tolist() == [[1.0, 0.0]] and prompt["has_mask_input"].tolist() == [1.0]
    # The decoder's inputs are what the fp32 encoder and prompt encoder give, not noise.
    dec = inputs.feeds(entry["mask_decoder"].spec)
    emb = _ort(sam_tiny_bundle, entry["image_encoder"]).run(inputs.feeds(entry["image_encoder"].spec))
    sparse = _ort(sam_tiny_bundle, entry["prompt_encoder"]).run(prompt)
    np.testing.assert_array_equal(dec["image_embeddings"], emb["image_embeddings"])
    np.testing.assert_array_equal(dec["sparse_embeddings"], sparse["sparse_embeddings"])
    np.testing.assert_array_equal(dec["dense_embeddings"], sparse["dense_embeddings"])


def test_fp16_mask_decoder_passes_and_a_noisy_one_is_refused(sam_tiny_bundle, tmp_path):
    m = read_manifest(sam_tiny_bundle)
    fp32 = m.find("mask_decoder", format="onnx", precision="fp32")[0]
    fp16_from_onnx(sam_tiny_bundle / fp32.file, tmp_path / "mask_decoder.fp16.onnx")
    half = OrtRunner(tmp_path / "mask_decoder.fp16.onnx", fp32.spec, "ort-cpu", threads=1)
    source = ComponentEntry("mask_decoder", "mask_decoder.fp16.onnx", "0", "onnx", "fp16", fp32.spec)
    inputs = ParityInputs(sam_tiny_bundle, m, threads=1)
    report = check_runner(half, inputs, source, "fp16", fp32.spec)
    assert report["reference"] == fp32.file and report["passed"], report
    masks, scores = report["outputs"]["low_res_masks"], report["outputs"]["iou_predictions"]
    assert masks["mask_iou"] >= 0.99 and scores["cosine"] >= 0.999
    assert report["inputs"] == {k: list(v) for k, v in fp32.spec.profile("opt").items()}
    bad = check_runner(Noisy(half, 0.5), inputs, source, "fp16", fp32.spec)
    assert not bad["passed"] and bad["outputs"]["iou_predictions"]["cosine"] < 0.999
    text = failure_message("mask_decoder", "mask_decoder.fp16.onnx", {**bad})
    assert text.startswith("the fp16 TensorRT engine of 'mask_decoder' (built from mask_decoder.fp16.onnx) misses "
                           "the fp16 "
                           f"parity policy against {fp32.file} on ONNX Runtime CPU: ")
    assert "iou_predictions: cosine 0." in text and "pass --no-parity-gate" in text


def test_clip_text_inputs_are_real_prompts():
    from clip_fixtures import tiny_bundle

    folder = tiny_bundle("tiny-vit")
    m = read_manifest(folder)
    spec = m.find("text_encoder", format="onnx")[0].spec
    tokens = ParityInputs(folder, m).feeds(spec)["tokens"]
    tok = ClipTokenizer()
    assert tokens.shape == spec.profile("opt")["tokens"]
    assert tokens.shape[0] > len(PROMPTS)  # 80, the templates' count: the prompts repeat
    for i, row in enumerate(tokens):
        assert row[0] == tok.sot_token_id and tok.eot_token_id in row
        assert tok.decode(row).strip() == PROMPTS[i % len(PROMPTS)]


def test_dalle_inputs_and_id_outputs(tmp_path_factory):
    from dalle_fixtures import tiny_bundle

    folder = tiny_bundle(tmp_path_factory)
    m = read_manifest(folder)
    onnx_of = {c.name: c for c in m.components if c.format == "onnx"}
    inputs = ParityInputs(folder, m, threads=1)
    step = inputs.feeds(onnx_of["prior_step"].spec)
    prefill = _ort(folder, onnx_of["prior_prefill"]).run(inputs.feeds(onnx_of["prior_prefill"].spec))
    np.testing.assert_array_equal(step["k_cache"], prefill["k_cache"])
    assert step["position"].tolist() == [m.config["text_len"]]
    assert step["token"].max() < m.config["image_vocab"] and step["token"].dtype == np.int64
    codes = inputs.feeds(onnx_of["dvae_decoder"].spec)["image_tokens"]
    assert 0 <= codes.min() and codes.max() < m.config["image_vocab"]
    # The encoder's ids are judged by agreement: 10 % flipped misses fp16's 95 %.
    spec = onnx_of["dvae_encoder"].spec
    ref = _ort(folder, onnx_of["dvae_encoder"]).run(inputs.feeds(spec))
    ids = ref["image_tokens"].copy()
    assert judge(ref, {"image_tokens": ids}, "fp16", spec)["outputs"]["image_tokens"]["id_agreement"] == 1.0
    flat = ids.reshape(-1)
    flat[: flat.size // 10 + 1] = (flat[: flat.size // 10 + 1] + 1) % m.config["image_vocab"]
    report = judge(ref, {"image_tokens": ids}, "fp16", spec)
    assert not report["passed"] and report["outputs"]["image_tokens"]["failures"][0].startswith("ids agree 0.8")


# --- the gate inside build_engine (TensorRT faked, the ONNX and ONNX Runtime real) -------------------------------


def _double_bundle(folder):
    folder.mkdir()
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "double",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              folder / "double.onnx")
    entry = ComponentEntry("double", "double.onnx", sha256_file(folder / "double.onnx"), "onnx", "fp32", DOUBLE)
    Manifest("sam", "toy", {}, {"image_size": 8}, [entry]).write(folder)
    return folder


def test_build_engine_gates_on_parity(tmp_path, monkeypatch, capsys):
    trt, _ = install_fakes(monkeypatch)
    bundle = _double_bundle(tmp_path / "b")
    trt.engine_factor = 2.01  # cosine 1, but off by 0.5 %: the fp32 policy's max-abs bound refuses it
    before = snapshot(bundle)
    with pytest.raises(ParityError, match=r"the fp32 TensorRT engine of 'double' \(built from double.onnx\) misses "
                                          r"the fp32 parity policy against double.onnx on ONNX Runtime CPU: y: max"):
        ext.build_engine(bundle, "fp32")
    assert snapshot(bundle) == before
    ext.build_engine(bundle, "fp32", parity="report")  # --no-parity-gate: added, and recorded as failed
    rep = read_manifest(bundle).parity["double.tensorrt.fp32"]
    assert (rep["passed"], rep["gate"], rep["outputs"]["y"]["cosine"] > 0.9999999) == (False, False, True)
    trt.engine_factor = 2.0
    assert main(["build-engine", str(bundle), "--precision", "fp32"]) in (0, None)
    out = capsys.readouterr().out
    assert "  parity: passed fp32 policy vs double.onnx (ONNX Runtime CPU): y cosine 1.000000, max abs 0" in out
    m = read_manifest(bundle)
    (engine,) = m.find("double", format="tensorrt")
    assert engine.info["parity"] == {"checked": True, "passed": True, "reference": "double.onnx"}
    assert engine.info["builder_flags"] == ["no TF32"] and trt.log["configs"][-1].cleared == ["TF32"]
    assert m.parity["double.tensorrt.fp32"]["inputs"] == {"x": [2, 3]}  # the profile's opt shape
    main(["inspect", str(bundle)])
    out = capsys.readouterr().out.splitlines()
    line = next(x for x in out if "double.tensorrt.fp32.y" in x)
    assert "PASS  cos 1.0000000  max abs 0.00e+00" in line and line.endswith("vs double.onnx")
    engine_line = next(x for x in out if x.strip().startswith("TensorRT 10.13.0.35"))
    assert engine_line.strip().startswith("TensorRT 10.13.0.35 for NVIDIA H100 80GB HBM3 (sm 9.0), from double.onnx, "
                                          "strongly typed, no TF32, built ")
    assert engine_line.endswith("; parity passed vs double.onnx")


# --- edgefm verify: any bundle on any backend ---------------------------------------------------------------------


def test_verify_a_bundle_on_a_backend(sam_tiny_bundle, tmp_path, capsys):
    import json
    import shutil

    from edgefm.export.bundle import commit_components

    folder = shutil.copytree(sam_tiny_bundle, tmp_path / "b")
    m = read_manifest(folder)

    def add_fp16(tamper: str | None = None, precision: str = "fp16") -> None:
        entries, files = [], {}
        for c in [c for c in m.components if c.precision == "fp32"]:
            dst = tmp_path / f"{c.name}.{precision}.onnx"
            (fp16_from_onnx if precision == "fp16" else int8_from_onnx)(folder / c.file, dst)
            if c.name == tamper:  # a decoder whose MatMul weights went wrong (30 % noise), as a bad build might
                model, rng = onnx.load(str(dst)), np.random.default_rng(0)
                for w in [w for w in model.graph.initializer if "MatMul" in w.name]:
                    a = onnx.numpy_helper.to_array(w)
                    a = a + (0.3 * a.std() * rng.standard_normal(a.shape)).astype(a.dtype)
                    w.CopyFrom(onnx.numpy_helper.from_array(a, w.name))
                onnx.save(model, str(dst))
            entries.append(ComponentEntry(c.name, dst.name, sha256_file(dst), "onnx", precision, c.spec))
            files[dst.name] = dst
        commit_components(folder, m, entries, files)

    add_fp16()
    report = tmp_path / "verify.json"
    assert main(["verify", str(folder), "--backend", "ort-cpu", "--precision", "fp16", "--threads", "1",
                 "--json", str(report)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{folder} on ort-cpu:" and len(out) == 6
    assert out[1].startswith("  image_encoder    image_encoder.fp16.onnx (fp16)  passed fp16 policy vs image_encoder")
    result = json.loads(report.read_text())
    dec = result["components"]["mask_decoder"]
    assert result["passed"] and dec["reference"] == m.find("mask_decoder", precision="fp32")[0].file
    assert dec["outputs"]["low_res_masks"]["mask_iou"] >= 0.99 and dec["outputs"]["iou_predictions"]["cosine"] > 0.999
    # The other end of the ranges: the decoder at its largest prompt batch and point count.
    assert main(["verify", str(folder), "--backend", "ort-cpu", "--precision", "fp16", "--component", "mask_decoder",
                 "--shapes", "min,max", "--json", str(report)]) == 0
    ends = json.loads(report.read_text())["components"]
    spec = m.find("mask_decoder", precision="fp32")[0].spec
    assert set(ends) == {"mask_decoder@min", "mask_decoder@max"}
    assert ends["mask_decoder@max"]["inputs"]["sparse_embeddings"][:2] == [spec.dims["batch"].max,
                                                                          spec.dims["num_points"].max]
    assert ends["mask_decoder@min"]["inputs"]["sparse_embeddings"][:2] == [1, 1]
    assert all(r["passed"] for r in ends.values()), ends
    capsys.readouterr()
    assert main(["verify", str(folder), "--shapes", "opt,biggest"]) == 2
    assert "--shapes 'opt,biggest': choose among opt, min, max (comma-separated)" in capsys.readouterr().err
    # Without --precision the CPU runs the fp32 files, which are the references: nothing to compare.
    assert main(["verify", str(folder), "--backend", "ort-cpu"]) == 0
    assert capsys.readouterr().out.count("skipped: it is the reference itself (ONNX Runtime CPU)") == 5
    # Export's dynamic int8 is judged against fp32 too (by int8's policy); only calibrated Q/DQ graphs are
    # their own references.
    add_fp16(precision="int8")
    assert main(["verify", str(folder), "--backend", "ort-cpu", "--precision", "int8", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "  image_encoder    image_encoder.int8.onnx (int8)  passed int8 policy vs image_encoder" in out
    assert "skipped" not in out
    add_fp16(tamper="mask_decoder")
    assert main(["verify", str(folder), "--backend", "ort-cpu", "--precision", "fp16", "--threads", "1"]) == 2
    captured = capsys.readouterr()
    assert "  mask_decoder     mask_decoder.fp16.onnx (fp16)  FAILED fp16 policy" in captured.out
    assert ("edgefm verify: error: 1 of 5 component(s) miss their parity policy on ort-cpu: mask_decoder"
            in captured.err)
