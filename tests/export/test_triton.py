"""``edgefm triton``: model repositories checked against Triton's own config schema and against the files served.

Triton itself cannot run here (no server, no GPU). What is checked instead: every ``config.pbtxt`` parses into
Triton's ``inference.ModelConfig`` message (the generated code shipped in ``tritonclient``; the text-format
parser refuses unknown fields, wrong types and bad enum values); the declared inputs and outputs match the
graph file in the version folder (names, dtypes, dims, with the batch dim taken off where Triton batches);
each model runs at its warm-up shapes from the repository's own copy; and SAM's ensemble, executed step by step
as its maps say, gives what the bundle's runners give.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from clip_fixtures import tiny_bundle as clip_bundle
from dalle_fixtures import tiny_bundle as dalle_bundle
from edgefm.export.triton import write_repository
from edgefm.runtime.bundle import Bundle
from edgefm.runtime.cli import main
from edgefm.runtime.errors import BundleError, InputError
from tensorrt_fixtures import H100, install_fakes, make_bundle, snapshot

ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(int64)": "TYPE_INT64",
             "tensor(int32)": "TYPE_INT32", "tensor(bool)": "TYPE_BOOL", "tensor(uint8)": "TYPE_UINT8"}


@pytest.fixture(scope="module")
def pb2():
    """Triton's ModelConfig protobuf, loaded from tritonclient without its grpc client (which needs grpcio)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("tritonclient is not installed (pip install 'edgefm[test]'): Triton's config schema is needed")
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    mod_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def parse(pb2, folder: Path):
    from google.protobuf import text_format

    return text_format.Parse((folder / "config.pbtxt").read_text(), pb2.ModelConfig())


def dtype_name(pb2, value: int) -> str:
    return pb2.DataType.Name(value)


def check_against_graph(pb2, config, folder: Path) -> None:
    """The config's I/O is the served file's I/O, as Triton checks at load time."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "1" / config.default_model_filename),
                                providers=["CPUExecutionProvider"])
    batched = config.max_batch_size > 0
    for declared, actual in ((config.input, sess.get_inputs()), (config.output, sess.get_outputs())):
        assert [t.name for t in declared] == [a.name for a in actual]
        for t, a in zip(declared, actual):
            assert dtype_name(pb2, t.data_type) == ORT_TYPES[a.type], t.name
            dims = ([-1] if batched else []) + list(t.dims)
            graph = [g if isinstance(g, int) else -1 for g in a.shape]
            if declared is config.output:
                # Triton's onnxruntime backend compares outputs exactly (compare_exact): -1 where the graph has
                # a free dim, the size where it has a fixed one.
                assert dims == graph, (t.name, dims, a.shape)
            else:
                # Inputs: a fixed dim of the graph must be declared as it is; a free one may be declared -1 or a
                # size (the warm-up run checks the sizes).
                assert len(dims) == len(graph), t.name
                assert all(g in (-1, d) for d, g in zip(dims, graph)), (t.name, dims, a.shape)
            if batched:
                assert not isinstance(a.shape[0], int), f"{t.name}: Triton batches along a fixed dim"


def check_against_spec(config, spec) -> None:
    """Every output is declared with the manifest's sizes: the exporter writes them into the graph, so ONNX
    Runtime (and Triton, which asks it) does not leave them free or fill them in by version."""
    batched = config.max_batch_size > 0
    for t in config.output:
        (want,) = [o.shape for o in spec.outputs if o.name == t.name]
        assert list(t.dims) == [d if isinstance(d, int) else -1 for d in want[1 if batched else 0:]], t.name


def run_warmup(pb2, config, folder: Path) -> dict[str, np.ndarray]:
    """What Triton's warm-up sends (zeros at the declared shapes), run on the repository's own copy."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    types = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64}
    (warm,) = config.model_warmup
    feeds = {}
    for name, value in warm.inputs.items():
        shape = ([warm.batch_size] if config.max_batch_size > 0 else []) + list(value.dims)
        assert value.zero_data
        feeds[name] = np.zeros(shape, types[dtype_name(pb2, value.data_type)])
    assert set(feeds) == {t.name for t in config.input}
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    for t in config.output:
        arr = outs[t.name]
        dims = ([warm.batch_size] if config.max_batch_size > 0 else []) + list(t.dims)
        assert all(d in (-1, n) for d, n in zip(dims, arr.shape)) and len(dims) == arr.ndim, (t.name, arr.shape)
        assert arr.dtype != np.float32 or np.isfinite(arr).all(), t.name
    return outs


def test_sam_repository(pb2, sam_tiny_bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["triton", str(sam_tiny_bundle), "--out", str(repo), "--name", "sam"]) == 0
    assert "wrote 6 models" in capsys.readouterr().out
    assert sorted(p.name for p in repo.iterdir()) == ["sam_decoder_context", "sam_image_encoder", "sam_mask_decoder",
                                                      "sam_prompt_decoder", "sam_prompt_encoder", "sam_prompt_to_masks"]
    configs = {p.name: parse(pb2, p) for p in repo.iterdir()}
    for name, config in configs.items():
        assert config.name == name
    enc = configs["sam_image_encoder"]
    assert enc.backend == "onnxruntime" and enc.max_batch_size == 8 and enc.HasField("dynamic_batching")
    assert list(enc.input[0].dims) == [3, 256, 256]
    (group,) = enc.instance_group
    assert (group.count, pb2.ModelInstanceGroup.Kind.Name(group.kind)) == (1, "KIND_GPU")
    (acc,) = enc.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "cuda" and dict(acc.parameters) == {"use_tf32": "0"}  # fp32 is fp32, as in the runtime
    # The ensemble's members take whole tensors: the decoder's embedding is one image's, not a batch.
    for name in ("sam_prompt_encoder", "sam_mask_decoder", "sam_decoder_context", "sam_prompt_decoder"):
        assert configs[name].max_batch_size == 0 and not configs[name].HasField("dynamic_batching")
    for name in ("sam_image_encoder", "sam_prompt_encoder", "sam_mask_decoder", "sam_decoder_context",
                 "sam_prompt_decoder"):
        check_against_graph(pb2, configs[name], repo / name)
        check_against_spec(configs[name], Bundle(sam_tiny_bundle, "ort-cpu").spec(name[4:]))
        run_warmup(pb2, configs[name], repo / name)
        got = (repo / name / "1" / "model.onnx").read_bytes()
        assert got == (sam_tiny_bundle / f"{name[4:]}.onnx").read_bytes()
    assert list((repo / "sam_prompt_to_masks" / "1").iterdir()) == []

    # The ensemble, run as its maps say, gives what the runtime's prompt encoder -> mask decoder chain gives.
    ens = configs["sam_prompt_to_masks"]
    assert ens.platform == "ensemble" and ens.max_batch_size == 0
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["sam_prompt_encoder", "sam_mask_decoder"]
    rng = np.random.default_rng(0)
    feeds = {"point_coords": rng.uniform(0, 256, (3, 2, 2)).astype(np.float32),
             "point_labels": np.array([[1, -1], [2, 3], [1, 0]], np.float32),
             "mask_input": np.zeros((3, 1, 64, 64), np.float32), "has_mask_input": np.zeros(3, np.float32),
             "image_embeddings": rng.standard_normal((1, 32, 16, 16)).astype(np.float32)}
    declared = {t.name: t for t in ens.input}
    assert set(declared) == set(feeds)
    for name, arr in feeds.items():
        assert len(declared[name].dims) == arr.ndim and all(d in (-1, n) for d, n in zip(declared[name].dims,
                                                                                             arr.shape))
    import onnxruntime as ort

    tensors = dict(feeds)
    for step in ens.ensemble_scheduling.step:
        sess = ort.InferenceSession(str(repo / step.model_name / "1" / "model.onnx"),
                                    providers=["CPUExecutionProvider"])
        member = configs[step.model_name]
        assert set(step.input_map) == {t.name for t in member.input}
        assert set(step.output_map) <= {t.name for t in member.output}
        outs = dict(zip([o.name for o in sess.get_outputs()],
                        sess.run(None, {k: tensors[v] for k, v in step.input_map.items()})))
        tensors.update({v: outs[k] for k, v in step.output_map.items()})
    bundle = Bundle(sam_tiny_bundle, "ort-cpu")
    mid = bundle.runner("prompt_encoder").run({k: feeds[k] for k in
                                               ("point_coords", "point_labels", "mask_input", "has_mask_input")})
    want = bundle.runner("mask_decoder").run({"image_embeddings": feeds["image_embeddings"], **mid})
    assert {t.name for t in ens.output} == set(want)
    for name in want:
        np.testing.assert_array_equal(tensors[name], want[name])


def test_clip_and_dalle_batching(pb2, tmp_path, tmp_path_factory):
    """Triton batches what leads with one batch dim everywhere; the prior's KV cache (batch second) and step
    position are passed whole."""
    clip = clip_bundle("tiny-vit")
    written = write_repository(clip, tmp_path / "repo", prefix="clip", device="cpu", instances=2,
                               queue_delay_us=500)
    assert sorted(written) == ["clip_image_encoder", "clip_text_encoder"]
    text = parse(pb2, written["clip_text_encoder"])
    manifest_max = Bundle(clip, "ort-cpu").spec("text_encoder").dims["text_batch"].max
    assert text.max_batch_size == manifest_max and list(text.input[0].dims) == [-1]  # tokens: (batch, length)
    assert text.dynamic_batching.max_queue_delay_microseconds == 500
    (group,) = text.instance_group
    assert (group.count, pb2.ModelInstanceGroup.Kind.Name(group.kind)) == (2, "KIND_CPU")
    assert not text.HasField("optimization")  # no CUDA options on a CPU instance
    for name, folder in written.items():
        config = parse(pb2, folder)
        check_against_graph(pb2, config, folder)
        check_against_spec(config, Bundle(clip, "ort-cpu").spec(name[5:]))
        run_warmup(pb2, config, folder)

    dalle = dalle_bundle(tmp_path_factory)
    written = write_repository(dalle, tmp_path / "repo", prefix="dalle")
    configs = {n: parse(pb2, f) for n, f in written.items()}
    assert configs["dalle_dvae_decoder"].max_batch_size > 0 and configs["dalle_dvae_encoder"].max_batch_size > 0
    assert configs["dalle_prior_prefill"].max_batch_size == 0 and configs["dalle_prior_step"].max_batch_size == 0
    for name, config in configs.items():
        check_against_graph(pb2, config, written[name])
        check_against_spec(config, Bundle(dalle, "ort-cpu").spec(name[6:]))
        run_warmup(pb2, config, written[name])
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == sorted([*written, "clip_image_encoder",
                                                                           "clip_text_encoder"])


def test_existing_models_are_kept_unless_overwrite(sam_tiny_bundle, tmp_path):
    repo = tmp_path / "repo"
    write_repository(sam_tiny_bundle, repo, prefix="sam")
    (repo / "other_model").mkdir()
    before = snapshot(repo)
    with pytest.raises(InputError, match=r"already has the models \['sam_decoder_context', 'sam_image_encoder', "
                                         r"'sam_mask_decoder', 'sam_prompt_decoder', 'sam_prompt_encoder', "
                                         r"'sam_prompt_to_masks'\]; pass --overwrite"):
        write_repository(sam_tiny_bundle, repo, prefix="sam", device="cpu")
    assert snapshot(repo) == before and not list(repo.glob(".edgefm-*"))
    write_repository(sam_tiny_bundle, repo, prefix="sam", device="cpu", overwrite=True)
    assert "KIND_CPU" in (repo / "sam_image_encoder" / "config.pbtxt").read_text()
    assert (repo / "other_model").is_dir() and not list(repo.glob(".edgefm-*"))


def test_refusals(sam_tiny_bundle, tmp_path, capsys):
    out = tmp_path / "repo"
    with pytest.raises(BundleError, match=r"has no TensorRT engines: run `edgefm build-engine .*` on a machine "
                                          "with the GPU and TensorRT version of your Triton server"):
        write_repository(sam_tiny_bundle, out, backend="tensorrt")
    with pytest.raises(InputError, match="--backend tensorrt needs --device gpu"):
        write_repository(sam_tiny_bundle, out, backend="tensorrt", device="cpu")
    with pytest.raises(InputError, match="--precision 'fp16': no onnx component of .* has it"):
        write_repository(sam_tiny_bundle, out, precision="fp16")
    with pytest.raises(InputError, match="Triton model names are folder names"):
        write_repository(sam_tiny_bundle, out, prefix="a b")
    assert not out.exists()
    # A changed file is refused by its manifest sha256 before anything is written.
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in sam_tiny_bundle.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "mask_decoder.onnx").write_bytes(b"not onnx")
    assert main(["triton", str(broken), "--out", str(out)]) == 2
    assert "mask_decoder.onnx does not match the sha256" in capsys.readouterr().err and not out.exists()


def test_tensorrt_engines(pb2, tmp_path, monkeypatch):
    """Engines are served as tensorrt_plan with the ranges they were built for; the header says which TensorRT and
    GPU they need. (The TensorRT build itself is the test fake's; the files are copied byte for byte.)"""
    from edgefm.export import tensorrt as ext
    from edgefm.runtime.sam.spec import sam_specs

    install_fakes(monkeypatch)
    bundle = make_bundle(tmp_path / "b", sam_specs(256, 32, 16), precisions=("fp32", "fp16"))
    ext.build_engine(bundle, "fp16", "1GiB", max_batch=4, max_points=8, parity="skip")
    written = write_repository(bundle, tmp_path / "repo", backend="tensorrt", prefix="trt")
    enc = parse(pb2, written["trt_image_encoder"])
    assert enc.platform == "tensorrt_plan" and enc.default_model_filename == "model.plan"
    assert enc.max_batch_size == 4  # the engine's profile, not the ONNX spec's 8
    assert not enc.HasField("optimization")  # TF32 is decided when an engine is built
    engine = json.loads((bundle / "manifest.json").read_text())
    files = {c["name"]: c["file"] for c in engine["components"] if c["format"] == "tensorrt"}
    for comp, file in files.items():
        assert (written[f"trt_{comp}"] / "1" / "model.plan").read_bytes() == (bundle / file).read_bytes()
    header = (written["trt_mask_decoder"] / "config.pbtxt").read_text().splitlines()[1]
    assert f"TensorRT 10.13.0.35 engine for {H100['name']} (compute capability 9.0)" in header
    assert "rebuild with `edgefm build-engine` where Triton runs" in header
    dec = parse(pb2, written["trt_mask_decoder"])
    assert [list(t.dims) for t in dec.input] == [[1, 32, 16, 16], [-1, -1, 32], [-1, 32, 16, 16]]


def test_external_data_travels_with_the_graph(pb2, sam_tiny_bundle, tmp_path):
    """A graph with its weights in a .onnx.data file (SAM ViT-H fp32): the file is copied beside model.onnx
    under the name the graph records, and the repository's copy loads and runs."""
    import dataclasses
    import shutil

    import onnx
    from edgefm.runtime.bundle import sha256_file
    from edgefm.runtime.manifest import read_manifest

    bundle = tmp_path / "bundle"
    shutil.copytree(sam_tiny_bundle, bundle)
    model = onnx.load(str(bundle / "image_encoder.onnx"))
    onnx.save_model(model, str(bundle / "image_encoder.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="image_encoder.onnx.data", size_threshold=0)
    manifest = read_manifest(bundle)
    manifest.components = [
        dataclasses.replace(c, sha256=sha256_file(bundle / c.file),
                            extra_files={"image_encoder.onnx.data": sha256_file(bundle / "image_encoder.onnx.data")})
        if c.file == "image_encoder.onnx" else c for c in manifest.components]
    manifest.write(bundle)
    written = write_repository(bundle, tmp_path / "repo", prefix="sam")
    folder = written["sam_image_encoder"]
    assert sorted(p.name for p in (folder / "1").iterdir()) == ["image_encoder.onnx.data", "model.onnx"]
    config = parse(pb2, folder)
    got = run_warmup(pb2, config, folder)["image_embeddings"]
    want = Bundle(sam_tiny_bundle, "ort-cpu").runner("image_encoder").run(
        {"image": np.zeros((1, 3, 256, 256), np.float32)})["image_embeddings"]
    np.testing.assert_array_equal(got, want)
