"""``edgefm bench`` on ORT CPU with a tiny SAM bundle: JSON schema, statistics, table, chart, errors.

Speed is never asserted: only the structure and the internal consistency of the figures.
"""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import pytest
from edgefm.runtime.bench import bench_bundle, dummy_feeds, latency_stats, register, value_rules
from edgefm.runtime.bundle import Bundle
from edgefm.runtime.dalle.spec import dvae_specs
from edgefm.runtime.errors import BackendError, InputError
from edgefm.runtime.manifest import Manifest
from edgefm.runtime.sam.spec import sam_specs

COMPONENTS = ("image_encoder", "prompt_encoder", "mask_decoder")
PIPELINES = ("sam.set_image", "sam.predict")


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
        ms = r["latency_ms"]
        assert r["iterations"] == 4 and len(r["samples_ms"]) == 4, name
        assert 0 < ms["min"] <= ms["median"] <= ms["p90"] <= ms["p99"] <= ms["max"], name
        assert ms["min"] <= ms["mean"] <= ms["max"], name
        assert ms["min"] == pytest.approx(min(r["samples_ms"]), abs=1e-3)
        assert r["throughput"]["items_per_s"] == pytest.approx(r["throughput"]["qps"] * r["batch"])
    enc = result["components"]["image_encoder"]
    assert enc["inputs"] == {"image": [2, 3, 256, 256]} and enc["precision"] == "fp32" and enc["transfer"] is None
    dec = result["components"]["mask_decoder"]["inputs"]
    assert dec["image_embeddings"][0] == 1 and dec["sparse_embeddings"][:2] == [2, 2]  # batch 2, opt 2 points
    env = result["environment"]
    for key in ("cpu", "cpu_cores", "gpu", "versions", "backend", "precision", "threads", "timestamp"):
        assert key in env, key
    assert env["versions"]["onnxruntime"] and env["versions"]["numpy"] == np.__version__
    assert env["threads"] == {"requested": 1, "ort_intra_op": 1} and env["precision"] == ["fp32"]
    assert result["memory"]["peak_host_rss_mib"] > 0
    # The markdown table: a header, a separator and one row per component and pipeline.
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| component | precision |") and len(rows) == 1 + len(COMPONENTS) + len(PIPELINES)
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
