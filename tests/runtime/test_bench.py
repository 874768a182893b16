"""``edgefm bench`` on ORT CPU with tiny SAM, CLIP and DALL·E bundles: JSON schema, statistics, table, chart,
pipelines on the families' runtime APIs, errors.

Speed is never asserted: only the structure and the internal consistency of the figures.
"""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import pytest
from edgefm.runtime.bench import (
    bench_bundle,
    dummy_feeds,
    latency_stats,
    markdown_table,
    register,
    value_rules,
)
from edgefm.runtime.bench_pipelines import CAMERA_HW, _clip_pipelines
from edgefm.runtime.bundle import Bundle
from edgefm.runtime.dalle.spec import dvae_specs
from edgefm.runtime.errors import BackendError, InputError
from edgefm.runtime.manifest import Manifest
from edgefm.runtime.sam.spec import sam_specs

COMPONENTS = ("image_encoder", "prompt_encoder", "mask_decoder", "decoder_context", "prompt_decoder")
PIPELINES = ("sam.set_image", "sam.predict")


def assert_sane(name: str, r: dict, iterations: int) -> None:
    """One row's statistics are consistent with its samples (never a speed)."""
    ms = r["latency_ms"]
    assert r["iterations"] == iterations and len(r["samples_ms"]) == iterations, name
    assert 0 < ms["min"] <= ms["median"] <= ms["p90"] <= ms["p99"] <= ms["max"], name
    assert ms["min"] <= ms["mean"] <= ms["max"], name
    assert ms["min"] == pytest.approx(min(r["samples_ms"]), abs=1e-3)
    assert ms["max"] == pytest.approx(max(r["samples_ms"]), abs=1e-3)
    assert r["throughput"]["items_per_s"] == pytest.approx(r["throughput"]["qps"] * r["batch"])


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edgefm")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def bench_run(sam_tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = _cli(["bench", str(sam_tiny_bundle), "--backend", "ort-cpu", "--batch", "2", "--iters", "4",
                 "--warmup", "1", "--threads", "1", "--json", str(out / "b.json"), "--plot", str(out / "b.png")])
    return args, out


def test_json_stats_and_stamp(bench_run, capsys):
    args, out = bench_run
    args.func(args)
    stdout = capsys.readouterr().out
    result = json.loads((out / "b.json").read_text())
    assert result["schema"] == "edgefm.bench/1" and result["backend"] == "ort-cpu"
    assert (result["iters"], result["warmup"], result["batch"]) == (4, 1, 2)
    assert tuple(result["components"]) == COMPONENTS and tuple(result["pipelines"]) == PIPELINES
    for name, r in {**result["components"], **result["pipelines"]}.items():
        assert_sane(name, r, 4)
    for name in COMPONENTS:  # cold start: opening the component, then its first call, apart from the warm-up
        cold = result["components"][name]["cold_start"]
        assert cold["load_ms"] > 0 and cold["first_call_ms"] > 0
    assert "- cold start (open incl. sha256 check + first call): image_encoder " in stdout
    enc = result["components"]["image_encoder"]
    assert enc["inputs"] == {"image": [2, 3, 256, 256]} and enc["precision"] == "fp32" and enc["transfer"] is None
    dec = result["components"]["mask_decoder"]["inputs"]
    assert dec["image_embeddings"][0] == 1 and dec["sparse_embeddings"][:2] == [2, 2]  # batch 2, opt 2 points
    env = result["environment"]
    for key in ("cpu", "cpu_cores", "gpu", "versions", "backend", "precision", "threads", "timestamp"):
        assert key in env, key
    assert env["versions"]["onnxruntime"] and env["versions"]["numpy"] == np.__version__
    assert env["threads"] == {"requested": 1, "ort_intra_op": 1} and env["precision"] == ["fp32"]
    assert env["tf32"] is None  # a CUDA math mode: not applicable on the CPU
    assert len(env["load_average"]["start"]) == len(env["load_average"]["end"]) == 3
    for name, r in {**result["components"], **result["pipelines"]}.items():  # 4 runs: too few for a 95% CI
        assert r["median_ci95_ms"] is None and r["cv"] == pytest.approx(np.std(r["samples_ms"]) / np.mean(
            r["samples_ms"]), rel=0.02), name  # samples are rounded to 0.1 µs
    assert isinstance(result["warnings"], list)
    assert all(f"- WARNING: {w}" in stdout for w in result["warnings"])
    assert result["memory"]["peak_host_rss_mib"] > 0
    # The markdown table: a header, a separator and one row per component and pipeline.
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| component | precision | inputs | min ms | median ms | median 95% CI |")
    assert len(rows) == 1 + len(COMPONENTS) + len(PIPELINES)
    for name in COMPONENTS:
        assert any(row.startswith(f"| {name} | fp32 |") for row in rows), name
    for name in PIPELINES:
        assert any(row.startswith(f"| {name} (pipeline) |") for row in rows), name
    image = cv2.imread(str(out / "b.png"))
    assert image is not None and image.shape[1] == 1000 and 250 <= image.shape[0] <= 600
    assert (image < 128).any() and (image == 255).all(axis=2).mean() > 0.5  # dark bars/text on white


def test_feeds_are_valid_for_the_component(sam_tiny_bundle):
    bundle = Bundle(sam_tiny_bundle, backend="ort-cpu")
    rules = value_rules(bundle.manifest)
    rng = np.random.default_rng(0)
    spec = bundle.spec("prompt_encoder")
    feeds = dummy_feeds(spec, 5, rng, rules)
    assert spec.check_feeds(feeds).keys() == set(spec.input_names)
    assert feeds["point_coords"].shape == (5, 2, 2) and feeds["point_labels"].dtype == np.float32
    assert set(np.unique(feeds["point_labels"])) <= {-1, 0, 1, 2, 3}
    assert set(np.unique(feeds["has_mask_input"])) <= {0, 1}
    assert 0 <= feeds["point_coords"].min() and feeds["point_coords"].max() < 256
    ids = dummy_feeds(sam_specs(64, 8, 4)["image_encoder"], 1, rng)  # no rules: floats
    assert ids["image"].dtype == np.float32
    with pytest.raises(InputError, match="--batch 9 is outside the image_batch range \\[1, 8\\] of component "
                                         "'image_encoder'"):
        dummy_feeds(bundle.spec("image_encoder"), 9, rng, rules)
    # Token ids stay below the vocabulary size the manifest declares; other integers in [0, 16).
    dalle = Manifest("dalle", "t", {}, {}, [], config={"image_vocab": 5, "text_vocab": 7})
    dec = dummy_feeds(dvae_specs(grid=4, image_size=32)["dvae_decoder"], 3, rng, value_rules(dalle))
    assert dec["image_tokens"].shape == (3, 4, 4) and dec["image_tokens"].dtype == np.int64
    assert dec["image_tokens"].min() >= 0 and dec["image_tokens"].max() < 5


def test_latency_stats_exact():
    s = latency_stats([0.004, 0.001, 0.002, 0.003], items=2)
    assert s["latency_ms"]["min"] == pytest.approx(1.0) and s["latency_ms"]["max"] == pytest.approx(4.0)
    assert s["latency_ms"]["median"] == pytest.approx(2.5) and s["latency_ms"]["mean"] == pytest.approx(2.5)
    assert s["latency_ms"]["p90"] == pytest.approx(3.7) and s["latency_ms"]["p99"] == pytest.approx(3.97)
    assert s["throughput"]["qps"] == pytest.approx(400.0) and s["throughput"]["items_per_s"] == pytest.approx(800.0)


def test_bad_backend_and_arguments(sam_tiny_bundle):
    with pytest.raises(BackendError, match="unknown backend 'cuda-magic'; choose one of \\['auto'"):
        bench_bundle(sam_tiny_bundle, backend="cuda-magic", iters=1, warmup=0)
    with pytest.raises(InputError, match="--iters must be at least 1, got 0"):
        bench_bundle(sam_tiny_bundle, backend="ort-cpu", iters=0)
    args = _cli(["bench", str(sam_tiny_bundle), "--backend", "tensorrt", "--iters", "1"])
    with pytest.raises(BackendError, match="backend 'tensorrt' cannot be used"):
        args.func(args)
    args = _cli(["bench", str(sam_tiny_bundle), "--backend", "ort-cpu", "--cuda-graph"])
    with pytest.raises(InputError, match="--cuda-graph .* needs --backend ort-cuda, not 'ort-cpu'"):
        args.func(args)
    with pytest.raises(InputError, match=r"--precision 'int8': no onnx component of .* has it \(it has \['fp32'\]\); "
                       "build or quantize one, or leave --precision out"):
        bench_bundle(sam_tiny_bundle, backend="ort-cpu", iters=1, precision="int8")


def test_graph_replay_row(sam_tiny_bundle):
    """--cuda-graph's figure, through the same capture code on ort-cpu (a static-shape session): the replay
    computes the component's outputs for the benched feeds, and its statistics are a latency."""
    from edgefm.runtime.bench import bench_component, graph_replay

    bundle = Bundle(sam_tiny_bundle, "ort-cpu")
    runner = bundle.runner("prompt_encoder")
    feeds = dummy_feeds(runner.spec, 2, np.random.default_rng(0), value_rules(bundle.manifest))
    row = graph_replay(runner, feeds, iters=3, warmup=1)
    assert row["method"].startswith("captured graph") and 0 < row["median_ms"] <= row["p90_ms"]
    plain = bench_component(bundle, "prompt_encoder", feeds, 2, 2, 0)
    assert plain["cuda_graph"] is None
    result = {"family": "sam", "variant": "tiny", "backend": "ort-cuda", "batch": 2, "iters": 2, "warmup": 0,
              "components": {"prompt_encoder": {**plain, "cuda_graph": row}}, "pipelines": {},
              "memory": {"peak_host_rss_mib": 1.0, "device_used_after_mib": 10.0},
              "environment": {"cpu": "x", "cpu_cores": 1, "gpu": None, "versions": {}, "threads": {"ort_intra_op": 1},
                              "timestamp": "t"}}
    table = markdown_table(result)
    assert f"- prompt_encoder: {row['median_ms']:.3f} ms median replayed as a captured graph" in table


# ---- CLIP and DALL·E pipelines ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_bundle():
    pytest.importorskip("open_clip")  # the tiny CLIP's weights are made through its open_clip twin
    from clip_fixtures import tiny_bundle

    return tiny_bundle("tiny-vit")


def test_clip_cli_rows_table_and_chart(clip_bundle, tmp_path, capsys):
    args = _cli(["bench", str(clip_bundle), "--backend", "ort-cpu", "--iters", "2", "--warmup", "1",
                 "--threads", "1", "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png")])
    args.func(args)
    stdout = capsys.readouterr().out
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["schema"] == "edgefm.bench/1" and result["family"] == "clip"
    assert tuple(result["components"]) == ("image_encoder", "text_encoder")
    assert tuple(result["pipelines"]) == ("clip.encode_labels", "clip.classify")
    for name, r in result["components"].items():
        assert_sane(name, r, 2)
    labels, classify = result["pipelines"]["clip.encode_labels"], result["pipelines"]["clip.classify"]
    assert_sane("clip.encode_labels", labels, 1)  # a label index is built once: one timed call
    assert_sane("clip.classify", classify, 2)
    assert labels["inputs"] == {"labels": [1000], "templates": [1]} and labels["batch"] == 1000
    assert classify["inputs"] == {"image": [*CAMERA_HW, 3]} and classify["batch"] == 1
    top5 = classify["output"]["top5"]
    assert len(top5) == 5 and len({t["index"] for t in top5}) == 5
    assert all(a["prob"] >= b["prob"] for a, b in zip(top5, top5[1:])) and 0 < top5[0]["prob"] <= 1
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 + 2
    assert any(row.startswith("| clip.classify (pipeline) | - | image 480x640x3 |") for row in rows)
    assert any(row.startswith("| clip.encode_labels (pipeline) | - | labels 1000, templates 1 |") and
               "items/s" in row for row in rows)
    assert "- clip.encode_labels: 1000 ImageNet-1k labels x 1 template ('simple')" in stdout
    assert "ensemble; built once and cached (timed once)" in stdout
    image = cv2.imread(str(tmp_path / "c.png"))
    assert image is not None and image.shape[1] == 1000 and (image < 128).any()


def test_clip_classify_times_the_real_zero_shot(clip_bundle):
    """The timed classify is ClipModel.zero_shot on the cached labels: same top-5 and probabilities."""
    from edgefm.runtime.clip.model import ClipModel
    from edgefm.runtime.clip.zero_shot import imagenet_classnames

    rows = _clip_pipelines(Bundle(clip_bundle, backend="ort-cpu", threads=1), 2, 0, np.random.default_rng(7))
    image = np.random.default_rng(7).integers(0, 256, (*CAMERA_HW, 3), dtype=np.uint8)  # the rng's first draw
    probs = ClipModel(clip_bundle, backend="ort-cpu", threads=1).zero_shot(image, imagenet_classnames(), "simple")
    top5 = rows["clip.classify"]["output"]["top5"]
    assert top5[0]["index"] == int(probs[0].argmax())
    assert [t["index"] for t in top5] == list(np.argsort(-probs[0], kind="stable")[:5])
    assert [t["label"] for t in top5] == [imagenet_classnames()[t["index"]] for t in top5]
    np.testing.assert_allclose([t["prob"] for t in top5], np.sort(probs[0])[::-1][:5], rtol=1e-6)
    assert rows["clip.encode_labels"]["iterations"] == 1 and rows["clip.classify"]["iterations"] == 2


def test_dalle_generate_row(tmp_path_factory):
    from dalle_fixtures import tiny_bundle

    result = bench_bundle(tiny_bundle(tmp_path_factory), backend="ort-cpu", iters=2, warmup=1, threads=1)
    assert set(result["components"]) == {"dvae_decoder", "dvae_encoder", "prior_prefill", "prior_step"}
    assert tuple(result["pipelines"]) == ("dalle.generate",)
    r = result["pipelines"]["dalle.generate"]
    assert_sane("dalle.generate", r, 2)
    assert (r["kind"], r["batch"], r["inputs"]) == ("pipeline", 1, {"text_tokens": [16]})
    assert r["output"]["image"] == [64, 64, 3] and r["output"]["tokens_per_image"] == 64
    assert r["output"]["tokens_per_s"] == pytest.approx(64e3 / r["latency_ms"]["median"])
    assert "63 prior_step calls" in r["description"] and "- dalle.generate: one image per iteration" in \
        markdown_table(result)
    json.dumps(result)  # plain JSON types only


def test_dalle_decode_row_without_prior(tmp_path_factory):
    from dalle_fixtures import tiny_models
    from edgefm.export.dalle import export_dalle

    path = export_dalle(tmp_path_factory.mktemp("dvae") / "b", tiny_models()[0], image_size=64)
    result = bench_bundle(path, backend="ort-cpu", iters=2, warmup=0, threads=1)
    assert tuple(result["components"]) == ("dvae_decoder",) and tuple(result["pipelines"]) == ("dalle.decode",)
    r = result["pipelines"]["dalle.decode"]
    assert_sane("dalle.decode", r, 2)
    assert r["inputs"] == {"ids": [8, 8]} and r["description"].endswith("HWC uint8 RGB 64x64")
    rows = [line for line in markdown_table(result).splitlines() if line.startswith("| ")]
    assert rows[-1].startswith("| dalle.decode (pipeline) | - | ids 8x8 |")


def test_named_dims_set_the_timed_shapes(clip_bundle, sam_tiny_bundle):
    """--dim NAME=SIZE (trtexec's --shapes, by dim name): the inputs take that size where a component has the
    dim; names no component has, sizes outside the range and batch dims (--batch's) are refused."""
    from edgefm.runtime.bench import bench_bundle, parse_dim

    result = bench_bundle(clip_bundle, "ort-cpu", iters=1, warmup=0, threads=1, pipelines=False,
                          dims={"length": 77})
    assert result["dims"] == {"length": 77}
    assert result["components"]["text_encoder"]["inputs"]["tokens"][1] == 77
    assert result["components"]["image_encoder"]["inputs"]["image"] == [1, 3, 224, 224]  # no such dim: unchanged
    sam = bench_bundle(sam_tiny_bundle, "ort-cpu", iters=1, warmup=0, threads=1, pipelines=False,
                       dims={"num_points": 5})
    assert sam["components"]["prompt_encoder"]["inputs"]["point_coords"] == [1, 5, 2]
    assert sam["components"]["mask_decoder"]["inputs"]["sparse_embeddings"][1] == 5
    with pytest.raises(InputError, match=r"--dim length=78 is outside the length range \[1, 77\] of component "
                                         "'text_encoder'"):
        bench_bundle(clip_bundle, "ort-cpu", iters=1, warmup=0, pipelines=False, dims={"length": 78})
    with pytest.raises(InputError, match=r"--dim points: no component of .* has a dim of that name \(it has "
                                         r"\['batch', 'image_batch', 'num_points'\]\)"):
        bench_bundle(sam_tiny_bundle, "ort-cpu", iters=1, warmup=0, pipelines=False, dims={"points": 5})
    with pytest.raises(InputError, match="--dim batch: batch dims are set with --batch"):
        bench_bundle(sam_tiny_bundle, "ort-cpu", iters=1, warmup=0, pipelines=False, dims={"batch": 2})
    assert parse_dim("length=77") == ("length", 77)
    with pytest.raises(InputError, match="expected NAME=SIZE"):
        parse_dim("length")


def test_device_preprocessing_is_timed_beside_the_host_s(sam_tiny_bundle, clip_bundle):
    """``--preprocess device`` (what "auto" picks on a GPU): each image pipeline also times the host
    preprocessing on the same sessions, so the gain is a ratio from one run. On ort-cpu here, the same code."""
    from edgefm.runtime.bench_pipelines import PIPELINES as FAMILY_PIPELINES

    for bundle, family, row in ((sam_tiny_bundle, "sam", "sam.set_image"), (clip_bundle, "clip", "clip.classify")):
        rows = FAMILY_PIPELINES[family](Bundle(bundle, backend="ort-cpu", threads=1), 2, 0, np.random.default_rng(0),
                                        "device")
        dev, host = rows[row], rows[f"{row}.host_preprocess"]
        assert (dev["preprocess"], host["preprocess"]) == ("device", "host")
        assert "(on the device)" in dev["description"] and "(on the host: numpy)" in host["description"]
        assert host["inputs"] == dev["inputs"] and host["iterations"] == 2
        assert_sane(f"{row}.host_preprocess", host, 2)
        assert "output" not in host  # the device row's classification result is not claimed for it
    auto = FAMILY_PIPELINES["sam"](Bundle(sam_tiny_bundle, backend="ort-cpu", threads=1), 1, 0,
                                   np.random.default_rng(0))
    assert auto["sam.set_image"]["preprocess"] == "host" and "sam.set_image.host_preprocess" not in auto


def _event(cat: str, name: str, ts: int, dur: int, op: str | None = None) -> dict:
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "ph": "X", "args": {"op_name": op} if op else {}}


def test_profile_summary_leaves_out_the_warm_up_runs():
    from edgefm.runtime.bench_profile import summarize_trace

    events = [_event("Session", "model_run", 0, 2000), _event("Node", "mm_kernel_time", 10, 1500, "MatMul"),
              _event("Session", "model_run", 3000, 500), _event("Node", "mm_kernel_time", 3010, 300, "MatMul"),
              _event("Node", "add_kernel_time", 3320, 100, "Add"),
              _event("Session", "model_run", 4000, 700), _event("Node", "mm_kernel_time", 4010, 500, "MatMul"),
              _event("Node", "add_kernel_time", 4520, 100, "Add"),
              _event("Node", "stray_kernel_time", 9000, 50, "Add"),  # outside every run
              _event("Session", "SequentialExecutor::Execute", 4000, 690)]
    s = summarize_trace(events, skip=1)
    assert s["runs"] == 2 and s["run_ms"] == pytest.approx(0.6) and s["nodes_ms"] == pytest.approx(0.5)
    assert [(o["op"], o["nodes"]) for o in s["ops"]] == [("MatMul", 1), ("Add", 1)]
    assert [o["ms"] for o in s["ops"]] == pytest.approx([0.4, 0.1])
    assert [o["share"] for o in s["ops"]] == pytest.approx([0.8, 0.2])
    assert [(n["node"], n["op"]) for n in s["top_nodes"]] == [("mm", "MatMul"), ("add", "Add")]
    with pytest.raises(ValueError, match="no runs after the 3 skipped"):
        summarize_trace(events, skip=3)


def test_profile_counts_every_node_of_the_optimized_graph(sam_tiny_bundle, tmp_path, capsys):
    """--profile: per component, the operator types and node counts of the graph ONNX Runtime runs."""
    from collections import Counter

    import onnx
    import onnxruntime as ort

    args = _cli(["bench", str(sam_tiny_bundle), "--backend", "ort-cpu", "--iters", "3", "--warmup", "2",
                 "--no-pipelines", "--profile", "--json", str(tmp_path / "p.json")])
    args.func(args)
    stdout = capsys.readouterr().out
    result = json.loads((tmp_path / "p.json").read_text())
    for name in ("prompt_encoder", "prompt_decoder"):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
        ort.InferenceSession(str(sam_tiny_bundle / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])
        want = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
        p = result["components"][name]["profile"]
        assert p["runs"] == 3 and {o["op"]: o["nodes"] for o in p["ops"]} == want, name
        assert sum(o["share"] for o in p["ops"]) == pytest.approx(1.0)
        assert sum(o["ms"] for o in p["ops"]) == pytest.approx(p["nodes_ms"]) and p["nodes_ms"] <= p["run_ms"]
        top = p["ops"][0]
        assert f"- {name}: {p['run_ms']:.3f} ms profiled, nodes {p['nodes_ms']:.3f} ms: {top['op']} " in stdout
    assert "Where the time goes (ONNX Runtime profiler, host time per node;" in stdout


def test_components_selects_the_timed_rows(sam_tiny_bundle, capsys):
    args = _cli(["bench", str(sam_tiny_bundle), "--backend", "ort-cpu", "--iters", "2", "--warmup", "0",
                 "--no-pipelines", "--components", "prompt_decoder,decoder_context"])
    args.func(args)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| decoder_context", "| prompt_decoder"]  # bundle order
    with pytest.raises(InputError, match="--components: .* has no component 'prompt_decodr' \\(it has image_encoder, "
                                         "prompt_encoder, mask_decoder, decoder_context, prompt_decoder\\)"):
        bench_bundle(sam_tiny_bundle, backend="ort-cpu", components=["prompt_decodr"])


def test_median_interval_in_the_json_and_the_table(sam_tiny_bundle):
    """With 6 runs the 95% interval of the median is (fastest, slowest) run; the table prints the JSON's."""
    result = bench_bundle(sam_tiny_bundle, "ort-cpu", iters=6, warmup=0, threads=1, pipelines=False,
                          components=["prompt_encoder"])
    r = result["components"]["prompt_encoder"]
    assert r["median_ci95_ms"] == pytest.approx([min(r["samples_ms"]), max(r["samples_ms"])], abs=1e-3)
    lo, hi = r["median_ci95_ms"]
    row = next(line for line in markdown_table(result).splitlines() if line.startswith("| prompt_encoder |"))
    assert f"| {r['latency_ms']['median']:.3f} | {lo:.3f}–{hi:.3f} | {r['latency_ms']['mean']:.3f} |" in row
