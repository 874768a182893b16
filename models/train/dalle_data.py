"""The data of the shapes DALL·E training (:mod:`edgefm.models.train.dalle`): scenes drawn by index, batched,
optionally ahead of the loop in worker processes, and captions framed as the runtime frames prompts."""

from __future__ import annotations

import itertools
import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from edgefm.models.dalle import PriorConfig
from edgefm.runtime import shapes
from edgefm.runtime.clip.tokenizer import ClipTokenizer
from edgefm.runtime.dalle.generator import frame_text_ids

IMAGE_SIZE = 64


def scene(stream: int, index: int, scene_share: float) -> shapes.Scene:
    """Scene ``index`` of a stream: a multi-object scene with probability ``scene_share``, else one object."""
    pick = np.random.default_rng([stream, index, 7]).random()
    if pick < scene_share:
        return shapes.random_scene(stream, index, IMAGE_SIZE, n_objects=(1, 3))
    return shapes.single_object(stream, index, IMAGE_SIZE)


def scene_arrays(stream: int, start: int, n: int, scene_share: float) -> tuple[np.ndarray, list[str]]:
    """float32 ``[n, 3, 64, 64]`` in [0, 1] and the captions of scenes ``start .. start + n - 1``."""
    items = [scene(stream, i, scene_share) for i in range(start, start + n)]
    images = np.stack([s.image for s in items]).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return images, [s.caption for s in items]


def scene_batch(stream: int, start: int, n: int, scene_share: float) -> tuple[torch.Tensor, list[str]]:
    """:func:`scene_arrays` with the images as a tensor."""
    images, captions = scene_arrays(stream, start, n, scene_share)
    return torch.from_numpy(images), captions


def scene_batches(
    jobs: Iterable[tuple[int, int, int, float]], workers: int = 0
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """:func:`scene_batch` of each job, in order. With ``workers`` > 0, that many processes draw the next
    ``2 · workers`` batches ahead (bounded, so a long run does not queue its whole data); the batches are the
    same either way, a scene being a function of its index. Close the iterator to stop the workers."""
    if workers <= 0:
        yield from (scene_batch(*job) for job in jobs)
        return
    jobs = iter(jobs)
    # fork: the workers only draw with numpy / OpenCV, never touching torch (nor a CUDA context).
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pending = deque(pool.apply_async(scene_arrays, job) for job in itertools.islice(jobs, 2 * workers))
        while pending:
            images, captions = pending.popleft().get()
            for job in itertools.islice(jobs, 1):
                pending.append(pool.apply_async(scene_arrays, job))
            yield torch.from_numpy(images), captions


class CaptionIds:
    """Captions -> int64 ``[text_len]`` rows, framed as the runtime's ``DalleGenerator.text_tokens``."""

    def __init__(self, config: PriorConfig, tokenizer: ClipTokenizer | None = None) -> None:
        self.tokenizer = tokenizer or ClipTokenizer()
        self.text_len, self.pad_id = config.text_len, config.pad_id
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, caption: str) -> np.ndarray:
        if caption not in self._cache:
            tok = self.tokenizer
            ids = [tok.sot_token_id, *tok.encode(caption), tok.eot_token_id]
            self._cache[caption] = frame_text_ids(ids, self.text_len, self.pad_id, tok.eot_token_id)[0]
        return self._cache[caption]
