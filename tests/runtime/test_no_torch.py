"""The runtime must work without PyTorch: a SAM prediction in a fresh interpreter never imports torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_sam_prediction_without_torch(sam_tiny_bundle):
    r = _run(f"""
        import sys
        import numpy as np
        from edgefm.runtime.sam import SamPredictor
        from edgefm.runtime.demo import make_scene
        p = SamPredictor({str(sam_tiny_bundle)!r}, backend="ort-cpu")
        p.set_image(make_scene(240, 320))
        masks, scores, low = p.predict(np.array([[100, 120]]), np.array([1]))
        assert masks.shape == (3, 240, 320) and scores.shape == (3,)
        print("torch loaded:", "torch" in sys.modules)
    """)
    assert r.returncode == 0, r.stderr
    assert "torch loaded: False" in r.stdout


def test_export_without_torch_names_the_extra(tmp_path):
    r = _run(BLOCK_TORCH + f"""
from edgefm.runtime.cli import main
code = main(["export", "sam", "--checkpoint", "x.pth", "--out", {str(tmp_path / 'b')!r}])
sys.exit(code)
""")
    assert r.returncode == 2
    assert "pip install 'edgefm[export]'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b").exists()


def test_verify_without_torch(sam_tiny_bundle):
    """The engine/backend check runs where engines run: numpy and ONNX Runtime, no torch (the decoder's inputs
    come from running the encoder and prompt encoder first)."""
    r = _run(BLOCK_TORCH + f"""
from pathlib import Path
from edgefm.export.verify import ParityInputs, check_runner
from edgefm.runtime.backends.onnxruntime import OrtRunner
from edgefm.runtime.manifest import read_manifest
folder = Path({str(sam_tiny_bundle)!r})
m = read_manifest(folder)
e = m.find("mask_decoder", format="onnx")[0]
rep = check_runner(OrtRunner(folder / e.file, e.spec, "ort-cpu"), ParityInputs(folder, m), e, "fp32", e.spec)
print(rep["passed"], rep["outputs"]["low_res_masks"]["mask_iou"], rep["reference"])
print("torch loaded:", "torch" in sys.modules)
""")
    assert r.returncode == 0, r.stderr
    assert "True 1.0 mask_decoder.onnx" in r.stdout and "torch loaded: False" in r.stdout
