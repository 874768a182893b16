"""``edgefm bench --baseline``: rows against an earlier result, verdicts only where the medians' 95% intervals
are apart; bad baseline files refused with their name."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from edgefm.runtime.bench import SCHEMA, register
from edgefm.runtime.bench_compare import compare, read_baseline
from edgefm.runtime.errors import InputError


def _row(samples: list[float], inputs: dict | None = None) -> dict:
    return {"latency_ms": {"median": float(np.median(samples))}, "samples_ms": samples,
            "inputs": inputs or {"image": [1, 3, 8, 8]}}


def _result(rows: dict, env: dict | None = None, pipelines: dict | None = None) -> dict:
    return {"schema": SCHEMA, "components": rows, "pipelines": pipelines or {},
            "environment": env or {"cpu": "x", "backend": "ort-cpu", "threads": {"ort_intra_op": 2}}}


def test_verdicts_need_the_intervals_apart():
    ten = [float(v) for v in range(10, 20)]  # median 14.5; 95% interval of the median: 11..18
    base = _result({"enc": _row(ten), "dec": _row(ten), "same": _row(ten), "shape": _row(ten), "few": _row(ten[:5]),
                    "gone": _row(ten)})
    now = _result({"enc": _row([v - 8.0 for v in ten]),  # interval 3..10, below 11: faster
                   "dec": _row([v + 8.0 for v in ten]),  # 19..26, above 18: slower
                   "same": _row([v + 2.0 for v in ten]),  # 13..20 overlaps 11..18
                   "shape": _row(ten, {"image": [2, 3, 8, 8]}), "few": _row(ten), "new": _row(ten)},
                  env={"cpu": "x", "backend": "ort-cuda", "threads": {"ort_intra_op": 2}})
    c = compare(now, base)
    verdicts = {r["name"]: r["verdict"] for r in c["rows"]}
    assert verdicts == {"enc": "faster", "dec": "slower", "same": "no clear difference", "shape": "different inputs",
                        "few": "too few runs (6 per side at least)"}
    enc = next(r for r in c["rows"] if r["name"] == "enc")
    assert (enc["baseline_median_ms"], enc["median_ms"]) == (14.5, 6.5) and enc["ratio"] == pytest.approx(6.5 / 14.5)
    assert c["only_in_this_run"] == ["new"] and c["only_in_baseline"] == ["gone"]
    assert c["environment_differences"] == {"backend": {"baseline": "ort-cpu", "now": "ort-cuda"}}


def test_a_shift_inside_the_noise_is_not_called(tmp_path):
    rng = np.random.default_rng(0)
    a, b = (list(10.0 + rng.normal(0, 1, 50)) for _ in range(2))  # the same distribution twice
    assert compare(_result({"x": _row(b)}), _result({"x": _row(a)}))["rows"][0]["verdict"] == "no clear difference"


def test_bad_baseline_files_are_named(tmp_path):
    with pytest.raises(InputError, match=r"--baseline .*nope\.json: cannot read it"):
        read_baseline(tmp_path / "nope.json", SCHEMA)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match=r"--baseline .*bad\.json: not JSON"):
        read_baseline(tmp_path / "bad.json", SCHEMA)
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something/2"}))
    with pytest.raises(InputError, match=r"not an edgefm bench result \(schema 'something/2', expected "
                                         r"'edgefm.bench/1'\)"):
        read_baseline(tmp_path / "other.json", SCHEMA)


def test_cli_compares_a_run_with_its_saved_baseline(sam_tiny_bundle, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="edgefm")
    register(parser.add_subparsers(dest="command", required=True))
    common = ["bench", str(sam_tiny_bundle), "--backend", "ort-cpu", "--iters", "6", "--warmup", "1", "--threads",
              "1", "--no-pipelines", "--components", "prompt_encoder,mask_decoder"]
    first = parser.parse_args([*common, "--json", str(tmp_path / "a.json")])
    first.func(first)
    second = parser.parse_args([*common, "--json", str(tmp_path / "b.json"), "--baseline", str(tmp_path / "a.json")])
    second.func(second)
    stdout = capsys.readouterr().out
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    rows = {r["name"]: r for r in b["baseline"]["rows"]}
    assert set(rows) == {"prompt_encoder", "mask_decoder"} and b["baseline"]["file"] == str(tmp_path / "a.json")
    for name, r in rows.items():
        assert r["baseline_median_ms"] == a["components"][name]["latency_ms"]["median"]
        assert r["ratio"] == pytest.approx(b["components"][name]["latency_ms"]["median"] / r["baseline_median_ms"])
        assert r["verdict"] in ("faster", "slower", "no clear difference")
        assert f"| {name} | {r['baseline_median_ms']:.3f} | {r['median_ms']:.3f} | {r['ratio']:.2f}x | " in stdout
    assert f"Against the baseline {tmp_path / 'a.json'}" in stdout


@pytest.mark.parametrize("family", ["sam", "clip", "dalle"])
def test_the_committed_h100_runs_read_as_baselines(family):
    """gpu_check.py compares its next `edgefm bench` run with these files (written before the intervals
    existed: they are recomputed from the samples)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / f"h100_bench_{family}_fp16.json"
    data = read_baseline(path, SCHEMA)
    c = compare(data, data)
    assert c["rows"] and c["only_in_this_run"] == c["only_in_baseline"] == [] and not c["environment_differences"]
    for r in c["rows"]:
        assert r["ratio"] == 1.0 and r["verdict"] in ("no clear difference", "too few runs (6 per side at least)")
