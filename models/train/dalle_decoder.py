"""Stage ``decoder`` of :mod:`edgefm.models.train.dalle`: the dVAE decoder fine-tuned on hard codes.

The paper trains the dVAE with gumbel-softmax relaxed codes only; at sampling time the decoder reads the
prior's *hard* codes (one-hots), which it never saw exactly. This stage freezes the encoder (so the codes,
and any prior trained on them, stay valid) and fine-tunes the decoder on one-hots of the encoder's argmax,
with the same logit-Laplace likelihood. Scenes are new ones of the training stream (indices from
``FRESH_SCENES``), in the dVAE's mix of single objects and multi-object scenes. ``--decoder-hid N`` starts
instead from a fresh decoder of width N (the decoder can be wider than the encoder: only the codes are
shared). Resumable like the other stages (``decoder_state.pt``); it rewrites ``dvae_shapes_decoder.safetensors``
in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from edgefm.models.dalle import Decoder, load_dvae_decoder, load_dvae_encoder

from .dalle_data import scene_batch, scene_batches

FRESH_SCENES = 5_000_000  # first scene index of this stage: past what the dVAE stage draws
WARMUP = 50


@torch.no_grad()
def hard_codes(encoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """One-hots ``[B, K, h, w]`` of the encoder's argmax codes: what the decoder reads at sampling time."""
    return F.one_hot(encoder.encode_ids(images), encoder.config.vocab_size).permute(0, 3, 1, 2).float()


def train_decoder(args: argparse.Namespace) -> dict[str, Any]:
    from . import dalle as T

    out = Path(args.out)
    encoder_path = Path(args.dvae) if args.dvae else out / f"{T.STEM['encoder']}.safetensors"
    decoder_path = Path(args.init_decoder) if args.init_decoder else out / f"{T.STEM['decoder']}.safetensors"
    fresh = args.decoder_hid is not None
    need = [("--dvae (the frozen encoder)", encoder_path)] + ([] if fresh else [("--init-decoder", decoder_path)])
    for what, path in need:
        if not path.is_file():
            raise FileNotFoundError(f"{what}: {path} does not exist; train the dvae stage first or pass the file")
    encoder = load_dvae_encoder(encoder_path).to(args.device).eval()
    torch.manual_seed(args.seed)
    if fresh:  # a new decoder of another width, trained from scratch on the same codes
        decoder = Decoder(dataclasses.replace(encoder.config, n_hid=args.decoder_hid)).to(args.device)
        decoder_path = Path(f"fresh decoder, n_hid {args.decoder_hid}")
    else:
        decoder = load_dvae_decoder(decoder_path).to(args.device)
    if decoder.config.vocab_size != encoder.config.vocab_size:
        raise ValueError(f"{decoder_path} reads {decoder.config.vocab_size} codes, {encoder_path} writes "
                         f"{encoder.config.vocab_size}")
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=args.lr, weight_decay=1e-4)
    state_path, step, elapsed = out / "decoder_state.pt", 0, 0.0
    if state_path.is_file() and not args.restart:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        decoder.load_state_dict(state["decoder"]), optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
    eval_images, _ = scene_batch(T.EVAL_STREAM, 0, args.eval_size, args.scene_share)
    t0 = time.monotonic()

    def save(step: int) -> None:
        T.save_state(state_path, {"decoder": decoder.state_dict(), "optimizer": optimizer.state_dict(),
                                  "step": step, "elapsed": elapsed + time.monotonic() - t0})

    start = T.evaluate_dvae(encoder, decoder, eval_images)
    stop = min(args.steps, args.until or args.steps)
    jobs = ((T.TRAIN_STREAM, FRESH_SCENES + s * args.batch, args.batch, args.scene_share) for s in range(step, stop))
    batches = scene_batches(jobs, args.workers)

    def body(step: int) -> dict[str, Any]:
        for group in optimizer.param_groups:
            group["lr"] = T.learning_rate(step, args.steps, args.lr, warmup=WARMUP)
        images = next(batches)[0].to(args.device)
        decoder.train()
        loss = T.logit_laplace_nll(decoder(hard_codes(encoder, images)), images).mean() / images[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"nll": float(loss.detach())}

    step, history = T.stage_loop(args, step, "decoder", body, lambda: T.evaluate_dvae(encoder, decoder, eval_images),
                                 save)
    batches.close()
    metrics = T.evaluate_dvae(encoder, decoder, eval_images)
    info = {"command": T._command(), "encoder": str(encoder_path), "init_decoder": str(decoder_path),
            "steps": step, "planned": args.steps, "batch": args.batch,
            "seconds": round(elapsed + time.monotonic() - t0, 1), "eval_before": start, "eval": metrics,
            "history": history, "finished": step >= args.steps}
    T.save_weights(decoder, out / f"{T.STEM['decoder']}.safetensors", decoder.config)
    T.update_record(out, "decoder", info)
    return info

