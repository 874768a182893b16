"""Training of the small DALL·E shipped with edgefm, on the generated shapes world (the paper's recipe).

Stage ``dvae`` (DALL·E paper, §2.1): at each cell of the 8×8 grid the encoder's logits over K codes are
relaxed with gumbel-softmax at temperature τ and the decoder reads the relaxed one-hots. Loss per image:
the logit-Laplace negative log-likelihood of the pixels plus β · KL(q(z | x) ‖ uniform over K codes),
reported per pixel dimension (nats). τ anneals from 1 to 1/16 (cosine), β ramps linearly from 0 to 6.6,
the step size decays cosine-wise. Evaluation decodes the *argmax* codes, as the runtime does.

Stage ``prior`` (:mod:`.dalle_prior`): images are turned into codes by the trained encoder (argmax) and
captions into text ids framed exactly as :meth:`edgefm.runtime.dalle.generator.DalleGenerator.text_tokens`
frames prompts (``<sot> ids <eot>`` then the padding id); the loss is the paper's 1/8 text + 7/8 image
cross-entropy (:meth:`DallePrior.training_loss`), its text softmax restricted to the ids the captions use (the
rest of CLIP's 49,409 are never a target). Two additions to the paper, for sampling with classifier-free
guidance as DALL·E mini / min-dalle do: ``--uncond-share`` of the captions (seeded per step) is replaced by
the empty caption ``<sot> <eot>``, and ``--guidance`` is written into the prior's config as its default scale.

Data: :mod:`edgefm.runtime.shapes`, stream seed 0 for training, 1 for evaluation; the batch of step ``s``
holds scenes ``s·B .. s·B + B - 1`` and the gumbel noise of step ``s`` is seeded by ``(seed, s)``, so a run
stopped by ``--minutes`` and started again with the same arguments continues exactly where it stopped.

Files in ``--out``: ``<stage>_state.pt`` (resumable state), ``dvae_shapes_{encoder,decoder}.safetensors``
(fp32) and ``prior_shapes.safetensors`` (stored fp16: its two 49,409-row text tables dominate the size;
the loaders upcast) each with ``<stem>.json`` (the prior's holds only ``PriorConfig`` fields + ``name``,
what :func:`edgefm.models.dalle.resolve_prior_config` reads), and ``dalle_shapes_training.json`` (the
commands, steps, times and metrics). ``--ship DIR`` copies the weights and their JSON to ``DIR``.

``--device cuda`` trains on a GPU (the data is still drawn on the CPU; ``--workers N`` draws it in N processes
ahead of the loop, the same scenes in the same order).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from edgefm.models.dalle import (
    DVAE_CONFIGS,
    PRIOR_CONFIGS,
    Decoder,
    DvaeConfig,
    Encoder,
    PriorConfig,
    map_pixels,
)

from .dalle_data import scene_batch, scene_batches
from .dalle_decoder import train_decoder
from .dalle_prior import train_prior

# The shipped sizes, small enough to train on a shared 2-core CPU within about an hour per stage: 64² images
# -> an 8×8 grid of 512 codes; a prior of 8 dense layers, width 64. Its text_len 8 holds single-object captions
# ("<sot> an orange hexagon <eot>" is 6 ids); the 49,409-row text tables dominate its size.
# 512 codes, not 128 (issue 5): with 128, the 8-pixel cells of six colors over varied backgrounds left no codes
# for the objects' outlines (held-out dVAE reconstructions classified correctly by the shapes CLIP: 0.54 with
# 128 codes vs 0.61 with 512 after the same 3,200 GPU steps; n_hid 32 gave 0.64 at four times the CPU cost,
# 1,024 codes 0.36).
SHAPES_DVAE = DvaeConfig(n_hid=16, n_init=16, n_blk_per_group=1, vocab_size=512)
SHAPES_PRIOR = PriorConfig(text_len=8, image_vocab=512, image_grid=8, d_model=64, n_layers=8, n_heads=4)
DVAE_SIZES = {"shapes": SHAPES_DVAE, **DVAE_CONFIGS}
PRIOR_SIZES = {"shapes": SHAPES_PRIOR, **PRIOR_CONFIGS}
TRAIN_STREAM, EVAL_STREAM = 0, 1
TAU_START, TAU_END = 1.0, 1 / 16  # paper: τ 1 -> 1/16
# Paper: β ramps 0 -> 6.6. Kept: with β = 1 the argmax codes used even fewer entries (2 vs 9 of 128 at
# step 260 of 520).
KL_WEIGHT = 6.6
PIXEL_TOLERANCE = 0.1  # a pixel is "right" when every channel is within this of the target (in [0, 1])
STEM = {"encoder": "dvae_shapes_encoder", "decoder": "dvae_shapes_decoder", "prior": "prior_shapes"}
RECORD = "dalle_shapes_training.json"


# ---- schedules and losses ------------------------------------------------------------------------------


def cosine(step: int, total: int, start: float, end: float) -> float:
    """``start`` at step 0 to ``end`` at ``total`` (held after), along half a cosine."""
    t = min(step / max(total, 1), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def learning_rate(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up then cosine decay to a tenth of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step - warmup, total - warmup, peak, peak / 10)


def logit_laplace_nll(stats: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Per-image NLL (nats, summed over pixels) of ``image`` in [0, 1] under the decoder's logit-Laplace.

    ``stats[:, :3]`` is μ (the mean in logit space), ``stats[:, 3:]`` ln b; pixels are mapped into
    [eps, 1 - eps] first. Density of x: exp(-|logit x - μ| / b) / (2 b x (1 - x)).
    """
    x = map_pixels(image)
    mu, log_b = stats[:, :3], stats[:, 3:].clamp(min=-7.0)  # b >= 1e-3: steps stay finite early on
    nll = (torch.logit(x) - mu).abs() * torch.exp(-log_b) + log_b + math.log(2) + torch.log(x * (1 - x))
    return nll.flatten(1).sum(1)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Per-image KL(q ‖ uniform) summed over grid cells; ``logits [B, K, h, w]``."""
    logq = F.log_softmax(logits, dim=1)
    return (logq.exp() * logq).sum(1).flatten(1).sum(1) + math.log(logits.shape[1]) * logits[0, 0].numel()


def dvae_loss(
    encoder: Encoder, decoder: Decoder, images: torch.Tensor, tau: float, beta: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The relaxed ELB loss per pixel dimension and its parts (gumbel noise from the global generator)."""
    logits = encoder(map_pixels(images))
    z = F.gumbel_softmax(logits, tau=tau, hard=False, dim=1)
    nll = logit_laplace_nll(decoder(z), images).mean()
    kl = kl_to_uniform(logits).mean()
    dims = images[0].numel()
    return (nll + beta * kl) / dims, {"nll": float(nll.detach()) / dims, "kl": float(kl.detach()) / dims}


# ---- evaluation ----------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_dvae(
    encoder: Encoder, decoder: Decoder, images: torch.Tensor, batch: int = 64
) -> dict[str, float]:
    """Reconstruction through the *argmax* codes: MSE, PSNR, share of pixels within ``PIXEL_TOLERANCE``,
    and code usage (perplexity of the code histogram, out of K)."""
    encoder.eval(), decoder.eval()
    recon, ids = [], []
    device = next(encoder.parameters()).device
    images = images.to(device)
    for i in range(0, len(images), batch):
        codes = encoder.encode_ids(images[i : i + batch])
        ids.append(codes)
        recon.append(decoder.decode_to_image(codes))
    rec, codes = torch.cat(recon), torch.cat(ids)
    mse = float(((rec - images) ** 2).mean())
    ok = float(((rec - images).abs().amax(1) <= PIXEL_TOLERANCE).float().mean())
    hist = torch.bincount(codes.flatten(), minlength=encoder.config.vocab_size).float()
    p = hist[hist > 0] / hist.sum()
    return {"mse": mse, "psnr": -10 * math.log10(max(mse, 1e-12)), "pixel_acc": ok,
            "codes_perplexity": float(torch.exp(-(p * p.log()).sum()))}


# ---- checkpoints ---------------------------------------------------------------------------------------


def save_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file, then rename: a run killed mid-write leaves the last good state."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def save_weights(
    module: torch.nn.Module, path: Path, config: Any, dtype: torch.dtype = torch.float32
) -> None:
    """``module``'s state dict as safetensors (in ``dtype``) and its config fields as ``<stem>.json``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, str(path.with_suffix(".tmp")))
    os.replace(path.with_suffix(".tmp"), path)
    fields = {"name": "shapes", **dataclasses.asdict(config)}
    path.with_suffix(".json").write_text(json.dumps(fields, indent=1) + "\n")


def update_record(out: Path, stage: str, info: dict[str, Any]) -> None:
    path = out / RECORD
    record = json.loads(path.read_text()) if path.is_file() else {}
    record[stage] = info
    path.write_text(json.dumps(record, indent=1) + "\n")


def _progress(total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


def stage_loop(args: argparse.Namespace, step: int, desc: str, body: Callable[[int], dict[str, Any]],
               evaluate: Callable[[], dict[str, float]], save: Callable[[int], None]) -> tuple[int, list[dict]]:
    """The loop every stage shares: ``body(step)`` trains one step and returns what to log for it (shown
    on the progress bar, and kept in the history at evaluations); every ``--eval-every`` steps and at the
    last step, ``evaluate()`` and ``save(step)``. Stops at ``--steps`` (or ``--until``) or when ``--minutes``
    is spent, saves, and returns the step reached and the history."""
    deadline, history = time.monotonic() + 60 * args.minutes, []
    bar = _progress(args.steps, step, desc)
    while step < min(args.steps, args.until or args.steps) and time.monotonic() < deadline:
        logged = body(step)
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in logged.items() if isinstance(v, float)})
        if step % args.eval_every == 0 or step == args.steps:
            metrics = evaluate()
            history.append({"step": step, **logged, **metrics})
            bar.write(f"step {step}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            save(step)
    bar.close()
    save(step)
    return step, history


# ---- stage 1: dVAE -------------------------------------------------------------------------------------


def train_dvae(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    config = _size(args.dvae_size, DVAE_SIZES)
    torch.manual_seed(args.seed)
    encoder, decoder = Encoder(config).to(args.device), Decoder(config).to(args.device)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    state_path, step, elapsed = out / "dvae_state.pt", 0, 0.0
    if state_path.is_file() and not args.restart:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        encoder.load_state_dict(state["encoder"]), decoder.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
    eval_images, _ = scene_batch(EVAL_STREAM, 0, args.eval_size, args.scene_share)
    anneal = args.anneal_steps if args.anneal_steps is not None else int(0.7 * args.steps)
    ramp = max(1, anneal // 7)  # β reaches its final weight at a tenth of the first schedule
    t0 = time.monotonic()

    def save(step: int) -> None:
        save_state(state_path, {"encoder": encoder.state_dict(), "decoder": decoder.state_dict(),
                                "optimizer": optimizer.state_dict(), "step": step,
                                "elapsed": elapsed + time.monotonic() - t0})

    stop = min(args.steps, args.until or args.steps)
    batches = scene_batches(((TRAIN_STREAM, s * args.batch, args.batch, args.scene_share) for s in range(step, stop)),
                            args.workers)

    def body(step: int) -> dict[str, Any]:
        encoder.train(), decoder.train()
        torch.manual_seed(args.seed * 1_000_003 + step)  # gumbel noise of this step, whatever came before
        tau, beta = cosine(step, anneal, TAU_START, TAU_END), args.kl_weight * min(1.0, step / ramp)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        images = next(batches)[0].to(args.device)
        optimizer.zero_grad(set_to_none=True)
        loss, parts = dvae_loss(encoder, decoder, images, tau, beta)
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach()), **parts, "tau": tau, "beta": beta}

    step, history = stage_loop(args, step, "dVAE", body, lambda: evaluate_dvae(encoder, decoder, eval_images), save)
    batches.close()
    metrics = evaluate_dvae(encoder, decoder, eval_images)
    info = {"command": _command(), "size": dataclasses.asdict(config), "steps": step, "planned": args.steps,
            "batch": args.batch, "seconds": round(elapsed + time.monotonic() - t0, 1), "eval": metrics,
            "eval_images": args.eval_size, "history": history, "finished": step >= args.steps}
    # Written even when --minutes stopped the run early ("finished" in the record says which).
    save_weights(encoder, out / f"{STEM['encoder']}.safetensors", config)
    save_weights(decoder, out / f"{STEM['decoder']}.safetensors", config)
    update_record(out, "dvae", info)
    return info


# ---- command line --------------------------------------------------------------------------------------


def _size(name: str, registry: dict[str, Any]) -> Any:
    if name not in registry:
        raise SystemExit(f"unknown size {name!r}; known: {', '.join(registry)}")
    return registry[name]


def _command() -> str:
    return "python -m edgefm.models.train.dalle " + " ".join(sys.argv[1:])


DEFAULTS = {  # per stage: steps, batch, learning rate, evaluation period, evaluation set size
    # 6,000 steps: at 520 (the first shipped dVAE) about 14 codes were in use and colors were confused
    "dvae": {"steps": 6000, "batch": 32, "lr": 2e-3, "eval_every": 500, "eval_size": 256, "scene_share": 0.25},
    # single objects only: multi-object captions do not fit text_len 8
    "prior": {"steps": 4000, "batch": 128, "lr": 1.5e-3, "eval_every": 400, "eval_size": 512, "scene_share": 0.0},
    "decoder": {"steps": 2500, "batch": 32, "lr": 1.5e-3, "eval_every": 250, "eval_size": 256, "scene_share": 0.25},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m edgefm.models.train.dalle",
                                description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=("dvae", "prior", "decoder"), required=True,
                   help="dvae, then prior (on the dVAE's codes); decoder (optional) fine-tunes the dVAE decoder "
                   "on the frozen encoder's hard codes")
    p.add_argument("--out", required=True, help="folder for the state, the weights and the training record")
    p.add_argument("--minutes", type=float, default=float("inf"),
                   help="stop after this wall time (the state is saved; run again to continue)")
    p.add_argument("--steps", type=int, help="planned optimisation steps (schedules are laid out on it)")
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float, help="peak step size")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-size", type=int, help="held-out scenes (stream 1) used by the evaluation")
    p.add_argument("--scene-share", type=float, help="share of multi-object scenes in the data")
    p.add_argument("--kl-weight", type=float, default=KL_WEIGHT, help="dvae stage: final β of the KL term")
    p.add_argument("--anneal-steps", type=int, help="dvae stage: steps over which τ anneals 1 -> 1/16 (default 0.7 "
                   "of --steps); set it to the first schedule's when lengthening a finished run, so that τ stays "
                   "annealed and only the step size restarts")
    p.add_argument("--seed", type=int, default=0)
    # One intra-op thread: on a CPU shared with other jobs, two threads ran 5-10x *slower* (measured).
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="torch device of the models (e.g. cuda); data is drawn on the CPU")
    p.add_argument("--workers", type=int, default=0, help="processes drawing scenes ahead of the training loop "
                   "(0: drawn in the loop; same data either way)")
    p.add_argument("--dvae-size", default="shapes", help=f"one of {', '.join(DVAE_SIZES)}")
    p.add_argument("--prior-size", default="shapes", help=f"one of {', '.join(PRIOR_SIZES)}")
    p.add_argument("--init-decoder", help="decoder stage: the decoder to start from "
                   "(default: --out/dvae_shapes_decoder.safetensors)")
    p.add_argument("--decoder-hid", type=int, help="decoder stage: start from a fresh decoder of this width "
                   "instead of --init-decoder")
    p.add_argument("--dvae", help="prior and decoder stages: the dVAE encoder "
                   "(default: --out/dvae_shapes_encoder.safetensors)")
    p.add_argument("--init-prior", help="prior stage: start from this prior's weights (same size) with a fresh "
                   "optimizer, e.g. after the dVAE it was trained on was trained further")
    p.add_argument("--pairs", type=int, default=40000, help="prior stage: training (caption, codes) pairs")
    p.add_argument("--until", type=int, help="stop at this step (schedules still follow --steps); run again "
                   "without it to continue")
    p.add_argument("--restart", action="store_true", help="ignore a saved state in --out")
    p.add_argument("--uncond-share", type=float, default=0.2,
                   help="prior stage: share of captions replaced by the empty caption (classifier-free guidance; "
                   "0 trains a purely conditional prior)")
    p.add_argument("--guidance", type=float, default=3.0,
                   help="prior stage: the guidance scale written into the prior's config as its sampling default "
                   "(only when --uncond-share > 0)")
    p.add_argument("--ship", help="copy the finished weights and their JSON to this folder")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stage = {"dvae": train_dvae, "prior": train_prior, "decoder": train_decoder}[args.stage]
    info = stage(args)
    print(json.dumps({k: info[k] for k in ("steps", "planned", "seconds", "eval")}, indent=1))
    if args.ship:
        stems = {"dvae": (STEM["encoder"], STEM["decoder"]), "prior": (STEM["prior"],),
                 "decoder": (STEM["decoder"],)}[args.stage]
        Path(args.ship).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            for suffix in (".safetensors", ".json"):
                shutil.copy2(Path(args.out) / f"{stem}{suffix}", Path(args.ship) / f"{stem}{suffix}")
    return info


if __name__ == "__main__":
    main()
