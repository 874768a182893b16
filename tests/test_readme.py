"""The README stays true: its Python example runs, its set-up commands are the ones CI reads."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import scene
from edgefm.runtime.draw import write_image

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(tag: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- {tag} -->\s*```\w*\n(.*?)```", text, re.S)
    assert m, f"README.md has no {tag} block"
    return m.group(1)


def test_setup_commands_pin_torch_and_run_the_main_jobs():
    demo, test = _block("setup:demo"), _block("setup:test")
    for cmd in (demo, test):
        assert "pip install torch==2.14.1 torchvision==0.29.1" in cmd
    assert demo.strip().endswith("edgefm demo")
    assert test.strip().endswith("python -m pytest")


def test_python_example_runs(sam_tiny_bundle, tmp_path, monkeypatch, capsys):
    """The example's calls and arguments exist and run (random tiny weights: the output is not judged)."""
    code = _block("example:python")
    write_image(tmp_path / "photo.jpg", scene(480, 640, seed=3))
    (tmp_path / "sam_vit_b").symlink_to(sam_tiny_bundle, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    capsys.readouterr()
