"""Train the small shapes-world SAM: ``python -m edgefm.models.train.sam --out runs/sam``.

Recipe (Kirillov et al., 2023, section 3 and appendix A, at small scale): per object, a first prompt that
is a foreground point drawn uniformly from the mask or its box (jittered by a few percent of its side);
then corrective points drawn uniformly from the error region of the previous prediction (false negative
-> foreground point, false positive -> background point), with the previous low-res logits as the mask
prompt. Mask loss = 20 * focal + dice on the logits; on the first prompt the ambiguity-aware loss is the
minimum over the three multimask outputs (plus the single-mask output, used by ``multimask_output=False``),
and the IoU head regresses the true IoU of every output with MSE.

Images are scenes of :mod:`edgefm.runtime.shapes`, some drawn larger and resized with the runtime's own
``resize_longest_side``, normalized and padded by the runtime's ``normalize_and_pad`` (so that training
sees exactly what :class:`~edgefm.runtime.sam.SamPredictor` feeds the encoder).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from edgefm.runtime.sam.transforms import normalize_and_pad, resize_longest_side
from edgefm.runtime.shapes import interior_point, random_scene

from ..checkpoint import sha256_file
from ..sam import Sam, SamConfig, build_sam, load_sam
from .common import Trainer, add_common_args, cosine_lr, export_weights, seed_everything, step_rng

#: The shipped variant: 128 px input, patch 8 -> 16 x 16 embedding, 64 x 64 mask logits (trained against
#: area-averaged targets so that their bilinear upscaling puts edges at sub-pixel positions).
SHAPES_SAM = SamConfig(
    encoder_embed_dim=64, encoder_depth=3, encoder_num_heads=2, encoder_global_attn_indexes=(2,),
    image_size=128, patch_size=8, window_size=8, prompt_embed_dim=48, mask_in_chans=8,
    decoder_num_heads=2, decoder_mlp_dim=192, iou_head_hidden_dim=64,
)
OBJECTS_PER_IMAGE = 3
CORRECTIONS = 1  # corrective-point iterations after the first prompt (the paper: 8 + 2 without points)


def load_scene(seed: int, index: int, rng: np.random.Generator, cfg: SamConfig) -> tuple[np.ndarray, np.ndarray]:
    """One training image at the model's input scale (HWC uint8, longest side ``image_size``) and its
    instance masks (N, h, w); half of the scenes are drawn up to 2.5x larger and resized like the runtime."""
    scale = 1.0 if rng.random() < 0.5 else rng.uniform(1.0, 2.5)
    long_side, short = round(cfg.image_size * scale), rng.uniform(0.6, 1.0)
    hw = (long_side, round(long_side * short)) if rng.random() < 0.5 else (round(long_side * short), long_side)
    scene = random_scene(seed, index, hw, n_objects=(1, 4))
    image = resize_longest_side(scene.image, cfg.image_size)
    h, w = image.shape[:2]
    masks = scene.masks
    if masks.shape[1:] != (h, w):
        masks = np.stack([cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0.5
                          for m in masks])
    keep = masks.reshape(len(masks), -1).any(1)
    return image, masks[keep]


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """20 * sigmoid focal (alpha 0.25, gamma 2, mean over pixels) + dice, per mask: ``(...)`` from
    ``(..., H, W)`` logits and float targets."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    focal = ((0.25 * target + 0.75 * (1 - target)) * ce * (1 - p_t) ** 2).flatten(-2).mean(-1)
    inter = (p * target).flatten(-2).sum(-1)
    dice = 1 - (2 * inter + 1) / (p.flatten(-2).sum(-1) + target.flatten(-2).sum(-1) + 1)
    return 20 * focal + dice


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = logits > 0
    inter = (pred & (target > 0.5)).flatten(-2).sum(-1).float()
    union = (pred | (target > 0.5)).flatten(-2).sum(-1).float()
    return inter / union.clamp(min=1)


def sample_points(rng: np.random.Generator, regions: np.ndarray) -> np.ndarray:
    """One XY pixel drawn uniformly from each (H, W) bool region of ``regions`` (K, H, W) -> (K, 2)."""
    out = np.zeros((len(regions), 2), np.float32)
    for k, region in enumerate(regions):
        ys, xs = np.nonzero(region)
        if len(xs):
            i = rng.integers(len(xs))
            out[k] = xs[i], ys[i]
    return out


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """XYXY boxes (K, 4) of (K, H, W) masks, exclusive right/bottom edge like the generator's."""
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.array(boxes, np.float32).reshape(-1, 4)


def jitter_boxes(rng: np.random.Generator, masks: np.ndarray) -> np.ndarray:
    """Tight boxes with noise of std 5% of the side, at most 3 px, on half of them."""
    boxes = tight_boxes(masks)
    for box in boxes:
        if rng.random() < 0.5:
            side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
            box += np.clip(rng.normal(0, 0.05, 4) * side, -3, 3)
    return boxes


def prompt_losses(model: Sam, embedding: torch.Tensor, gt: torch.Tensor, rng: np.random.Generator,
                  use_box: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """The interactive-training loss of K objects of one image (``gt``: K x S x S float, padded; the loss is
    taken at the decoder's resolution against the area-averaged ``gt``, points are drawn at full scale)."""
    full = gt.numpy() > 0.5
    scale = gt.shape[-1] // model.prompt_encoder.mask_input_size[0]
    gt = F.avg_pool2d(gt[:, None], scale)[:, 0] if scale > 1 else gt
    gt_np = gt.numpy() > 0.5
    k = len(gt)
    coords = np.zeros((k, 0, 2), np.float32)
    labels = np.zeros((k, 0), np.float32)
    boxes = torch.from_numpy(jitter_boxes(rng, full)) if use_box else None
    if not use_box:
        coords, labels = sample_points(rng, full)[:, None], np.ones((k, 1), np.float32)
    mask_prompt, total, stats = None, torch.zeros(()), {}
    for it in range(1 + CORRECTIONS):
        points = (torch.from_numpy(coords), torch.from_numpy(labels)) if coords.shape[1] else None
        sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=mask_prompt)
        logits, iou_pred = model.mask_decoder.predict_masks(
            embedding, model.prompt_encoder.get_dense_pe(), sparse, dense)  # K x 4 x S x S, K x 4
        losses = mask_loss(logits, gt[:, None].expand_as(logits))  # K x 4
        iou = mask_iou(logits.detach(), gt[:, None])
        if it == 0:  # ambiguity-aware: only the best of the three multimask outputs is trained
            best = losses[:, 1:].argmin(1)
            loss = losses[:, 0] + losses[:, 1:].gather(1, best[:, None])[:, 0]
            iou_loss = F.mse_loss(iou_pred, iou)
            stats["iou_first"] = float(iou[:, 0].mean())
        else:
            loss, iou_loss = losses[:, 0], F.mse_loss(iou_pred[:, 0], iou[:, 0])
        total = total + loss.mean() + iou_loss
        # the next corrective point comes from the error region of the single-mask output
        pred = logits[:, 0].detach().numpy() > 0
        fn, fp = gt_np & ~pred, pred & ~gt_np
        pick_fn = fn.reshape(k, -1).sum(1) >= fp.reshape(k, -1).sum(1)
        region = np.where(pick_fn[:, None, None], fn, fp)
        # a low-res error pixel (i, j) is the input pixel at its centre
        points_lr = sample_points(rng, region) * scale + (scale - 1) / 2
        coords = np.concatenate([coords, points_lr.astype(np.float32)[:, None]], 1)
        labels = np.concatenate([labels, pick_fn.astype(np.float32)[:, None]], 1)
        mask_prompt = logits[:, :1].detach()
    stats["iou_last"] = float(iou[:, 0].mean())
    return total / (1 + CORRECTIONS), stats


def to_input(images: list[np.ndarray], cfg: SamConfig) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([normalize_and_pad(im, cfg.image_size, cfg.pixel_mean, cfg.pixel_std)
                                            for im in images]))


@torch.no_grad()
def evaluate(model: Sam, cfg: SamConfig, seed: int, n: int = 24) -> dict[str, float]:
    """mIoU of the single-mask output for one interior click and for the tight box, on ``n`` scenes of
    stream ``seed`` drawn at the input scale (the runtime test measures the exported model instead)."""
    point_iou, box_iou = [], []
    for i in range(n):
        image, masks = load_scene(seed, i, np.random.default_rng(i), cfg)
        emb = model.image_encoder(to_input([image], cfg))
        gt = torch.from_numpy(np.stack([np.pad(m, ((0, cfg.image_size - m.shape[0]), (0, cfg.image_size - m.shape[1])))
                                        for m in masks]).astype(np.float32))
        pts = torch.from_numpy(np.stack([interior_point(m) for m in masks]))
        boxes = torch.from_numpy(tight_boxes(masks))
        for prompt, out in (({"points": (pts, torch.ones(len(masks), 1))}, point_iou), ({"boxes": boxes}, box_iou)):
            sparse, dense = model.prompt_encoder(points=prompt.get("points"), boxes=prompt.get("boxes"), masks=None)
            logits, _ = model.mask_decoder.predict_masks(emb, model.prompt_encoder.get_dense_pe(), sparse, dense)
            logits = F.interpolate(logits[:, :1], size=cfg.image_size, mode="bilinear", align_corners=False)
            out.extend(mask_iou(logits[:, 0], gt).tolist())
    return {"point_miou": float(np.mean(point_iou)), "box_miou": float(np.mean(box_iou))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgefm.models.train.sam", description=__doc__.split("\n")[0])
    add_common_args(parser, steps=1000, batch=8, lr=1e-3)
    parser.add_argument("--init", type=Path, default=None,
                        help="start from these weights (e.g. the shipped sam_shapes.safetensors) with a fresh "
                             "optimizer and schedule: a fine-tuning leg; use another --seed for new scenes")
    args = parser.parse_args(argv)
    seed_everything(args.seed, args.threads)
    cfg = SHAPES_SAM
    model = build_sam(cfg)
    if args.init is not None:
        model.load_state_dict(load_sam(args.init, cfg).state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.1)
    trainer = Trainer(model, optimizer, args.out, args.steps, args.eval_every, args.save_every, args.minutes)

    def step_fn(step: int) -> dict[str, float]:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, warmup=min(100, args.steps // 10 + 1))
        rng = step_rng(args.seed, step)
        scenes = [load_scene(args.seed, step * args.batch + i, rng, cfg) for i in range(args.batch)]
        embeddings = model.image_encoder(to_input([im for im, _ in scenes], cfg))
        total, stats = torch.zeros(()), {"iou_first": 0.0, "iou_last": 0.0}
        for b, (image, masks) in enumerate(scenes):
            pick = rng.permutation(len(masks))[:OBJECTS_PER_IMAGE]
            gt = np.zeros((len(pick), cfg.image_size, cfg.image_size), np.float32)
            gt[:, : image.shape[0], : image.shape[1]] = masks[pick]
            loss, s = prompt_losses(model, embeddings[b : b + 1], torch.from_numpy(gt), rng, rng.random() < 0.5)
            total = total + loss / args.batch
            stats = {key: stats[key] + s[key] / args.batch for key in stats}
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return {"loss": total.item(), **stats}

    def eval_fn() -> dict[str, float]:
        return evaluate(model, cfg, seed=args.seed + 1, n=args.eval_n or 24)

    if not trainer.run(step_fn, eval_fn):
        return
    weights = args.weights or args.out / "sam_shapes.safetensors"
    final = trainer.log[-1] if trainer.log else {}
    export_weights(model, weights, {
        "family": "sam", "variant": "shapes", "loader": "edgefm.models.sam.load_sam(path, SamConfig(**config))",
        "config": dataclasses.asdict(cfg), "steps": args.steps, "batch": args.batch, "seed": args.seed,
        "init": None if args.init is None else {"path": str(args.init), "sha256": sha256_file(args.init)},
        "eval": {k: v for k, v in final.items() if k != "time"},
    })
    print(f"wrote {weights} and {weights.with_suffix('.json')}")


if __name__ == "__main__":
    main()
