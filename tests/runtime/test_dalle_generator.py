"""DALL·E runtime: greedy ids equal PyTorch's, seeded sampling, top-k / top-p against a torch reference,
CLIP reranking, the dVAE round trip, the CLI, clear errors, and no torch in the runtime."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import types

import cv2
import numpy as np
import pytest
from dalle_fixtures import smooth_picture, tiny_bundle, tiny_models
from edgefm.runtime.bundle import Bundle
from edgefm.runtime.dalle import DalleGenerator, DvaeCodec, filter_logits, sample_tokens, token_probabilities
from edgefm.runtime.dalle.cli import register
from edgefm.runtime.errors import BundleError, EdgefmError, InputError

PROMPT = "a small red cube on a wooden table"


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def gen(bundle_path):
    return DalleGenerator(Bundle(bundle_path, backend="ort-cpu", threads=1))


@pytest.fixture(scope="module")
def models():
    return tiny_models()


# ---- generation ------------------------------------------------------------------------------------------


def test_text_tokens_are_clip_bpe_framed_and_padded(gen):
    from edgefm.runtime.clip import ClipTokenizer

    ids, truncated = gen.text_tokens(PROMPT)
    words = ClipTokenizer().encode(PROMPT)
    assert not truncated and ids.shape == (16,) and ids.dtype == np.int64
    assert list(ids[: len(words) + 2]) == [49406, *words, 49407]
    assert (ids[len(words) + 2 :] == 49408).all()  # the prior's pad id, not CLIP's zero padding
    long_ids, truncated = gen.text_tokens(" ".join(["tree"] * 40))
    assert truncated and long_ids.shape == (16,) and long_ids[-1] == 49407 and 49408 not in long_ids
    assert gen.generate(" ".join(["tree"] * 40), temperature=0).truncated


def test_greedy_generation_equals_pytorch(gen, models):
    import torch

    result = gen.generate(PROMPT, n=3, temperature=0)
    with torch.no_grad():
        ref = models[2].generate(torch.from_numpy(np.repeat(result.text_tokens[None], 3, 0)), greedy=True)
    assert result.tokens.shape == (3, 8, 8) and result.tokens.dtype == np.int64
    np.testing.assert_array_equal(result.tokens.reshape(3, -1), ref.numpy())
    with torch.no_grad():
        ref_images = models[0].decode_to_image(torch.from_numpy(result.tokens)).numpy()
    want = np.clip(np.rint(ref_images * 255), 0, 255).transpose(0, 2, 3, 1)
    assert np.abs(np.stack(result.images).astype(int) - want).max() <= 1  # rounding at .5 may differ


@pytest.mark.parametrize("scale", [0.0, 8.0])
def test_guided_greedy_generation_equals_pytorch(gen, models, scale):
    """Classifier-free guidance: the runtime's doubled batch (prompt rows, then empty-prompt rows) and its
    ``u + s·(c - u)`` pick the same codes as the PyTorch reference; scale 0 is the unconditional model."""
    import torch

    result = gen.generate(PROMPT, n=2, temperature=0, guidance=scale)
    assert result.guidance == scale
    assert list(gen.empty_text_tokens[:3]) == [49406, 49407, 49408]
    with torch.no_grad():
        text = torch.from_numpy(np.repeat(result.text_tokens[None], 2, 0))
        ref = models[2].generate(text, greedy=True, guidance=scale,
                                 empty_text_ids=torch.from_numpy(gen.empty_text_tokens))
        plain = models[2].generate(text, greedy=True)
    np.testing.assert_array_equal(result.tokens.reshape(2, -1), ref.numpy())
    if scale == 0:  # the unconditional model: the prompt no longer matters
        other = gen.generate("a completely different prompt", n=1, temperature=0, guidance=0.0)
        np.testing.assert_array_equal(other.tokens[0], result.tokens[0])
    else:  # guidance changed the drawing, so the equality above is not the unguided one's
        assert (ref != plain).any()


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_captured_steps_take_turns_with_the_cache_and_draw_the_same_codes(bundle_path, models, guidance):
    """``cuda_graphs=True``: prefill into buffer A, then two captured step graphs that hand the cache back and
    forth (A -> B, B -> A). Here on the CPU provider, where a captured graph is a static-shape session with
    pre-bound buffers (the same binding code as on ort-cuda): greedy codes equal PyTorch's, and seeded samples
    equal the uncaptured runtime's, across batch sizes (guidance doubles the batch: another capture)."""
    import torch

    captured = DalleGenerator(Bundle(bundle_path, backend="ort-cpu", threads=1))
    captured._graphs = True  # the CPU stand-in for ort-cuda (the public flag refuses other backends)
    plain = DalleGenerator(Bundle(bundle_path, backend="ort-cpu", threads=1))
    greedy = captured.generate(PROMPT, n=3, temperature=0, guidance=guidance)
    with torch.no_grad():
        text = torch.from_numpy(np.repeat(greedy.text_tokens[None], 3, 0))
        ref = models[2].generate(text, greedy=True, guidance=guidance,
                                 empty_text_ids=torch.from_numpy(captured.empty_text_tokens))
    np.testing.assert_array_equal(greedy.tokens.reshape(3, -1), ref.numpy())
    for n in (1, 2):
        want = plain.generate(PROMPT, n=n, seed=5, top_k=16, guidance=guidance).tokens
        np.testing.assert_array_equal(captured.generate(PROMPT, n=n, seed=5, top_k=16, guidance=guidance).tokens, want)
    assert list(captured._captured) == [2 * 2 if guidance != 1 else 2]  # one batch size kept


def test_captured_steps_need_ort_cuda(bundle_path):
    with pytest.raises(InputError, match=r"cuda_graphs=True \(--cuda-graph\) replays ONNX Runtime CUDA graphs: "
                                         r"it needs backend 'ort-cuda' \(--backend ort-cuda\), not 'ort-cpu'"):
        DalleGenerator(bundle_path, backend="ort-cpu", cuda_graphs=True)


def test_guidance_default_comes_from_the_bundle(bundle_path, tmp_path):
    """A bundle without a recorded scale samples unguided; a recorded one is the default and can be overridden."""
    plain = DalleGenerator(Bundle(bundle_path, backend="ort-cpu", threads=1))
    assert plain.guidance_scale == 1 and plain.generate(PROMPT, temperature=0).guidance == 1

    def record(m):
        m["config"]["prior"]["guidance_scale"] = 2.5

    edited = _edited_bundle(bundle_path, tmp_path / "guided", record)
    gen = DalleGenerator(Bundle(edited, backend="ort-cpu", threads=1))
    assert gen.generate(PROMPT, temperature=0).guidance == 2.5
    assert gen.generate(PROMPT, temperature=0, guidance=1.0).guidance == 1.0


def test_seeded_sampling_is_reproducible(gen):
    a = gen.generate(PROMPT, n=3, seed=1, top_k=32)
    b = gen.generate(PROMPT, n=3, seed=1, top_k=32)
    c = gen.generate(PROMPT, n=3, seed=2, top_k=32)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert (a.tokens != c.tokens).mean() > 0.5 and not np.array_equal(a.images[0], c.images[0])
    assert (a.tokens[0] != a.tokens[1]).mean() > 0.5  # samples of one batch differ from each other
    assert a.images[0].shape == (64, 64, 3) and a.images[0].dtype == np.uint8


def test_batches_larger_than_the_limit_are_split(gen, monkeypatch):
    monkeypatch.setattr(gen, "batch_limit", 2)
    result = gen.generate(PROMPT, n=3, temperature=0)
    assert result.tokens.shape == (3, 8, 8) and np.array_equal(result.tokens[0], result.tokens[2])


class _BrightnessClip:
    """A stand-in reranker: image embedding (mean brightness, 1 - it) normalized; text points at (1, 0)."""

    def encode_images(self, images):
        m = np.array([im.mean() / 255 for im in images])
        e = np.stack([m, 1 - m], 1)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    def encode_texts(self, texts):
        return np.array([[1.0, 0.0]] * len(texts))


def test_rerank_orders_by_similarity(gen):
    result = gen.generate(PROMPT, n=4, seed=3, rerank=_BrightnessClip())
    want = _BrightnessClip().encode_images(result.images)[:, 0]
    np.testing.assert_allclose(result.scores, want, rtol=1e-12)
    assert list(result.order) == list(np.argsort(-want))
    assert result.ranked_images()[0] is result.images[result.order[0]]
    with pytest.raises(InputError, match="lacks"):
        gen.generate(PROMPT, rerank=object())


# ---- sampling vs a torch reference -------------------------------------------------------------------------


def _torch_filter(logits: np.ndarray, top_k, top_p) -> np.ndarray:
    """Reference: top-k as torch.topk thresholds, then nucleus filtering as in Hugging Face transformers'
    TopPLogitsWarper (sorted cumulative probabilities, shifted by one so the crossing token stays)."""
    import torch

    x = torch.tensor(logits, dtype=torch.float64)
    if top_k is not None:
        kth = torch.topk(x, min(top_k, x.shape[-1])).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_x, index = torch.sort(x, descending=True)
        remove = sorted_x.softmax(-1).cumsum(-1) > top_p
        remove[:, 1:] = remove[:, :-1].clone()
        remove[:, 0] = False
        x = x.scatter(-1, index, sorted_x.masked_fill(remove, float("-inf")))
    return x.numpy()


@pytest.mark.parametrize("top_k, top_p", [(1, None), (5, None), (50, None), (80, None), (None, 0.05),
                                          (None, 0.5), (None, 0.9), (None, 1.0), (10, 0.7), (3, 0.99)])
def test_filter_logits_matches_torch_reference(top_k, top_p):
    import torch

    logits = np.random.default_rng(0).normal(0, 2, (6, 50))
    got, ref = filter_logits(logits, top_k, top_p), _torch_filter(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
    np.testing.assert_array_equal(got[np.isfinite(got)], ref[np.isfinite(ref)])
    probs = token_probabilities(logits, 0.7, top_k, top_p)
    want = torch.from_numpy(_torch_filter(logits / 0.7, top_k, top_p)).softmax(-1).numpy()
    np.testing.assert_allclose(probs, want, rtol=0, atol=1e-12)
    kept = np.isfinite(got).sum(1)
    assert (kept >= 1).all() and (top_k is None or (kept <= top_k).all())


def test_sampling_follows_the_filtered_distribution():
    logits = np.random.default_rng(1).normal(0, 1.5, (1, 12))
    probs = token_probabilities(logits, 0.8, top_k=8, top_p=0.9)[0]
    draws = sample_tokens(np.repeat(logits, 40000, 0), np.random.default_rng(2), 0.8, top_k=8, top_p=0.9)
    freq = np.bincount(draws, minlength=12) / len(draws)
    assert freq[probs == 0].sum() == 0  # filtered tokens are never drawn
    assert np.abs(freq - probs).max() < 0.01  # 40k draws: standard error <= 0.0025
    np.testing.assert_array_equal(sample_tokens(logits, np.random.default_rng(0), 0.0), np.argmax(logits, 1))


# ---- dVAE round trip -------------------------------------------------------------------------------------


def test_dvae_round_trip_equals_pytorch(bundle_path, models):
    import torch

    codec = DvaeCodec(bundle_path, backend="ort-cpu", threads=1)
    picture = smooth_picture(64, 64, seed=3)
    ids = codec.encode(picture)
    with torch.no_grad():
        x = torch.from_numpy(picture.transpose(2, 0, 1)[None].astype(np.float32) / 255)
        ref_ids = models[1].encode_ids(x)[0].numpy()
        ref_image = models[0].decode_to_image(torch.from_numpy(ref_ids)[None])[0].numpy()
    np.testing.assert_array_equal(ids, ref_ids)
    recon = codec.decode(ids)
    want = np.clip(np.rint(ref_image * 255), 0, 255).transpose(1, 2, 0)
    assert recon.shape == (64, 64, 3) and np.abs(recon.astype(int) - want).max() <= 1
    np.testing.assert_array_equal(codec.encode(np.stack([picture, picture]))[1], ids)


def test_codec_resizes_the_shortest_side_and_center_crops(bundle_path):
    codec = DvaeCodec(bundle_path, backend="ort-cpu", threads=1)
    picture = smooth_picture(96, 160, seed=4)
    want = cv2.resize(picture, (107, 64), interpolation=cv2.INTER_LANCZOS4)[:, 22:86]  # 160 * 64/96 = 106.7
    np.testing.assert_array_equal(codec.prepare(picture), want)
    with pytest.raises(InputError, match=r"ids must be dVAE codes in \[0, 63\]"):
        codec.decode(np.full((8, 8), 64))


# ---- CLI -------------------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="edgefm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_generate_and_dvae_write_pictures(bundle_path, tmp_path, capsys):
    from edgefm.runtime.draw import read_image, write_image

    _cli(["generate", str(bundle_path), PROMPT, "-n", "3", "--seed", "1", "--top-p", "0.9", "--out",
          str(tmp_path / "grid.png"), "--tokens-out", str(tmp_path / "t.npz"), "--no-progress",
          "--backend", "ort-cpu"])
    grid = read_image(tmp_path / "grid.png")
    assert grid.shape == (128, 128, 3) and grid[64:, 64:].max() == 0  # 2x2 tiles, the 4th empty
    assert np.load(tmp_path / "t.npz")["tokens"].shape == (3, 8, 8)
    assert "wrote" in capsys.readouterr().out
    write_image(tmp_path / "in.png", smooth_picture(80, 100, seed=5))
    _cli(["dvae", str(bundle_path), str(tmp_path / "in.png"), "--out", str(tmp_path / "r.png"), "--compare"])
    assert read_image(tmp_path / "r.png").shape == (64, 128, 3)
    assert "PSNR" in capsys.readouterr().out


def test_cli_rerank_without_clip_runtime_says_so(bundle_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "edgefm.runtime.clip", types.ModuleType("edgefm.runtime.clip"))
    with pytest.raises(InputError, match="--rerank .* needs the CLIP runtime"):
        _cli(["generate", str(bundle_path), PROMPT, "--rerank", "clip_b", "--out", str(tmp_path / "g.png")])
    assert not (tmp_path / "g.png").exists()


# ---- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "non-empty"), (dict(prompt="   "), "non-empty"), (dict(prompt=None), "non-empty"),
    (dict(n=0), "n .* >= 1"), (dict(n=-2), "n .* >= 1"), (dict(n=1.5), "n .* >= 1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=0), "top_k must be"), (dict(top_k=2.5), "top_k must be"),
    (dict(temperature=-1.0), "temperature must be >= 0"), (dict(n="3"), "n .* >= 1"),
    (dict(guidance=-1.0), "guidance .* must be >= 0"), (dict(guidance=float("nan")), "guidance .* must be >= 0"),
])
def test_bad_generation_inputs(gen, kwargs, message):
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(InputError, match=message):
        gen.generate(**kwargs)


def _edited_bundle(src, dst, edit):
    dst.mkdir()
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    m = json.loads((src / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_bad_bundles_are_refused_clearly(bundle_path, tmp_path):
    clip = _edited_bundle(bundle_path, tmp_path / "clip", lambda m: m.update(family="clip"))
    with pytest.raises(BundleError, match="holds a 'clip' bundle, but a 'dalle' bundle is needed"):
        DalleGenerator(clip)
    with pytest.raises(BundleError, match="holds a 'clip' bundle"):
        DvaeCodec(Bundle(clip))

    def drop_prior(m):
        m["components"] = [c for c in m["components"] if not c["name"].startswith("prior")]

    dvae_only = _edited_bundle(bundle_path, tmp_path / "dvae", drop_prior)
    with pytest.raises(BundleError, match="no prior_prefill, prior_step.*--prior"):
        DalleGenerator(dvae_only, backend="ort-cpu")
    with pytest.raises(EdgefmError, match="is not an edgefm bundle"):
        DalleGenerator(tmp_path)


# ---- no torch ------------------------------------------------------------------------------------------


def test_runtime_generates_without_torch(bundle_path, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, _NoTorch())
        import numpy as np
        from edgefm.runtime.dalle import DalleGenerator, DvaeCodec
        import argparse
        from edgefm.runtime.dalle.cli import add_export_args, register
        parser = argparse.ArgumentParser()
        register(parser.add_subparsers())
        add_export_args(parser)  # the `edgefm export dalle` flags are built without torch too
        gen = DalleGenerator({str(bundle_path)!r}, backend="ort-cpu", threads=1)
        r = gen.generate("a cat", n=2, seed=0, top_k=10, top_p=0.9, progress=True)
        codec = DvaeCodec({str(bundle_path)!r}, backend="ort-cpu", threads=1)
        ids = codec.encode(r.images[0])
        assert r.tokens.shape == (2, 8, 8) and codec.decode(ids).shape == (64, 64, 3)
        print("torch loaded:", any(m == "torch" or m.startswith("torch.") for m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "torch loaded: False" in r.stdout
    assert "image rows" in r.stderr  # the progress bar counts image rows
