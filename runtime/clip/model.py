"""``ClipModel``: CLIP embeddings and zero-shot classification from an exported bundle (no torch).

Conventions: images are HWC uint8 RGB arrays (gray and RGBA accepted, see ``preprocess``) or image file
paths; embeddings come back L2-normalized float32 ``(N, D)``. Text batches are cut to the longest real
prompt of the batch (up to and including its ``<end_of_text>``): under the causal mask the pooled feature
never sees later positions, so this is exact and saves most of the text encoder's work on short prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import check_cuda_graphs
from ..bundle import Bundle
from ..draw import read_image
from ..errors import BundleError, InputError
from ..image_prep import PREPROCESS, ImagePrep, asked_preprocess, open_checked
from .preprocess import _as_hwc, crop_offset, preprocess, resized_size
from .spec import IMAGE_ENCODER, TEXT_ENCODER
from .tokenizer import ClipTokenizer
from .zero_shot import (
    check_labels,
    ensemble_label_embeddings,
    l2_normalize,
    resolve_templates,
    zero_shot_probs,
)

ImageLike = np.ndarray | str | Path


class ClipModel:
    """CLIP on a bundle made by ``edgefm export clip``.

    Args:
        bundle: the bundle folder (or an open :class:`Bundle` of family "clip").
        backend: "auto", "ort-cpu", "ort-cuda", "ort-trt" or "tensorrt" (see ``Bundle``).
        threads: intra-op threads for ONNX Runtime on the CPU (default: one per core).
        precision: run that precision of the components that have it (e.g. an int8 image encoder), see
            ``Bundle``; default: fp16 on a GPU, fp32 on the CPU.
        preprocess: where ``encode_images`` resizes, crops and normalizes, PIL's pixels either way: "host"
            (numpy), "device" (an ONNX Runtime graph beside the image encoder, ``runtime/image_prep.py``: the
            uint8 images are uploaded instead of float32 tensors; RGBA images stay on the host), or "auto"
            (the device on ONNX Runtime GPU backends once a check at the first use agrees, else the host).
        cuda_graphs: (ort-cuda) run the image encoder as a captured CUDA graph per batch size, its input buffer
            the one device preprocessing writes into: a camera frame is one upload, the preprocessing graph and
            one replay. A second copy of the image encoder's weights in GPU memory per batch size kept (2).
    """

    # Captured image-encoder graphs kept (by batch size), each a session with its own copy of the weights.
    MAX_IMAGE_GRAPHS = 2

    def __init__(
        self, bundle: str | Path | Bundle, backend: str = "auto", threads: int | None = None,
        precision: str | None = None, preprocess: str = "auto", cuda_graphs: bool = False,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle, backend, threads=threads,
                                                                        family="clip", precision=precision)
        if self.bundle.family != "clip":
            raise BundleError(
                f"{self.bundle.path} holds a {self.bundle.family!r} bundle; ClipModel needs 'clip'"
            )
        if cuda_graphs:
            check_cuda_graphs(self.bundle.backend)
        self._graphs = cuda_graphs
        self._image_graphs: dict[tuple, Any] = {}  # batch size -> captured image encoder, most recent last
        cfg, pre = self.bundle.config, self.bundle.preprocess
        try:
            self.embed_dim = int(cfg["embed_dim"])
            self.logit_scale = float(cfg["logit_scale"])
            self.context_length = int(cfg["context_length"])
            self.image_size = int(pre["image_size"])
            self.mean, self.std, self.resize = tuple(pre["mean"]), tuple(pre["std"]), pre["resize"]
            vocab = self.bundle.path / cfg["tokenizer"]
        except KeyError as exc:
            raise BundleError(
                f"{self.bundle.path / 'manifest.json'} lacks CLIP field {exc.args[0]!r}; re-export the bundle"
            ) from None
        if not vocab.is_file():
            raise BundleError(f"{vocab} (the tokenizer vocabulary) is missing from the bundle; re-export it")
        self.tokenizer = ClipTokenizer(vocab, context_length=self.context_length)
        self._label_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], np.ndarray] = {}
        if preprocess not in PREPROCESS:  # resolved at the first image: text-only use never opens that encoder
            raise InputError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
        self._preprocess_asked: str | None = preprocess
        self._prep: ImagePrep | None = None

    @property
    def identity(self) -> dict[str, Any]:
        """What identifies the encoders' weights: the sha256 of each component file."""
        return {c.name: c.sha256 for c in self.bundle.manifest.components if c.format == "onnx"}

    # -- images ---------------------------------------------------------------------------------------

    def preprocess(self, image: ImageLike) -> np.ndarray:
        """One image (array or path) -> float32 ``[3, S, S]`` as the bundle's manifest prescribes."""
        if isinstance(image, (str, Path)):
            image = read_image(image)
        return preprocess(image, self.image_size, self.mean, self.std, self.resize)

    def encode_pixels(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Preprocessed ``[N, 3, S, S]`` float32 -> normalized ``(N, D)``."""
        runner = self.bundle.runner(IMAGE_ENCODER)
        step = _batch_limit(runner.spec, "image_batch", batch_size)
        out = []
        for i in range(0, len(pixels), step):
            chunk = pixels[i : i + step]
            target = self._image_graph(len(chunk)) if self._graphs else runner
            out.append(target.run({"image": chunk})["image_embeds"])
        return l2_normalize(np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32))

    def encode_images(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 32) -> np.ndarray:
        """Images (HWC uint8 RGB arrays or paths) -> L2-normalized float32 ``(N, D)``."""
        if isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            images = [images]
        if len(images) == 0:
            raise InputError("encode_images got no images; pass a list of HWC uint8 RGB arrays or paths.")
        on_device = self.preprocess_on == "device"
        if on_device:  # as many per batch as the encoder takes: the batch is one device buffer
            batch_size = _batch_limit(self.bundle.runner(IMAGE_ENCODER).spec, "image_batch", batch_size)
        out = []
        for i in range(0, len(images), batch_size):
            chunk = [read_image(im) if isinstance(im, (str, Path)) else im for im in images[i : i + batch_size]]
            rgb = [_as_hwc(im) for im in chunk] if on_device else []
            # Alpha is premultiplied on the host only; a picture too large for the device's transient memory
            # (ImagePrep.fits) sends its chunk to the host too.
            if on_device and all(im.shape[2] != 4 and self._prep.fits(im.shape[:2], *self._geometry(*im.shape[:2]))
                                 for im in rgb):
                out.append(self._encode_on_device(rgb))
            else:
                out.append(self.encode_pixels(np.stack([self.preprocess(im) for im in chunk]), batch_size))
        return np.concatenate(out)

    @property
    def preprocess_on(self) -> str:
        """``"host"`` or ``"device"``: where ``encode_images`` preprocesses (decided at the first call)."""
        if self._preprocess_asked is not None and self._prep is None:
            runner, s = self.bundle.runner(IMAGE_ENCODER), self.image_size
            asked = asked_preprocess(self._preprocess_asked, runner, self.bundle.backend)
            self._preprocess_asked = None
            if asked != "host":
                self._prep = open_checked(runner, *self._pixel_stats(), (s, s), self.resize, self.preprocess,
                                          self._geometry, asked == "device")
        return "device" if self._prep is not None else "host"

    def _pixel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std in the graph's 0..255 units (the manifest's are for pixels / 255)."""
        return np.asarray(self.mean, np.float64) * 255, np.asarray(self.std, np.float64) * 255

    def _geometry(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        rh, rw = resized_size(h, w, self.image_size)
        s = self.image_size
        return (rh, rw), (crop_offset(rh, s), crop_offset(rw, s), s, s)

    def _encode_on_device(self, images: list[np.ndarray]) -> np.ndarray:
        import onnxruntime as ort

        runner = self.bundle.runner(IMAGE_ENCODER)
        s = self.image_size
        graph = self._image_graph(len(images)) if self._graphs else None
        batch = graph.inputs["image"] if graph is not None else ort.OrtValue.ortvalue_from_shape_and_type(
            [len(images), 3, s, s], np.float32, runner.device, 0)
        for i, im in enumerate(images):
            rgb = np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im
            self._prep(rgb, *self._geometry(*im.shape[:2]), into=(batch, i))
        if graph is not None:  # the preprocessing wrote into the captured graph's own input buffer
            graph.replay()
            return l2_normalize(graph.outputs["image_embeds"].numpy())
        return l2_normalize(runner.run_on_device({"image": batch})["image_embeds"].numpy())

    def _image_graph(self, batch: int) -> Any:
        """The image encoder captured for ``batch`` images (captured at the first use of that batch size)."""
        from ..backends.onnxruntime import _CapturedGraph, recent_graph

        runner, s = self.bundle.runner(IMAGE_ENCODER), self.image_size
        capture = lambda: _CapturedGraph(runner, {"image": np.zeros((batch, 3, s, s), np.float32)})  # noqa: E731
        return recent_graph(self._image_graphs, (batch,), capture, self.MAX_IMAGE_GRAPHS)[0]

    # -- texts ----------------------------------------------------------------------------------------

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """int64 ``[N, context_length]`` token rows (long texts truncated, end token kept)."""
        return self.tokenizer(list([texts] if isinstance(texts, str) else texts))

    def encode_tokens(self, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Token rows -> normalized ``(N, D)``; each batch cut after its last ``<end_of_text>``."""
        runner = self.bundle.runner(TEXT_ENCODER)
        step = _batch_limit(runner.spec, "text_batch", batch_size)
        out = []
        for i in range(0, len(tokens), step):
            batch = tokens[i : i + step]
            # The end token is each row's largest id (what the graph pools on); keep up to the last one.
            length = int(batch.argmax(axis=1).max()) + 1
            out.append(runner.run({"tokens": np.ascontiguousarray(batch[:, :length])})["text_embeds"])
        return l2_normalize(np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32))

    def encode_texts(self, texts: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> L2-normalized float32 ``(N, D)``."""
        tokens = self.tokenize(texts)
        if len(tokens) == 0:
            raise InputError("encode_texts got no texts; pass a list of strings.")
        return self.encode_tokens(tokens, batch_size)

    # -- zero-shot ------------------------------------------------------------------------------------

    def label_embeddings(
        self, labels: Sequence[str], templates: str | Sequence[str] = "imagenet80"
    ) -> np.ndarray:
        """``(len(labels), D)`` prompt-ensembled unit vectors, cached per (labels, templates)."""
        key = (check_labels(labels), resolve_templates(templates))
        if key not in self._label_cache:
            self._label_cache[key] = ensemble_label_embeddings(self.encode_texts, *key)
        return self._label_cache[key]

    def zero_shot(self, images: ImageLike | Sequence[ImageLike] | np.ndarray, labels: Sequence[str],
                  templates: str | Sequence[str] = "imagenet80", batch_size: int = 32) -> np.ndarray:
        """Probabilities ``(N, len(labels))``: softmax over labels of ``logit_scale * cos(image, label)``.

        ``images`` may also be precomputed normalized image embeddings ``(N, D)`` float32.
        """
        label_emb = self.label_embeddings(labels, templates)
        if isinstance(images, np.ndarray) and images.dtype == np.float32 and images.ndim == 2 \
                and images.shape[1] == self.embed_dim:
            image_emb = images
        else:
            image_emb = self.encode_images(images, batch_size)
        return zero_shot_probs(image_emb, label_emb, self.logit_scale)


def _batch_limit(spec: Any, dim: str, batch_size: int) -> int:
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    return min(batch_size, spec.dims[dim].max)
