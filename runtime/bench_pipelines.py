"""End-to-end figures of ``edgefm bench``: each family's runtime API timed as a user's program calls it.

SAM ``set_image`` on one seeded VGA frame and one click; CLIP the 1000 ImageNet labels encoded once (timed
once: a label index is built once and cached), then one frame classified against the cached embeddings;
DALL·E one image per iteration (prefill, grid² sampling steps, dVAE decode), or only the dVAE decode of one
code grid for a bundle without a prior.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .bundle import Bundle
from .timing import latency_stats, time_calls

CAMERA_HW = (480, 640)  # one VGA camera frame, (H, W)
CLIP_TEMPLATES = "simple"  # one prompt per label: what a cached on-device label index typically holds
DALLE_PROMPT = "an armchair in the shape of an avocado"



def _sam_pipelines(bundle: Bundle, iters: int, warmup: int, rng: np.random.Generator,
                   preprocess: str = "auto") -> dict[str, Any]:
    """SamPredictor end to end: set_image on one camera frame, then one foreground click -> 3 masks."""
    from .sam import SamPredictor

    predictor = SamPredictor(bundle, preprocess=preprocess)
    h, w = CAMERA_HW
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    point, label = np.array([[w / 2, h / 2]], np.float32), np.array([1], np.float32)
    set_image = latency_stats(time_calls(lambda: predictor.set_image(image), iters, warmup))
    predict = latency_stats(time_calls(lambda: predictor.predict(point, label, multimask_output=True), iters, warmup))
    where = predictor.preprocess_on
    decode = ("prompt decoder against the image's decoder context" if predictor.prompt_decoder is not None
              else "prompt encoder, mask decoder")
    out = {
        "sam.set_image": {"kind": "pipeline", "batch": 1, "inputs": {"image": [h, w, 3]}, "preprocess": where,
                          "description": f"HWC uint8 RGB -> resize, normalize, pad (on the {where}), image_encoder",
                          **set_image},
        "sam.predict": {"kind": "pipeline", "batch": 1, "inputs": {"point": [1, 2]},
                        "description": f"one foreground point -> 3 masks at full size ({decode}, upscale, "
                                       "threshold)", **predict},
    }
    if where == "device":  # the host path beside it, on the same sessions (the bundle keeps one per component)
        host = SamPredictor(bundle, preprocess="host")
        stats = latency_stats(time_calls(lambda: host.set_image(image), iters, warmup))
        out["sam.set_image.host_preprocess"] = _host_twin(out["sam.set_image"], stats)
    return out


def _host_twin(row: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """A pipeline row timed again with its preprocessing on the host, for the ratio in the same run."""
    return {**{k: v for k, v in row.items() if k != "output"}, **stats, "preprocess": "host",
            "description": row["description"].replace("(on the device)", "(on the host: numpy)")}


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, largest first."""
    k = min(k, scores.size)
    idx = np.argpartition(-scores, k - 1)[:k]
    return idx[np.argsort(-scores[idx], kind="stable")]


def _clip_pipelines(bundle: Bundle, iters: int, warmup: int, rng: np.random.Generator,
                    preprocess: str = "auto") -> dict[str, Any]:
    """ClipModel: the 1000 ImageNet labels encoded once, then one camera frame classified against them."""
    from .clip.model import ClipModel
    from .clip.zero_shot import imagenet_classnames, resolve_templates

    model = ClipModel(bundle, preprocess=preprocess)
    h, w = CAMERA_HW
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    labels, templates = imagenet_classnames(), resolve_templates(CLIP_TEMPLATES)
    if warmup:  # the text encoder on one batch of the same prompts (the label cache is not filled by it)
        model.encode_texts([templates[0].format(label) for label in labels[:256]])
    # One timed call: label_embeddings computes the embeddings and caches them in the model.
    encode = latency_stats(time_calls(lambda: model.label_embeddings(labels, templates), 1, 0), len(labels))
    out: dict[str, np.ndarray] = {}

    def classify() -> None:
        out["probs"] = probs = model.zero_shot(image, labels, templates)[0]
        out["top5"] = _top_k(probs, 5)

    classify_stats = latency_stats(time_calls(classify, iters, warmup))
    top5 = [{"index": int(i), "label": labels[i], "prob": float(out["probs"][i])} for i in out["top5"]]
    where = model.preprocess_on
    rows = {
        "clip.encode_labels": {
            "kind": "pipeline", "batch": len(labels),
            "inputs": {"labels": [len(labels)], "templates": [len(templates)]},
            "description": f"{len(labels)} ImageNet-1k labels x {len(templates)} template ({CLIP_TEMPLATES!r}) -> "
                           "tokenize, text encoder, normalize, ensemble; built once and cached",
            **encode},
        "clip.classify": {
            "kind": "pipeline", "batch": 1, "inputs": {"image": [h, w, 3]}, "preprocess": where,
            "description": f"HWC uint8 RGB -> resize, crop, normalize (on the {where}), image encoder -> softmax "
                           f"of cosine vs {len(labels)} cached label embeddings -> top-5",
            **classify_stats, "output": {"top5": top5}},
    }
    if where == "device":  # the host path beside it, on the same sessions and cached labels
        host = ClipModel(bundle, preprocess="host")
        host._label_cache = model._label_cache
        stats = latency_stats(time_calls(lambda: host.zero_shot(image, labels, templates), iters, warmup))
        rows["clip.classify.host_preprocess"] = _host_twin(rows["clip.classify"], stats)
    return rows


def _dalle_pipelines(bundle: Bundle, iters: int, warmup: int, rng: np.random.Generator,
                     preprocess: str = "auto") -> dict[str, Any]:
    """DalleGenerator: one image from a fixed prompt and seed per iteration; DvaeCodec.decode without a prior.
    (``preprocess``: no image goes in.)"""
    from .dalle.generator import DalleGenerator, DvaeCodec
    from .dalle.spec import PRIOR_PREFILL, PRIOR_STEP

    if not {PRIOR_PREFILL, PRIOR_STEP} <= set(bundle.manifest.component_names):
        codec = DvaeCodec(bundle)
        g = codec.grid
        ids = rng.integers(0, int(bundle.config["image_vocab"]), (g, g), dtype=np.int64)
        decode = latency_stats(time_calls(lambda: codec.decode(ids), iters, warmup))
        return {"dalle.decode": {
            "kind": "pipeline", "batch": 1, "inputs": {"ids": [g, g]},
            "description": "one grid of dVAE codes -> dvae_decoder -> HWC uint8 RGB "
                           f"{codec.image_size}x{codec.image_size}", **decode}}
    gen = DalleGenerator(bundle)
    g, seed = gen.grid, int(rng.integers(0, 2**31))
    gen.text_tokens(DALLE_PROMPT)  # loads the BPE vocabulary outside the timed calls
    out: dict[str, Any] = {}

    def generate() -> None:
        out["image"] = gen.generate(DALLE_PROMPT, n=1, seed=seed).images[0]

    stats = latency_stats(time_calls(generate, iters, warmup))
    return {"dalle.generate": {
        "kind": "pipeline", "batch": 1, "inputs": {"text_tokens": [gen.text_len]},
        "description": f"one image per iteration: prompt {DALLE_PROMPT!r}, seed {seed} -> prior prefill, "
                       f"{g * g} tokens sampled ({g * g - 1} prior_step calls, temperature 1), dvae_decoder -> "
                       "HWC uint8",
        **stats, "output": {"image": list(out["image"].shape), "tokens_per_image": g * g,
                            "tokens_per_s": g * g / (stats["latency_ms"]["median"] / 1e3)}}}


# Family -> end-to-end figures on the family's runtime API (what a user's program calls).
PIPELINES: dict[str, Callable[[Bundle, int, int, np.random.Generator, str], dict[str, Any]]] = {
    "sam": _sam_pipelines, "clip": _clip_pipelines, "dalle": _dalle_pipelines}


