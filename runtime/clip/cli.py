"""``edgefm classify`` and ``edgefm index``: CLIP zero-shot classification and image retrieval (no torch).

``register(sub)`` adds both subcommands to the ``edgefm`` parser's subparsers; each command raises
:class:`EdgefmError` subclasses for user mistakes, which the main CLI prints as one paragraph.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import InputError


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
    model = ClipModel(args.bundle, backend=args.backend, threads=args.threads)
    probs = model.zero_shot(args.images, labels, templates=args.templates, batch_size=args.batch_size)
    for path, row in zip(args.images, probs):
        print(path)
        for i in row.argsort(kind="stable")[::-1][: args.top_k]:
            print(f"  {row[i]:.4f}  {labels[i]}")


def cmd_index_build(args: argparse.Namespace) -> None:
    from .index import ImageIndex
    from .model import ClipModel

    model = ClipModel(args.bundle, backend=args.backend, threads=args.threads)
    index = ImageIndex.build(args.folder, model, batch_size=args.batch_size, progress=not args.no_progress,
                             dtype="float16" if args.fp16 else "float32")
    out = index.save(args.out)
    print(f"wrote {out}  ({len(index)} images, {len(index.skipped)} skipped)")
    for path, why in index.skipped.items():
        print(f"  skipped {path}: {why}")


def cmd_index_query(args: argparse.Namespace) -> None:
    from .index import ImageIndex
    from .model import ClipModel

    index = ImageIndex.load(args.index)
    bundle = args.bundle or index.bundle
    if not bundle:
        raise InputError(f"{args.index} does not name its bundle; pass --bundle BUNDLE")
    model = ClipModel(bundle, backend=args.backend, threads=args.threads)
    hits = index.search(args.query, k=args.top_k, model=model)
    for rank, (path, score) in enumerate(hits, 1):
        print(f"{rank:>3}. {score:.4f}  {path}")


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", help="auto, ort-cpu, ort-cuda, ort-trt or tensorrt")
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
    _runtime_args(q)
    q.set_defaults(func=cmd_index_query)
