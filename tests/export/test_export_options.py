"""Every family refuses bad export options before doing any work, naming the flag and the choices."""

from __future__ import annotations

import pytest
from edgefm.runtime.errors import InputError


@pytest.mark.parametrize("family", ["sam", "clip", "dalle"])
def test_bad_precision_opset_and_attention_are_refused_with_the_choices(family, tmp_path, capsys):
    from edgefm.runtime.cli import main

    source = "--dvae-decoder" if family == "dalle" else "--checkpoint"
    base = ["export", family, "--out", str(tmp_path / "b"), source, __file__]
    want = {"sam": "is not supported for SAM; choose fp32, fp16 or int8",
            "clip": "is not supported for CLIP; choose fp32, fp16 or int8",
            "dalle": "is not supported for DALL·E; choose fp32 or fp16"}[family]
    from edgefm.export.onnx import check_options

    names = {"sam": "SAM", "clip": "CLIP", "dalle": "DALL·E"}
    precisions = ("fp32", "fp16") if family == "dalle" else ("fp32", "fp16", "int8")
    with pytest.raises(InputError, match=f"--precision 'bf16' {want}"):
        check_options(names[family], "bf16", precisions, 17)
    with pytest.raises(InputError, match="--opset 13 is too old: opset 17 is needed"):
        check_options(names[family], "fp32", precisions, 13)
    refused = f"--attention 'flash' is not supported for {names[family]}; choose plain or fused"
    with pytest.raises(InputError, match=refused):
        check_options(names[family], "fp32", precisions, 17, "flash")
    # Through the CLI: refused before the checkpoint is even read (here it is not a checkpoint at all).
    assert main([*base, "--precision", "int8"] if family == "dalle" else [*base, "--opset", "13"]) == 2
    err = capsys.readouterr().err
    assert ("--precision 'int8' " + want) in err if family == "dalle" else "--opset 13 is too old" in err
    assert not (tmp_path / "b").exists()
