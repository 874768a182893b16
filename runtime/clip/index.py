"""``ImageIndex``: a folder of images embedded by a CLIP bundle, searched by text or by image.

An index is a folder: ``embeddings.npz`` (``embeddings``: ``(N, D)`` L2-normalized, float32 or float16) and
``index.json`` (image paths in row order, the files skipped as unreadable with why, the bundle's folder and
identity: the sha256 of its encoder files). Scores are cosine similarities; results are sorted by score,
highest first (ties keep file order).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..draw import read_image
from ..errors import InputError
from .model import ClipModel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
EMBEDDINGS = "embeddings.npz"
META = "index.json"


def list_images(source: str | Path | Iterable[str | Path]) -> list[Path]:
    """The image files of a folder (recursive, sorted) or the given list of files, in order."""
    if isinstance(source, (str, Path)):
        root = Path(source)
        if root.is_dir():
            return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if root.is_file():
            return [root]
        raise InputError(f"{str(root)!r} is neither a folder nor a file; pass a folder of images or files")
    return [Path(p) for p in source]


def _bounded_map(pool: ThreadPoolExecutor, fn, items: list[Path], window: int):
    """``(item, fn(item))`` in order with at most ``window`` results pending (``pool.map`` would decode the
    whole folder ahead of the encoder and hold every preprocessed image in memory)."""
    futures: deque = deque()
    for item in items:
        futures.append((item, pool.submit(fn, item)))
        if len(futures) >= window:
            path, fut = futures.popleft()
            yield path, fut.result()
    while futures:
        path, fut = futures.popleft()
        yield path, fut.result()


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class ImageIndex:
    """Normalized image embeddings with their file paths (row i is ``paths[i]``)."""

    def __init__(self, paths: Sequence[str], embeddings: np.ndarray, identity: dict[str, Any],
                 skipped: dict[str, str] | None = None, bundle: str | None = None,
                 model: ClipModel | None = None) -> None:
        if len(paths) != len(embeddings):
            raise InputError(f"index has {len(paths)} paths but {len(embeddings)} embeddings")
        self.paths = [str(p) for p in paths]
        self.embeddings = embeddings
        self.identity = identity
        self.skipped = dict(skipped or {})
        self.bundle = bundle
        self.model = model
        if model is not None:
            self._check_model(model)

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def build(cls, source: str | Path | Iterable[str | Path], model: ClipModel, batch_size: int = 32,
              workers: int | None = None, progress: bool = True, dtype: str = "float32") -> ImageIndex:
        """Embed every readable image of ``source`` (a folder, searched recursively, or a list of files).

        Decoding and preprocessing run in a thread pool (OpenCV and numpy release the GIL) while the
        encoder runs; unreadable files are skipped and listed in ``skipped`` (path -> reason).
        """
        if dtype not in ("float32", "float16"):
            raise InputError(f"dtype must be float32 or float16, got {dtype!r}")
        files = list_images(source)
        if not files:
            raise InputError(f"no image files found in {source!s}; expected {sorted(IMAGE_SUFFIXES)}")

        def load(path: Path) -> np.ndarray | str:
            try:
                return model.preprocess(read_image(path))
            except Exception as exc:  # a corrupt file must not stop a long build
                return f"{type(exc).__name__}: {exc}"

        from tqdm import tqdm

        kept: list[str] = []
        chunks: list[np.ndarray] = []
        skipped: dict[str, str] = {}
        pending: list[np.ndarray] = []
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool, \
                tqdm(total=len(files), desc="indexing", unit="img", disable=not progress) as bar:
            for path, item in _bounded_map(pool, load, files, window=4 * batch_size):
                bar.update(1)
                if isinstance(item, str):
                    skipped[str(path)] = item
                    continue
                kept.append(str(path))
                pending.append(item)
                if len(pending) == batch_size:
                    chunks.append(model.encode_pixels(np.stack(pending), batch_size))
                    pending = []
            if pending:
                chunks.append(model.encode_pixels(np.stack(pending), batch_size))
        if not kept:
            raise InputError(f"none of the {len(files)} files in {source!s} could be read as an image")
        emb = np.concatenate(chunks).astype(dtype)
        return cls(kept, emb, model.identity, skipped, str(model.bundle.path.resolve()), model)

    def _check_model(self, model: ClipModel) -> None:
        if model.identity != self.identity:
            raise InputError(
                f"This index was built with another CLIP bundle ({self.bundle}) than {model.bundle.path}: "
                "their embeddings are not comparable. Search it with the bundle that built it, or rebuild "
                "the index with this one."
            )

    def query_embedding(self, query: str | np.ndarray | Path, model: ClipModel) -> np.ndarray:
        """Text, an image (HWC uint8 array or path), or an embedding ``(D,)`` -> a unit vector ``(D,)``."""
        if isinstance(query, str) and not Path(query).is_file():
            if Path(query).suffix.lower() in _IMAGE_SUFFIXES and " " not in query:
                # "photos/dgo.jpg" is a mistyped path far more often than a text query
                raise InputError(f"image {query!r} does not exist; to search for that text, add a word to it")
            return model.encode_texts([query])[0]
        if isinstance(query, np.ndarray) and query.ndim == 1:
            return (query / np.linalg.norm(query)).astype(np.float32)
        return model.encode_images([query])[0]

    def search(self, query: str | np.ndarray | Path, k: int = 5,
               model: ClipModel | None = None) -> list[tuple[str, float]]:
        """The ``k`` best ``(path, cosine)`` pairs for ``query``, highest score first."""
        model = model or self.model
        if model is None:
            raise InputError("search needs a ClipModel: pass model=..., or ImageIndex.load(path, model)")
        self._check_model(model)
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        q = self.query_embedding(query, model)
        scores = self.embeddings.astype(np.float32) @ q
        order = np.argsort(-scores, kind="stable")[:k]
        return [(self.paths[i], float(scores[i])) for i in order]

    def save(self, path: str | Path) -> Path:
        """Write the index folder ``path`` (replaced if it exists; written beside it, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        np.savez(tmp / EMBEDDINGS, embeddings=self.embeddings)
        meta = {"format": "edgefm-clip-index", "version": 1, "paths": self.paths, "skipped": self.skipped,
                "bundle": self.bundle, "identity": self.identity, "dtype": str(self.embeddings.dtype)}
        (tmp / META).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        else:
            os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, model: ClipModel | None = None) -> ImageIndex:
        """Read an index folder; with ``model``, refuse it if another bundle built it."""
        path = Path(path)
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
            with np.load(path / EMBEDDINGS) as data:
                emb = data["embeddings"]
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(
                f"{path} is not a readable edgefm image index ({type(exc).__name__}: {exc}); "
                "build one with `edgefm index build BUNDLE FOLDER --out INDEX`"
            ) from None
        return cls(meta["paths"], emb, meta["identity"], meta.get("skipped"), meta.get("bundle"), model)
