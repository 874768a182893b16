"""The ``edgefm`` command. Runtime commands import no torch; ``export`` loads the [export] extra lazily.

User mistakes end with one clear paragraph on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from .bench import register as register_bench
from .camera.cli import register as register_camera
from .clip.cli import register as register_clip
from .dalle.cli import add_export_args as add_dalle_export_args
from .dalle.cli import register as register_dalle
from .errors import EdgefmError, InputError, require
from .manifest import add_precision_arg


def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in n:
        raise InputError(f"{what} {text!r} must be {' or '.join(str(k) for k in n)} comma-separated numbers")
    return values


def _progress(msg: str) -> None:
    print(f"edgefm: {msg}", file=sys.stderr, flush=True)


def cmd_export(args: argparse.Namespace) -> None:
    require("torch", "export", "`edgefm export`")
    require("onnx", "export", "`edgefm export`")
    if args.family == "sam":
        from edgefm.export.sam import export_sam

        if args.checkpoint is None or not Path(args.checkpoint).is_file():
            raise InputError(f"--checkpoint {args.checkpoint!r} does not exist; pass the official .pth file")
        out = export_sam(args.checkpoint, args.out, args.variant, precision=args.precision, opset=args.opset,
                         parity_gate=not args.no_parity_gate, overwrite=args.overwrite, progress=_progress,
                         attention=args.attention)
    elif args.family == "clip":
        from edgefm.export.clip import export_clip

        if args.checkpoint is None or not Path(args.checkpoint).is_file():
            raise InputError(f"--checkpoint {args.checkpoint!r} does not exist; pass e.g. OpenAI's ViT-B-32.pt")
        out = export_clip(args.checkpoint, args.out, precision=args.precision, quick_gelu=args.quick_gelu,
                          overwrite=args.overwrite, parity_gate=not args.no_parity_gate, progress=_progress,
                          opset=args.opset, attention=args.attention)
    else:
        from edgefm.export.dalle import run_export

        if args.attention != "plain":
            raise InputError(f"--attention {args.attention} applies to sam and clip; the DALL·E components "
                             "export plain attention only (leave --attention out)")
        out = run_export(args, progress=_progress)
    print(f"wrote {out}")
    _print_manifest(out, brief=True)


def _print_manifest(path: Path, brief: bool = False) -> None:
    from .manifest import read_manifest

    m = read_manifest(path)
    print(f"bundle   {path}\nfamily   {m.family}  variant {m.variant}  schema {m.schema_version}  "
          f"edgefm {m.edgefm_version}  created {m.created}")
    src = m.source
    digest = str(src.get("sha256", "-"))[:16]
    print(f"source   {src.get('checkpoint', '-')}  sha256 {digest}  ({src.get('loader', '')})")
    if not brief:
        print("preprocess " + json.dumps(m.preprocess))
        if m.config:
            print("config   " + json.dumps(m.config))
    print("components:")
    for c in m.components:
        size = sum((path / f).stat().st_size for f in [c.file, *c.extra_files] if (path / f).exists())
        print(f"  {c.name:<16} {c.format:<8} {c.precision:<5} {c.file} ({size / 2**20:.1f} MiB)")
        if not brief:
            for kind, tensors in (("in ", c.spec.inputs), ("out", c.spec.outputs)):
                for t in tensors:
                    print(f"      {kind} {t.name:<20} {t.dtype:<8} {list(t.shape)}")
            if c.spec.dims:
                print("      dims " + ", ".join(f"{k}=[{r.min}..{r.max}] opt {r.opt}" for k, r in c.spec.dims.items()))
            if c.format == "tensorrt":
                print("      " + _engine_line(c.info))
    if m.parity:
        gate = m.parity.get("gate", True)
        print(f"parity vs {m.parity.get('reference', 'PyTorch')} on {m.parity.get('backend', '?')}"
              + ("" if gate else "  (GATE DISABLED at export)"))
        for name, rep in m.parity.items():
            if not isinstance(rep, dict) or "outputs" not in rep:
                continue
            for out, r in rep["outputs"].items():
                iou = f"  mask IoU {r['mask_iou']:.5f}" if "mask_iou" in r else ""
                iou += f"  PSNR {r['psnr_db']:.1f} dB" if "psnr_db" in r else ""
                iou += f"  ids agree {r['id_agreement']:.4f}" if "id_agreement" in r else ""
                iou += f"  vs {rep['reference']}" if isinstance(rep.get("reference"), str) else ""  # engine/int8 rows
                print(f"  {name + '.' + out:<36} {'PASS' if r['passed'] else 'FAIL'}  cos {r['cosine']:.7f}  "
                      f"max abs {r['max_abs']:.2e} (|ref| {r['ref_max_abs']:.3g}){iou}")


def _engine_line(info: dict) -> str:
    """What an engine was built with and for, and whether build-engine's parity check passed."""
    parity = info.get("parity", {})
    checked = ("parity not checked" if not parity.get("checked") else
               f"parity {'passed' if parity.get('passed') else 'FAILED'} vs {parity.get('reference')}")
    flags = ", ".join(info.get("builder_flags") or []) or "no flags"
    return (f"TensorRT {info.get('tensorrt_version')} for {info.get('gpu')} (sm {info.get('compute_capability')}), "
            f"from {info.get('source')}, {'strongly typed' if info.get('strongly_typed') else 'weakly typed'}, "
            f"{flags}, built {info.get('built')}; {checked}")


def cmd_inspect(args: argparse.Namespace) -> None:
    _print_manifest(Path(args.bundle))


def _no_masks_hint(gen, args: argparse.Namespace) -> str:  # noqa: ANN001 - a SamAutomaticMaskGenerator
    """Why ``segment --auto`` kept nothing: which quality filter dropped the candidates, and what to change."""
    c = gen.filter_counts
    return (f"edgefm: of {c['candidates']} candidate masks, {c['passed_iou']} had a predicted IoU above "
            f"--pred-iou-thresh {args.pred_iou_thresh:g} (best: {gen.best_predicted_iou:.3f}) and "
            f"{c['passed_stability']} of those a stability score of at least --stability-score-thresh "
            f"{args.stability_score_thresh:g}. Lower the thresholds for a model less sure of itself than "
            "Meta's checkpoints (the shipped demo SAM: --pred-iou-thresh 0.8 --stability-score-thresh 0.9).")


def cmd_segment(args: argparse.Namespace) -> None:
    from .draw import overlay_masks, read_image, write_image
    from .sam import SamPredictor

    image = read_image(args.image)
    points = [_floats(p, (2, 3), "--point") for p in args.point]
    box = _floats(args.box, (4,), "--box") if args.box else None
    if not points and box is None and not args.auto:
        raise InputError("give a prompt: --point X,Y[,LABEL] (repeatable), --box X0,Y0,X1,Y1, or --auto")
    predictor = SamPredictor(args.bundle, backend=args.backend, threads=args.threads, precision=args.precision)
    t0 = time.perf_counter()
    if args.auto:
        from .sam import SamAutomaticMaskGenerator

        gen = SamAutomaticMaskGenerator(predictor, points_per_side=args.points_per_side, progress=True,
                                        pred_iou_thresh=args.pred_iou_thresh,
                                        stability_score_thresh=args.stability_score_thresh,
                                        min_mask_region_area=args.min_mask_region_area)
        records = gen.generate(image)
        masks = [r["segmentation"] for r in records]
        scores = np.array([r["predicted_iou"] for r in records])
        drawn = overlay_masks(image, masks)
        print(f"{len(masks)} masks")
        if not masks:
            print(_no_masks_hint(gen, args), file=sys.stderr)
    else:
        predictor.set_image(image)
        coords = np.array([p[:2] for p in points], np.float32) if points else None
        labels = np.array([p[2] if len(p) == 3 else 1 for p in points], np.float32) if points else None
        masks, scores, _ = predictor.predict(coords, labels, np.array(box) if box else None,
                                             multimask_output=args.multimask)
        best = int(np.argmax(scores))
        masks = [masks[best]] if not args.all_masks else list(masks)
        drawn = overlay_masks(image, masks, coords, labels, np.array(box) if box else None)
        print(f"mask: {int(masks[0].sum())} pixels, predicted IoU {scores[best]:.3f}")
    ms = (time.perf_counter() - t0) * 1e3
    write_image(args.out, drawn)
    encoder = predictor.bundle.entry("image_encoder").precision
    print(f"wrote {args.out}  ({ms:.0f} ms on {predictor.backend}, {encoder} image encoder)")
    if args.masks_out:
        np.savez_compressed(args.masks_out, masks=np.array(masks, bool), scores=np.asarray(scores))
        print(f"wrote {args.masks_out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), cache=Path(args.cache) if args.cache else None, backend=args.backend)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="export a PyTorch checkpoint to an ONNX bundle (needs edgefm[export])")
    e.add_argument("family", choices=["sam", "clip", "dalle"])
    e.add_argument("--checkpoint", help="sam / clip: official checkpoint (.pth, .pt archive or .safetensors)")
    e.add_argument("--variant", default="vit_b", help="sam: vit_b | vit_l | vit_h | tiny")
    e.add_argument("--out", required=True, help="bundle folder to write")
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="int8 (sam, clip; for CPUs): MatMul weights dynamically quantized, gated by the int8 "
                        "parity policy (cosine >= 0.99, mask IoU >= 0.95)")
    e.add_argument("--opset", type=int, default=17)
    e.add_argument("--no-parity-gate", action="store_true", help="write the bundle even if parity fails")
    e.add_argument("--attention", default="plain", choices=["plain", "fused", "fused-qk"],
                   help="sam, clip: 'fused' writes the transformer attention as ONNX Runtime's MultiHeadAttention "
                        "(one node per block, for ort-cuda; not parsable by TensorRT); sam: 'fused-qk' also folds "
                        "the relative positions into the query/key product (experimental)")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--quick-gelu", dest="quick_gelu", action="store_true", default=None,
                   help="clip: QuickGELU activations (OpenAI archives imply it)")
    e.add_argument("--no-quick-gelu", dest="quick_gelu", action="store_false", help="clip: plain GELU")
    add_dalle_export_args(e)
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="print a bundle's manifest: components, shapes, parity")
    i.add_argument("bundle")
    i.set_defaults(func=cmd_inspect)

    s = sub.add_parser("segment", help="segment an image with a SAM bundle and write an overlay picture")
    s.add_argument("bundle")
    s.add_argument("image")
    s.add_argument("--point", action="append", default=[], metavar="X,Y[,LABEL]",
                   help="prompt point in image pixels; LABEL 1 foreground (default) or 0 background")
    s.add_argument("--box", metavar="X0,Y0,X1,Y1")
    s.add_argument("--auto", action="store_true", help="automatic mask generation over a point grid")
    s.add_argument("--points-per-side", type=int, default=32, help="--auto: the point grid (official: 32)")
    s.add_argument("--pred-iou-thresh", type=float, default=0.88,
                   help="--auto: keep masks whose predicted IoU is above this (official: 0.88)")
    s.add_argument("--stability-score-thresh", type=float, default=0.95,
                   help="--auto: keep masks whose stability score is at least this (official: 0.95)")
    s.add_argument("--min-mask-region-area", type=int, default=0,
                   help="--auto: fill holes and remove islands smaller than this many pixels (official: 0)")
    s.add_argument("--multimask", action="store_true", help="predict 3 masks and keep the best-scored")
    s.add_argument("--all-masks", action="store_true", help="draw every predicted mask")
    s.add_argument("--out", required=True, help="overlay picture (.png / .jpg)")
    s.add_argument("--masks-out", help="also save masks and scores as .npz")
    s.set_defaults(func=cmd_segment)

    d = sub.add_parser("demo", help="export the bundled demo models and run them on generated scenes")
    d.add_argument("--out", default="edgefm-demo", help="folder for the pictures")
    d.add_argument("--cache", help="where exported demo bundles are cached (default ~/.cache/edgefm)")
    d.set_defaults(func=cmd_demo)

    register_clip(sub)
    register_dalle(sub)
    register_bench(sub)
    register_camera(sub)
    # The engine builder needs no torch, only TensorRT (imported when a build runs).
    from edgefm.export.quantize import add_quantize_parser
    from edgefm.export.tensorrt import add_build_engine_parser
    from edgefm.export.triton import add_triton_parser
    from edgefm.export.verify import add_verify_parser

    add_quantize_parser(sub)  # needs onnx and onnxruntime's quantizer (the [export] extra), not torch
    add_build_engine_parser(sub)
    add_verify_parser(sub)  # numpy + ONNX Runtime (and TensorRT for engines), like the runtime
    add_triton_parser(sub)  # file copies and config text: no torch, no onnx
    for cmd in (s, d):
        cmd.add_argument("--backend", default="auto", help="auto | ort-cpu | ort-cuda | ort-trt | tensorrt")
    s.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime")
    add_precision_arg(s)
    return p


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (not the stream at setup), as ``_progress`` does."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"edgefm: {record.getMessage()}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Library notes (e.g. which backend `--backend auto` chose) go to stderr, prefixed like the progress lines.
    logger = logging.getLogger("edgefm")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
        logger.setLevel(logging.INFO)
    try:
        args.func(args)
    except EdgefmError as exc:
        print(f"edgefm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
