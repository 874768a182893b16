"""``edgefm classify`` and ``edgefm index``: CLIP zero-shot classification and image retrieval (no torch).

``register(sub)`` adds both subcommands to the ``edgefm`` parser's subparsers; each command raises
:class:`EdgefmError` subclasses for user mistakes, which the main CLI prints as one paragraph.
``index query ... --sheet results.png`` also draws the hits as a picture (:func:`contact_sheet`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..manifest import add_precision_arg

SHEET_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SHEET_GAP, SHEET_TITLE = 6, 28  # contact sheet: pixels between tiles, height of the query row


def _labels(args: argparse.Namespace) -> list[str]:
    from .zero_shot import imagenet_classnames

    if args.imagenet:
        if args.labels:
            raise InputError("pass either --labels or --imagenet, not both")
        return list(imagenet_classnames())
    labels = [lab.strip() for lab in (args.labels or "").split(",") if lab.strip()]
    if not labels:
        raise InputError("--labels is empty: pass comma-separated labels, e.g. --labels 'cat,dog,car', "
                         "or --imagenet for the 1000 ImageNet classes")
    return labels


def cmd_classify(args: argparse.Namespace) -> None:
    from .model import ClipModel

    labels = _labels(args)
    if args.top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {args.top_k}")
    model = ClipModel(args.bundle, backend=args.backend, threads=args.threads, precision=args.precision)
    probs = model.zero_shot(args.images, labels, templates=args.templates, batch_size=args.batch_size)
    for path, row in zip(args.images, probs):
        print(path)
        for i in row.argsort(kind="stable")[::-1][: args.top_k]:
            print(f"  {row[i]:.4f}  {labels[i]}")


def cmd_index_build(args: argparse.Namespace) -> None:
    from .index import ImageIndex
    from .model import ClipModel

    model = ClipModel(args.bundle, backend=args.backend, threads=args.threads, precision=args.precision)
    index = ImageIndex.build(args.folder, model, batch_size=args.batch_size, progress=not args.no_progress,
                             dtype="float16" if args.fp16 else "float32")
    out = index.save(args.out)
    print(f"wrote {out}  ({len(index)} images, {len(index.skipped)} skipped)")
    for path, why in index.skipped.items():
        print(f"  skipped {path}: {why}")


def _fit(image: np.ndarray, cell: int) -> np.ndarray:
    """``image`` scaled to fit a ``cell`` x ``cell`` square (aspect kept), centred on dark grey."""
    import cv2

    h, w = image.shape[:2]
    s = cell / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    tile = np.full((cell, cell, 3), 32, np.uint8)
    y, x = (cell - nh) // 2, (cell - nw) // 2
    tile[y : y + nh, x : x + nw] = small
    return tile


def contact_sheet(hits: list[tuple[str, float]], query: str, cell: int = 192,
                  columns: int | None = None) -> np.ndarray:
    """A picture of search hits: a title row with the query, then one ``cell`` x ``cell`` tile per hit in rank
    order, row by row (``columns`` default ``min(5, len(hits))``), ``SHEET_GAP`` pixels apart, labelled with
    rank, cosine score and file name. A hit whose file can no longer be read gets a dark tile saying so.
    Tile ``i`` (row r, column c) starts at ``(x, y) = (gap + c * (cell + gap), title + r * (cell + gap))``.
    HWC uint8 RGB."""
    from ..draw import put_label, read_image

    if not hits:
        raise InputError("there are no hits to draw on a contact sheet")
    cols, gap = columns or min(5, len(hits)), SHEET_GAP
    rows, title = math.ceil(len(hits) / cols), SHEET_TITLE
    sheet = np.zeros((title + rows * (cell + gap), gap + cols * (cell + gap), 3), np.uint8)
    put_label(sheet, f"query: {query}"[: cols * cell // 8], (gap + 2, 19))
    for i, (path, score) in enumerate(hits):
        r, c = divmod(i, cols)
        y, x = title + r * (cell + gap), gap + c * (cell + gap)
        tile = sheet[y : y + cell, x : x + cell]
        try:
            tile[:] = _fit(read_image(path), cell)
        except InputError:
            put_label(tile, "(unreadable)", (6, cell // 2))
        put_label(tile, f"#{i + 1}  {score:.4f}", (4, 16))
        put_label(tile, Path(path).name[: cell // 7], (4, cell - 6), scale=0.4)
    return sheet


def cmd_index_query(args: argparse.Namespace) -> None:
    from .index import ImageIndex
    from .model import ClipModel

    if args.sheet and Path(args.sheet).suffix.lower() not in SHEET_SUFFIXES:
        raise InputError(f"--sheet {args.sheet!r}: name the contact sheet with one of {list(SHEET_SUFFIXES)}, "
                         "e.g. --sheet results.png")
    if args.cell < 32:
        raise InputError(f"--cell must be at least 32 pixels, got {args.cell}")
    index = ImageIndex.load(args.index)
    bundle = args.bundle or index.bundle
    if not bundle:
        raise InputError(f"{args.index} does not name its bundle; pass --bundle BUNDLE")
    if not args.bundle and not Path(bundle).is_dir():
        raise InputError(f"the bundle that built {args.index} ({bundle}) is no longer there; pass its new "
                         "location with --bundle BUNDLE")
    model = ClipModel(bundle, backend=args.backend, threads=args.threads, precision=args.precision)
    hits = index.search(args.query, k=args.top_k, model=model)
    for rank, (path, score) in enumerate(hits, 1):
        print(f"{rank:>3}. {score:.4f}  {path}")
    if args.sheet:
        from ..draw import write_image

        print(f"wrote {write_image(args.sheet, contact_sheet(hits, args.query, args.cell))}")


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", help="auto, ort-cpu, ort-cuda, ort-trt or tensorrt")
    add_precision_arg(p)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime CPU threads")
    p.add_argument("--batch-size", type=int, default=32)


def register(sub: Any) -> None:
    """Add ``classify`` and ``index`` (``build`` / ``query``) to the ``edgefm`` subparsers."""
    c = sub.add_parser("classify", help="zero-shot classification of images with a CLIP bundle")
    c.add_argument("bundle", help="CLIP bundle (edgefm export clip ...)")
    c.add_argument("images", nargs="+", metavar="IMAGE")
    c.add_argument("--labels", help="comma-separated labels, e.g. 'cat,dog,car'")
    c.add_argument("--imagenet", action="store_true", help="use the 1000 ImageNet class names as labels")
    c.add_argument("--templates", default="imagenet80",
                   help="prompt templates: imagenet80 (OpenAI's 80), imagenet_simple (7) or simple")
    c.add_argument("--top-k", "--top", dest="top_k", type=int, default=5, help="labels shown per image")
    _runtime_args(c)
    c.set_defaults(func=cmd_classify)

    idx = sub.add_parser("index", help="build or search a CLIP image index")
    isub = idx.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="embed every image of a folder")
    b.add_argument("bundle", help="CLIP bundle")
    b.add_argument("folder", help="folder of images (searched recursively)")
    b.add_argument("--out", required=True, help="index folder to write")
    b.add_argument("--fp16", action="store_true", help="store embeddings as float16 (half the size)")
    b.add_argument("--no-progress", action="store_true")
    _runtime_args(b)
    b.set_defaults(func=cmd_index_build)
    q = isub.add_parser("query", aliases=["search"], help="find the images closest to a text or an image")
    q.add_argument("index", help="index folder (edgefm index build ...)")
    q.add_argument("query", help="a text, or the path of an image")
    q.add_argument("--top-k", "-k", dest="top_k", type=int, default=5)
    q.add_argument("--bundle", help="CLIP bundle (default: the one that built the index)")
    q.add_argument("--sheet", metavar="PICTURE", help="also write a contact sheet of the hits, e.g. results.png")
    q.add_argument("--cell", type=int, default=192, help="contact sheet tile size in pixels")
    _runtime_args(q)
    q.set_defaults(func=cmd_index_query)
