"""``benchmarks/gpu/gpu_check.py --smoke``: the GPU run's script, end to end with tiny models on ort-cpu.

Device time is rare (15 minutes, some sessions only), so the script must not fail there for a reason a CPU
could have shown: every section runs and none records an error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"env", "models", "export", "gpu_parity", "bench", "kernel_profile", "sam_predictor",
            "camera_1280x720", "dalle_generate", "edgefm_bench", "edgefm_verify"}


@pytest.mark.slow
def test_gpu_check_smoke_run_has_every_section_and_no_error(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "gpu_check.py"), "--smoke", "--out",
                           str(out), "--work", str(tmp_path / "work"), "--iters", "2", "--warmup", "1",
                           "--camera-seconds", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["errors"] == {}, list(res["errors"])
    assert SECTIONS <= set(res["sections"])
    parity = res["sections"]["gpu_parity"]
    assert {"sam.mask_decoder.fusedqk_fp16", "sam.prompt_decoder.fused_fp16", "clip.text_encoder.fused_fp16"} <= set(
        parity)
    assert all(r["passed"] for r in parity.values() if isinstance(r, dict) and "passed" in r)
    impls = {(r["component"], r["impl"], r["precision"]) for r in res["rows"]}
    assert ("sam.prompt_to_masks", "onnxruntime ort-cpu captured graphs, chained", "fused_fp16") in impls
    assert ("sam.prompt_to_masks", "onnxruntime ort-cpu captured prompt decoder", "fused_fp16") in impls
    assert ("sam.prompt_to_masks", "onnxruntime ort-cpu prompt decoder + context on device", "fp16") in impls
    assert res["sections"]["captured_vs_plain_max_abs"]["prompt_decoder.fp16"] < 1e-2
    assert ("sam.set_image 1500x2250", "SamPredictor ort-cpu preprocess=device", "fp16") in impls
    assert ("sam.amg 2x2 points (12 candidates) 1500x2250", "SamAutomaticMaskGenerator ort-cpu", "fp16") in impls
    predictor = res["sections"]["sam_predictor"]  # device preprocessing: the host's pixels, the host's masks
    for precision in ("fp32", "fp16"):
        host, dev = predictor[f"{precision}_host_preprocess"], predictor[f"{precision}_device_preprocess"]
        assert dev["mask_iou_vs_cpu_fp32"] == host["mask_iou_vs_cpu_fp32"]
    assert "Where the time goes" in (out / "gpu_check.md").read_text()
    assert res["sections"]["dalle_generate"]["captured_same_tokens_as_cpu"] == 1.0
    assert ("dalle.generate n=1 (shapes, 8x8 grid)", "DalleGenerator ort-cpu captured steps", "fp32") in impls
    profiles = res["sections"]["kernel_profile"]  # on the CPU no kernels are recorded, but the same code runs
    for variant in ("fp16", "fused_fp16"):
        assert profiles[f"sam.prompt_decoder onnxruntime {variant}"]["wall_ms"] > 0
    # On ort-cpu each single-precision bundle's files are their own references: verify says so, per component.
    verify = res["sections"]["edgefm_verify"]
    assert set(verify["sam.fp16"]["components"]) == {"image_encoder", "prompt_encoder", "mask_decoder",
                                                     "decoder_context", "prompt_decoder"}
    assert {line for v in verify.values() if isinstance(v, dict) and "components" in v
            for line in v["components"].values()} == {"it is the reference itself (ONNX Runtime CPU)"}
    report = (out / "gpu_check.md").read_text()
    assert "| sam.fp16 | mask_decoder | it is the reference itself (ONNX Runtime CPU) |" in report
