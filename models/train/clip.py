"""Train the small shapes-world CLIP: ``python -m edgefm.models.train.clip --out runs/clip``.

Recipe (Radford et al., 2021, at small scale): a batch of N (image, text) pairs, L2-normalized features,
logits = exp(t) * I @ T^T with the temperature t learned (``logit_scale``, initialised to log(1/0.07) and
clamped at log(100) as in the paper), and the symmetric cross-entropy over images and over texts. In this
world many pairs of a batch share a class, so the targets are the (uniform) distribution over every pair
with the same class or caption instead of the diagonal alone; with distinct captions this is exactly
the paper's loss.

Texts are the generator's captions ("a red triangle", "a small red triangle above a blue circle") and
zero-shot prompts made of :data:`TEMPLATES` and the class names, so ``ClipModel.zero_shot(images,
CLASSES, templates=TEMPLATES)`` is in-distribution. Images are 64 x 64 single objects (80%) and
multi-object scenes (20%). Two image towers are registered; the ModifiedResNet one is shipped (at
step 200 of 600 the ViT reached 0.29 zero-shot top-1 where the ResNet reached 0.83).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from edgefm.runtime.clip.tokenizer import ClipTokenizer
from edgefm.runtime.shapes import CLASSES, random_scene, single_object

from ..clip import ClipConfig, build_clip
from .common import Trainer, add_common_args, cosine_lr, export_weights, seed_everything, step_rng

#: Small variants for this world: 64 px images, a 64-wide text tower with the real BPE vocabulary.
SHAPES_CLIP_CONFIGS: dict[str, ClipConfig] = {
    "shapes-vit": ClipConfig(
        embed_dim=64, image_size=64, vision_layers=4, vision_width=64, vision_patch_size=8,
        context_length=24, text_width=64, text_heads=1, text_layers=2, quick_gelu=False,
    ),
    "shapes-rn": ClipConfig(
        embed_dim=64, image_size=64, vision_layers=(1, 1, 1, 1), vision_width=16, vision_patch_size=None,
        context_length=24, text_width=64, text_heads=1, text_layers=2, quick_gelu=False,
    ),
}
# the shipped one: on this budget the ResNet learned shapes several times faster than the ViT
SHAPES_CLIP = SHAPES_CLIP_CONFIGS["shapes-rn"]
#: Zero-shot templates the model is trained on (OpenAI's "imagenet_simple" set plus the "simple" one).
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)
SCENE_FRACTION = 0.2
PROMPT_FRACTION = 0.5  # of single-object pairs: a template prompt instead of the generator's caption


class Texts:
    """Tokenizes with the runtime's BPE tokenizer (the one the bundle ships) and caches the rows."""

    def __init__(self, context_length: int) -> None:
        self.tokenizer = ClipTokenizer(context_length=context_length)
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.tokenizer(missing)))
        rows = np.stack([self.cache[t] for t in texts]).astype(np.int64)
        # cut after the batch's last <end_of_text> (the row maximum): exact under the causal mask, and cheaper
        return torch.from_numpy(rows[:, : int(rows.argmax(1).max()) + 1])


def to_pixels(images: list[np.ndarray], cfg: ClipConfig) -> torch.Tensor:
    """HWC uint8 RGB at ``cfg.image_size`` -> normalized NCHW float32 (what the runtime's preprocess gives
    for images already at the model size)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x - mean) / std


def make_batch(seed: int, step: int, batch: int, cfg: ClipConfig) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Images, texts and grouping keys (same key = positive pair) of one step."""
    rng = step_rng(seed, step)
    images, texts, keys = [], [], []
    for i in range(batch):
        index = step * batch + i
        if rng.random() < SCENE_FRACTION:
            scene = random_scene(seed, index, cfg.image_size, n_objects=(2, 3))
            images.append(scene.image)
            texts.append(scene.caption)
            keys.append(scene.caption)
            continue
        scene = single_object(seed, index, cfg.image_size)
        label = scene.objects[0].label
        images.append(scene.image)
        texts.append(TEMPLATES[rng.integers(len(TEMPLATES))].format(label)
                     if rng.random() < PROMPT_FRACTION else scene.caption)
        keys.append(label)
    return images, texts, keys


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric cross-entropy of CLIP with the positives of each row spread over its key group.
    Returns the loss and the image->text top-1 accuracy over groups."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image_features @ text_features.t()  # N_img, N_txt
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    group = torch.tensor([ids[k] for k in keys])
    same = (group[:, None] == group[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                  + torch.sum(-target * logits.t().log_softmax(1), 1).mean())
    acc = same[torch.arange(len(keys)), logits.argmax(1)].mean()
    return loss, acc


@torch.no_grad()
def zero_shot_accuracy(model, cfg: ClipConfig, texts: Texts, seed: int, n: int = 360) -> float:
    """Top-1 over :data:`CLASSES` on ``n`` single-object images of stream ``seed``, prompt-ensembled over
    :data:`TEMPLATES` like the runtime's ``ClipModel.zero_shot``."""
    prompts = [t.format(c) for c in CLASSES for t in TEMPLATES]
    emb = F.normalize(model.encode_text(texts(prompts)), dim=-1).view(len(CLASSES), len(TEMPLATES), -1)
    label_emb = F.normalize(emb.mean(1), dim=-1)
    scenes = [single_object(seed, i, cfg.image_size) for i in range(n)]
    image_emb = F.normalize(model.encode_image(to_pixels([s.image for s in scenes], cfg)), dim=-1)
    pred = (image_emb @ label_emb.t()).argmax(1).numpy()
    truth = np.array([CLASSES.index(s.objects[0].label) for s in scenes])
    return float((pred == truth).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgefm.models.train.clip", description=__doc__.split("\n")[0])
    add_common_args(parser, steps=1200, batch=128, lr=1e-3)
    parser.add_argument("--variant", choices=sorted(SHAPES_CLIP_CONFIGS), default="shapes-rn")
    args = parser.parse_args(argv)
    seed_everything(args.seed, args.threads)
    cfg = SHAPES_CLIP_CONFIGS[args.variant]
    model = build_clip(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    trainer = Trainer(model, optimizer, args.out, args.steps, args.eval_every, args.save_every, args.minutes)
    texts = Texts(cfg.context_length)

    def step_fn(step: int) -> dict[str, float]:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, warmup=min(100, args.steps // 10 + 1))
        images, captions, keys = make_batch(args.seed, step, args.batch, cfg)
        loss, acc = contrastive_loss(model.encode_image(to_pixels(images, cfg)), model.encode_text(texts(captions)),
                                     model.logit_scale, keys)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():  # the paper clips the temperature so that logits are scaled by at most 100
            model.logit_scale.clamp_(0, np.log(100))
        return {"loss": loss.item(), "acc": acc.item(), "scale": model.logit_scale.exp().item()}

    def eval_fn() -> dict[str, float]:
        return {"zero_shot_top1": zero_shot_accuracy(model, cfg, texts, seed=args.seed + 1, n=args.eval_n or 360)}

    if not trainer.run(step_fn, eval_fn):
        return
    weights = args.weights or args.out / "clip_shapes.safetensors"
    final = trainer.log[-1] if trainer.log else {}
    export_weights(model, weights, {
        "family": "clip", "loader": "edgefm.models.clip.load_clip(path, quick_gelu=False)",
        "variant": args.variant, "config": dataclasses.asdict(cfg),
        "templates": list(TEMPLATES), "classes": list(CLASSES),
        "steps": args.steps, "batch": args.batch, "seed": args.seed,
        "eval": {k: v for k, v in final.items() if k != "time"},
    })
    print(f"wrote {weights} and {Path(weights).with_suffix('.json')}")


if __name__ == "__main__":
    main()
