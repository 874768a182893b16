"""TensorRT engines: profiles from specs, compatibility checks, the build -> manifest -> runner path.

TensorRT cannot run here, so most tests drive the code through a small fake of the documented ``tensorrt``
and ``cuda.bindings.runtime`` APIs (host memory stands in for the device; the fake engine doubles its input).
What they prove is edgefm's own logic: profile ranges, manifest records, atomic updates, the checks that run
before deserializing, buffer reuse and CUDA-graph capture/replay. ``test_real_engine`` runs where TensorRT, a
GPU and cuda-python exist and skips with the reason elsewhere.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from edgefm.export import tensorrt as ext
from edgefm.runtime.backends import tensorrt as rtt
from edgefm.runtime.bundle import Bundle, sha256_file
from edgefm.runtime.errors import BackendError, BundleError, InputError
from edgefm.runtime.manifest import ComponentEntry, Manifest, read_manifest
from edgefm.runtime.sam.spec import sam_specs
from edgefm.runtime.spec import ComponentSpec, DimRange, TensorSpec
from tensorrt_fixtures import DOUBLE, H100, install_fakes, make_bundle, snapshot


@pytest.fixture
def fake_gpu(monkeypatch):
    return install_fakes(monkeypatch)

# --- profiles ------------------------------------------------------------------------------------------------


def test_profiles_from_sam_specs():
    specs = sam_specs(1024, 256, 64)
    assert ext.profiles_from_spec(specs["image_encoder"]) == [
        {"image": ((1, 3, 1024, 1024), (1, 3, 1024, 1024), (8, 3, 1024, 1024))}]
    assert ext.profiles_from_spec(specs["prompt_encoder"]) == [{
        "point_coords": ((1, 1, 2), (1, 2, 2), (128, 32, 2)),
        "point_labels": ((1, 1), (1, 2), (128, 32)),
        "mask_input": ((1, 1, 256, 256), (1, 1, 256, 256), (128, 1, 256, 256)),
        "has_mask_input": ((1,), (1,), (128,)),
    }]
    assert ext.profiles_from_spec(specs["mask_decoder"]) == [{
        "image_embeddings": ((1, 256, 64, 64),) * 3,
        "sparse_embeddings": ((1, 1, 256), (1, 2, 256), (128, 32, 256)),
        "dense_embeddings": ((1, 256, 64, 64), (1, 256, 64, 64), (128, 256, 64, 64)),
    }]


def test_profiles_with_overrides():
    specs = sam_specs(1024, 256, 64)
    over = ext.dim_overrides(max_batch=4, max_points=1)
    assert over == {"batch": 4, "image_batch": 4, "num_points": 1}
    assert ext.profiles_from_spec(specs["image_encoder"], over) == [
        {"image": ((1, 3, 1024, 1024), (1, 3, 1024, 1024), (4, 3, 1024, 1024))}]
    # opt (2 points) is clipped to the new max (1 point)
    assert ext.profiles_from_spec(specs["prompt_encoder"], over)[0]["point_labels"] == ((1, 1), (1, 1), (4, 1))
    big = ext.profiles_from_spec(specs["mask_decoder"], ext.dim_overrides(max_batch=256, max_points=64))[0]
    assert big["sparse_embeddings"] == ((1, 1, 256), (1, 2, 256), (256, 64, 256))
    assert ext.engine_spec(specs["mask_decoder"], over).dims == {"batch": DimRange(1, 1, 4),
                                                                  "num_points": DimRange(1, 1, 1)}
    with pytest.raises(InputError, match="--max-batch must be at least 1"):
        ext.dim_overrides(max_batch=0)
    spec = ComponentSpec("c", (TensorSpec("x", "float32", ("batch",)),), (), {"batch": DimRange(2, 2, 8)})
    with pytest.raises(InputError, match="new max 1 of dim 'batch' is below its min 2"):
        ext.profiles_from_spec(spec, {"batch": 1})


def test_parse_size():
    assert ext.parse_size("4GiB") == 4 * 2**30
    assert ext.parse_size("512MiB") == 512 * 2**20
    assert ext.parse_size("2GB") == 2 * 10**9
    assert ext.parse_size(1000) == 1000
    with pytest.raises(InputError, match="--workspace 'four'"):
        ext.parse_size("four")


# --- pure runtime checks ---------------------------------------------------------------------------------------


def test_engine_compat_checks():
    info = {"tensorrt_version": "10.13.0.35", "gpu": H100["name"], "compute_capability": "9.0"}
    assert rtt.check_engine_compat(info, "10.13.0.35", H100, "e.engine", "/b") == []
    with pytest.raises(BackendError) as e:
        rtt.check_engine_compat(info, "11.1.0.7", H100, "e.engine", "/b")
    assert "built with TensorRT 10.13.0.35, but TensorRT 11.1.0.7 is installed" in str(e.value)
    assert "edgefm build-engine /b" in str(e.value)
    a100 = {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    with pytest.raises(BackendError) as e:
        rtt.check_engine_compat(info, "10.13.0.35", a100, "e.engine", "/b")
    assert "compute capability 9.0" in str(e.value) and "compute capability 8.0" in str(e.value)
    assert "edgefm build-engine /b" in str(e.value)
    with pytest.raises(BackendError, match="none is visible"):
        rtt.check_engine_compat(info, "10.13.0.35", None, "e.engine", "/b")
    with pytest.raises(BundleError, match="edgefm build-engine /b"):
        rtt.check_engine_compat({"gpu": "x"}, "10.13.0.35", H100, "e.engine", "/b")
    pcie = {"name": "NVIDIA H100 PCIe", "compute_capability": "9.0"}
    (warning,) = rtt.check_engine_compat(info, "10.13.0.35", pcie, "e.engine", "/b")
    assert "NVIDIA H100 PCIe" in warning


def test_profile_choice_dtypes_and_graph_policy():
    wide = {"x": ((1, 3), (8, 3), (64, 3))}
    narrow = {"x": ((1, 3), (1, 3), (4, 3))}
    assert rtt.choose_profile([wide, narrow], {"x": (2, 3)}) == 1  # the tightest profile that fits
    assert rtt.choose_profile([wide, narrow], {"x": (9, 3)}) == 0
    with pytest.raises(InputError, match="fit none of the engine's optimization profiles"):
        rtt.choose_profile([wide, narrow], {"x": (65, 3)})
    assert rtt.profiles_from_json(rtt.profiles_to_json([wide])) == [wide]
    assert rtt.numpy_dtype(types.SimpleNamespace(name="HALF")) == np.float16
    assert rtt.numpy_dtype("DataType.INT64") == np.int64
    with pytest.raises(BackendError, match="BF16 has no numpy equivalent"):
        rtt.numpy_dtype("DataType.BF16")
    policy = rtt.GraphPolicy(after=2)
    assert [policy.observe("a") for _ in range(3)] == ["direct", "direct", "capture"]
    policy.captured = True
    assert [policy.observe("a"), policy.observe("b"), policy.observe("b")] == ["replay", "direct", "direct"]


# --- building ----------------------------------------------------------------------------------------------------


def test_build_engine_without_tensorrt(tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path / "b", sam_specs(256, 32, 16))
    before = snapshot(bundle)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails as on this machine
    with pytest.raises(BackendError) as e:
        ext.build_engine(bundle, "fp16")
    assert "TensorRT is not installed: pip install 'edgefm[tensorrt]' on a machine with an NVIDIA GPU" in str(e.value)
    assert snapshot(bundle) == before
    assert not [p for p in tmp_path.iterdir() if p.name != "b"]


def test_plan_sources():
    specs = sam_specs(256, 32, 16)
    mixed = Manifest("sam", "t", {}, {}, [
        ComponentEntry("image_encoder", "a.onnx", "0", "onnx", "fp32", specs["image_encoder"]),
        ComponentEntry("image_encoder", "a16.onnx", "0", "onnx", "fp16", specs["image_encoder"]),
        ComponentEntry("mask_decoder", "d.onnx", "0", "onnx", "fp32", specs["mask_decoder"]),
    ])
    steps = ext.plan_sources(mixed, "fp16", has_fp16_flag=True)
    assert [(s.source.file, s.fp16_flag) for s in steps] == [("a16.onnx", False), ("d.onnx", True)]
    with pytest.raises(InputError, match="re-export the bundle with --precision fp16"):
        ext.plan_sources(mixed, "fp16", has_fp16_flag=False)  # TensorRT 11.x: no FP16 flag
    assert [s.source.file for s in ext.plan_sources(mixed, "fp32", False)] == ["a.onnx", "d.onnx"]
    with pytest.raises(InputError, match="has an int8 \\(Q/DQ\\) ONNX: run `edgefm quantize BUNDLE --calibration"):
        ext.plan_sources(mixed, "int8", True)  # tests/export/test_quantize.py covers the bundles that have one
    with pytest.raises(InputError, match="--component \\['clip'\\] not in the bundle"):
        ext.plan_sources(mixed, "fp32", True, ["clip"])
    with pytest.raises(InputError, match="--precision 'bf16'"):
        ext.plan_sources(mixed, "bf16", True)


def test_build_engine_records_and_replaces(tmp_path, fake_gpu):
    trt, _ = fake_gpu
    bundle = make_bundle(tmp_path / "b", sam_specs(256, 32, 16), precisions=("fp32", "fp16"))
    entries = ext.build_engine(bundle, "fp16", "1GiB", max_batch=4, max_points=8, parity="skip")
    m = read_manifest(bundle)
    engines = m.find("prompt_encoder", format="tensorrt")
    assert [e.precision for e in engines] == ["fp16"] and len(entries) == 5
    e = engines[0]
    assert e.file.startswith("prompt_encoder.fp16.") and e.sha256 == sha256_file(bundle / e.file)
    assert e.info["source"] == "prompt_encoder.fp16.onnx" and e.info["strongly_typed"] is True
    assert (e.info["tensorrt_version"], e.info["gpu"], e.info["compute_capability"]) == (
        "10.13.0.35", H100["name"], "9.0")
    assert e.info["profiles"][0]["point_labels"] == {"min": [1, 1], "opt": [1, 2], "max": [4, 8]}
    assert e.spec.dims == {"batch": DimRange(1, 1, 4), "num_points": DimRange(1, 2, 8)}
    assert trt.log["networks"][0].flags == 1 << 5  # STRONGLY_TYPED
    # LayerNorm runs fp16 I/O in the fp16 ONNX: its statistics are pinned to fp32, the MatMuls left alone.
    assert e.info["normalization_layers_fp32"] == 1
    assert [getattr(la, "compute_precision", None) for la in trt.log["networks"][0].layers] == [None, "float32", None]
    cfg = trt.log["configs"][0]
    assert cfg.pool == {"WORKSPACE": 2**30} and cfg.flags == []
    assert cfg.profiles[0]["image"] == [[1, 3, 256, 256], [1, 3, 256, 256], [4, 3, 256, 256]]
    cache = bundle / ".cache" / "tensorrt-timing.cache"
    assert cache.read_bytes() == b"ttttt"  # one cache file, loaded and extended by each of the 5 builds
    # Rebuilding the same precision replaces the entries and their files; the ONNX entries stay.
    old = {x.file for x in m.components if x.format == "tensorrt"}
    ext.build_engine(bundle, "fp16", max_batch=2, parity="skip")
    m2 = read_manifest(bundle)
    assert len([c for c in m2.components if c.format == "tensorrt"]) == 5
    assert len([c for c in m2.components if c.format == "onnx"]) == 10
    assert m2.find("image_encoder", format="tensorrt")[0].spec.dims["image_batch"] == DimRange(1, 1, 2)
    gone = old - {c.file for c in m2.components}
    assert gone and not any((bundle / f).exists() for f in gone)
    assert not list(bundle.glob(".*tmp*"))


def test_a_refused_normalization_precision_stops_the_build(tmp_path, fake_gpu):
    trt, _ = fake_gpu

    class Refusing(trt.INormalizationLayer):
        compute_precision = property(lambda self: None)  # read-only: assigning raises AttributeError

    trt.INormalizationLayer = Refusing
    bundle = make_bundle(tmp_path / "b", sam_specs(256, 32, 16), precisions=("fp16",))
    before = snapshot(bundle)
    with pytest.raises(BackendError, match="refused to run normalization layer '/normalization' in fp32 .* "
                                           "build --precision fp32, or use --backend ort-cuda"):
        ext.build_engine(bundle, "fp16")
    assert snapshot(bundle) == before


def test_parser_errors_are_reported_and_bundle_untouched(tmp_path, fake_gpu):
    err = {"node": 12, "desc": "unsupported operator", "name": "/attn/Einsum", "op": "Einsum"}
    bundle = make_bundle(tmp_path / "b", sam_specs(256, 32, 16), errors={"mask_decoder": [err]})
    before = snapshot(bundle)
    with pytest.raises(BundleError) as e:
        ext.build_engine(bundle, "fp32", parity="skip")
    assert "rejected" in str(e.value) and "mask_decoder.fp32.onnx" in str(e.value)
    assert "node 12, name /attn/Einsum, op Einsum: unsupported operator" in str(e.value)
    assert snapshot(bundle) == before  # not even the timing cache of the components that did build


def test_tensorrt_11_has_no_normalization_control(tmp_path, monkeypatch):
    """11.x bindings lack INormalizationLayer.compute_precision: the build goes on, strongly typed, and says so."""
    trt, _ = install_fakes(monkeypatch, version="11.4.0.106")
    bundle = make_bundle(tmp_path / "b", sam_specs(256, 32, 16), precisions=("fp16",))
    entries = ext.build_engine(bundle, "fp16", parity="skip")
    assert {e.info["normalization_layers_fp32"] for e in entries} == {None}
    assert {e.info["strongly_typed"] for e in entries} == {True} and trt.log["configs"][0].flags == []


# --- running -----------------------------------------------------------------------------------------------------


def test_runner_checks_before_deserializing(tmp_path, fake_gpu, monkeypatch):
    trt, cudart = fake_gpu
    bundle = make_bundle(tmp_path / "b", {"double": DOUBLE})
    ext.build_engine(bundle, "fp32", parity="skip")
    monkeypatch.setattr(trt, "__version__", "11.0.0.1")
    with pytest.raises(BackendError, match=f"edgefm build-engine {bundle}"):
        Bundle(bundle, backend="tensorrt").runner("double")
    monkeypatch.setattr(trt, "__version__", "10.13.0.35")
    cudart.cc = (8, 9)
    with pytest.raises(BackendError, match="compute capability 9.0 .* compute capability 8.9"):
        Bundle(bundle, backend="tensorrt").runner("double")
    assert trt.log["deserialized"] == 0


def test_runner_buffers_and_cuda_graphs(tmp_path, fake_gpu):
    trt, cudart = fake_gpu
    bundle = make_bundle(tmp_path / "b", {"double": DOUBLE})
    ext.build_engine(bundle, "fp32", parity="skip")
    runner = Bundle(bundle, backend="tensorrt").runner("double")
    assert runner.backend == "tensorrt" and trt.log["deserialized"] == 1
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for i in range(4):  # direct, direct, capture + launch, replay
        np.testing.assert_array_equal(runner.run({"x": x + i})["y"], 2 * (x + i))
    assert (cudart.launches, trt.log["executes"], cudart.mallocs) == (2, 4, 2)
    x4 = np.ones((4, 3), np.float32)
    out, times = runner.run_timed({"x": x4})  # a new shape: larger buffers, the old graph dropped
    np.testing.assert_array_equal(out["y"], 2 * x4)
    assert times == {"h2d_ms": 0.25, "compute_ms": 0.25, "d2h_ms": 0.25}
    assert (cudart.destroyed, cudart.mallocs, cudart.launches) == (1, 4, 2)
    with pytest.raises(InputError, match="axis 0 \\(batch\\) must be in \\[1, 4\\]"):
        runner.run({"x": np.ones((5, 3), np.float32)})
    runner.close()
    assert cudart.mem == {}


def test_bench_splits_copies_from_compute(tmp_path, fake_gpu):
    from edgefm.runtime.bench import bench_bundle, markdown_table

    bundle = make_bundle(tmp_path / "b", {"double": DOUBLE})
    ext.build_engine(bundle, "fp32", parity="skip")
    result = bench_bundle(bundle, "tensorrt", batch=4, iters=3, warmup=2, pipelines=False)
    r = result["components"]["double"]
    assert (r["format"], r["iterations"], r["inputs"]) == ("tensorrt", 3, {"x": [4, 3]})
    assert r["transfer"] == {"method": "CUDA events", "h2d_ms": 0.25, "compute_ms": 0.25, "d2h_ms": 0.25,
                             "transfer_ms": 0.5}
    env = result["environment"]
    assert env["gpu"] == H100 and env["versions"]["tensorrt"] == "10.13.0.35" and env["threads"]["ort_intra_op"] is None
    assert "- double: compute 0.250 ms, host<->device 0.500 ms (CUDA events)" in markdown_table(result)
    with pytest.raises(InputError, match="for TensorRT engines run trtexec --loadEngine=ENGINE --dumpProfile"):
        bench_bundle(bundle, "tensorrt", profile=True)  # ONNX Runtime's profiler cannot see into an engine


def _real_tensorrt():
    """The real TensorRT, a GPU and cuda-python, or a skip that says which is missing."""
    try:
        import tensorrt
    except Exception as exc:  # the PyPI stubs raise various errors without NVIDIA's libraries
        pytest.skip(f"TensorRT is not importable here ({type(exc).__name__}: {exc}); needs NVIDIA's libraries")
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed (pip install cuda-python)")
    if rtt.current_gpu() is None:
        pytest.skip("no NVIDIA GPU is visible")
    return tensorrt


def test_real_engine(tmp_path):
    """Where TensorRT really runs: build a two-op graph with a dynamic batch, run it, compare with numpy."""
    _real_tensorrt()
    onnx = pytest.importorskip("onnx", reason="onnx is needed to write the test graph")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Relu", ["t"], ["y"])], "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])])
    folder = tmp_path / "b"
    folder.mkdir()
    # IR version 8 (opset 17's own): older TensorRT parsers refuse the newest IR versions onnx writes by default.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, folder / "double.onnx")
    entry = ComponentEntry("double", "double.onnx", sha256_file(folder / "double.onnx"), "onnx", "fp32", DOUBLE)
    Manifest("sam", "toy", {}, {}, [entry]).write(folder)
    ext.build_engine(folder, "fp32", "256MiB")
    runner = Bundle(folder, backend="tensorrt").runner("double")
    x = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
    for _ in range(4):  # the last runs replay a CUDA graph
        np.testing.assert_allclose(runner.run({"x": x})["y"], np.maximum(2 * x, 0), rtol=1e-6)
