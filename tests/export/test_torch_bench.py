"""``edgefm bench --pytorch``: the bundle's own checkpoint timed in PyTorch on the same inputs, outputs compared."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")  # the PyTorch side needs the [export] extra

from clip_fixtures import tiny_bundle as clip_memory_bundle  # noqa: E402
from clip_fixtures import tiny_pair  # noqa: E402
from dalle_fixtures import tiny_bundle as dalle_bundle  # noqa: E402
from edgefm.export.clip import export_clip  # noqa: E402
from edgefm.export.sam import export_sam  # noqa: E402
from edgefm.runtime.bench import bench_bundle, markdown_table  # noqa: E402
from edgefm.runtime.cli import main  # noqa: E402
from edgefm.runtime.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def sam_from_file(sam_tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("torch_bench")
    ckpt = folder / "sam_tiny.pth"
    torch.save(sam_tiny.state_dict(), ckpt)
    return export_sam(ckpt, folder / "sam", "tiny"), ckpt, folder


def test_sam_against_its_checkpoint(sam_from_file):
    bundle, ckpt, _ = sam_from_file
    result = bench_bundle(bundle, "ort-cpu", iters=3, warmup=1, threads=1, pipelines=False, pytorch=ckpt)
    assert result["pytorch_checkpoint"] == str(ckpt)
    for name in ("image_encoder", "prompt_encoder", "mask_decoder"):
        ours, pt = result["components"][name], result["components"][name]["pytorch"]
        assert (pt["device"], pt["math"], pt["iterations"]) == ("cpu", "fp32", 3)
        assert pt["latency_ms"]["median"] > 0
        assert pt["ratio"] == pytest.approx(ours["latency_ms"]["median"] / pt["latency_ms"]["median"])
        a = pt["agreement"]
        assert a["policy"] == "fp32" and a["passed"], a
        assert a["worst"] >= (0.999 if name == "mask_decoder" else 0.99999)  # mask IoU for the decoder
    assert "mask_iou" in result["components"]["mask_decoder"]["pytorch"]["agreement"]["outputs"]["low_res_masks"]
    table = markdown_table(result)
    assert "- image_encoder: PyTorch (cpu, fp32)" in table and "(fp32 policy: pass)" in table


def test_clip_through_the_cli(tmp_path, capsys):
    ours, _ = tiny_pair("tiny-vit")
    ckpt = tmp_path / "clip_tiny.pt"
    torch.save(ours.state_dict(), ckpt)
    bundle = export_clip(ckpt, tmp_path / "clip")
    out = tmp_path / "b.json"
    assert main(["bench", str(bundle), "--backend", "ort-cpu", "--iters", "2", "--warmup", "0", "--threads", "1",
                 "--no-pipelines", "--pytorch", str(ckpt), "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "- text_encoder: PyTorch (cpu, fp32)" in stdout
    result = json.loads(out.read_text())
    for name in ("image_encoder", "text_encoder"):
        assert result["components"][name]["pytorch"]["agreement"]["passed"]


def test_refusals(sam_from_file, sam_tiny, tmp_path_factory):
    bundle, ckpt, folder = sam_from_file
    other = folder / "other.pth"
    state = {k: v + 1 if v.is_floating_point() else v for k, v in sam_tiny.state_dict().items()}
    torch.save(state, other)
    with pytest.raises(InputError, match=r"--pytorch .*other.pth \(sha256 [0-9a-f]{16}…\) is not the checkpoint "
                                         r".* was exported from \(sam_tiny.pth, sha256"):
        bench_bundle(bundle, "ort-cpu", iters=1, warmup=0, pipelines=False, pytorch=other)
    with pytest.raises(InputError, match="no such checkpoint file"):
        bench_bundle(bundle, "ort-cpu", iters=1, warmup=0, pipelines=False, pytorch=folder / "missing.pth")
    memory = clip_memory_bundle("tiny-vit")
    with pytest.raises(InputError, match="records no checkpoint .* export it from the checkpoint file"):
        bench_bundle(memory, "ort-cpu", iters=1, warmup=0, pipelines=False, pytorch=ckpt)
    with pytest.raises(InputError, match="compares SAM and CLIP bundles .* a 'dalle' bundle"):
        bench_bundle(dalle_bundle(tmp_path_factory), "ort-cpu", iters=1, warmup=0, pipelines=False, pytorch=ckpt)


def test_a_model_of_the_projects_own_size(tmp_path):
    """The shipped SAM has no named size: its SamConfig comes from the JSON beside the checkpoint, and a copy of
    the checkpoint without that JSON is refused with where to put it."""
    import shutil

    from edgefm.export.demo import sam_config_beside, weights_dir

    ckpt = weights_dir() / "sam_shapes.safetensors"
    bundle = export_sam(ckpt, tmp_path / "sam", sam_config_beside(ckpt))
    result = bench_bundle(bundle, "ort-cpu", iters=2, warmup=0, threads=1, pipelines=False, pytorch=ckpt)
    assert all(r["pytorch"]["agreement"]["passed"] for r in result["components"].values())
    alone = tmp_path / "alone" / ckpt.name
    alone.parent.mkdir()
    shutil.copyfile(ckpt, alone)
    with pytest.raises(InputError, match=r"holds a SAM of no named size \('custom'\); --pytorch needs its SamConfig "
                                         r"as JSON beside the checkpoint \(.*alone/sam_shapes.json"):
        bench_bundle(bundle, "ort-cpu", iters=1, warmup=0, pipelines=False, pytorch=alone)


@pytest.mark.slow
def test_sam_against_its_checkpoint_compiled(sam_from_file):
    """--pytorch-compile: the PyTorch side runs through torch.compile (inductor; on a CPU it builds C++), compiled
    before it is timed, and its outputs are still checked against the bundle's."""
    bundle, ckpt, _ = sam_from_file
    result = bench_bundle(bundle, "ort-cpu", iters=2, warmup=0, threads=1, pipelines=False, pytorch=ckpt,
                          components=["prompt_encoder"], pytorch_compile="default")
    pt = result["components"]["prompt_encoder"]["pytorch"]
    assert (pt["math"], pt["iterations"]) == ("fp32, torch.compile default", 2)
    assert pt["agreement"]["passed"] and pt["agreement"]["worst"] >= 0.99999, pt["agreement"]
    assert "- prompt_encoder: PyTorch (cpu, fp32, torch.compile default)" in markdown_table(result)


def test_compile_mode_needs_the_checkpoint(sam_from_file):
    bundle, _, _ = sam_from_file
    with pytest.raises(InputError, match="--pytorch-compile sets how the --pytorch CHECKPOINT runs"):
        bench_bundle(bundle, "ort-cpu", iters=1, warmup=0, pipelines=False, pytorch_compile="default")
