"""DALL·E models: dVAE equivalence with OpenAI's ``dall_e`` package, safe loading of its pickles, and the
prior's KV-cache decoding, sparse masks and loss weighting.

The reference modules are pickled exactly as the released ``encoder.pkl``/``decoder.pkl`` were
(``torch.save(module)``), with random weights, and read back through our restricted unpickler.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from edgefm.models.dalle import (
    DVAE_CONFIGS,
    IMAGE_LOSS_WEIGHT,
    PRIOR_CONFIGS,
    TEXT_LOSS_WEIGHT,
    DallePrior,
    Decoder,
    DvaeConfig,
    Encoder,
    attention_mask,
    load_dvae_decoder,
    load_dvae_encoder,
    map_pixels,
    train_step,
    unmap_pixels,
)
from edgefm.runtime.errors import CheckpointError, InputError

dall_e = pytest.importorskip("dall_e")

# Smallest sizes the dall_e validators accept (n_hid >= 64, vocab >= 512); two blocks per group so that
# block_2 and the width-changing id_path convolutions are covered.
SMALL = dict(n_hid=64, n_blk_per_group=2, vocab_size=512)
SMALL_DECODER_INIT = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The CI machine has 2 shared cores; tiny models run faster without intra-op threading contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """dall_e initialises biases to zero; give every bias a value so a mis-wired bias cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".b"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> float:
    err = (ours - ref).abs().max().item()
    assert err <= rel * max(1.0, ref.abs().max().item()), f"max abs diff {err}"
    return err


def _one_hot(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.one_hot(ids, vocab).permute(0, 3, 1, 2).float()


# ---- dVAE ---------------------------------------------------------------------------------------------


def test_state_dict_names_and_shapes_equal_dall_e():
    config = DvaeConfig(n_init=SMALL_DECODER_INIT, **SMALL)
    pairs = [
        (dall_e.Encoder(**SMALL), Encoder(config)),
        (dall_e.Decoder(n_init=SMALL_DECODER_INIT, **SMALL), Decoder(config)),
    ]
    for ref, ours in pairs:
        ref_sd, our_sd = ref.state_dict(), ours.state_dict()
        assert list(our_sd) == list(ref_sd)
        assert all(our_sd[k].shape == ref_sd[k].shape for k in ref_sd)
        ours.load_state_dict(ref_sd, strict=True)
        ref.load_state_dict(our_sd, strict=True)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickled_encoder_gives_dall_e_logits(tmp_path, zip_format):
    torch.manual_seed(0)
    ref = _randomize(dall_e.Encoder(**SMALL), 1).eval()
    path = tmp_path / "encoder.pkl"
    torch.save(ref, path, _use_new_zipfile_serialization=zip_format)
    ours = load_dvae_encoder(path)
    assert ours.config == DvaeConfig(**SMALL)
    image = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref_logits = ref(dall_e.map_pixels(image))
        _assert_close(ours(map_pixels(image)), ref_logits)
        assert torch.equal(ours.encode_ids(image), ref_logits.argmax(1))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickled_decoder_gives_dall_e_outputs(tmp_path, zip_format):
    torch.manual_seed(0)
    ref = _randomize(dall_e.Decoder(n_init=SMALL_DECODER_INIT, **SMALL), 2).eval()
    path = tmp_path / "decoder.pkl"
    torch.save(ref, path, _use_new_zipfile_serialization=zip_format)
    ours = load_dvae_decoder(path)
    assert ours.config == DvaeConfig(n_init=SMALL_DECODER_INIT, **SMALL)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 4, 4))
    with torch.no_grad():
        ref_stats = ref(_one_hot(ids, SMALL["vocab_size"]))
        assert ref_stats.shape == (2, 6, 32, 32)
        _assert_close(ours(_one_hot(ids, SMALL["vocab_size"])), ref_stats)
        _assert_close(ours.forward_ids(ids), ref_stats)
        # The official notebook's reconstruction: unmap_pixels(sigmoid(x_stats[:, :3])).
        _assert_close(ours.decode_to_image(ids), dall_e.unmap_pixels(torch.sigmoid(ref_stats[:, :3])))


@pytest.mark.slow
def test_official_size_decoder_through_loader(tmp_path):
    torch.manual_seed(0)
    ref = _randomize(dall_e.Decoder(), 3).eval()
    path = tmp_path / "decoder.pkl"
    torch.save(ref, path)
    ours = load_dvae_decoder(path)
    assert ours.config == DVAE_CONFIGS["official"]
    # A 16×16 grid (128² image) instead of 32×32: the same weights and layers at a quarter of the cost
    # (convolutions do not care about the grid size), keeping this test well under 30 s on 2 cores.
    ids = torch.randint(0, 8192, (1, 16, 16))
    with torch.no_grad():
        _assert_close(ours.forward_ids(ids), ref(_one_hot(ids, 8192)))


def test_forward_ids_equals_one_hot_decoder():
    torch.manual_seed(0)
    decoder = _randomize(Decoder(DVAE_CONFIGS["tiny"]), 4).eval()
    ids = torch.randint(0, 64, (3, 5, 7))
    with torch.no_grad():
        dense = decoder(_one_hot(ids, 64))
        assert dense.shape == (3, 6, 40, 56)
        # A 1×1 conv over a one-hot picks one weight column: the lookup is exact up to summing zeros.
        assert (decoder.forward_ids(ids) - dense).abs().max().item() <= 1e-6


def test_map_and_unmap_pixels_match_dall_e():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(map_pixels(x), dall_e.map_pixels(x))
    assert map_pixels(x).min() >= 0.1 and map_pixels(x).max() <= 0.9
    y = torch.linspace(-0.5, 1.5, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    assert torch.equal(unmap_pixels(y), dall_e.unmap_pixels(y))
    assert (unmap_pixels(map_pixels(x)) - x).abs().max().item() < 1e-6


def test_plain_state_dict_loads_with_sizes_from_shapes(tmp_path):
    decoder = Decoder(DVAE_CONFIGS["tiny"])
    torch.save(decoder.state_dict(), tmp_path / "decoder.pt")
    loaded = load_dvae_decoder(tmp_path / "decoder.pt")
    assert loaded.config == DVAE_CONFIGS["tiny"]
    expected = decoder.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


class _RunsShell:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.target}",))


class _RunsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_that_calls_os_system_is_refused(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "decoder.pkl"
    torch.save({"payload": _RunsShell(str(marker))}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="system") as info:
        load_dvae_decoder(path)
    assert str(path) in str(info.value) and "refused" in str(info.value)
    assert not marker.exists()


def test_tampered_dall_e_pickle_is_refused(tmp_path):
    """A genuine decoder module carrying one extra malicious attribute."""
    marker = tmp_path / "pwned"
    ref = dall_e.Decoder(n_init=SMALL_DECODER_INIT, **SMALL)
    ref.blocks.group_2.block_1.extra = _RunsShell(str(marker))
    torch.save(ref, tmp_path / "decoder.pkl")
    with pytest.raises(CheckpointError, match="system"):
        load_dvae_decoder(tmp_path / "decoder.pkl")
    assert not marker.exists()
    torch.save([_RunsEval()], tmp_path / "eval.pkl")
    with pytest.raises(CheckpointError, match="builtins.eval"):
        load_dvae_encoder(tmp_path / "eval.pkl")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_wrong_files_are_refused_with_clear_errors(tmp_path):
    torch.save(dall_e.Decoder(n_init=SMALL_DECODER_INIT, **SMALL), tmp_path / "decoder.pkl")
    with pytest.raises(CheckpointError, match="dall_e.encoder.Encoder was expected"):
        load_dvae_encoder(tmp_path / "decoder.pkl")
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "scripted.pt"))
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_dvae_decoder(tmp_path / "scripted.pt")
    (tmp_path / "truncated.pkl").write_bytes((tmp_path / "decoder.pkl").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_dvae_decoder(tmp_path / "truncated.pkl")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dvae_decoder(tmp_path / "missing.pkl")


# ---- prior --------------------------------------------------------------------------------------------

SPARSE = dataclasses.replace(
    PRIOR_CONFIGS["tiny"], n_layers=3, attention=("row", "column", "conv"), conv_kernel=3
)


def _prior(config, seed: int = 0) -> DallePrior:
    """Random prior with weights large enough that logits are far from ties (greedy ids are stable)."""
    torch.manual_seed(seed)
    model = DallePrior(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.normal_(std=0.3)
    return model


def _text(config, batch: int = 2, length: int = 10) -> torch.Tensor:
    ids = torch.randint(0, config.pad_id, (batch, config.text_len))
    ids[:, length:] = config.pad_id
    return ids


@pytest.mark.parametrize("config", [PRIOR_CONFIGS["tiny"], SPARSE], ids=["dense", "row-column-conv"])
def test_prefill_and_steps_equal_full_forward(config):
    model = _prior(config)
    text = _text(config)
    image = torch.randint(0, config.image_vocab, (2, config.image_len))
    with torch.no_grad():
        _, full = model(text, image[:, :-1])  # [B, N, image_vocab]
        logits, k_cache, v_cache = model.prefill(text)
        shape = (config.n_layers, 2, config.n_heads, config.context_len, config.head_dim)
        assert k_cache.shape == v_cache.shape == shape
        k_inplace, v_inplace = k_cache.clone(), v_cache.clone()
        steps, steps_inplace = [logits], [logits]
        for j in range(config.image_len - 1):
            position = torch.tensor(config.text_len + j)
            logits, k_cache, v_cache = model.step(image[:, j], position, k_cache, v_cache)
            assert k_cache.shape == shape
            steps.append(logits)
            steps_inplace.append(model.step_inplace(image[:, j], config.text_len + j, k_inplace, v_inplace))
    _assert_close(torch.stack(steps, dim=1), full)
    # The eager form (caches written in place, attention over the prefix) gives the same logits and caches.
    _assert_close(torch.stack(steps_inplace, dim=1), full)
    _assert_close(k_inplace, k_cache)
    _assert_close(v_inplace, v_cache)


@pytest.mark.parametrize("config", [PRIOR_CONFIGS["tiny"], SPARSE], ids=["dense", "row-column-conv"])
def test_greedy_generation_with_cache_equals_recompute(config):
    model = _prior(config, seed=1)
    text = _text(config)
    cached = model.generate(text, greedy=True)
    recomputed = model.generate(text, greedy=True, use_cache=False)
    assert cached.shape == (2, config.image_len)
    assert torch.equal(cached, recomputed)
    assert min(len(set(row.tolist())) for row in cached) >= 4  # not a degenerate constant sequence


def test_sparse_masks_follow_their_definitions():
    config = dataclasses.replace(PRIOR_CONFIGS["tiny"], text_len=3, image_grid=4, conv_kernel=3)
    t = config.text_len
    query = t + 5  # image token 5 = grid cell (1, 1)
    expected = {
        "dense": set(range(6)),
        "row": {2, 3, 4, 5},  # the last grid-width positions
        "column": {1, 5},
        "conv": {0, 1, 2, 4, 5},  # causal 3×3 neighbourhood of (1, 1)
    }
    for pattern, image_keys in expected.items():
        row = attention_mask(config, pattern)[query]
        assert set(torch.nonzero(row).flatten().tolist()) == set(range(t)) | {t + j for j in image_keys}
        text_block = attention_mask(config, pattern)[:t, :t]
        assert torch.equal(text_block, torch.ones(t, t, dtype=torch.bool).tril())


def test_column_layer_ignores_tokens_outside_its_column():
    config = dataclasses.replace(PRIOR_CONFIGS["tiny"], n_layers=1, attention=("column",))
    model = _prior(config)
    text = _text(config, batch=1)
    image = torch.randint(0, config.image_vocab, (1, config.image_len - 1))
    g, j = config.image_grid, 2 * config.image_grid + 3
    changed = image.clone()
    changed[0, j - 1] = (image[0, j - 1] + 1) % config.image_vocab  # previous cell: another column
    with torch.no_grad():
        before, after = model(text, image)[1], model(text, changed)[1]
    # image_logits[:, k] is the output at image token k - 1; the output at token j sees only its column.
    assert torch.equal(before[0, j + 1], after[0, j + 1])
    assert not torch.allclose(before[0, j], after[0, j])  # token j - 1 itself does change
    changed[0, j - g] = (image[0, j - g] + 1) % config.image_vocab  # same column: must matter
    with torch.no_grad():
        assert not torch.allclose(model(text, changed)[1][0, j + 1], before[0, j + 1])


def test_padding_uses_per_position_embeddings():
    config = PRIOR_CONFIGS["tiny"]
    model = _prior(config)
    text = _text(config, batch=1, length=5)
    with torch.no_grad():
        x = model.embed_text(text)
        _assert_close(x[0, 7], model.text_pad_embedding[7] + model.text_position[7])
        _assert_close(x[0, 2], model.text_embedding.weight[text[0, 2]] + model.text_position[2])
    with pytest.raises(InputError, match=f"\\[batch, {config.text_len}\\]"):
        model.prefill(text[:, :-1])


def test_training_loss_weights_text_one_eighth_and_image_seven_eighths():
    config = PRIOR_CONFIGS["tiny"]
    model = _prior(config)
    text = _text(config)
    image = torch.randint(0, config.image_vocab, (2, config.image_len))
    with torch.no_grad():
        loss = model.training_loss(text, image)
        # Manual: full head over text + image vocabularies, then each kind's own slice.
        logits = model.to_logits(model.hidden(text, image[:, :-1]))
        t, vt = config.text_len, config.text_vocab
        text_lp = logits[:, : t - 1, :vt].log_softmax(-1)
        image_lp = logits[:, t - 1 :, vt:].log_softmax(-1)
        text_ce = -text_lp.gather(-1, text[:, 1:, None]).mean()
        image_ce = -image_lp.gather(-1, image[:, :, None]).mean()
    assert abs(TEXT_LOSS_WEIGHT - 0.125) < 1e-12 and abs(IMAGE_LOSS_WEIGHT - 0.875) < 1e-12
    expected = 0.125 * text_ce + 0.875 * image_ce
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    assert abs(text_ce.item() - image_ce.item()) > 0.1  # the weighting is visible in the number


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    config = PRIOR_CONFIGS["tiny"]
    torch.manual_seed(0)
    model = DallePrior(config)
    text = _text(config)
    image = torch.randint(0, config.image_vocab, (2, config.image_len))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = [train_step(model, optimizer, text, image) for _ in range(4)]
    assert losses[-1] < losses[0] - 0.5, losses
