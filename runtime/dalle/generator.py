"""DALL·E text-to-image on exported components, without PyTorch: ``DalleGenerator`` and ``DvaeCodec``.

Conventions: images are HWC uint8 RGB; token grids int64 ``[n, grid, grid]`` row-major (the prior's
order). Prompts are tokenized with CLIP's BPE and framed as ``<start_of_text> ids <end_of_text>``
followed by the prior's padding id up to ``text_len`` (the bundle's ``config``); a longer prompt is cut to
``text_len`` ids, the last one replaced by ``<end_of_text>``, and the result says ``truncated=True``.

Sampling runs in numpy from ``np.random.default_rng(seed)``: per image token, logits / temperature, then
top-k (keep logits >= the k-th largest), then top-p (keep the smallest set of most likely tokens whose
probability reaches p), then one inverse-CDF draw per sample. ``temperature=0`` is greedy (argmax).
The n samples of a prompt run as one batch (split at the bundle's batch limit), in a fixed draw order,
so a seed gives the same images on every backend whose logits agree.

Classifier-free guidance (min-dalle's "supercondition_factor"): with a scale s != 1 each sample runs twice in
the batch, once on the prompt and once on the empty prompt ``<start_of_text> <end_of_text>``, and the token is
drawn from ``u + s · (c - u)`` of their image logits; both rows are fed the drawn token. It needs a prior
trained with some empty captions; the bundle's ``config["prior"]["guidance_scale"]`` is the default (1, no
guidance, for a prior that records none).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from ..backends import Runner, check_cuda_graphs
from ..bundle import Bundle
from ..errors import BundleError, InputError
from ..sam.transforms import as_rgb_uint8
from .sampling import check_sampling, guided_logits, sample_tokens
from .spec import DVAE_DECODER, DVAE_ENCODER, PRIOR_PREFILL, PRIOR_STEP

_INTERPOLATION = {"lanczos": cv2.INTER_LANCZOS4, "bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR,
                  "area": cv2.INTER_AREA, "nearest": cv2.INTER_NEAREST}


# ---- results and reranking ------------------------------------------------------------------------------


class Reranker(Protocol):
    """What ``rerank=`` needs (the CLIP runtime's model provides it): L2-normalized embeddings."""

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray: ...  # (N, D)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...  # (M, D)


@dataclass
class GenerationResult:
    """``images``, ``tokens`` and ``scores`` are in sample order; ``order`` lists sample indices best first
    (by CLIP score when reranked, else sample order)."""

    prompt: str
    images: list[np.ndarray]  # HWC uint8 RGB
    tokens: np.ndarray  # int64 [n, grid, grid]
    text_tokens: np.ndarray  # int64 [text_len], as fed to the prior
    truncated: bool  # the prompt was longer than text_len tokens and was cut
    seed: int
    guidance: float = 1.0  # the classifier-free guidance scale used (1 = none)
    scores: np.ndarray | None = None  # float [n], CLIP cosine similarity to the prompt
    order: np.ndarray | None = None  # int [n]

    def ranked_images(self) -> list[np.ndarray]:
        order = self.order if self.order is not None else range(len(self.images))
        return [self.images[i] for i in order]


def rerank_scores(reranker: Reranker, images: list[np.ndarray], prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity of each image to the prompt and the indices sorted best first (ties keep order)."""
    missing = [m for m in ("encode_images", "encode_texts") if not callable(getattr(reranker, m, None))]
    if missing:
        raise InputError(f"rerank must be a CLIP model with encode_images and encode_texts; "
                         f"{type(reranker).__name__} lacks {missing}")
    image_emb = np.asarray(reranker.encode_images(images), np.float64)
    text_emb = np.asarray(reranker.encode_texts([prompt]), np.float64)
    if image_emb.shape[0] != len(images) or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise InputError(
            f"rerank model returned image embeddings {image_emb.shape} and text embeddings {text_emb.shape}; "
            f"expected ({len(images)}, D) and (1, D)"
        )
    scores = image_emb @ text_emb[0]
    return scores, np.argsort(-scores, kind="stable")


def to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """float NCHW in [0, 1] -> list of HWC uint8 RGB."""
    x = np.clip(np.rint(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)
    return [np.ascontiguousarray(im.transpose(1, 2, 0)) for im in x]


def _open(bundle: Bundle | str | Path, backend: str, threads: int | None, need: tuple[str, ...],
          precision: str | None = None) -> Bundle:
    if not isinstance(bundle, Bundle):
        bundle = Bundle(bundle, backend, threads=threads, family="dalle", precision=precision)
    elif bundle.family != "dalle":
        raise BundleError(
            f"{bundle.path} holds a {bundle.family!r} bundle, but a 'dalle' bundle is needed here"
        )
    missing = [n for n in need if n not in bundle.manifest.component_names]
    if missing:
        raise BundleError(
            f"{bundle.path} has no {', '.join(missing)} (it has {bundle.manifest.component_names}); "
            "export it with `edgefm export dalle` and the matching flags (--prior for generation, "
            "--dvae-encoder for encoding images)"
        )
    return bundle


def _batches(n: int, limit: int) -> list[slice]:
    return [slice(i, min(i + limit, n)) for i in range(0, n, limit)]


class DvaeCodec:
    """Pictures <-> dVAE codes: ``encode(image) -> ids [grid, grid]``, ``decode(ids) -> image``.

    ``encode`` resizes the shortest side to the bundle's ``image_size`` and center-crops (the preprocessing
    is read from the manifest); a batch NHWC of ``image_size``² pictures is encoded as is.
    """

    def __init__(
        self, bundle: Bundle | str | Path, backend: str = "auto", threads: int | None = None,
        precision: str | None = None, load_decoder: bool = True,
    ) -> None:
        """``load_decoder=False``: open the decoder at the first ``decode`` instead of now (a codec that only
        encodes, as ``edgefm quantize`` uses it, then never loads it)."""
        self.bundle = _open(bundle, backend, threads, (DVAE_DECODER,), precision)
        if load_decoder:
            self.bundle.runner(DVAE_DECODER)
        pre = self.bundle.preprocess
        self.image_size = int(pre["image_size"])
        self.grid = int(self.bundle.config["image_grid"])
        self.interpolation = _INTERPOLATION.get(str(pre.get("interpolation", "lanczos")), cv2.INTER_LANCZOS4)
        self.batch_limit = self.bundle.spec(DVAE_DECODER).dims["batch"].max

    @property
    def decoder(self) -> Runner:
        """The dVAE decoder's runner (opened at construction unless ``load_decoder=False``)."""
        return self.bundle.runner(DVAE_DECODER)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """One picture (HWC uint8 RGB, any size) -> ``image_size``² HWC uint8: shortest side, center crop."""
        image = as_rgb_uint8(image)
        h, w = image.shape[:2]
        s = self.image_size
        if min(h, w) != s:
            scale = s / min(h, w)
            nh, nw = (s, max(s, round(w * scale))) if h <= w else (max(s, round(h * scale)), s)
            image = cv2.resize(image, (nw, nh), interpolation=self.interpolation)
            h, w = nh, nw
        top, left = int(round((h - s) / 2)), int(round((w - s) / 2))  # torchvision's center_crop rounding
        return np.ascontiguousarray(image[top : top + s, left : left + s])

    def encode(self, image: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB -> int64 ``[grid, grid]``; NHWC of ``image_size``² -> ``[N, grid, grid]``."""
        if DVAE_ENCODER not in self.bundle.manifest.component_names:
            raise BundleError(
                f"{self.bundle.path} has no dvae_encoder; export it with --dvae-encoder encoder.pkl"
            )
        single = not (isinstance(image, np.ndarray) and image.ndim == 4)
        batch = [self.prepare(image)] if single else [self.prepare(im) for im in image]
        x = np.stack(batch).astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
        runner = self.bundle.runner(DVAE_ENCODER)
        limit = runner.spec.dims["batch"].max
        ids = np.concatenate([runner.run({"image": np.ascontiguousarray(x[s])})["image_tokens"]
                              for s in _batches(len(x), limit)])
        return ids[0] if single else ids

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """int ``[grid, grid]`` -> HWC uint8 RGB; ``[N, grid, grid]`` -> NHWC uint8."""
        ids = np.asarray(ids)
        single = ids.ndim == 2
        ids = ids[None] if single else ids
        g = self.grid
        if ids.ndim != 3 or ids.shape[1:] != (g, g) or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"ids must be integer [{g}, {g}] or [N, {g}, {g}], got {ids.dtype} "
                             f"{list(ids.shape)}")
        vocab = int(self.bundle.config["image_vocab"])
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise InputError(f"ids must be dVAE codes in [0, {vocab - 1}], got [{ids.min()}, {ids.max()}]")
        if not len(ids):
            return np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        out = np.stack(to_uint8(self.decode_float(ids.astype(np.int64))))
        return out[0] if single else out

    def decode_float(self, ids: np.ndarray) -> np.ndarray:
        """int64 ``[N, grid, grid]`` -> float32 NCHW RGB in [0, 1] (the decoder's output, unrounded)."""
        return np.concatenate([self.decoder.run({"image_tokens": np.ascontiguousarray(ids[s])})["image"]
                               for s in _batches(len(ids), self.batch_limit)])


class DalleGenerator:
    """``generate(prompt, n, seed, temperature, top_k, top_p, rerank)`` on a bundle with a prior."""

    def __init__(self, bundle: Bundle | str | Path, backend: str = "auto", threads: int | None = None,
                 tokenizer: Any | None = None, precision: str | None = None, cuda_graphs: bool = False) -> None:
        """``cuda_graphs`` (ort-cuda): replay each prior step as a captured CUDA graph, two per batch size
        taking turns with the KV cache (:mod:`edgefm.runtime.dalle.captured`; two more copies of the prior's
        weights on the device)."""
        self.bundle = _open(bundle, backend, threads, (PRIOR_PREFILL, PRIOR_STEP, DVAE_DECODER), precision)
        if cuda_graphs:
            check_cuda_graphs(self.bundle.backend)
        self._graphs = cuda_graphs
        self._captured: dict[int, Any] = {}  # batch size -> CapturedSteps, the most recent one kept
        cfg = self.bundle.config
        tok = cfg.get("tokenizer", {})
        if tok.get("kind") != "clip_bpe":
            raise BundleError(
                f"{self.bundle.path}: the prior's tokenizer {tok.get('kind')!r} is not supported (this "
                "edgefm tokenizes prompts with CLIP's BPE, 'clip_bpe'); re-export the bundle"
            )
        self.text_len, self.pad_id = int(cfg["text_len"]), int(cfg["pad_id"])
        self.sot_id, self.eot_id = int(tok["sot_id"]), int(tok["eot_id"])
        self.grid = int(cfg["image_grid"])
        self.codec = DvaeCodec(self.bundle)
        self.prefill = self.bundle.runner(PRIOR_PREFILL)
        self.step = self.bundle.runner(PRIOR_STEP)
        self.batch_limit = self.prefill.spec.dims["batch"].max
        self.guidance_scale = float((cfg.get("prior") or {}).get("guidance_scale", 1.0))
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from ..clip.tokenizer import ClipTokenizer

            self._tokenizer = ClipTokenizer()
        return self._tokenizer

    def text_tokens(self, prompt: str) -> tuple[np.ndarray, bool]:
        """int64 ``[text_len]`` fed to the prior for ``prompt`` and whether the prompt was cut."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"the prompt must be a non-empty text, got {prompt!r}")
        ids = [self.sot_id, *self.tokenizer.encode(prompt), self.eot_id]
        return frame_text_ids(ids, self.text_len, self.pad_id, self.eot_id)

    @property
    def empty_text_tokens(self) -> np.ndarray:
        """The empty prompt, ``<start_of_text> <end_of_text>`` then padding: the unconditional row of guidance."""
        return frame_text_ids([self.sot_id, self.eot_id], self.text_len, self.pad_id, self.eot_id)[0]

    def generate(
        self,
        prompt: str,
        n: int = 1,
        seed: int = 0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        rerank: Reranker | None = None,
        progress: bool = False,
        guidance: float | None = None,
    ) -> GenerationResult:
        """``n`` images for ``prompt``; with ``rerank`` (a CLIP model), scores and a best-first order.
        ``guidance`` is the classifier-free guidance scale (None: the bundle's default, 1: none)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"n (the number of images) must be a whole number >= 1, got {n}")
        guidance = self.guidance_scale if guidance is None else guidance
        check_sampling(temperature, top_k, top_p, guidance)
        text, truncated = self.text_tokens(prompt)
        rng = np.random.default_rng(seed)
        # A guided sample takes two rows of the batch (prompt and empty prompt).
        limit = self.batch_limit if guidance == 1 else max(1, self.batch_limit // 2)
        tokens = np.concatenate([
            self.sample_tokens(text, s.stop - s.start, rng, temperature, top_k, top_p, progress, guidance)
            for s in _batches(int(n), limit)
        ])
        images = to_uint8(self.codec.decode_float(tokens))
        result = GenerationResult(prompt, images, tokens, text, truncated, seed, float(guidance))
        if rerank is not None:
            result.scores, result.order = rerank_scores(rerank, images, prompt)
        return result

    def sample_tokens(
        self,
        text: np.ndarray,
        n: int,
        rng: np.random.Generator,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        progress: bool = False,
        guidance: float = 1.0,
    ) -> np.ndarray:
        """Image codes int64 ``[n, grid, grid]`` for text ids ``[text_len]``: prefill once, then one step per
        token with the fixed-size KV cache fed back (kept on the device by IO binding on CUDA). With
        ``guidance`` != 1 the batch holds n prompt rows then n empty-prompt rows."""
        g, t = self.grid, self.text_len
        guided = guidance != 1
        rows = np.repeat(text[None], n, axis=0)
        if guided:
            rows = np.concatenate([rows, np.repeat(self.empty_text_tokens[None], n, axis=0)])
        if self._graphs:
            steps = self._captured_steps(rows.shape[0])
            logits = steps.start(rows)
        else:
            out = self._run(self.prefill, {"text_tokens": rows}, ("k_cache", "v_cache"))
            logits, k, v = out["logits"], out["k_cache"], out["v_cache"]
        tokens = np.empty((n, g * g), np.int64)
        bar = _progress_bar(g, progress)
        try:
            for j in range(g * g):
                if guided:
                    logits = guided_logits(logits[:n], logits[n:], guidance)
                tokens[:, j] = sample_tokens(logits, rng, temperature, top_k, top_p)
                if j + 1 < g * g:
                    fed = np.concatenate([tokens[:, j], tokens[:, j]]) if guided else tokens[:, j].copy()
                    if self._graphs:
                        logits = steps(fed, t + j)
                    else:
                        feeds = {"token": fed, "position": np.array([t + j], np.int64), "k_cache": k,
                                 "v_cache": v}
                        out = self._run(self.step, feeds, ("k_cache_out", "v_cache_out"))
                        logits, k, v = out["logits"], out["k_cache_out"], out["v_cache_out"]
                if bar is not None and (j + 1) % g == 0:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return tokens.reshape(n, g, g)

    def _captured_steps(self, batch: int) -> Any:
        """The captured prefill + steps for this batch size (captured on first use; one batch size is kept, as
        each costs two sessions' weights on the device)."""
        if batch not in self._captured:
            from .captured import CapturedSteps

            self._captured.clear()
            self._captured[batch] = CapturedSteps(self.prefill, self.step, batch, self.text_len)
        return self._captured[batch]

    @staticmethod
    def _run(runner: Any, feeds: dict[str, Any], keep: tuple[str, ...]) -> dict[str, Any]:
        """Run a prior graph; on CUDA the caches stay device-resident ``OrtValue``s between calls."""
        if getattr(runner, "device", "cpu") == "cuda" and hasattr(runner, "run_on_device"):
            outs = runner.run_on_device(feeds, keep=keep)
            return {k: (v if k in keep else v.numpy()) for k, v in outs.items()}
        return runner.run(feeds)


def frame_text_ids(ids: list[int], text_len: int, pad_id: int, eot_id: int) -> tuple[np.ndarray, bool]:
    """``<start_of_text> ... <end_of_text>`` ids as the prior's int64 ``[text_len]`` row: cut to ``text_len``
    (the last id replaced by ``eot_id``), padded with ``pad_id``; and whether it was cut. The trainer frames
    its captions with it too, so the prior is fed at run time exactly what it learned from."""
    truncated = len(ids) > text_len
    if truncated:
        ids = [*ids[: text_len - 1], eot_id]
    row = np.full(text_len, pad_id, np.int64)
    row[: len(ids)] = ids
    return row, truncated


def _progress_bar(rows: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=rows, desc="image rows", unit="row")
