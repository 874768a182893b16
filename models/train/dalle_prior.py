"""Stage ``prior`` of :mod:`edgefm.models.train.dalle`: the transformer prior on (caption, dVAE codes) pairs.

Images are turned into codes by the trained encoder (argmax) once and cached in ``--out``; the loss is the
paper's 1/8 text + 7/8 image cross-entropy with the text softmax restricted to the ids the captions use, and
a seeded share of captions emptied for classifier-free guidance (see the stage docs in the trainer's module).
``--init-prior`` starts from another prior's weights with a fresh optimizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgefm.models.checkpoint import load_strict, read_state_dict
from edgefm.models.dalle import (
    IMAGE_LOSS_WEIGHT,
    TEXT_LOSS_WEIGHT,
    DallePrior,
    Encoder,
    PriorConfig,
    load_dvae_encoder,
    train_step,
)

from .dalle_data import CaptionIds, scene_batches


@torch.no_grad()
def evaluate_prior(prior: DallePrior, text: torch.Tensor, codes: torch.Tensor, batch: int = 128,
                   text_vocab: torch.Tensor | None = None) -> dict:
    """Held-out cross-entropies (nats): text (over ``text_vocab`` when given, as trained), image, and the
    paper's weighted sum."""
    prior.eval()
    t_sum = i_sum = 0.0
    device = next(prior.parameters()).device
    for i in range(0, len(text), batch):
        t, c = text[i : i + batch].to(device), codes[i : i + batch].to(device)
        text_ce, image_ce = prior.loss_parts(t, c, text_vocab)
        t_sum, i_sum = t_sum + float(text_ce) * len(t), i_sum + float(image_ce) * len(t)
    t_ce, i_ce = t_sum / len(text), i_sum / len(text)
    return {"text_ce": t_ce, "image_ce": i_ce, "loss": TEXT_LOSS_WEIGHT * t_ce + IMAGE_LOSS_WEIGHT * i_ce}


@torch.no_grad()
def encode_pairs(encoder: Encoder, captions: CaptionIds, stream: int, n: int, scene_share: float,
                 batch: int = 256, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(text ids int64 [n, text_len], codes int64 [n, grid²]) for the first ``n`` scenes of ``stream``."""
    encoder.eval()
    device = next(encoder.parameters()).device
    texts, codes = [], []
    jobs = ((stream, start, min(batch, n - start), scene_share) for start in range(0, n, batch))
    for images, caps in scene_batches(jobs, workers):
        codes.append(encoder.encode_ids(images.to(device)).flatten(1).cpu())
        texts.append(torch.from_numpy(np.stack([captions(c) for c in caps])))
    return torch.cat(texts), torch.cat(codes)


def prior_data(
    args: argparse.Namespace, config: PriorConfig, captions: CaptionIds
) -> dict[str, torch.Tensor]:
    """The (text, codes) pairs, encoded once and cached in ``--out`` (keyed by the encoder file)."""
    from . import dalle as T

    out = Path(args.out)
    dvae = Path(args.dvae) if args.dvae else out / f"{T.STEM['encoder']}.safetensors"
    cache = out / "prior_pairs.pt"
    key = f"{dvae.resolve()}:{dvae.stat().st_mtime_ns}:{args.pairs}:{args.eval_size}:{args.scene_share}"
    if cache.is_file():
        data = torch.load(cache, map_location="cpu", weights_only=True)
        if data.get("key") == key:
            return data
    encoder = load_dvae_encoder(dvae).to(args.device)
    if encoder.config.vocab_size != config.image_vocab:
        raise ValueError(f"{dvae} has {encoder.config.vocab_size} codes, the prior size "
                         f"{args.prior_size!r} predicts {config.image_vocab}")
    print(f"encoding {args.pairs} training and {args.eval_size} evaluation scenes with {dvae}", flush=True)
    text, codes = encode_pairs(encoder, captions, T.TRAIN_STREAM, args.pairs, args.scene_share, workers=args.workers)
    eval_text, eval_codes = encode_pairs(encoder, captions, T.EVAL_STREAM, args.eval_size, args.scene_share,
                                         workers=args.workers)
    data = {"key": key, "text": text, "codes": codes, "eval_text": eval_text, "eval_codes": eval_codes}
    T.save_state(cache, data)
    return data


def train_prior(args: argparse.Namespace) -> dict[str, Any]:
    from . import dalle as T

    out = Path(args.out)
    config = T._size(args.prior_size, T.PRIOR_SIZES)
    captions = CaptionIds(config)  # one tokenizer for the pairs and the empty caption
    data = prior_data(args, config, captions)
    if args.uncond_share > 0:  # the scale it will be sampled with travels in the config (and the bundle)
        config = dataclasses.replace(config, guidance_scale=args.guidance)
    empty = torch.from_numpy(captions(""))
    # Every id a text target can take (training and held-out captions', the empty caption's): the restricted
    # text softmax and its evaluation.
    text_vocab = torch.unique(torch.cat([data["text"].flatten(), data["eval_text"].flatten(), empty]))
    text_vocab = text_vocab.to(args.device)
    torch.manual_seed(args.seed)
    prior = DallePrior(config).to(args.device)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=args.lr, weight_decay=0.01)
    state_path, step, elapsed = out / "prior_state.pt", 0, 0.0
    if state_path.is_file() and not args.restart:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        prior.load_state_dict(state["prior"]), optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
    elif args.init_prior:  # fine-tuning, new optimizer: e.g. a prior of an earlier dVAE's codes (text side,
        # layout and much of the image statistics carry over even when most codes changed)
        load_strict(prior, read_state_dict(args.init_prior), args.init_prior, model_name="the --init-prior prior")
    n = len(data["text"])
    t0 = time.monotonic()

    def save(step: int) -> None:
        T.save_state(state_path, {"prior": prior.state_dict(), "optimizer": optimizer.state_dict(),
                                "step": step, "elapsed": elapsed + time.monotonic() - t0})

    def body(step: int) -> dict[str, Any]:
        # Epoch-wise permutation seeded by (seed, epoch): batches are a pure function of the step.
        per_epoch = n // args.batch
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
        idx = order[k * args.batch : (k + 1) * args.batch]
        torch.manual_seed(args.seed * 1_000_003 + step)  # dropout, if the size has any
        for group in optimizer.param_groups:
            group["lr"] = T.learning_rate(step, args.steps, args.lr)
        text = data["text"][idx]
        # Classifier-free guidance needs the unconditional model too: a share of the captions is emptied.
        drop = torch.rand(len(idx), generator=torch.Generator().manual_seed(args.seed * 104_729 + step))
        text = torch.where((drop < args.uncond_share)[:, None], empty, text)
        loss = train_step(prior, optimizer, text.to(args.device), data["codes"][idx].to(args.device), text_vocab)
        return {"train_loss": loss}

    def evaluate() -> dict[str, float]:
        return evaluate_prior(prior, data["eval_text"], data["eval_codes"], text_vocab=text_vocab)

    step, history = T.stage_loop(args, step, "prior", body, evaluate, save)
    metrics = evaluate_prior(prior, data["eval_text"], data["eval_codes"], text_vocab=text_vocab)
    info = {"command": T._command(), "size": dataclasses.asdict(config), "steps": step, "planned": args.steps,
            "batch": args.batch, "pairs": n, "init_prior": args.init_prior,
            "seconds": round(elapsed + time.monotonic() - t0, 1),
            "eval": metrics, "history": history, "finished": step >= args.steps}
    T.save_weights(prior, out / f"{T.STEM['prior']}.safetensors", config, dtype=torch.float16)
    T.update_record(out, "prior", info)
    return info
