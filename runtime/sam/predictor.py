"""``SamPredictor``: the official predictor's API on exported components, without PyTorch.

``set_image`` runs the image encoder once; each ``predict`` runs only the prompt encoder and the mask
decoder, and upscales only the masks it returns. With a bundle that has them, prompts without a mask input
run one ``prompt_decoder`` call instead, against the image's ``decoder_context`` (computed at the first such
prompt of each image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..backends import Runner, check_cuda_graphs
from ..backends.onnxruntime import _CapturedGraph, recent_graph, shapes_key
from ..bundle import Bundle
from ..errors import InputError
from ..image_prep import ImagePrep, asked_preprocess, open_checked
from .amg_utils import calculate_stability_score
from .mask_upscale import MaskUpscaler
from .spec import CONTEXT, DECODER_CONTEXT, IMAGE_ENCODER, MASK_DECODER, PROMPT_DECODER, PROMPT_ENCODER
from .transforms import (
    as_rgb_uint8,
    normalize_and_pad,
    resize_longest_side,
    resized_shape,
    scale_coords,
    upscale_masks,
)


class SamPredictor:
    """Prompted segmentation of one image at a time.

    Conventions: images HWC uint8 RGB; point_coords (N, 2) XY pixels of the original image; point_labels
    (N,) with 1 = foreground, 0 = background; box (4,) XYXY pixels; mask_input (1, 256, 256) low-res logits
    from a previous call. Sizes are (H, W).
    """

    # Prompt shapes (batch, points, mask or not) whose captured prompt encoder + decoder pair is kept.
    MAX_PROMPT_GRAPHS = 4

    def __init__(self, bundle: Bundle | str | Path, backend: str = "auto", threads: int | None = None,
                 cuda_graphs: bool = False, precision: str | None = None, load_encoder: bool = True,
                 preprocess: str = "auto") -> None:
        """``cuda_graphs`` (ort-cuda): run the encoder, and the prompt encoder + decoder per prompt shape, as
        captured CUDA graphs that share their device buffers: ``set_image`` is one host copy and one replay,
        ``predict`` the point arrays copied in and two replays. Costs a second copy of each component's
        weights in GPU memory (the captured sessions are separate from the plain ones). ``precision``: run that
        precision of the components that have it (e.g. an int8 encoder engine), see :class:`Bundle`.
        ``load_encoder=False``: open the image encoder at the first ``set_image`` instead of now, for a
        predictor fed by :meth:`set_image_embedding` (its bundle may then lack the encoder file).
        ``preprocess``: where ``set_image`` resizes, normalizes and pads, PIL's pixels exactly either way.
        ``"host"``: numpy. ``"device"``: the same integer arithmetic as an ONNX Runtime graph on the encoder's
        device (``runtime/image_prep.py``: the uint8 image is uploaded instead of the float32 tensor).
        ``"auto"``: the device on ONNX Runtime GPU backends, once a check at the first use finds it agrees
        with the host; the host otherwise. :attr:`preprocess_on` says which is in use."""
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle, backend, threads=threads, family="sam",
                                                                        precision=precision)
        pre = self.bundle.preprocess
        self.image_size = int(pre["image_size"])
        self.mean, self.std = pre["mean"], pre["std"]
        self.mask_threshold = float(self.bundle.config.get("mask_threshold", 0.0))
        if load_encoder:  # opened now, so a bad file fails here and the first frame pays no load
            self.bundle.runner(IMAGE_ENCODER)
        self.low_res_size = self.bundle.spec(MASK_DECODER).outputs[1].shape[-1]
        # Prompts without a mask input: one prompt_decoder call against the image's decoder context, where the
        # bundle has both for this backend. Then the prompt encoder + mask decoder only decode prompts with a
        # mask input, and open at the first such prompt (a click-only session never loads their weights, or
        # builds their engines on ort-trt). Bundles exported before the two components, and engines built from
        # such bundles, decode every prompt with the prompt encoder + mask decoder, opened now.
        split = self.bundle.has(DECODER_CONTEXT) and self.bundle.has(PROMPT_DECODER)
        self.context_encoder = self.bundle.runner(DECODER_CONTEXT) if split else None
        self.prompt_decoder = self.bundle.runner(PROMPT_DECODER) if split else None
        self._lead = self.prompt_decoder if split else self.decoder  # the decoder every prompt may run
        if not split:
            self.bundle.runner(PROMPT_ENCODER)
        self._context_graph = None
        # ONNX Runtime on a GPU: chain the encoder into the decoder without a host round trip. (One backend
        # runs every component of a bundle, so the decoder's runner says what the encoder's will be.)
        self._on_device = getattr(self._lead, "device", "cpu") == "cuda" and hasattr(self._lead, "run_on_device")
        if cuda_graphs:  # (on ort-cuda the runners are on the device)
            check_cuda_graphs(self.bundle.backend)
        self._graphs = cuda_graphs
        # "auto" on a GPU and "device" anywhere become "device" once the first use has checked the graph.
        self._preprocess_asked = asked_preprocess(preprocess, self._lead, self.bundle.backend)
        self._prep: ImagePrep | None = None
        self._upscaler: MaskUpscaler | None = None  # made on the first predict on the device
        self._logits_buffer: np.ndarray | None = None  # host upscaling's full-size logits, reused (see upscale)
        self._encoder_graph = None
        self._prompt_graphs: dict[tuple, tuple] = {}  # prompt shapes -> (prompt graph, decoder graph), LRU last
        self.reset_image()

    @property
    def backend(self) -> str:
        return self.bundle.backend

    @property
    def prompt_encoder(self) -> Runner:
        return self.bundle.runner(PROMPT_ENCODER)

    @property
    def decoder(self) -> Runner:
        """The mask decoder's runner (with a prompt decoder in the bundle, opened at the first mask input)."""
        return self.bundle.runner(MASK_DECODER)

    @property
    def encoder(self) -> Runner:
        """The image encoder's runner (opened at construction, or at the first use with ``load_encoder=False``:
        a predictor fed only by :meth:`set_image_embedding` then never loads the encoder's weights)."""
        return self.bundle.runner(IMAGE_ENCODER)

    def reset_image(self) -> None:
        self.features: np.ndarray | None = None
        self._context: dict[str, Any] | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode ``image`` (HWC uint8, RGB unless ``image_format="BGR"``) once for later prompts."""
        if image_format not in ("RGB", "BGR"):
            raise InputError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = as_rgb_uint8(image)
        if image_format == "BGR":
            image = np.ascontiguousarray(image[..., ::-1])
        input_size = resized_shape(*image.shape[:2], self.image_size)
        if self.preprocess_on == "device" and self._prep.fits(image.shape[:2], input_size):
            x = self._prep(image, input_size)
        else:
            x = self.host_pixels(image)
        self.set_preprocessed(x, image.shape[:2], input_size)

    def host_pixels(self, image: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB -> the encoder's input (1, 3, S, S) float32, made on the host (numpy, PIL-exact)."""
        return normalize_and_pad(resize_longest_side(image, self.image_size), self.image_size, self.mean, self.std)

    @property
    def preprocess_on(self) -> str:
        """``"host"`` or ``"device"``: where ``set_image`` preprocesses (decided at the first call for "auto")."""
        if self._preprocess_asked != "host" and self._prep is None:
            self._open_prep()
        return "device" if self._prep is not None else "host"

    def _open_prep(self) -> None:
        s = self.image_size
        self._prep = open_checked(self._lead, self.mean, self.std, (s, s), "bilinear_antialias", self.host_pixels,
                                  lambda h, w: (resized_shape(h, w, s), None), self._preprocess_asked == "device")
        if self._prep is None:
            self._preprocess_asked = "host"

    def set_preprocessed(self, x: np.ndarray, original_size: tuple[int, int], input_size: tuple[int, int]) -> None:
        """``set_image`` with the resize/normalize/pad already done (``x``: 1x3xSxS float32), e.g. by a
        camera pipeline's preprocessing stage. (``x`` may also be the device preprocessing's output.)"""
        on_device = not isinstance(x, np.ndarray)
        if self._graphs:
            # One buffer holds the embedding of every image: the decoder graphs captured for an earlier image
            # read the new one from the same address. With device preprocessing, the encoder is captured
            # reading the buffer that the preprocessing graph writes.
            feeds = {} if on_device else self.encoder.spec.check_feeds({"image": x})
            if self._encoder_graph is None:
                bound = {"image": self._prep.pixels} if self.preprocess_on == "device" else None
                if bound and feeds:
                    bound["image"].update_inplace(feeds.pop("image"))
                self._encoder_graph = _CapturedGraph(self.encoder, feeds, bound=bound)
            else:
                self._encoder_graph.replay(feeds)
            out = {"image_embeddings": self._encoder_graph.outputs["image_embeddings"]}
        elif self._on_device:
            # The embedding stays in GPU memory (an OrtValue) and is bound straight into the decoder.
            out = self.encoder.run_on_device({"image": x}, keep=("image_embeddings",))
        else:
            out = self.encoder.run({"image": x.numpy() if on_device else x})
        self.features, self._context = out["image_embeddings"], None
        self.original_size, self.input_size = tuple(original_size), tuple(input_size)

    def set_image_embedding(self, embedding: np.ndarray, original_size: tuple[int, int]) -> None:
        """Prompt against an embedding computed elsewhere: ``get_image_embedding()`` of a predictor on the same
        bundle (a server running the image encoder, say), for an image of ``original_size`` (H, W) pixels.
        Only the prompt-side components (and the decoder context) run here, never the image encoder."""
        spec = self.bundle.spec(MASK_DECODER)
        want = spec.concrete_shape(spec.inputs[0])
        emb = np.asarray(embedding, dtype=np.float32)
        emb = emb[None] if emb.shape == want[1:] else emb
        if emb.shape != want:
            raise InputError(f"embedding has shape {tuple(np.shape(embedding))}, but this bundle's mask decoder "
                             f"takes {want}: pass get_image_embedding() of a predictor on the same bundle")
        size = tuple(int(v) for v in original_size)
        if len(size) != 2 or min(size) < 1:
            raise InputError(f"original_size must be the image's (H, W) in pixels, got {original_size!r}")
        if self._graphs:
            raise InputError("set_image_embedding does not work with cuda_graphs=True: the captured decoder reads "
                             "the embedding from the captured encoder's buffer; use a predictor without cuda_graphs")
        if self._on_device:
            from ..backends.onnxruntime import ort

            emb = ort().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(emb), self._lead.device, 0)
        self.features, self._context = emb, None
        self.original_size, self.input_size = size, resized_shape(*size, self.image_size)

    def get_image_embedding(self) -> np.ndarray:
        self._need_image()
        return self.features.numpy() if self._on_device else self.features

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks (C, H, W), IoU predictions (C,) and low-res logits (C, 256, 256) for one prompt;
        C = 3 with ``multimask_output`` (the three ambiguity levels), else 1 (the single-mask output)."""
        if point_coords is not None:
            point_coords = np.asarray(point_coords, dtype=np.float32).reshape(1, -1, 2)
            if point_labels is None:
                raise InputError("point_labels must be given with point_coords (1 = foreground, 0 = background)")
            point_labels = np.asarray(point_labels, dtype=np.float32).reshape(1, -1)
        if box is not None:
            box = np.asarray(box, dtype=np.float32).reshape(1, 4)
        if mask_input is not None:
            mask_input = np.asarray(mask_input, dtype=np.float32)
            if mask_input.shape != (1, self.low_res_size, self.low_res_size):
                raise InputError(
                    f"mask_input must have shape (1, {self.low_res_size}, {self.low_res_size}) "
                    f"(the low-res logits of a previous predict), got {mask_input.shape}"
                )
            mask_input = mask_input[None]
        masks, iou, low = self.predict_batch(point_coords, point_labels, box, mask_input, multimask_output,
                                             return_logits)
        return masks[0], iou[0], low[0]

    def predict_batch(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        upscale: bool = True,
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """B prompts in one decoder call. point_coords (B, N, 2) and point_labels (B, N) in original-image
        pixels; boxes (B, 4) XYXY; mask_input (B, 1, 256, 256). Returns masks (B, C, H, W) (bool, or float
        logits with ``return_logits``), IoU predictions (B, C) and low-res logits (B, C, 256, 256).
        ``upscale=False``: masks is None, for a caller that upscales only some of them (:meth:`upscale`)."""
        self._need_image()
        coords, labels = self._prompt_points(point_coords, point_labels, boxes)
        b = coords.shape[0]
        split = mask_input is None and self.prompt_decoder is not None  # one call against the decoder context
        prompt = {"point_coords": coords, "point_labels": labels}
        if mask_input is None and not split:
            prompt.update(mask_input=np.zeros((b, 1, self.low_res_size, self.low_res_size), np.float32),
                          has_mask_input=np.zeros((b,), np.float32))
        elif mask_input is not None:
            prompt.update(mask_input=np.asarray(mask_input, np.float32), has_mask_input=np.ones((b,), np.float32))
        sel = slice(1, None) if multimask_output else slice(0, 1)
        if not self._on_device:
            if split:
                out = self.prompt_decoder.run({**prompt, **self.decoder_context()})
            else:
                out = self.decoder.run({"image_embeddings": self.features, **self.prompt_encoder.run(prompt)})
            low = out["low_res_masks"][:, sel]
            return self.upscale(low, return_logits) if upscale else None, out["iou_predictions"][:, sel], low
        if self._graphs:
            dev = self._replay_prompt(prompt if split else self.prompt_encoder.spec.check_feeds(prompt), split)
        elif split:
            dev = self.prompt_decoder.run_on_device({**prompt, **self.decoder_context()}, keep=("low_res_masks",))
        else:
            emb = self.prompt_encoder.run(prompt)
            dev = self.decoder.run_on_device({"image_embeddings": self.features, **emb}, keep=("low_res_masks",))
        # The logits are upscaled and thresholded where they are (mask_upscale.py; on the CPU, OpenCV is the
        # faster), so only the returned arrays come to the host.
        masks = self._device_upscale(dev["low_res_masks"], sel, return_logits) if upscale else None
        return masks, dev["iou_predictions"].numpy()[:, sel], dev["low_res_masks"].numpy()[:, sel]

    def decoder_context(self) -> dict[str, Any]:
        """The image's decoder context (``decoder_context``'s outputs), computed at the first call per image.
        On a GPU backend the tensors stay on the device (with ``cuda_graphs``: in a captured graph's buffers,
        refilled from the encoder's for each image)."""
        self._need_image()
        if self.context_encoder is None:
            raise InputError(f"the bundle {self.bundle.path} has no {DECODER_CONTEXT} component (exported before "
                             "edgefm had it): re-export it to decode clicks with one prompt_decoder call")
        if self._context is None:
            feeds = {"image_embeddings": self.features}
            if self._graphs:
                if self._context_graph is None:  # reads the captured encoder's output buffer
                    self._context_graph = _CapturedGraph(self.context_encoder, {}, bound=feeds)
                else:
                    self._context_graph.replay()
                self._context = self._context_graph.outputs
            elif self._on_device:
                self._context = self.context_encoder.run_on_device(feeds, keep=CONTEXT)
            else:
                self._context = self.context_encoder.run(feeds)
        return self._context

    def upscale(self, low_res: np.ndarray, return_logits: bool = False,
                stability_offset: float | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Low-res logits (B, C, 256, 256) of the image set now -> masks (B, C, H, W) at its original size:
        bool, or float logits with ``return_logits`` (the official postprocess_masks, then the threshold).
        With ``stability_offset``, also the (B, C) stability scores of the full-size logits (what the automatic
        mask generator filters on; on a GPU they are computed there, so only boolean masks come back)."""
        self._need_image()
        if self._on_device:
            return self._device_upscale(low_res, slice(None), return_logits, stability_offset)
        shape = (*low_res.shape[:2], *self.original_size)
        # Logits only thresholded here go to a buffer kept between calls: a click's three 1500x2250 masks are
        # 40 MB, which malloc maps fresh (and the kernel zeroes) on every call otherwise, 40% of the upscale.
        scratch = None if return_logits else self._scratch(shape)
        logits = upscale_masks(low_res, self.input_size, self.original_size, self.image_size, out=scratch)
        masks = logits if return_logits else logits > self.mask_threshold
        if stability_offset is None:
            return masks
        return masks, calculate_stability_score(logits, self.mask_threshold, stability_offset)

    SCRATCH_BYTES = 64 << 20  # the most host memory kept between calls for full-size logits

    def _scratch(self, shape: tuple[int, ...]) -> np.ndarray | None:
        n = int(np.prod(shape))
        if 4 * n > self.SCRATCH_BYTES:  # (the automatic mask generator's batches: allocated per call)
            return None
        if self._logits_buffer is None or self._logits_buffer.size < n:
            self._logits_buffer = np.empty(n, np.float32)
        return self._logits_buffer[:n].reshape(shape)

    def _device_upscale(self, low_res: Any, channels: slice, return_logits: bool,
                        stability_offset: float | None = None) -> Any:
        if self._upscaler is None:  # CUDA (and CPU) kernels only: not worth a TensorRT engine per image size
            providers = [p for p in self._lead.providers if p[0] != "TensorrtExecutionProvider"]
            self._upscaler = MaskUpscaler(providers, self._lead.device)
        return self._upscaler(low_res, channels, self.input_size, self.original_size, self.image_size,
                              self.mask_threshold, return_logits, stability_offset)

    def _replay_prompt(self, prompt: dict[str, np.ndarray], split: bool) -> dict[str, Any]:
        """Captured-graph predict: the graphs for these prompt shapes (captured on first use, the least recently
        used of more than MAX_PROMPT_GRAPHS released), inputs refilled, replayed. ``split``: the prompt decoder
        alone, bound to the context graph's buffers; else the prompt encoder + mask decoder pair."""
        def capture() -> tuple[_CapturedGraph, ...]:
            if split:
                return (_CapturedGraph(self.prompt_decoder, prompt, bound=self.decoder_context()),)
            pe = _CapturedGraph(self.prompt_encoder, prompt)
            bound = {"image_embeddings": self._encoder_graph.outputs["image_embeddings"],
                     **{n: pe.outputs[n] for n in ("sparse_embeddings", "dense_embeddings")}}
            return pe, _CapturedGraph(self.decoder, {}, bound=bound)

        if split:
            self.decoder_context()  # this image's context in the buffers the decoder graphs read
        # The two kinds never share a key: their prompts have different input names.
        graphs, captured = recent_graph(self._prompt_graphs, shapes_key(prompt), capture, self.MAX_PROMPT_GRAPHS)
        if not captured:  # capturing ran them once already
            graphs[0].replay(prompt)
            for graph in graphs[1:]:
                graph.replay()
        return graphs[-1].outputs

    def _prompt_points(self, point_coords, point_labels, boxes) -> tuple[np.ndarray, np.ndarray]:
        """Official prompt layout in the resized frame: points, then box corners (labels 2, 3); a padding
        point (label -1) when there is no box."""
        if point_coords is None and boxes is None:
            raise InputError("no prompt given: pass point_coords with point_labels, and/or a box")
        h, w = self.original_size
        parts_c, parts_l = [], []
        if point_coords is not None:
            pc = np.asarray(point_coords, np.float32)
            pl = np.asarray(point_labels, np.float32)
            if pc.ndim != 3 or pc.shape[-1] != 2 or pl.shape != pc.shape[:2]:
                raise InputError(f"point_coords must be (B, N, 2) and point_labels (B, N); got {pc.shape}, {pl.shape}")
            bad = (pc[..., 0] < 0) | (pc[..., 0] > w) | (pc[..., 1] < 0) | (pc[..., 1] > h)
            if bad.any():
                x, y = pc[bad][0]
                raise InputError(f"point ({x:g}, {y:g}) is outside the image of size W={w}, H={h}")
            if not np.isin(pl, (0, 1)).all():
                raise InputError("point_labels must be 1 (foreground) or 0 (background)")
            parts_c.append(scale_coords(pc, self.original_size, self.input_size))
            parts_l.append(pl)
        if boxes is not None:
            bx = np.asarray(boxes, np.float32).reshape(-1, 4)
            if ((bx[:, 2] < bx[:, 0]) | (bx[:, 3] < bx[:, 1])).any():
                raise InputError(f"box must be XYXY with x0 <= x1 and y0 <= y1, got {bx.tolist()}")
            if ((bx[:, :2] > [w, h]).any(axis=1) | (bx[:, 2:] < 0).any(axis=1)).any():
                raise InputError(f"box {bx.tolist()} lies outside the image of size W={w}, H={h}")
            parts_c.append(scale_coords(bx.reshape(-1, 2, 2), self.original_size, self.input_size))
            parts_l.append(np.tile(np.array([[2, 3]], np.float32), (bx.shape[0], 1)))
        else:
            n = parts_c[0].shape[0]
            parts_c.append(np.zeros((n, 1, 2), np.float32))
            parts_l.append(-np.ones((n, 1), np.float32))
        if len({p.shape[0] for p in parts_c}) != 1:
            raise InputError("point_coords and boxes must have the same batch size")
        return np.concatenate(parts_c, axis=1), np.concatenate(parts_l, axis=1)

    def _need_image(self) -> None:
        if self.features is None:
            raise InputError("no image is set: call set_image(image) before predict")
