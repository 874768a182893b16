"""CLIP through the ``edgefm`` command: the issue's bad inputs, zero-shot top-5 and retrieval ranking against
PyTorch references, and the contact sheet of ``index query --sheet``.

Bad inputs (corrupt archive, state dict of no known architecture, empty label list, unreadable image, index
built by another bundle) go through ``edgefm.runtime.cli.main``: each must end with exit status 2 and one
paragraph naming the file or argument, never a traceback, and write nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from clip_fixtures import picture, tiny_bundle, tiny_pair  # noqa: E402
from edgefm.runtime.cli import main  # noqa: E402
from edgefm.runtime.clip.cli import SHEET_GAP, SHEET_TITLE, _fit  # noqa: E402
from edgefm.runtime.clip.index import ImageIndex  # noqa: E402
from edgefm.runtime.clip.model import ClipModel  # noqa: E402
from edgefm.runtime.clip.zero_shot import imagenet_classnames, resolve_templates  # noqa: E402
from edgefm.runtime.draw import read_image, write_image  # noqa: E402
from edgefm.runtime.errors import InputError  # noqa: E402
from PIL import Image  # noqa: E402

NOT_AN_IMAGE = b"\x89PNG\r\n\x1a\n but no picture follows"


@pytest.fixture(scope="module")
def bundle() -> str:
    return str(tiny_bundle("tiny-vit"))


@pytest.fixture(scope="module")
def vit(bundle) -> ClipModel:
    return ClipModel(bundle, backend="ort-cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Eight pictures of different sizes in ``photos/``, a corrupt PNG and an empty folder beside it."""
    root = tmp_path_factory.mktemp("clip_cli")
    for i in range(8):
        write_image(root / "photos" / f"p{i}.png", picture(40 + i, h=50 + 13 * i, w=140 - 9 * i))
    (root / "bad.png").write_bytes(NOT_AN_IMAGE)
    (root / "only_bad").mkdir()
    (root / "only_bad" / "x.png").write_bytes(NOT_AN_IMAGE)
    (root / "empty").mkdir()
    return {"root": root, "photos": root / "photos", "bad": root / "bad.png"}


@pytest.fixture(scope="module")
def index_dir(bundle, files) -> Path:
    out = files["root"] / "photos.index"
    assert main(["index", "build", bundle, str(files["photos"]), "--out", str(out), "--no-progress"]) == 0
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err


# --- section 4: zero-shot and retrieval against PyTorch references -----------------------------------------


def reference_image_embeddings(images) -> torch.Tensor:
    """open_clip's path: PIL images through its eval transform, then encode_image, normalized."""
    ours, ref = tiny_pair("tiny-vit")
    transform = open_clip.image_transform(ours.config.image_size, is_train=False)
    pil = [Image.open(im).convert("RGB") if isinstance(im, Path) else Image.fromarray(im) for im in images]
    with torch.no_grad():
        return torch.nn.functional.normalize(ref.encode_image(torch.stack([transform(p) for p in pil])), dim=-1)


def test_zero_shot_top5_equals_open_clip_classifier(vit, files, capsys):
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    _, ref = tiny_pair("tiny-vit")
    labels = list(imagenet_classnames()[::97][:7])  # 7 x 80 prompts
    templates = list(resolve_templates("imagenet80"))
    paths = sorted(files["photos"].glob("*.png"))[:3]
    weights = build_zero_shot_classifier(ref, open_clip.tokenize, labels, templates)  # (D, L), ensembled
    with torch.no_grad():
        ref_probs = torch.softmax(ref.logit_scale.exp() * reference_image_embeddings(paths) @ weights, -1).numpy()
    probs = vit.zero_shot(paths, labels)  # default templates: imagenet80
    err = np.abs(probs - ref_probs).max()
    assert err <= 1e-4
    for got, want in zip(probs, ref_probs):
        top = np.argsort(-want)[:6]
        assert np.diff(want[top]).max() < -2 * err  # distinct probabilities: the order below means something
        assert list(np.argsort(-got)[:5]) == list(top[:5])
    # The command prints the same five labels in the same order, probabilities to 4 decimals.
    code, out, err_text = run_cli(capsys, "classify", vit.bundle.path, paths[0], "--labels", ",".join(labels),
                                  "--top", "5")
    assert code == 0, err_text
    lines = out.splitlines()[1:]
    assert [ln.split(None, 1)[1] for ln in lines] == [labels[i] for i in np.argsort(-ref_probs[0])[:5]]
    assert np.abs(np.array([float(ln.split()[0]) for ln in lines]) - np.sort(ref_probs[0])[::-1][:5]).max() \
        <= 5e-5 + 1e-4


def test_retrieval_ranking_equals_pytorch_brute_force(vit, index_dir, files):
    _, ref = tiny_pair("tiny-vit")
    index = ImageIndex.load(index_dir, vit)
    emb = reference_image_embeddings([Path(p) for p in index.paths])  # brute force, every file
    with torch.no_grad():
        text = torch.nn.functional.normalize(ref.encode_text(open_clip.tokenize(["a red sunset"])), dim=-1)[0]
    image = files["photos"] / "p3.png"
    for query, q in (("a red sunset", text), (image, emb[index.paths.index(str(image))])):
        scores = (emb @ q).numpy()
        order = np.argsort(-scores, kind="stable")
        hits = index.search(query, k=len(index))
        err = np.abs(np.array([s for _, s in hits]) - scores[order]).max()
        assert err <= 1e-5
        assert np.diff(scores[order]).max() < -2 * err  # no near-ties: the ranking is well defined
        assert [p for p, _ in hits] == [index.paths[i] for i in order]


# --- index query --sheet -----------------------------------------------------------------------------------


def tile(sheet: np.ndarray, i: int, cell: int, cols: int) -> np.ndarray:
    r, c = divmod(i, cols)
    y, x = SHEET_TITLE + r * (cell + SHEET_GAP), SHEET_GAP + c * (cell + SHEET_GAP)
    return sheet[y : y + cell, x : x + cell]


def test_query_writes_contact_sheet_of_the_hits(vit, index_dir, files, tmp_path, capsys):
    sheet_path, cell = tmp_path / "results.png", 64
    code, out, err = run_cli(capsys, "index", "query", index_dir, "a red sunset", "-k", "6", "--sheet",
                             sheet_path, "--cell", cell)
    assert code == 0, err
    assert f"wrote {sheet_path}" in out
    hits = ImageIndex.load(index_dir, vit).search("a red sunset", k=6)
    sheet = read_image(sheet_path)
    assert sheet.shape == (SHEET_TITLE + 2 * (cell + SHEET_GAP), SHEET_GAP + 5 * (cell + SHEET_GAP), 3)
    for i, (path, _) in enumerate(hits):  # each tile shows its hit, in rank order (labels cover the edges)
        want = _fit(read_image(path), cell)
        assert np.array_equal(tile(sheet, i, cell, 5)[22:44], want[22:44]), i
    assert not tile(sheet, 6, cell, 5).any()  # unused cells stay black
    # A file deleted since indexing gets a placeholder tile; the sheet is still written.
    index = ImageIndex.load(index_dir)
    index.paths[index.paths.index(hits[0][0])] = str(tmp_path / "gone.png")
    moved = index.save(tmp_path / "moved.index")
    code, out, err = run_cli(capsys, "index", "query", moved, "a red sunset", "-k", "1", "--sheet", sheet_path,
                             "--cell", cell)
    assert code == 0, err
    first = tile(read_image(sheet_path), 0, cell, 1)
    assert "gone.png" in out
    assert first[38:46].max() == 0 and first[24:32].max() == 255  # black, with "(unreadable)" written on it


@pytest.mark.parametrize("extra, message", [
    (["--sheet", "{tmp}/results.txt"], "--sheet '{tmp}/results.txt': name the contact sheet with one of"),
    (["--sheet", "{tmp}/r.png", "--cell", "8"], "--cell must be at least 32 pixels, got 8"),
])
def test_sheet_arguments_are_checked_first(index_dir, tmp_path, capsys, extra, message):
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, _, err = run_cli(capsys, "index", "query", index_dir, "a cat", *extra)
    assert_clean_error(code, err, message.replace("{tmp}", str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


# --- bad inputs --------------------------------------------------------------------------------------------


def corrupt_checkpoints(folder: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (file, phrases its error must contain)."""
    sd = tiny_pair("tiny-vit")[1].state_dict()
    torch.save(sd, folder / "whole.pt")
    data = (folder / "whole.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    with zipfile.ZipFile(folder / "ViT-B-32.pt", "w") as archive:  # TorchScript layout, damaged records
        archive.writestr("ViT-B-32/constants.pkl", b"\x80\x02)")
        archive.writestr("ViT-B-32/data.pkl", b"not a pickle")
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(2, 3, 4, 4)}, folder / "sam_vit_b.pth")
    from safetensors.torch import save_file

    timm_tower = {k: v for k, v in sd.items() if not k.startswith("visual.")}
    timm_tower["visual.trunk.patch_embed.proj.weight"] = torch.zeros(4, 3, 2, 2)  # OpenCLIP's timm tower
    save_file({k: v.contiguous() for k, v in timm_tower.items()}, folder / "timm.safetensors")
    torch.save({**sd, "visual.head.weight": torch.zeros(3)}, folder / "extra.pt")
    torch.save([1, 2, 3], folder / "list.pt")
    return {
        "truncated": (folder / "truncated.pt", ["truncated.pt' could not be read", "truncated or corrupt", "sha256"]),
        "damaged archive": (folder / "ViT-B-32.pt", ["ViT-B-32.pt' looks like a TorchScript archive",
                                                    "truncated or corrupt"]),
        "sam checkpoint": (folder / "sam_vit_b.pth", ["sam_vit_b.pth' is not a CLIP checkpoint",
                                                     "no key 'token_embedding.weight'",
                                                     "image_encoder.patch_embed.proj.weight"]),
        "timm tower": (folder / "timm.safetensors", ["not a CLIP checkpoint", "no key 'visual.conv1.weight'",
                                                     "ModifiedResNet/ViT"]),
        "unexpected key": (folder / "extra.pt", ["extra.pt' does not fit CLIP", "visual.head.weight",
                                                 "inferred as variant 'tiny-vit'"]),
        "not a mapping": (folder / "list.pt", ["list.pt' holds a list, not a state dict"]),
    }


def test_export_refuses_corrupt_and_unknown_checkpoints(tmp_path, capsys):
    cases = corrupt_checkpoints(tmp_path)
    before = sorted(os.listdir(tmp_path))
    for name, (path, expected) in cases.items():
        code, _, err = run_cli(capsys, "export", "clip", "--checkpoint", path, "--out", tmp_path / "bundle")
        assert_clean_error(code, err, "edgefm export: error: Checkpoint", *expected)
        assert sorted(os.listdir(tmp_path)) == before, name  # no bundle, no temporary folder left behind


def test_export_random_bytes_is_called_corrupt(tmp_path, capsys):
    (tmp_path / "ViT-B-32.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    code, _, err = run_cli(capsys, "export", "clip", "--checkpoint", tmp_path / "ViT-B-32.pt", "--out",
                           tmp_path / "b")
    assert_clean_error(code, err, "corrupt")


@pytest.mark.parametrize("args, message", [
    (["{img}", "--labels", " , "], "--labels is empty: pass comma-separated labels"),
    (["{img}"], "--labels is empty"),
    (["{img}", "--labels", "cat", "--imagenet"], "pass either --labels or --imagenet, not both"),
    (["{bad}", "--labels", "cat,dog"], "'{bad}' could not be decoded as an image"),
    (["{root}/nope.jpg", "--labels", "cat,dog"], "image file '{root}/nope.jpg' does not exist"),
    (["{img}", "--labels", "cat", "--top-k", "0"], "--top-k must be at least 1, got 0"),
    (["{img}", "--labels", "cat", "--templates", "nope"], "templates='nope' is not a known template set"),
])
def test_classify_errors(bundle, files, capsys, args, message):
    fill = {"{img}": str(files["photos"] / "p0.png"), "{bad}": str(files["bad"]), "{root}": str(files["root"])}
    for key, value in fill.items():
        args, message = [a.replace(key, value) for a in args], message.replace(key, value)
    code, out, err = run_cli(capsys, "classify", bundle, *args)
    assert_clean_error(code, err, f"edgefm classify: error: {message}")
    assert out == ""


def test_model_api_names_unreadable_images_and_blank_labels(vit, files):
    with pytest.raises(InputError, match=r"bad\.png' could not be decoded"):
        vit.encode_images([files["photos"] / "p0.png", files["bad"]])
    with pytest.raises(InputError, match=r"non-empty strings; got \[' '\]"):
        vit.zero_shot([picture(0)], ["cat", " "])
    with pytest.raises(InputError, match="label list is empty"):
        vit.label_embeddings([])


def test_index_errors(bundle, files, index_dir, tmp_path, capsys):
    root = files["root"]
    for folder, message in ((root / "empty", "no image files found in"),
                            (root / "only_bad", "none of the 1 files in"),
                            (root / "nowhere", "is neither a folder nor a file")):
        out = tmp_path / f"{folder.name}.index"
        code, _, err = run_cli(capsys, "index", "build", bundle, folder, "--out", out, "--no-progress")
        assert_clean_error(code, err, message, folder.name)
        assert not out.exists()
    # Built by another bundle: the identity recorded in the index is not this bundle's.
    other = tmp_path / "other.index"
    shutil.copytree(index_dir, other)
    meta = json.loads((other / "index.json").read_text())
    meta["identity"] = {name: "0" * 64 for name in meta["identity"]}
    (other / "index.json").write_text(json.dumps(meta))
    code, _, err = run_cli(capsys, "index", "query", other, "a cat", "--bundle", bundle)
    assert_clean_error(code, err, "built with another CLIP bundle", "not comparable", "rebuild the index")
    # The building bundle moved away: say so and name --bundle.
    meta = json.loads((index_dir / "index.json").read_text())
    meta["bundle"] = str(tmp_path / "moved-bundle")
    (other / "index.json").write_text(json.dumps(meta))
    code, _, err = run_cli(capsys, "index", "query", other, "a cat")
    assert_clean_error(code, err, f"({tmp_path / 'moved-bundle'}) is no longer there", "--bundle BUNDLE")
    assert run_cli(capsys, "index", "query", other, "a cat", "--bundle", bundle)[0] == 0
    code, _, err = run_cli(capsys, "index", "query", files["photos"], "a cat")
    assert_clean_error(code, err, "is not a readable edgefm image index", "edgefm index build")
    code, _, err = run_cli(capsys, "index", "query", index_dir, files["bad"])
    assert_clean_error(code, err, f"'{files['bad']}' could not be decoded as an image")
    assert sorted(os.listdir(index_dir)) == ["embeddings.npz", "index.json"]  # failed queries wrote nothing


def test_mistyped_image_path_is_not_a_text_query(tmp_path):
    from edgefm.runtime.clip.index import ImageIndex

    index = ImageIndex.__new__(ImageIndex)
    with pytest.raises(InputError, match="image 'photos/dgo.jpg' does not exist"):
        index.query_embedding("photos/dgo.jpg", model=None)
