"""``edgefm demo``'s bundle cache: re-exported when a shipped checkpoint or the exporting code changes, kept
otherwise."""

from __future__ import annotations

import json

from edgefm.export import demo


def test_demo_bundles_are_reexported_when_the_exporters_change(tmp_path, monkeypatch):
    made: list[str] = []

    def export(bundle, weights):
        bundle.mkdir(exist_ok=True)
        (bundle / "manifest.json").write_text("{}")
        made.append(bundle.name)

    monkeypatch.setattr(demo, "DEMO_MODELS", {"sam": (("sam_shapes.safetensors",), export)})
    demo.ensure_demo_bundles(tmp_path, progress=lambda m: None)
    demo.ensure_demo_bundles(tmp_path, progress=lambda m: None)
    assert made == ["sam_shapes"]  # cached while nothing changed
    stamp = json.loads((tmp_path / "sam_shapes.stamp.json").read_text())
    assert stamp["exporter"] == demo.exporter_digest() and len(stamp["exporter"]) == 64
    assert stamp["sam_shapes.safetensors"] == demo.sha256_file(demo.weights_dir() / "sam_shapes.safetensors")
    monkeypatch.setattr(demo, "exporter_digest", lambda: "0" * 64)  # a newer edgefm's exporters
    demo.ensure_demo_bundles(tmp_path, progress=lambda m: None)
    assert made == ["sam_shapes", "sam_shapes"]
