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


def test_command_table_lists_every_command():
    """"Commands at a glance" names each subcommand of the parser, and nothing the parser lacks."""
    from edgefm.runtime.cli import build_parser

    text = README.read_text().split("## Commands at a glance", 1)[1].split("\n## ", 1)[0]
    listed = set()
    for row in re.findall(r"^\| (`.*?`) \| ", text, re.M):  # the first cell: one or more `command ...`
        listed |= {chunk.split()[0] for chunk in re.findall(r"`([^`]+)`", row)}
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert sorted(listed) == sorted(sub.choices)
