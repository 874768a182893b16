"""DALL·E export: per-component parity PyTorch vs ONNX Runtime, export from checkpoint files through the
CLI arguments, and failures (mismatched models, unknown sizes, parity gate)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import assert_scaled_close
from dalle_fixtures import one_torch_thread, tiny_bundle, tiny_models  # noqa: F401 (fixture)
from edgefm.export.dalle import add_export_args, export_dalle, run_export, smooth_images, text_parity_ids
from edgefm.export.parity import cosine
from edgefm.runtime.bundle import Bundle
from edgefm.runtime.errors import EdgefmError, InputError, ParityError


@pytest.fixture(scope="module")
def models():
    return tiny_models()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return Bundle(tiny_bundle(tmp_path_factory), backend="ort-cpu", threads=1)


def test_manifest_parity_and_config(bundle):
    m = json.loads((bundle.path / "manifest.json").read_text())
    assert m["family"] == "dalle" and m["variant"] == "tiny"
    names = [c["name"] for c in m["components"]]
    assert names == ["dvae_decoder", "dvae_encoder", "prior_prefill", "prior_step"]
    for name in ("dvae_decoder", "prior_prefill", "prior_step"):
        assert m["parity"][name]["passed"]
        for out in m["parity"][name]["outputs"].values():
            assert out["cosine"] >= 0.99999 and out["max_abs"] <= 1e-4 * max(1.0, out["ref_max_abs"])
    assert m["parity"]["dvae_encoder"]["outputs"]["image_tokens"]["id_agreement"] == 1.0
    assert m["parity"]["prior_step"]["inputs"]["k_cache"] == [2, 2, 4, 79, 16]
    cfg = m["config"]
    assert (cfg["image_grid"], cfg["image_size"], cfg["image_vocab"]) == (8, 64, 64)
    assert (cfg["text_len"], cfg["pad_id"], cfg["context_len"]) == (16, 49408, 16 + 64 - 1)
    assert cfg["tokenizer"]["kind"] == "clip_bpe" and cfg["tokenizer"]["eot_id"] == 49407
    assert m["preprocess"]["image_size"] == 64 and m["preprocess"]["map_pixels_eps"] == 0.1
    step = next(c for c in m["components"] if c["name"] == "prior_step")
    assert [t["name"] for t in step["outputs"]] == ["logits", "k_cache_out", "v_cache_out"]
    assert step["dims"]["batch"] == [1, 8, 32]


def test_decoder_image_matches_pytorch_at_another_batch(bundle, models):
    decoder = models[0]
    ids = np.random.default_rng(7).integers(0, 64, (3, 8, 8))
    got = bundle.runner("dvae_decoder").run({"image_tokens": ids})["image"]
    with torch.no_grad():
        ref = decoder.decode_to_image(torch.from_numpy(ids)).numpy()
    assert got.shape == (3, 3, 64, 64) and 0.0 <= got.min() and got.max() <= 1.0
    assert cosine(got, ref) >= 0.99999
    assert_scaled_close(got, ref, rel=1e-4, what="decoded image")


def test_encoder_ids_identical_on_smooth_images(bundle, models):
    encoder = models[1]
    images = smooth_images(3, 64, seed=11)
    got = bundle.runner("dvae_encoder").run({"image": images})["image_tokens"]
    with torch.no_grad():
        ref = encoder.encode_ids(torch.from_numpy(images)).numpy()
    assert got.dtype == np.int64 and got.shape == (3, 8, 8)
    np.testing.assert_array_equal(got, ref)
    assert len(np.unique(ref)) > 3  # the images do not all collapse onto one code


def test_prefill_and_chained_steps_match_pytorch(bundle, models):
    """ONNX caches are fed back step after step (as the runtime does) across two image rows."""
    prior = models[2]
    c = prior.config
    text = text_parity_ids(c, batch=3, seed=4)
    tokens = np.random.default_rng(5).integers(0, c.image_vocab, (2 * c.image_grid + 2, 3))
    out = bundle.runner("prior_prefill").run({"text_tokens": text})
    with torch.no_grad():
        ref_logits, k, v = prior.prefill(torch.from_numpy(text))
    assert_scaled_close(out["logits"], ref_logits.numpy(), rel=1e-4, what="prefill logits")
    assert_scaled_close(out["k_cache"], k.numpy(), rel=1e-4, what="prefill k_cache")
    kc, vc = out["k_cache"], out["v_cache"]
    step = bundle.runner("prior_step")
    for j, tok in enumerate(tokens):
        pos = np.array([c.text_len + j], np.int64)
        out = step.run({"token": tok, "position": pos, "k_cache": kc, "v_cache": vc})
        kc, vc = out["k_cache_out"], out["v_cache_out"]
        with torch.no_grad():
            ref_logits, k, v = prior.step(torch.from_numpy(tok), c.text_len + j, k, v)
        assert_scaled_close(out["logits"], ref_logits.numpy(), rel=1e-4, what=f"step {j} logits")
    assert_scaled_close(vc, v.numpy(), rel=1e-4, what="v_cache after the steps")


def test_prior_step_computes_no_shapes_per_call(bundle, tmp_path):
    """The prior runs once per image token: its step reshapes by constants (the batch as -1), so once ONNX
    Runtime has folded what is static no Shape op is left (a step is only the model's arithmetic, and on a GPU
    nothing of it waits on the host), and the grid row of a position is one integer Div, not floor division's
    sign corrections (Mod, Less, Xor, And, Where)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "step.onnx")
    ort.InferenceSession(str(bundle.path / bundle.entry("prior_step").file), options,
                         providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert not {"Shape", "Mod", "Xor"} & set(ops), sorted(set(ops))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_export_args(p)
    return p


def test_export_from_checkpoint_files_with_sparse_prior(tmp_path):
    """CLI arguments -> files: a dVAE decoder state dict and a sparse-attention prior in safetensors with its
    JSON config beside it; greedy ids through the bundle equal PyTorch's."""
    from edgefm.runtime.dalle import DalleGenerator
    from safetensors.torch import save_file

    decoder, _, prior = tiny_models("tiny_sparse", seed=3)
    torch.save(decoder.state_dict(), tmp_path / "decoder.pt")
    save_file(prior.state_dict(), str(tmp_path / "prior.safetensors"))
    fields = {"name": "my_sparse", "attention": ["row", "column"], "conv_kernel": 3}
    (tmp_path / "prior.json").write_text(json.dumps(fields))
    args = _parser().parse_args(["--dvae-decoder", str(tmp_path / "decoder.pt"), "--prior",
                                 str(tmp_path / "prior.safetensors"), "--out", str(tmp_path / "b")])
    out = run_export(args)
    m = json.loads((out / "manifest.json").read_text())
    assert m["variant"] == "my_sparse" and m["config"]["prior"]["attention"] == ["row", "column"]
    assert [c["name"] for c in m["components"]] == ["dvae_decoder", "prior_prefill", "prior_step"]
    assert m["source"]["components"]["prior_prefill"]["checkpoint"] == "prior.safetensors"
    assert len(m["source"]["sha256"]) == 64 and m["parity"]["prior_step"]["passed"]

    gen = DalleGenerator(out, backend="ort-cpu", threads=1)
    result = gen.generate("two red circles", n=2, temperature=0)
    with torch.no_grad():
        ref = prior.generate(torch.from_numpy(np.repeat(result.text_tokens[None], 2, 0)), greedy=True)
    np.testing.assert_array_equal(result.tokens.reshape(2, -1), ref.numpy())


def test_prior_and_dvae_must_pair(tmp_path):
    from edgefm.models.dalle import DvaeConfig, build_decoder, build_prior

    with pytest.raises(InputError, match="64 image codes but the dVAE decoder has 32"):
        export_dalle(tmp_path / "b", build_decoder(DvaeConfig(n_hid=16, n_init=8, n_blk_per_group=1,
                                                              vocab_size=32)), prior=build_prior("tiny"))
    assert not (tmp_path / "b").exists()


def test_bad_arguments_are_named(tmp_path):
    decoder = tmp_path / "decoder.pt"
    torch.save(tiny_models()[0].state_dict(), decoder)
    prior = tmp_path / "prior.pt"
    torch.save({"x": torch.zeros(1)}, prior)
    cases = [
        (["--dvae-decoder", str(tmp_path / "nope.pkl")], "--dvae-decoder .* does not exist"),
        (["--dvae-decoder", str(decoder), "--prior-config", "tiny"], "given without --prior"),
        (["--dvae-decoder", str(decoder), "--prior", str(prior)], "pass --prior-config"),
        (["--dvae-decoder", str(decoder), "--prior", str(prior), "--prior-config", "huge"],
         "neither a known prior size"),
        (["--dvae-decoder", str(decoder), "--image-size", "60"], "multiple of 8"),
    ]
    for argv, message in cases:
        with pytest.raises(InputError, match=message):
            run_export(_parser().parse_args([*argv, "--out", str(tmp_path / "b")]))
    with pytest.raises(EdgefmError, match="does not fit the DALL·E prior 'tiny'"):
        run_export(_parser().parse_args(["--dvae-decoder", str(decoder), "--prior", str(prior),
                                         "--prior-config", "tiny", "--out", str(tmp_path / "b")]))
    with pytest.raises(InputError, match="precision 'int8'"):
        export_dalle(tmp_path / "b", decoder, precision="int8")
    assert not (tmp_path / "b").exists()


def test_parity_gate_refuses_then_records_when_disabled(tmp_path, monkeypatch):
    import edgefm.export.dalle as exporter

    real = exporter.compare_outputs
    def drifted(ref, got, precision):
        return real(ref, {k: v + 1e-2 for k, v in got.items()}, precision)

    monkeypatch.setattr(exporter, "compare_outputs", drifted)
    decoder = tiny_models()[0]
    with pytest.raises(ParityError, match="dvae_decoder.*max abs"):
        export_dalle(tmp_path / "b", decoder, image_size=32)
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())
    out = export_dalle(tmp_path / "b", decoder, image_size=32, parity_gate=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["parity"]["gate"] is False and not m["parity"]["dvae_decoder"]["passed"]
    assert m["config"]["image_grid"] == 4 and "text_len" not in m["config"]


@pytest.mark.parametrize("pattern", ["dense", "row", "column", "conv"])
def test_step_graph_is_the_model_step(pattern):
    """The exported step attends to the given cache plus the fed token's own key and writes the cache once; the
    model's step writes first, then attends. Same logits and caches, at the first, a middle and the last
    position, for every attention pattern."""
    from edgefm.export.dalle import PriorStepGraph
    from edgefm.models.dalle import DallePrior
    from edgefm.models.dalle.prior_config import PRIOR_CONFIGS

    c = dataclasses.replace(PRIOR_CONFIGS["tiny"], attention=(pattern, "dense"), conv_kernel=3)
    torch.manual_seed(0)
    prior = DallePrior(c).eval()
    graph = PriorStepGraph(prior)
    text = torch.from_numpy(text_parity_ids(c, batch=2, seed=1))
    with torch.no_grad():
        _, k, v = prior.prefill(text)
        g = torch.Generator().manual_seed(2)
        k = k + torch.randn(k.shape, generator=g) * (torch.arange(c.context_len) < c.context_len - 1)[:, None]
        v = v + torch.randn(v.shape, generator=g)
        for pos in (c.text_len, c.text_len + c.image_grid + 1, c.context_len - 1):
            token = torch.tensor([3, c.image_vocab - 1])
            want = prior.step(token, pos, k, v)
            got = graph(token, torch.tensor([pos]), k, v)
            for name, a, b in zip(("logits", "k_cache", "v_cache"), got, want, strict=True):
                assert_scaled_close(a.numpy(), b.numpy(), rel=1e-5, what=f"{name} at {pos}")
