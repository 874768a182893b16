"""The two sides of ``sam_cpu.py``, each served in its own child process over a JSON-lines pipe: official
segment-anything (PyTorch) and edgefm (ONNX Runtime). Only numpy and the standard library at import time: the
edgefm child must provably never import torch."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import timed

IMAGE_HW = (1500, 2250)  # the non-square photo, (H, W)
POINT_XY = (1310.0, 640.0)  # one foreground click, XY pixels of that photo
SEED = 0
OFFICIAL = "official"
PARTS = ("decoder", "upscale", "threshold")


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory of this process now (VmRSS) or its peak so far (VmHWM), MiB."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field))
    return int(line.split()[1]) / 1024


def scene(h: int, w: int, seed: int = SEED) -> np.ndarray:
    """A smooth gradient with a few filled discs and squares: HWC uint8 RGB, something to segment."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 200, yy / h * 200, (xx + yy) / (w + h) * 150 + 50], -1).astype(np.uint8)
    for _ in range(4):
        color = rng.integers(0, 255, 3).astype(np.uint8)
        cx, cy = rng.integers(w // 5, 4 * w // 5), rng.integers(h // 5, 4 * h // 5)
        r = rng.integers(min(h, w) // 10, min(h, w) // 4)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        img[disc if rng.random() < 0.5 else (abs(xx - cx) <= r) & (abs(yy - cy) <= r)] = color
    return img


# --- the two sides: the same operations, served by a child process over a JSON-lines pipe ---


def official_sam(c: dict[str, Any], state_dict: dict[str, Any]) -> Any:
    """segment-anything's ``Sam`` with the numbers of an edgefm SamConfig given as a dict (for vit_b:
    ``sam_model_registry["vit_b"]``), holding ``state_dict`` (strict), in eval mode: the tests' wiring
    (``tests/sam_fixtures.py``), so that the benchmarks time the model the tests check."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from edgefm.models.sam import SamConfig
    from sam_fixtures import official_sam as wired

    return wired(SamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}), state_dict)


class OfficialSide:
    """segment-anything's Sam and SamPredictor, PyTorch eager, fp32."""

    def __init__(self, work: Path, threads: int) -> None:
        import torch
        from segment_anything import SamPredictor

        self.torch = torch
        torch.set_num_threads(threads)
        self.rss_after_imports = rss_mb()
        c = json.loads((work / "config.json").read_text())
        # What sam_model_registry does with a checkpoint: torch.load, then a strict load_state_dict.
        self.sam = official_sam(c, torch.load(work / "weights.pt", weights_only=True))
        self.predictor = SamPredictor(self.sam)
        self.x = torch.from_numpy(np.load(work / "encoder_input.npy"))
        self.image = np.load(work / "image.npy")
        self.info = {"torch_threads": torch.get_num_threads(), "backend": "PyTorch eager, CPU, fp32"}

    def image_encoder(self) -> np.ndarray:
        with self.torch.inference_mode():
            return self.sam.image_encoder(self.x).numpy()

    def preprocess(self):
        """set_image without the encoder: PIL resize, to tensor, normalize and pad."""
        p = self.predictor
        x = self.torch.as_tensor(p.transform.apply_image(self.image)).permute(2, 0, 1).contiguous()[None]
        return self.sam.preprocess(x)

    def decode(self):
        """predict_torch up to the low-res logits (the official predict runs under no_grad)."""
        p, sam = self.predictor, self.sam
        torch = self.torch
        pts = torch.as_tensor(p.transform.apply_coords(np.array([POINT_XY]), p.original_size))[None].float()
        with torch.no_grad():
            sparse, dense = sam.prompt_encoder(points=(pts, torch.ones(1, 1, dtype=torch.int)), boxes=None,
                                               masks=None)
            return sam.mask_decoder(image_embeddings=p.features, image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=True)[0]

    def upscale(self, low):
        with self.torch.no_grad():
            return self.sam.postprocess_masks(low, self.predictor.input_size, self.predictor.original_size)

    def threshold(self, masks) -> np.ndarray:
        return (masks > self.sam.mask_threshold)[0].numpy()


class EdgefmSide:
    """edgefm's torch-free SamPredictor on an exported bundle, ONNX Runtime CPU."""

    def __init__(self, work: Path, threads: int, bundle: str) -> None:
        import cv2
        from edgefm.runtime.sam import SamPredictor, transforms

        self.transforms = transforms
        self.rss_after_imports = rss_mb()
        self.predictor = p = SamPredictor(bundle, backend="ort-cpu", threads=threads)
        self.x = np.load(work / "encoder_input.npy")
        self.image = np.load(work / "image.npy")
        so = p.encoder.session.get_session_options()
        self.info = {"ort_intra_op_threads": so.intra_op_num_threads, "backend": p.backend,
                     "ort_inter_op_threads": so.inter_op_num_threads,
                     "ort_graph_optimization": str(so.graph_optimization_level),
                     "ort_providers": p.encoder.session.get_providers(),
                     "opencv_threads": cv2.getNumThreads(),
                     "precision": {c: p.bundle.entry(c).precision for c in ("image_encoder", "mask_decoder")}}

    def image_encoder(self) -> np.ndarray:
        return self.predictor.encoder.run({"image": self.x})["image_embeddings"]

    def preprocess(self) -> np.ndarray:
        return self.predictor.host_pixels(self.image)

    def decode(self) -> np.ndarray:
        """The predictor's decoding of one click to low-res logits: one prompt_decoder call against the
        image's decoder context where the bundle has them, else prompt encoder + mask decoder."""
        p = self.predictor
        return p.predict_batch(np.array([[POINT_XY]], np.float32), np.ones((1, 1), np.float32), upscale=False)[2]

    def upscale(self, low: np.ndarray) -> np.ndarray:
        p = self.predictor
        return self.transforms.upscale_masks(low, p.input_size, p.original_size, p.image_size)

    def threshold(self, masks: np.ndarray) -> np.ndarray:
        return masks[0] > self.predictor.mask_threshold


def time_parts(side, n: int) -> dict[str, list[float]]:
    """predict split in three, each step timed on the previous step's output."""
    out: dict[str, list[float]] = {k: [] for k in PARTS}
    for _ in range(n):
        t0 = time.perf_counter()
        low = side.decode()
        t1 = time.perf_counter()
        masks = side.upscale(low)
        t2 = time.perf_counter()
        side.threshold(masks)
        t3 = time.perf_counter()
        for k, dt in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2)):
            out[k].append(dt)
    return out


def serve(name: str, work: Path, threads: int, bundle: str | None) -> None:
    """Child process: answer the parent's JSON-line commands on the original stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries go to stderr, never into the protocol
    t0 = time.perf_counter()
    side = OfficialSide(work, threads) if name == OFFICIAL else EdgefmSide(work, threads, bundle)
    p = side.predictor
    ops = {"image_encoder": side.image_encoder, "preprocess": side.preprocess,
           "set_image": lambda: p.set_image(side.image),
           "predict": lambda: p.predict(np.array([POINT_XY]), np.array([1]), multimask_output=True)}
    proto.write(json.dumps({**side.info, "load_s": time.perf_counter() - t0, "rss_after_load_mb": rss_mb(),
                            "rss_after_imports_mb": side.rss_after_imports}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["what"] in ("predict", "parts") and p.features is None:
            p.set_image(side.image)
        if cmd["op"] == "time" and cmd["what"] == "parts":
            time_parts(side, cmd["warmup"])
            reply: dict[str, Any] = time_parts(side, cmd["n"])
        elif cmd["op"] == "time":
            timed(ops[cmd["what"]], cmd["warmup"])
            reply = {cmd["what"]: timed(ops[cmd["what"]], cmd["n"])}
        else:  # "outputs", for the agreement check: same weights and inputs should give the same outputs
            masks, scores, _ = ops["predict"]()
            np.savez(cmd["path"], embeddings=side.image_encoder(), masks=masks, scores=scores)
            reply = {}
        proto.write(json.dumps(reply) + "\n")
    # VmHWM, not the parent's wait4/RUSAGE_CHILDREN maxrss: a child forked from a big parent inherits the
    # parent's resident set at fork time into that figure (it read 4.3 GB for every side here).
    proto.write(json.dumps({"torch_imported": "torch" in sys.modules, "peak_rss_mb": rss_mb("VmHWM")}) + "\n")
