"""DALL·E -> bundle with up to four components: dvae_decoder, dvae_encoder, prior_prefill, prior_step.

The graph wrappers bend the models for export without changing their math: the decoder takes token ids
(an embedding lookup replaces the 8192-channel one-hot; sigmoid and ``unmap_pixels`` run in the graph), the
encoder returns ids (``map_pixels`` and the argmax in the graph), and the prior is split into a prefill
graph and a one-token step graph whose KV cache has a fixed size (see :mod:`edgefm.runtime.dalle.spec`).

Checkpoints: the dVAE from OpenAI's pickles (``encoder.pkl`` / ``decoder.pkl``, read by the restricted
unpickler of :mod:`edgefm.models.dalle.pickle_loader`) or their state dicts; the prior from a state dict
(``.safetensors`` / ``.pt``) plus its sizes, given as a ``PRIOR_CONFIGS`` name, a :class:`PriorConfig`,
or a JSON file of ``PriorConfig`` fields (``--prior-config``; by default ``<prior file stem>.json`` beside
the checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from edgefm.models.checkpoint import sha256_file
from edgefm.models.dalle import (
    LOGIT_LAPLACE_EPS,
    DallePrior,
    Decoder,
    DecoderFromIds,
    Encoder,
    EncoderToIds,
    PriorConfig,
    load_dvae_decoder,
    load_dvae_encoder,
    unmap_pixels,
)
from edgefm.models.dalle.prior import CLIP_TEXT_VOCAB, load_prior, resolve_prior_config
from edgefm.runtime.dalle.cli import add_export_args  # noqa: F401  (re-exported beside run_export)
from edgefm.runtime.dalle.spec import (
    DVAE_DECODER,
    DVAE_ENCODER,
    PRIOR_PREFILL,
    PRIOR_STEP,
    dvae_specs,
    prior_specs,
)
from edgefm.runtime.errors import InputError
from edgefm.runtime.manifest import Manifest
from edgefm.runtime.spec import ComponentSpec
from torch import nn

from .bundle import BundleWriter
from .onnx import at_precision, check_options, example_inputs, onnx_from_module
from .parity import ID_AGREEMENT, compare_outputs, gate, ids_report, measure

CLIP_SOT, CLIP_EOT = CLIP_TEXT_VOCAB - 2, CLIP_TEXT_VOCAB - 1
DOWNSAMPLE = 8  # dVAE image side / grid side


class PriorPrefillGraph(nn.Module):
    """Text ids [B, text_len] -> logits of the first image token [B, image_vocab] + fixed-size KV cache."""

    def __init__(self, prior: DallePrior) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, text_tokens: torch.Tensor):
        return self.prior.prefill(text_tokens)


class ModelStep(nn.Module):
    """:meth:`DallePrior.step` with the step graph's inputs: what :class:`PriorStepGraph` is measured against."""

    def __init__(self, prior: DallePrior) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, token, position, k_cache, v_cache):
        return self.prior.step(token, position.reshape(()), k_cache, v_cache)


class PriorStepGraph(nn.Module):
    """One image token [B] at sequence position [1] + KV cache -> next-token logits + updated cache.

    The math of :meth:`DallePrior.step`, arranged for an engine: the model writes each layer's new key and value
    into that layer's cache before attending (a select over the whole cache per layer, then a stack of the
    layers), three full passes over the cache per step. Here each layer attends to the cache as given, with
    the fed position itself left out, plus the fed token's own key and value (one softmax over both); the new
    rows are written once at the end (a copy of the cache and a row scatter). A step is memory-bound, so this
    is most of its time on a CPU."""

    def __init__(self, prior: DallePrior) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, token, position, k_cache, v_cache):
        prior, c = self.prior, self.prior.config
        pos = position.reshape(())  # position travels as shape [1] (TensorRT-friendly)
        x = prior.step_input(token, pos)
        earlier = torch.arange(c.context_len, device=token.device) != pos  # the cache has no row here yet
        allowed = {p: getattr(prior, f"mask_{p}")[pos][None] & earlier for p in dict.fromkeys(c.layer_patterns)}
        new_k, new_v = [], []
        for i, (block, pattern) in enumerate(zip(prior.blocks, c.layer_patterns, strict=True)):
            q, k, v = block.attn.project(block.ln_1(x))  # [B, H, 1, d]
            scale = 1.0 / math.sqrt(q.shape[-1])
            cached = ((q @ k_cache[i].transpose(-2, -1)) * scale).masked_fill(~allowed[pattern], float("-inf"))
            weights = torch.cat([cached, (q * k).sum(-1, keepdim=True) * scale], dim=-1).softmax(dim=-1)
            y = weights[..., :-1] @ v_cache[i] + weights[..., -1:] * v  # every row sees its own position
            h, d = int(y.shape[1]), int(y.shape[3])
            x = block.residual(x, y.transpose(1, 2).reshape(-1, 1, h * d))
            new_k.append(k)
            new_v.append(v)
        k_rows, v_rows = torch.stack(new_k), torch.stack(new_v)  # [n_layers, B, H, 1, d]
        # The row index as data of the rows' own shape: (rows == rows) is all true (false only for NaN, which
        # times 0 is still 0), so no Shape op computes the batch size per call (index_put's export would).
        at = (k_rows == k_rows).long() * 0 + pos
        k_out = k_cache.scatter(3, at, k_rows)  # ScatterElements: a copy of the cache with one row written
        v_out = v_cache.scatter(3, at, v_rows)
        return prior.image_logits(prior.ln_f(x[:, 0])), k_out, v_out


class DecoderGraph(nn.Module):
    """Export graph of the dVAE decoder: ids [B, h, w] -> image in [0, 1] [B, 3, 8h, 8w].

    The function of :class:`DecoderFromIds` (a lookup instead of the one-hot input conv, sigmoid and unmap
    in the graph) in a cheaper order: nearest 2× upsampling commutes with ReLU and 1×1 convolutions, so
    the first block after each upsampling runs its 1×1 identity conv and its first ReLU + 1×1 conv on the
    small grid and upsamples their narrower outputs. That is ~15 % of the official decoder's
    multiply-adds saved (PyTorch gives the same floats); export measures parity against DecoderFromIds.
    """

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        blocks = self.decoder.blocks
        x = F.embedding(ids, blocks.input.w[:, :, 0, 0].t()) + blocks.input.b  # [B, h, w, n_init]
        x = x.permute(0, 3, 1, 2)
        upsample = None
        for name, group in blocks.named_children():
            if not name.startswith("group_"):
                continue
            for layer in group.children():
                if isinstance(layer, nn.Upsample):
                    upsample = layer
                    continue
                x = layer(x) if upsample is None else _block_of_upsampled(layer, x, upsample)
                upsample = None
        return unmap_pixels(torch.sigmoid(blocks.output(x)[:, :3]))


def _block_of_upsampled(block: nn.Module, x: torch.Tensor, upsample: nn.Module) -> torch.Tensor:
    """``block(upsample(x))`` with the block's leading 1×1 parts run before the upsampling."""
    res = block.res_path
    if res.conv_1.kw != 1:
        return block(upsample(x))
    r = upsample(res.conv_1(res.relu_1(x)))
    for layer in list(res.children())[2:]:
        r = layer(r)
    return upsample(block.id_path(x)) + block.post_gain * r


def smooth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth float32 NCHW images in [0, 1] (sinusoid blends): encoder argmaxes on them are not near-tied
    the way they are on white noise, so fp32 ids can be required to match exactly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        for c in range(3):
            fx, fy, phase = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
            out[i, c] = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
    return out


def text_parity_ids(config: PriorConfig, batch: int = 2, seed: int = 0) -> np.ndarray:
    """Rows framed like the runtime's: ``<sot> ids <eot>`` then the padding id, of different lengths."""
    rng = np.random.default_rng(seed)
    out = np.full((batch, config.text_len), config.pad_id, np.int64)
    for row in range(batch):
        n = int(rng.integers(1, config.text_len - 1)) if row else config.text_len - 2
        out[row, 0] = CLIP_SOT
        out[row, 1 : n + 1] = rng.integers(0, CLIP_SOT, n)
        out[row, n + 1] = CLIP_EOT
    return out


def _torch_run(module: nn.Module, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outs = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
    outs = outs if isinstance(outs, tuple) else (outs,)
    return {n: o.numpy() for n, o in zip(spec.output_names, outs)}


def step_parity_feeds(prior: DallePrior, text_ids: np.ndarray, n_fed: int, seed: int = 0) -> dict:
    """Step inputs after the prefill and ``n_fed`` PyTorch steps on random tokens (a realistic cache)."""
    rng = np.random.default_rng(seed)
    c = prior.config
    tokens = rng.integers(0, c.image_vocab, (n_fed + 1, text_ids.shape[0]))
    with torch.no_grad():
        _, k, v = prior.prefill(torch.from_numpy(text_ids))
        for j in range(n_fed):
            _, k, v = prior.step(torch.from_numpy(tokens[j]), c.text_len + j, k, v)
    return {"token": tokens[n_fed], "position": np.array([c.text_len + n_fed], np.int64),
            "k_cache": k.numpy(), "v_cache": v.numpy()}


def _source(path: Path, loader: str) -> dict[str, str]:
    return {"checkpoint": path.name, "sha256": sha256_file(path), "loader": loader}


def _dvae(model: nn.Module | str | Path, kind: str, sources: dict[str, Any]) -> nn.Module:
    want = Decoder if kind == DVAE_DECODER else Encoder
    if isinstance(model, nn.Module):
        if not isinstance(model, want):
            raise InputError(f"{kind} must be a {want.__name__} or a file path, not {type(model).__name__}")
        sources[kind] = {"loader": "in-memory model"}
        return model.eval()
    path = Path(model)
    if not path.is_file():
        raise InputError(f"--{kind.replace('_', '-')} {str(path)!r} does not exist")
    load = load_dvae_decoder if kind == DVAE_DECODER else load_dvae_encoder
    sources[kind] = _source(path, "restricted unpickler (dall_e pickle) or state dict, strict keys")
    return load(path)


def dalle_preprocess(image_size: int) -> dict[str, Any]:
    """How the runtime brings a picture to the dVAE encoder (as OpenAI's notebook: shortest side, crop)."""
    # map_pixels (eps) is applied inside the dvae_encoder graph; it is recorded for readers.
    return {"image_size": image_size, "resize": "shortest_side", "crop": "center", "interpolation": "lanczos",
            "scale": 1 / 255, "map_pixels_eps": LOGIT_LAPLACE_EPS, "pixel_format": "RGB", "layout": "NCHW"}


def dalle_config(grid: int, image_size: int, image_vocab: int, prior: PriorConfig | None) -> dict[str, Any]:
    config: dict[str, Any] = {"image_grid": grid, "image_size": image_size, "image_vocab": image_vocab}
    if prior is not None:
        config.update(
            text_len=prior.text_len, text_vocab=prior.text_vocab, pad_id=prior.pad_id,
            context_len=prior.context_len, prior=dataclasses.asdict(prior),
            tokenizer={"kind": "clip_bpe", "vocab": "edgefm.runtime.clip bpe_simple_vocab_16e6.txt.gz",
                       "sot_id": CLIP_SOT, "eot_id": CLIP_EOT,
                       "framing": "<sot> ids <eot>, then pad_id up to text_len; longer prompts are cut "
                                  "and end with <eot>"},
        )
    return config


def _check_pairing(decoder: Decoder, encoder: Encoder | None, prior: PriorConfig | None, grid: int) -> None:
    vocab = decoder.config.vocab_size
    if encoder is not None and encoder.config.vocab_size != vocab:
        raise InputError(f"the dVAE encoder has {encoder.config.vocab_size} codes but the decoder {vocab}; "
                         "pass the encoder and decoder of the same dVAE")
    if prior is None:
        return
    if prior.image_vocab != vocab:
        raise InputError(f"the prior predicts {prior.image_vocab} image codes but the dVAE decoder has "
                         f"{vocab}; pass a prior trained on this dVAE's codes")
    if prior.text_vocab != CLIP_TEXT_VOCAB + 1:
        raise InputError(f"the prior's text_vocab is {prior.text_vocab}, but the runtime tokenizes prompts "
                         f"with CLIP's BPE ({CLIP_TEXT_VOCAB} ids + 1 padding id = {CLIP_TEXT_VOCAB + 1})")
    if prior.image_grid != grid:
        raise InputError(f"the prior's image grid is {prior.image_grid}² but --image-size gives {grid}²")


def export_dalle(
    out: str | Path,
    dvae_decoder: Decoder | str | Path,
    dvae_encoder: Encoder | str | Path | None = None,
    prior: DallePrior | str | Path | None = None,
    prior_config: str | PriorConfig | Path | None = None,
    image_size: int | None = None,
    precision: str = "fp32",
    opset: int = 17,
    overwrite: bool = False,
    parity_gate: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export a DALL·E dVAE decoder (and optionally its encoder and a prior) to a bundle at ``out``.

    Models are given as modules or checkpoint paths: dVAE pickles / state dicts, and a prior state dict
    whose sizes come from ``prior_config`` (a ``PRIOR_CONFIGS`` name, a :class:`PriorConfig`, or a JSON
    file of its fields; by default ``<prior stem>.json`` beside the checkpoint).

    ``image_size`` (a multiple of 8) fixes the decoded image side; by default it is ``8 * image_grid``
    of the prior, or 256 (the official 32×32 grid) without one.
    """
    check_options("DALL·E", precision, tuple(ID_AGREEMENT), opset)
    sources: dict[str, Any] = {}
    decoder = _dvae(dvae_decoder, DVAE_DECODER, sources)
    encoder = _dvae(dvae_encoder, DVAE_ENCODER, sources) if dvae_encoder is not None else None
    variant = "dvae"
    if isinstance(prior, DallePrior):
        variant, _ = resolve_prior_config(prior.config)  # the registry name of its sizes, if any
        prior = prior.eval()
        sources[PRIOR_PREFILL] = {"loader": "in-memory model"}
    elif prior is not None:
        path = Path(prior)
        if not path.is_file():
            raise InputError(f"--prior {str(path)!r} does not exist")
        variant, prior = load_prior(path, prior_config)
        sources[PRIOR_PREFILL] = _source(path, "torch.load(weights_only=True) / safetensors, strict keys")
    pcfg = prior.config if prior is not None else None
    if image_size is None:
        image_size = DOWNSAMPLE * (pcfg.image_grid if pcfg is not None else 32)
    if image_size % DOWNSAMPLE:
        raise InputError(f"--image-size {image_size} must be a multiple of {DOWNSAMPLE}")
    grid = image_size // DOWNSAMPLE
    _check_pairing(decoder, encoder, pcfg, grid)
    specs, graphs, feeds = _components(decoder, encoder, prior, grid, image_size)
    parity: dict[str, Any] = {"gate": parity_gate, "reference": f"PyTorch {torch.__version__} fp32, CPU",
                              "backend": "onnxruntime CPU"}

    with BundleWriter(out, overwrite=overwrite) as writer:
        for name, graph in graphs.items():
            if progress:
                progress(f"exporting {name} ({precision})")
            spec = specs[name]
            # The decoder and the step are measured against the model's own paths, not their rearranged graphs.
            reference = (DecoderFromIds(decoder) if name == DVAE_DECODER
                         else ModelStep(graph.prior) if name == PRIOR_STEP else graph)
            ref = _torch_run(reference, spec, feeds[name])
            onnx_path = writer.workdir(name) / f"{name}.onnx"
            extra = onnx_from_module(graph, spec, onnx_path, example_inputs(spec, feeds[name]), opset)
            onnx_path, extra = at_precision(onnx_path, precision, extra, writer.workdir)
            compare = ids_report if name == DVAE_ENCODER else compare_outputs
            report = measure(onnx_path, spec, feeds[name], ref, precision, compare)
            parity[name] = report
            gate(name, report, parity_gate)
            writer.add(onnx_path, spec, "onnx", precision, extra, info={"opset": opset})
        manifest = Manifest(
            family="dalle", variant=variant, source={**sources[DVAE_DECODER], "components": sources},
            preprocess=dalle_preprocess(image_size), components=[], parity=parity,
            config=dalle_config(grid, image_size, decoder.config.vocab_size, pcfg),
        )
        return writer.finish(manifest)


def _components(
    decoder: Decoder, encoder: Encoder | None, prior: DallePrior | None, grid: int, image_size: int
) -> tuple[dict[str, ComponentSpec], dict[str, nn.Module], dict[str, dict[str, np.ndarray]]]:
    """Specs, graph wrappers and seeded parity inputs of the components to export, in bundle order."""
    specs = dvae_specs(grid, image_size)
    graphs: dict[str, nn.Module] = {DVAE_DECODER: DecoderGraph(decoder)}
    rng = np.random.default_rng(0)
    feeds = {DVAE_DECODER: {"image_tokens": rng.integers(0, decoder.config.vocab_size, (2, grid, grid))}}
    if encoder is not None:
        graphs[DVAE_ENCODER] = EncoderToIds(encoder)
        feeds[DVAE_ENCODER] = {"image": smooth_images(2, image_size)}
    if prior is not None:
        c = prior.config
        specs.update(prior_specs(c.text_len, c.image_vocab, c.n_layers, c.n_heads, c.context_len, c.head_dim))
        graphs[PRIOR_PREFILL], graphs[PRIOR_STEP] = PriorPrefillGraph(prior), PriorStepGraph(prior)
        text = text_parity_ids(c)
        feeds[PRIOR_PREFILL] = {"text_tokens": text}
        # One row and one token past it: the step's row/column positions and mask rows are exercised.
        feeds[PRIOR_STEP] = step_parity_feeds(prior, text, n_fed=min(c.image_grid + 1, c.image_len - 2))
    return specs, graphs, feeds


# ---- `edgefm export dalle` (flags: edgefm.runtime.dalle.cli.add_export_args, importable without torch) ---


def run_export(args: argparse.Namespace, progress: Callable[[str], None] | None = None) -> Path:
    """Run ``edgefm export dalle`` from parsed arguments; returns the bundle folder."""
    if not getattr(args, "dvae_decoder", None):
        raise InputError("`edgefm export dalle` needs --dvae-decoder PATH (decoder.pkl or a state dict)")
    for flag in ("dvae_decoder", "dvae_encoder", "prior"):
        value = getattr(args, flag, None)
        if value is not None and not Path(value).is_file():
            raise InputError(f"--{flag.replace('_', '-')} {value!r} does not exist")
    if getattr(args, "prior_config", None) and not getattr(args, "prior", None):
        raise InputError("--prior-config was given without --prior; pass the prior's checkpoint too")
    return export_dalle(
        args.out, args.dvae_decoder, args.dvae_encoder, args.prior, args.prior_config,
        image_size=args.image_size, precision=args.precision, opset=args.opset,
        overwrite=args.overwrite, parity_gate=not args.no_parity_gate, progress=progress,
    )
