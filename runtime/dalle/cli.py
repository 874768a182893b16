"""``edgefm generate`` and ``edgefm dvae``: DALL·E from the command line (no torch).

``register(sub)`` adds both subcommands to the ``edgefm`` parser's subparsers; each command raises
:class:`EdgefmError` subclasses for user mistakes, which the main CLI prints as one paragraph.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np

from ..draw import put_label, read_image, write_image
from ..errors import InputError
from ..manifest import add_precision_arg


def image_grid(
    images: list[np.ndarray], labels: list[str] | None = None, columns: int | None = None
) -> np.ndarray:
    """Tiles HWC uint8 images of one size row by row (``columns`` default ceil(sqrt(n))), each with its label
    at the top-left; empty cells stay black. Returns ``(rows * H, columns * W, 3)``."""
    if not images:
        raise InputError("no images to put in a grid")
    h, w = images[0].shape[:2]
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    canvas = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        tile = canvas[r * h : (r + 1) * h, c * w : (c + 1) * w]
        tile[:] = image
        if labels:
            put_label(tile, labels[i], (3, 14), scale=0.4 if w < 160 else 0.5)
    return canvas


def load_reranker(bundle: str, backend: str, threads: int | None = None) -> Any:
    """The CLIP runtime model of ``--rerank`` (imported only when asked for), on the same backend and
    threads as the generator."""
    try:
        from ..clip import ClipModel
    except ImportError as exc:
        raise InputError(
            f"--rerank {bundle!r} needs the CLIP runtime (edgefm.runtime.clip.ClipModel), which this edgefm "
            "installation does not provide; update edgefm or leave out --rerank"
        ) from exc
    model = ClipModel(bundle, backend=backend, threads=threads)
    missing = [m for m in ("encode_images", "encode_texts") if not hasattr(model, m)]
    if missing:
        raise InputError(f"--rerank: the CLIP model lacks {missing}; update edgefm or leave out --rerank")
    return model


def cmd_generate(args: argparse.Namespace) -> None:
    from .generator import DalleGenerator

    if args.n < 1:
        raise InputError(f"-n must be at least 1, got {args.n}")
    reranker = load_reranker(args.rerank, args.backend, args.threads) if args.rerank else None
    gen = DalleGenerator(args.bundle, backend=args.backend, threads=args.threads, precision=args.precision,
                         cuda_graphs=args.cuda_graph)
    t0 = time.perf_counter()
    result = gen.generate(args.prompt, n=args.n, seed=args.seed, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, rerank=reranker, progress=not args.no_progress,
                          guidance=args.guidance)
    seconds = time.perf_counter() - t0
    if result.truncated:
        print(f"note: the prompt is longer than the prior's {gen.text_len} text tokens and was cut")
    order = list(result.order) if result.order is not None else list(range(len(result.images)))
    if result.scores is not None:
        labels = [f"#{i} {result.scores[i]:.3f}" for i in order]
        for rank, i in enumerate(order):
            print(f"{rank + 1:>3}. sample #{i}  CLIP score {result.scores[i]:.4f}")
    else:
        labels = [f"#{i}" for i in order]
    write_image(args.out, image_grid([result.images[i] for i in order], labels))
    print(f"wrote {args.out}  ({len(order)} images, seed {args.seed}, guidance {result.guidance:g}, "
          f"{seconds:.1f} s on {gen.bundle.backend})")
    if args.tokens_out:
        np.savez_compressed(args.tokens_out, tokens=result.tokens, text_tokens=result.text_tokens,
                            scores=result.scores if result.scores is not None else np.zeros(0))
        print(f"wrote {args.tokens_out}")


def cmd_dvae(args: argparse.Namespace) -> None:
    from .generator import DvaeCodec

    codec = DvaeCodec(args.bundle, backend=args.backend, threads=args.threads, precision=args.precision)
    image = codec.prepare(read_image(args.image))
    ids = codec.encode(image)
    recon = codec.decode(ids)
    mse = float(np.mean((recon.astype(np.float64) - image) ** 2))
    psnr = 10 * math.log10(255.0**2 / mse) if mse > 0 else float("inf")
    write_image(args.out, np.concatenate([image, recon], axis=1) if args.compare else recon)
    print(f"wrote {args.out}  ({ids.shape[0]}x{ids.shape[1]} codes, {len(np.unique(ids))} distinct; "
          f"PSNR {psnr:.2f} dB vs the {codec.image_size}x{codec.image_size} input crop)")


def add_export_args(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``edgefm export dalle`` (run them with ``edgefm.export.dalle.run_export``).

    Lives here, free of torch, so that building the ``edgefm`` parser never imports the [export] extra.
    Flags the parser already has (``--out``, ``--precision``, ``--opset``, ``--overwrite``,
    ``--no-parity-gate`` when shared with other families) are left alone.
    """

    def add(flag: str, **kwargs: Any) -> None:
        try:
            parser.add_argument(flag, **kwargs)
        except argparse.ArgumentError:  # already defined by a shared export parser
            pass

    add("--dvae-decoder", help="dVAE decoder: OpenAI's decoder.pkl or a state dict")
    add("--dvae-encoder", help="dVAE encoder: OpenAI's encoder.pkl or a state dict (optional)")
    add("--prior", help="prior state dict (.safetensors / .pt) (optional)")
    add("--prior-config", help="prior sizes: a named size (tiny, small ...) or a JSON file of PriorConfig "
        "fields (default: <prior stem>.json beside the prior)")
    add("--image-size", type=int, help="decoded image side (default 8 x prior grid, else 256)")
    add("--out", required=True, help="bundle folder to write")
    add("--precision", default="fp32", choices=["fp32", "fp16"])
    add("--opset", type=int, default=17)
    add("--overwrite", action="store_true")
    add("--no-parity-gate", action="store_true", help="write the bundle even if parity fails")


def register(sub: Any) -> None:
    """Add ``generate`` and ``dvae`` to the ``edgefm`` subparsers."""
    g = sub.add_parser("generate", help="text -> images with a DALL·E bundle; writes a grid picture")
    g.add_argument("bundle", help="DALL·E bundle with a prior (edgefm export dalle ... --prior)")
    g.add_argument("prompt")
    g.add_argument("-n", type=int, default=8, help="number of images (one batch)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely codes")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the bundle's; 1 = none; needs a prior trained "
                   "with empty captions)")
    g.add_argument("--rerank", metavar="CLIP_BUNDLE",
                   help="order the images by CLIP similarity to the prompt (the paper's reranking)")
    g.add_argument("--out", required=True, help="grid picture (.png / .jpg)")
    g.add_argument("--tokens-out", help="also save the token grids (and scores) as .npz")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--cuda-graph", action="store_true",
                   help="ort-cuda: replay each prior step as a captured CUDA graph (two more copies of the "
                        "prior's weights on the GPU)")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("dvae", help="round-trip a picture through the dVAE codes of a DALL·E bundle")
    d.add_argument("bundle", help="DALL·E bundle with dvae_encoder and dvae_decoder")
    d.add_argument("image")
    d.add_argument("--out", required=True, help="reconstruction picture (.png / .jpg)")
    d.add_argument("--compare", action="store_true",
                   help="write the input crop and the reconstruction side by side")
    d.set_defaults(func=cmd_dvae)

    for cmd in (g, d):
        cmd.add_argument("--backend", default="auto", help="auto | ort-cpu | ort-cuda | ort-trt | tensorrt")
        cmd.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime")
        add_precision_arg(cmd)
