"""``--backend auto`` and explicit backends: what is chosen from what is installed *and* usable, and why not.

onnxruntime-gpu lists its CUDA and TensorRT providers whether or not a GPU or TensorRT's libraries exist
(seen on the H100 machine: TensorrtExecutionProvider listed, no libnvinfer), so listing is not enough.
"""

from __future__ import annotations

import logging

import pytest
from edgefm.runtime import backends
from edgefm.runtime.backends import onnxruntime as ortb
from edgefm.runtime.errors import BackendError

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture
def machine(monkeypatch):
    """Set what this 'machine' has: providers listed, a visible GPU, TensorRT libraries, TensorRT Python."""

    def set_(providers=("CPUExecutionProvider",), gpu=False, trt_libs=False, trt_native=False):
        monkeypatch.setattr(ortb.ort(), "get_available_providers", lambda: list(providers))
        monkeypatch.setattr(ortb, "gpu_visible", lambda: gpu)
        monkeypatch.setattr(ortb, "tensorrt_libraries", lambda: trt_libs)
        monkeypatch.setattr(backends, "_tensorrt_usable", lambda: trt_native)

    return set_


@pytest.mark.parametrize("have, want", [
    (dict(), ["ort-cpu"]),
    (dict(providers=ALL), ["ort-cpu"]),  # onnxruntime-gpu on a machine without a GPU
    (dict(providers=ALL, gpu=True), ["ort-cuda", "ort-cpu"]),  # ... with a GPU, without TensorRT
    (dict(providers=ALL, gpu=True, trt_libs=True), ["ort-trt", "ort-cuda", "ort-cpu"]),
    (dict(providers=ALL, gpu=True, trt_libs=True, trt_native=True), ["tensorrt", "ort-trt", "ort-cuda", "ort-cpu"]),
])
def test_available_backends_best_first(machine, have, want):
    machine(**have)
    assert backends.available_backends() == want


def test_auto_prefers_native_tensorrt_only_for_bundles_with_engines(machine, caplog):
    machine(providers=ALL, gpu=True, trt_libs=True, trt_native=True)
    with caplog.at_level(logging.INFO, logger="edgefm"):
        assert backends.resolve_backend("auto", {"onnx", "tensorrt"}) == "tensorrt"
        assert backends.resolve_backend("auto", {"onnx"}) == "ort-trt"
    assert "backend auto -> tensorrt (usable here, best first: tensorrt, ort-trt, ort-cuda, ort-cpu)" in caplog.text
    assert "backend auto -> ort-trt" in caplog.text


@pytest.mark.parametrize("have, name, why", [
    (dict(), "ort-cuda", "this onnxruntime build has no CUDA provider"),
    (dict(providers=ALL), "ort-cuda", "no CUDA GPU is visible"),
    (dict(providers=ALL, gpu=True), "ort-trt", "TensorRT's libraries (libnvinfer) cannot be loaded"),
    (dict(providers=ALL, gpu=True), "tensorrt", "TensorRT is not importable or no GPU is visible"),
])
def test_explicit_backend_that_cannot_run_says_why(machine, have, name, why):
    machine(**have)
    with pytest.raises(BackendError, match=f"backend '{name}' cannot be used: .*available: "):
        backends.resolve_backend(name, {"onnx", "tensorrt"})
    with pytest.raises(BackendError) as err:
        backends.resolve_backend(name, {"onnx", "tensorrt"})
    assert why in str(err.value)


def test_native_tensorrt_needs_engines_in_the_bundle(machine):
    machine(providers=ALL, gpu=True, trt_libs=True, trt_native=True)
    with pytest.raises(BackendError, match=r"the bundle has no TensorRT engines \(run `edgefm build-engine`\)"):
        backends.resolve_backend("tensorrt", {"onnx"})


def test_unknown_backend_name(machine):
    machine()
    with pytest.raises(BackendError, match="unknown backend 'cuda'; choose one of"):
        backends.resolve_backend("cuda")


def test_fp32_on_cuda_is_fp32_unless_tf32_is_asked(machine, monkeypatch, sam_tiny_bundle):
    """ONNX Runtime's CUDA provider runs fp32 MatMul/Conv in TF32 unless told not to; edgefm tells it not to,
    so an fp32 bundle on ort-cuda can meet the fp32 policy. ``tf32=True`` (bench --tf32) opts in. The session
    itself needs a GPU: the options are recorded where open_runner hands them to OrtRunner."""
    from pathlib import Path

    from edgefm.runtime.bundle import Bundle
    from edgefm.runtime.errors import InputError

    machine(providers=ALL, gpu=True)
    made = {}
    monkeypatch.setattr(ortb, "OrtRunner", lambda path, spec, backend, explicit_int8, **kw: made.setdefault(
        Path(path).name, dict(ortb._provider_options(backend, None, kw.get("cuda_options")))))
    Bundle(sam_tiny_bundle, "ort-cuda").runner("image_encoder")
    Bundle(sam_tiny_bundle, "ort-cuda", tf32=True).runner("prompt_encoder")
    cuda = "CUDAExecutionProvider"
    assert made["image_encoder.onnx"][cuda]["use_tf32"] == "0"
    assert made["prompt_encoder.onnx"][cuda]["use_tf32"] == "1"
    assert made["image_encoder.onnx"][cuda]["cudnn_conv_algo_search"] == "EXHAUSTIVE"  # the rest is kept
    with pytest.raises(InputError, match="--tf32 is a math mode of ONNX Runtime's CUDA provider .* not of "
                                         "'ort-cpu': CPUs have no TF32"):
        Bundle(sam_tiny_bundle, "ort-cpu", tf32=True)
    # onnxruntime-gpu before 1.18 has no use_tf32 and refuses options it does not know: none is passed there.
    monkeypatch.setattr(ortb.ort(), "__version__", "1.17.3")
    assert "use_tf32" not in dict(ortb._provider_options("ort-cuda", None))[cuda]
    monkeypatch.setattr(ortb.ort(), "__version__", "1.18.0.dev20240301")
    assert dict(ortb._provider_options("ort-cuda", None))[cuda]["use_tf32"] == "0"


def test_ort_trt_builds_one_profile_over_the_spec(machine, monkeypatch, sam_tiny_bundle):
    """ort-trt hands TensorRT one profile over the manifest's ranges, so no later shape inside them rebuilds
    an engine mid-stream; inputs without a free dim stay out of it. (Sessions open on the CPU provider here:
    TensorRT's is not installed; the options are what OrtRunner opened them with.)"""
    from edgefm.runtime.bundle import Bundle

    machine(providers=ALL, gpu=True, trt_libs=True)
    monkeypatch.setattr(ortb.OrtRunner, "_open", lambda self, so, providers: ortb.ort().InferenceSession(
        str(self.path), providers=["CPUExecutionProvider"]))
    bundle = Bundle(sam_tiny_bundle, "ort-trt")
    trt = "TensorrtExecutionProvider"
    pe = dict(bundle.runner("prompt_encoder").providers)[trt]
    assert pe["trt_profile_min_shapes"] == "point_coords:1x1x2,point_labels:1x1,mask_input:1x1x64x64,has_mask_input:1"
    assert pe["trt_profile_opt_shapes"] == "point_coords:1x2x2,point_labels:1x2,mask_input:1x1x64x64,has_mask_input:1"
    assert pe["trt_profile_max_shapes"] == ("point_coords:128x32x2,point_labels:128x32,mask_input:128x1x64x64,"
                                            "has_mask_input:128")
    dec = dict(bundle.runner("mask_decoder").providers)[trt]
    assert dec["trt_profile_max_shapes"] == "sparse_embeddings:128x32x32,dense_embeddings:128x32x16x16"
    assert dec["trt_fp16_enable"] and dec["trt_engine_cache_enable"]
