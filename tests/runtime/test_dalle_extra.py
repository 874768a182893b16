"""DALL·E runtime on the widths of the "small" prior, and CLIP reranking with a real exported CLIP bundle.

The prior is "small" (text_len 64, d_model 256, 4 layers, 8 heads, 8192 codes, the paper's row / column /
conv attention) on a 16×16 image grid instead of 32×32: the same widths and masks, a quarter of the tokens,
so that an export and a full greedy image in PyTorch and in the runtime fit CI's time (the 32×32 grid
took ~30 s for that alone on 2 shared cores). Its dVAE decoder has the tiny widths with 8192 codes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from dalle_fixtures import one_torch_thread, seeded_  # noqa: F401 (fixture)
from edgefm.runtime.bundle import Bundle
from edgefm.runtime.cli import main
from edgefm.runtime.dalle import DalleGenerator, DvaeCodec
from edgefm.runtime.draw import read_image
from edgefm.runtime.errors import ManifestError

PROMPT = "a small red cube on a wooden table"
SOT, EOT, TREE = 49406, 49407, 2677  # CLIP BPE: <start_of_text>, <end_of_text>, "tree</w>"


@pytest.fixture(scope="module")
def models():
    """(decoder, prior): 8192-code dVAE decoder with tiny widths, the "small" prior on a 16×16 grid."""
    from edgefm.models.dalle import PRIOR_CONFIGS, DvaeConfig, build_decoder, build_prior

    torch.manual_seed(0)
    config = dataclasses.replace(PRIOR_CONFIGS["small"], image_grid=16)
    decoder = build_decoder(DvaeConfig(n_hid=16, n_init=8, n_blk_per_group=1, vocab_size=8192))
    return seeded_(decoder, 1), seeded_(build_prior(config), 2)


@pytest.fixture(scope="module")
def bundle_path(models, tmp_path_factory):
    from edgefm.export.dalle import export_dalle

    return export_dalle(tmp_path_factory.mktemp("dalle-small") / "b", models[0], prior=models[1])


@pytest.fixture(scope="module")
def gen(bundle_path):
    return DalleGenerator(Bundle(bundle_path, backend="ort-cpu", threads=1))


@pytest.fixture(scope="module")
def clip_bundle(tmp_path_factory):
    from edgefm.export.clip import export_clip
    from edgefm.models.clip import CLIP_CONFIGS, build_clip

    torch.manual_seed(0)
    return export_clip(build_clip(CLIP_CONFIGS["tiny-vit"]), tmp_path_factory.mktemp("clip") / "tiny-vit")


@pytest.fixture(scope="module")
def clip(clip_bundle):
    from edgefm.runtime.clip import ClipModel

    return ClipModel(clip_bundle, backend="ort-cpu", threads=1)


def test_reordered_decoder_graph_equals_the_model():
    """The exported dvae_decoder runs 1×1 parts before each upsampling (export.dalle.DecoderGraph)."""
    from edgefm.export.dalle import DecoderGraph
    from edgefm.models.dalle import DecoderFromIds, DvaeConfig, build_decoder

    torch.manual_seed(0)
    decoder = seeded_(build_decoder(DvaeConfig(n_hid=16, n_init=8, n_blk_per_group=2, vocab_size=64)), 4)
    ids = torch.randint(0, 64, (2, 4, 5))
    with torch.no_grad():
        got, ref = DecoderGraph(decoder)(ids), DecoderFromIds(decoder)(ids)
    assert got.shape == (2, 3, 32, 40)
    assert (got - ref).abs().max().item() <= 1e-6


# ---- generation --------------------------------------------------------------------------------------------


def test_small_greedy_ids_and_image_equal_pytorch(gen, models):
    decoder, prior = models
    result = gen.generate(PROMPT, temperature=0)
    with torch.no_grad():
        ref = prior.generate(torch.from_numpy(result.text_tokens[None]), greedy=True).numpy()
        ref_image = decoder.decode_to_image(torch.from_numpy(ref.reshape(1, 16, 16)))[0].numpy()
    assert result.tokens.shape == (1, 16, 16) and gen.text_len == 64
    np.testing.assert_array_equal(result.tokens.reshape(1, -1), ref)
    assert len(np.unique(ref)) >= 4  # greedy did not collapse onto one code: the ids depend on the context
    want = np.clip(np.rint(ref_image * 255), 0, 255).transpose(1, 2, 0)
    assert result.images[0].shape == (128, 128, 3)
    assert np.abs(result.images[0].astype(int) - want).max() <= 1  # rounding at .5 may differ


def test_same_seed_same_image_another_seed_differs(gen):
    a = gen.generate(PROMPT, seed=5, top_p=0.9)
    b = gen.generate(PROMPT, seed=5, top_p=0.9)
    c = gen.generate(PROMPT, seed=6, top_p=0.9)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True))
    assert (a.tokens != c.tokens).mean() > 0.9  # 8192 codes: another seed shares almost none
    assert not np.array_equal(a.images[0], c.images[0])


def test_long_prompt_is_cut_to_text_len_as_documented(gen, bundle_path, tmp_path, capsys):
    """The generator's docstring: cut to text_len ids, the last replaced by <end_of_text>, truncated=True;
    the CLI says so and feeds the prior exactly the ids of "tree" x 62, which fills the 64 slots."""
    long, exact = " ".join(["tree"] * 100), " ".join(["tree"] * 62)
    ids, truncated = gen.text_tokens(long)
    assert truncated and ids.tolist() == [SOT, *[TREE] * 62, EOT]
    exact_ids, exact_cut = gen.text_tokens(exact)
    assert not exact_cut and exact_ids.tolist() == ids.tolist()
    assert main(["generate", str(bundle_path), long, "-n", "1", "--seed", "3", "--out", str(tmp_path / "g.png"),
                 "--tokens-out", str(tmp_path / "t.npz"), "--no-progress", "--backend", "ort-cpu"]) == 0
    out = capsys.readouterr().out
    assert "longer than the prior's 64 text tokens and was cut" in out
    saved = np.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(saved["text_tokens"], ids)
    assert saved["tokens"].shape == (1, 16, 16)


# ---- bad input: clear messages, nothing written -------------------------------------------------------------


def _family_edited(src, dst, family: str):
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["family"] = family
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_bad_cli_inputs_give_one_clear_line(bundle_path, tmp_path, capsys):
    unknown = _family_edited(bundle_path, tmp_path / "unknown", "stylegan")
    out = tmp_path / "g.png"
    cases = [
        ([str(bundle_path), PROMPT, "-n", "0"], "-n must be at least 1, got 0"),
        ([str(bundle_path), PROMPT, "-n", "-3"], "-n must be at least 1, got -3"),
        ([str(bundle_path), PROMPT, "--top-p", "0"], r"top_p must be in (0, 1]"),
        ([str(bundle_path), PROMPT, "--top-p", "1.5"], r"top_p must be in (0, 1]"),
        ([str(unknown), PROMPT], "field 'family' is 'stylegan'; expected one of ['sam', 'clip', 'dalle']"),
        ([str(bundle_path), PROMPT, "--rerank", str(bundle_path)],
         "holds a 'dalle' bundle, but a 'clip' bundle is needed"),
    ]
    for argv, message in cases:
        assert main(["generate", *argv, "--out", str(out), "--backend", "ort-cpu", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("edgefm generate: error: ") and message in err, (argv, err)
        assert "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()
    with pytest.raises(ManifestError, match="field 'family' is 'stylegan'"):
        DalleGenerator(unknown, backend="ort-cpu")
    with pytest.raises(ManifestError, match="field 'family' is 'stylegan'"):
        DvaeCodec(unknown, backend="ort-cpu")


# ---- CLIP reranking with a real exported CLIP ----------------------------------------------------------------


def test_rerank_scores_are_clip_cosines_sorted_descending(gen, clip):
    result = gen.generate(PROMPT, n=4, seed=2, rerank=clip)
    direct = clip.encode_images(result.images).astype(np.float64) @ clip.encode_texts([PROMPT])[0]
    np.testing.assert_allclose(result.scores, direct, rtol=0, atol=1e-6)
    assert np.ptp(direct) > 1e-4  # the samples really score differently, so the order means something
    assert list(result.order) == list(np.argsort(-direct, kind="stable"))
    assert (np.diff(result.scores[result.order]) <= 0).all()
    assert [id(x) for x in result.ranked_images()] == [id(result.images[i]) for i in result.order]


def test_cli_generate_with_rerank_writes_the_ranked_grid(bundle_path, clip_bundle, tmp_path, capsys,
                                                          monkeypatch):
    import edgefm.runtime.clip as clip_runtime

    seen = {}

    class Recording(clip_runtime.ClipModel):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(clip_runtime, "ClipModel", Recording)
    grid_path = tmp_path / "grid.png"
    assert main(["generate", str(bundle_path), PROMPT, "-n", "3", "--seed", "4", "--rerank", str(clip_bundle),
                 "--out", str(grid_path), "--tokens-out", str(tmp_path / "t.npz"), "--no-progress",
                 "--backend", "ort-cpu", "--threads", "1"]) == 0
    assert seen["threads"] == 1  # --threads reaches the CLIP reranker too, not only the generator
    saved = np.load(tmp_path / "t.npz")
    images = list(DvaeCodec(bundle_path, backend="ort-cpu", threads=1).decode(saved["tokens"]))
    clip = clip_runtime.ClipModel(clip_bundle, backend="ort-cpu", threads=1)
    direct = clip.encode_images(images).astype(np.float64) @ clip.encode_texts([PROMPT])[0]
    np.testing.assert_allclose(saved["scores"], direct, rtol=0, atol=1e-6)
    order = np.argsort(-direct, kind="stable")
    printed = [ln for ln in capsys.readouterr().out.splitlines() if "CLIP score" in ln]
    assert [int(ln.split("#")[1].split()[0]) for ln in printed] == list(order)
    grid = read_image(grid_path)
    assert grid.shape == (256, 256, 3) and grid[128:, 128:].max() == 0  # 2×2 tiles of 128², one empty
    for rank, i in enumerate(order):
        r, c = divmod(rank, 2)
        tile = grid[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128]
        np.testing.assert_array_equal(tile[24:], images[i][24:])  # below the label: the ranked image
