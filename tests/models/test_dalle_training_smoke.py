"""Smoke tests of the DALL·E training loops (models/train/dalle.py): a few steps of each stage on tiny sizes.

They check what a broken loop would get wrong: the losses (logit-Laplace NLL, KL to the uniform prior)
against their textbook formulas, text ids framed exactly as the runtime's generator frames prompts,
determinism and exact resumption, and weights + JSON that the exporter's loaders accept.
"""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from edgefm.models.train import dalle as train

DVAE_ARGS = ["--stage", "dvae", "--dvae-size", "tiny", "--steps", "3", "--batch", "4", "--eval-every", "2",
             "--eval-size", "8"]
PRIOR_ARGS = ["--stage", "prior", "--prior-size", "tiny", "--steps", "3", "--batch", "4", "--eval-every", "2",
              "--eval-size", "8", "--pairs", "16"]


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def dvae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dalle_train")
    info = train.main([*DVAE_ARGS, "--out", str(out)])
    return out, info


def test_logit_laplace_nll_matches_the_density():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 4, 4)
    stats = torch.randn(2, 6, 4, 4)
    x = train.map_pixels(image)
    laplace = torch.distributions.Laplace(stats[:, :3], stats[:, 3:].exp())
    # change of variables y = logit(x): log p(x) = log p_y(logit x) - log(x (1 - x))
    want = -(laplace.log_prob(torch.logit(x)) - torch.log(x * (1 - x))).flatten(1).sum(1)
    torch.testing.assert_close(train.logit_laplace_nll(stats, image), want, rtol=1e-5, atol=1e-4)


def test_kl_to_uniform_bounds():
    flat = torch.zeros(1, 16, 2, 2)
    peaked = torch.full((1, 16, 2, 2), -1e4)
    peaked[:, 3] = 0
    assert float(train.kl_to_uniform(flat)) == pytest.approx(0.0, abs=1e-5)
    assert float(train.kl_to_uniform(peaked)) == pytest.approx(4 * math.log(16), rel=1e-5)


def test_schedules_follow_the_paper_endpoints():
    assert train.cosine(0, 100, train.TAU_START, train.TAU_END) == pytest.approx(1.0)
    assert train.cosine(100, 100, train.TAU_START, train.TAU_END) == pytest.approx(1 / 16)
    assert train.cosine(500, 100, train.TAU_START, train.TAU_END) == pytest.approx(1 / 16)
    assert train.learning_rate(0, 1000, 1e-3) == pytest.approx(1e-5)
    assert train.learning_rate(1000, 1000, 1e-3) == pytest.approx(1e-4)


def test_caption_ids_equal_the_runtime_framing():
    from edgefm.runtime.dalle.generator import DalleGenerator

    config = train.PRIOR_SIZES["shapes"]
    from edgefm.models.train.dalle_data import CaptionIds

    captions = CaptionIds(config)
    tok = captions.tokenizer
    # text_tokens only reads these attributes of the generator; a namespace stands in for a bundle
    runtime = SimpleNamespace(tokenizer=tok, sot_id=tok.sot_token_id, eot_id=tok.eot_token_id,
                              text_len=config.text_len, pad_id=config.pad_id)
    for caption in ("a red triangle", "an orange hexagon", "a small red triangle above a large blue circle"):
        want, _ = DalleGenerator.text_tokens(runtime, caption)
        np.testing.assert_array_equal(captions(caption), want)
    assert captions("a red triangle").tolist() == [49406, 320, 736, 14615, 49407, *[49408] * 3]
    # the unconditional row of classifier-free guidance: trained on what the runtime feeds
    np.testing.assert_array_equal(captions(""), DalleGenerator.empty_text_tokens.fget(runtime))


def test_dvae_stage_writes_loadable_weights(dvae_run):
    from edgefm.models.dalle import load_dvae_decoder, load_dvae_encoder

    out, info = dvae_run
    assert info["steps"] == 3 and info["finished"]
    assert all(math.isfinite(h["loss"]) for h in info["history"])
    encoder = load_dvae_encoder(out / "dvae_shapes_encoder.safetensors")
    decoder = load_dvae_decoder(out / "dvae_shapes_decoder.safetensors")
    assert encoder.config.vocab_size == decoder.config.vocab_size == 64
    assert json.loads((out / "dvae_shapes_encoder.json").read_text())["n_hid"] == 16
    record = json.loads((out / train.RECORD).read_text())
    assert record["dvae"]["steps"] == 3 and 0 <= record["dvae"]["eval"]["pixel_acc"] <= 1


def test_dvae_stage_is_deterministic_and_resumes_exactly(dvae_run, tmp_path):
    out, _ = dvae_run
    train.main([*DVAE_ARGS, "--out", str(tmp_path), "--until", "2"])
    assert torch.load(tmp_path / "dvae_state.pt", weights_only=True)["step"] == 2
    train.main([*DVAE_ARGS, "--out", str(tmp_path)])  # continues from step 2
    for stem in ("dvae_shapes_encoder", "dvae_shapes_decoder"):
        ref, got = _tensors(out / f"{stem}.safetensors"), _tensors(tmp_path / f"{stem}.safetensors")
        assert ref.keys() == got.keys()
        for key in ref:
            assert torch.equal(ref[key], got[key]), key


def test_lengthened_dvae_schedule_keeps_tau_annealed(dvae_run, tmp_path):
    """Continuing a finished run on a longer schedule: with --anneal-steps at the first schedule's length τ stays
    at 1/16 and β at its final weight; only the step size restarts (without it, τ would rise again)."""
    import shutil

    out, _ = dvae_run
    shutil.copy(out / "dvae_state.pt", tmp_path / "dvae_state.pt")  # finished at step 3, τ annealed over 2
    info = train.main([*DVAE_ARGS, "--out", str(tmp_path), "--steps", "6", "--anneal-steps", "2"])
    assert info["steps"] == 6 and [h["step"] for h in info["history"]] == [4, 6]
    assert all(h["tau"] == pytest.approx(1 / 16) and h["beta"] == pytest.approx(train.KL_WEIGHT)
               for h in info["history"])
    assert train.cosine(3, int(0.7 * 6), train.TAU_START, train.TAU_END) > 3 * train.TAU_END  # the default


def test_prior_stage_trains_on_the_dvae_codes(dvae_run, tmp_path):
    from edgefm.models.dalle import load_prior

    out, _ = dvae_run
    dvae = str(out / "dvae_shapes_encoder.safetensors")
    info = train.main([*PRIOR_ARGS, "--out", str(tmp_path), "--dvae", dvae])
    assert info["steps"] == 3 and info["pairs"] == 16
    first = info["history"][0]
    pairs = torch.load(tmp_path / "prior_pairs.pt", weights_only=True)
    # an untrained prior is near uniform: the paper-weighted loss is close to 1/8 ln(text ids the captions
    # use, the empty caption's included) + 7/8 ln(image codes)
    used = len(torch.unique(torch.cat([pairs["text"].flatten(), torch.tensor([49406, 49407, 49408])])))
    config = train.PRIOR_SIZES["tiny"]
    assert first["loss"] == pytest.approx(math.log(used) / 8 + 7 * math.log(64) / 8, rel=0.1)
    weights = tmp_path / "prior_shapes.safetensors"
    assert all(t.dtype == torch.float16 for t in _tensors(weights).values())
    name, prior = load_prior(weights)  # sizes from prior_shapes.json beside it, strict keys
    # trained with empty captions (the default share), so the default guidance scale travels in the config
    assert name == "shapes" and prior.config == dataclasses.replace(config, guidance_scale=3.0)
    assert pairs["codes"].shape == (16, 64) and int(pairs["codes"].max()) < 64
    # a prior trained without empty captions has no unconditional model: no guidance by default
    train.main([*PRIOR_ARGS, "--out", str(tmp_path), "--dvae", dvae, "--restart", "--uncond-share", "0"])
    assert load_prior(weights)[1].config.guidance_scale == 1.0
    assert pairs["text"].shape == (16, config.text_len) and int(pairs["text"][:, 0].min()) == 49406


def test_prior_stage_can_start_from_another_prior(dvae_run, tmp_path):
    """--init-prior loads a prior's weights (fresh optimizer): at step size 0 they come back unchanged."""
    out, _ = dvae_run
    dvae = str(out / "dvae_shapes_encoder.safetensors")
    train.main([*PRIOR_ARGS, "--out", str(tmp_path / "a"), "--dvae", dvae])
    start = tmp_path / "a" / "prior_shapes.safetensors"
    train.main([*PRIOR_ARGS, "--out", str(tmp_path / "b"), "--dvae", dvae, "--init-prior", str(start), "--lr", "0"])
    before, after = _tensors(start), _tensors(tmp_path / "b" / "prior_shapes.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "b" / train.RECORD).read_text())["prior"]["init_prior"] == str(start)
    from edgefm.runtime.errors import CheckpointError

    with pytest.raises(CheckpointError, match="init-prior"):  # not a prior of this size: refused, by name
        train.main([*PRIOR_ARGS, "--out", str(tmp_path / "c"), "--dvae", dvae, "--init-prior", dvae])


def test_restricted_text_softmax_is_the_cross_entropy_over_those_ids():
    """``training_loss(..., text_vocab)``: the text term is the CE among the listed ids only; listing every id
    gives the paper's full loss back."""
    from edgefm.models.dalle import DallePrior

    torch.manual_seed(0)
    prior = DallePrior(train.PRIOR_SIZES["tiny"]).eval()
    c = prior.config
    text = torch.tensor([[49406, 320, 736, 49407] + [c.pad_id] * (c.text_len - 4)] * 2)
    codes = torch.randint(0, c.image_vocab, (2, c.image_len))
    vocab = torch.unique(text)
    with torch.no_grad():
        text_logits, image_logits = prior(text, codes[:, :-1])
        image_ce = torch.nn.functional.cross_entropy(image_logits.flatten(0, 1), codes.flatten())
        restricted = torch.nn.functional.cross_entropy(
            text_logits[..., vocab].flatten(0, 1), torch.searchsorted(vocab, text[:, 1:].flatten()))
        assert prior.training_loss(text, codes, vocab) == pytest.approx(
            float(restricted / 8 + 7 * image_ce / 8), rel=1e-5)
        full = prior.training_loss(text, codes)
        assert prior.training_loss(text, codes, torch.arange(c.text_vocab)) == pytest.approx(float(full), rel=1e-5)
        assert float(full) > float(prior.training_loss(text, codes, vocab))  # 49,409 ids vs 5


def test_decoder_stage_fine_tunes_only_the_decoder_on_hard_codes(dvae_run, tmp_path):
    """The decoder stage keeps the encoder (the prior's codes stay valid), moves the decoder, lowers its
    reconstruction error on the hard codes, and writes a decoder the loaders read."""
    from edgefm.models.dalle import load_dvae_decoder

    out, _ = dvae_run
    encoder = out / "dvae_shapes_encoder.safetensors"
    start = out / "dvae_shapes_decoder.safetensors"
    info = train.main(["--stage", "decoder", "--steps", "8", "--batch", "4", "--eval-every", "4", "--eval-size", "8",
                       "--lr", "0.2", "--out", str(tmp_path), "--dvae", str(encoder), "--init-decoder", str(start)])
    assert info["steps"] == 8

    def hard_code_nll(decoder_path):  # the stage's objective, on held-out scenes
        from edgefm.models.dalle import load_dvae_encoder
        from edgefm.models.train.dalle_decoder import hard_codes

        images, _ = train.scene_batch(train.EVAL_STREAM, 0, 16, 0.25)
        codes = hard_codes(load_dvae_encoder(encoder), images)
        with torch.no_grad():
            return float(train.logit_laplace_nll(load_dvae_decoder(decoder_path)(codes), images).mean())

    assert hard_code_nll(tmp_path / "dvae_shapes_decoder.safetensors") < hard_code_nll(start)
    before, after = _tensors(start), _tensors(tmp_path / "dvae_shapes_decoder.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert load_dvae_decoder(tmp_path / "dvae_shapes_decoder.safetensors").config.vocab_size == 64
    assert not (tmp_path / "dvae_shapes_encoder.safetensors").exists()  # the encoder is read, never written
    record = json.loads((tmp_path / "dalle_shapes_training.json").read_text())
    assert record["decoder"]["init_decoder"] == str(start)
    with pytest.raises(FileNotFoundError, match="--init-decoder"):
        train.main(["--stage", "decoder", "--out", str(tmp_path / "empty"), "--dvae", str(encoder)])


def test_decoder_stage_can_train_a_fresh_decoder_of_another_width(dvae_run, tmp_path):
    from edgefm.models.dalle import load_dvae_decoder

    out, _ = dvae_run
    encoder = out / "dvae_shapes_encoder.safetensors"
    info = train.main(["--stage", "decoder", "--steps", "2", "--batch", "4", "--eval-every", "2", "--eval-size", "8",
                       "--out", str(tmp_path), "--dvae", str(encoder), "--decoder-hid", "8"])
    assert info["steps"] == 2 and info["init_decoder"] == "fresh decoder, n_hid 8"
    decoder = load_dvae_decoder(tmp_path / "dvae_shapes_decoder.safetensors")
    assert decoder.config.n_hid == 8 and decoder.config.vocab_size == 64
