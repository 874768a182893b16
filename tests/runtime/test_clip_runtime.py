"""ClipModel on exported tiny bundles vs PyTorch and open_clip (same random weights); zero-shot; errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from clip_fixtures import picture, tiny_bundle, tiny_pair  # noqa: E402
from edgefm.runtime.clip.model import ClipModel  # noqa: E402
from edgefm.runtime.clip.zero_shot import imagenet_classnames, resolve_templates  # noqa: E402
from edgefm.runtime.errors import InputError  # noqa: E402
from PIL import Image  # noqa: E402

TEXTS = ["a cat", "a photo of a dog on the beach at sunset", "", "x " * 90, "an emoji 🐱 and café"]
LABELS = ["cat", "dog", "tree", "car"]


def normalized(t: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(t, dim=-1).numpy()


@pytest.fixture(scope="module")
def vit():
    return ClipModel(tiny_bundle("tiny-vit"), backend="ort-cpu")


def test_truncated_text_batches_equal_full_length_pytorch(vit):
    model, _ = tiny_pair("tiny-vit")
    tokens = open_clip.tokenize(TEXTS)
    with torch.no_grad():
        ref = normalized(model.encode_text(tokens))
    assert np.array_equal(vit.tokenize(TEXTS), tokens.numpy())
    # batch_size=2 gives batches cut at different lengths (3, 11...), one row at 77.
    for batch_size in (2, 256):
        got = vit.encode_texts(TEXTS, batch_size=batch_size)
        assert got.dtype == np.float32 and got.shape == (len(TEXTS), 64)
        assert np.abs(got - ref).max() <= 1e-5


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_end_to_end_same_as_open_clip(name):
    ours, ref = tiny_pair(name)
    clip = vit_or(name)
    images = [picture(i, h=60 + 17 * i, w=100 - 9 * i) for i in range(4)]
    transform = open_clip.image_transform(ours.config.image_size, is_train=False)
    pixels = torch.stack([transform(Image.fromarray(im)) for im in images])
    with torch.no_grad():
        ref_img = normalized(ref.encode_image(pixels))
        ref_txt = normalized(ref.encode_text(open_clip.tokenize([f"a photo of a {lab}." for lab in LABELS])))
    got_img = clip.encode_images(images, batch_size=3)
    cos = (got_img * ref_img).sum(-1)
    assert cos.min() >= 0.99999, cos
    probs = clip.zero_shot(images, LABELS, templates="simple")
    scale = ref.logit_scale.detach().exp()
    ref_probs = torch.softmax(scale * torch.from_numpy(ref_img @ ref_txt.T), -1).numpy()
    assert probs.shape == (4, len(LABELS))
    assert np.array_equal(probs.argmax(1), ref_probs.argmax(1))
    assert np.abs(probs - ref_probs).max() <= 1e-4


def vit_or(name: str) -> ClipModel:
    return ClipModel(tiny_bundle(name), backend="ort-cpu")


@pytest.mark.parametrize("preprocess", ["host", "device"])
def test_captured_image_encoder_gives_the_same_embeddings(vit, preprocess):
    """``cuda_graphs=True`` (here the CPU stand-in: a static-shape session with pre-bound buffers, the same
    binding code as on ort-cuda): one captured encoder per batch size, fed by host pixels or written directly by
    the device preprocessing graph; the embeddings equal the plain runner's, including a last, smaller batch."""
    graphs = ClipModel(tiny_bundle("tiny-vit"), backend="ort-cpu", preprocess=preprocess)
    graphs._graphs = True  # what cuda_graphs=True switches on with ort-cuda (the flag refuses other backends)
    images = [picture(seed, 70 + 9 * seed, 110) for seed in range(5)]
    want = vit.encode_images(images, batch_size=2)
    got = graphs.encode_images(images, batch_size=2)  # batches of 2, 2 and 1: two graphs kept
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert graphs.preprocess_on == preprocess
    assert sorted(graphs._image_graphs) == [(1,), (2,)]
    with pytest.raises(InputError, match=r"it needs backend 'ort-cuda' \(--backend ort-cuda\), not 'ort-cpu'"):
        ClipModel(tiny_bundle("tiny-vit"), backend="ort-cpu", cuda_graphs=True)


def test_prompt_ensembling_matches_torch_reference(vit):
    model, _ = tiny_pair("tiny-vit")
    templates = resolve_templates("imagenet80")
    assert len(templates) == 80 and len(imagenet_classnames()) == 1000
    labels = ["goldfish", "tabby cat"]
    images = [picture(7), picture(8)]
    with torch.no_grad():
        weights = []
        for lab in labels:
            emb = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize(
                [t.format(lab) for t in templates])), dim=-1).mean(0)
            weights.append(emb / emb.norm())
        weights = torch.stack(weights)
    img = vit.encode_images(images)
    scale = model.logit_scale.detach().exp()
    ref = torch.softmax(scale * torch.from_numpy(img) @ weights.T, -1).numpy()
    probs = vit.zero_shot(images, labels)  # default: imagenet80
    assert np.abs(probs - ref).max() <= 1e-4
    assert np.allclose(probs.sum(1), 1.0, atol=1e-6)
    cached = vit.label_embeddings(labels, "imagenet80")
    assert vit.label_embeddings(labels, "imagenet80") is cached  # cached per (labels, templates)
    assert np.abs(vit.zero_shot(img, labels) - probs).max() == 0.0  # precomputed embeddings accepted


def test_bad_inputs(vit):
    with pytest.raises(InputError, match="label list is empty"):
        vit.zero_shot([picture(0)], [])
    with pytest.raises(InputError, match="not a known template set"):
        vit.zero_shot([picture(0)], ["cat"], templates="nope")
    with pytest.raises(InputError, match=r"exactly once"):
        vit.zero_shot([picture(0)], ["cat"], templates=["no placeholder"])
    with pytest.raises(InputError, match="no images"):
        vit.encode_images([])
    with pytest.raises(InputError, match="does not exist"):
        vit.encode_images(["/nonexistent/image.png"])


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    import cv2

    folder = tmp_path_factory.mktemp("clip_images")
    for i in range(7):
        sub = folder / ("sub" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        cv2.imwrite(str(sub / f"img{i}.png"), picture(20 + i)[:, :, ::-1])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_image_index_ranking_save_load(vit, image_folder, tmp_path):
    from edgefm.runtime.clip.index import ImageIndex

    index = ImageIndex.build(image_folder, vit, batch_size=3, progress=False)
    assert len(index) == 7 and list(index.skipped) == [str(image_folder / "corrupt.png")]
    assert "could not be decoded" in index.skipped[str(image_folder / "corrupt.png")]
    # brute force: embed each file alone, rank by cosine
    emb = np.stack([vit.encode_images([p])[0] for p in index.paths])
    assert np.abs(index.embeddings - emb).max() <= 1e-6
    for query in ("a red sunset", image_folder / "img1.png"):
        q = vit.encode_texts([query])[0] if isinstance(query, str) else vit.encode_images([query])[0]
        scores = emb @ q
        order = np.argsort(-scores, kind="stable")[:4]
        hits = index.search(query, k=4)
        assert [p for p, _ in hits] == [index.paths[i] for i in order]
        assert np.allclose([s for _, s in hits], scores[order], atol=1e-6)
    assert index.search(image_folder / "img1.png", k=1)[0][0] == str(image_folder / "img1.png")
    saved = index.save(tmp_path / "idx")
    loaded = ImageIndex.load(saved, vit)
    assert loaded.paths == index.paths and np.array_equal(loaded.embeddings, index.embeddings)
    assert loaded.search("a red sunset", k=7) == index.search("a red sunset", k=7)
    other = ClipModel(tiny_bundle("tiny-rn"), backend="ort-cpu")
    with pytest.raises(InputError, match="another CLIP bundle"):
        ImageIndex.load(saved, other)


def test_cli_classify_and_index(vit, image_folder, tmp_path, capsys):
    import argparse

    from edgefm.runtime.clip.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    bundle = str(tiny_bundle("tiny-vit"))
    image = str(image_folder / "img1.png")
    args = parser.parse_args(["classify", bundle, image, "--labels", "cat, dog,tree", "--templates", "simple",
                              "--top-k", "2"])
    args.func(args)
    out = capsys.readouterr().out
    probs = vit.zero_shot([image], ["cat", "dog", "tree"], templates="simple")[0]
    best = int(probs.argmax())
    assert f"{probs[best]:.4f}  {['cat', 'dog', 'tree'][best]}" in out.splitlines()[1]
    with pytest.raises(InputError, match="--labels is empty"):
        args = parser.parse_args(["classify", bundle, image, "--labels", " , "])
        args.func(args)
    args = parser.parse_args(["index", "build", bundle, str(image_folder), "--out", str(tmp_path / "i"),
                              "--no-progress"])
    args.func(args)
    assert "7 images, 1 skipped" in capsys.readouterr().out
    args = parser.parse_args(["index", "query", str(tmp_path / "i"), "a red sunset", "-k", "3"])
    args.func(args)
    lines = capsys.readouterr().out.splitlines()
    from edgefm.runtime.clip.index import ImageIndex

    top = ImageIndex.load(tmp_path / "i", vit).search("a red sunset", k=3)
    assert len(lines) == 3 and lines[0].endswith(top[0][0]) and f"{top[0][1]:.4f}" in lines[0]
