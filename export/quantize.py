"""Calibrated int8 Q/DQ components for TensorRT's explicit quantization: ``edgefm quantize``.

TensorRT 10/11 builds int8 engines only from explicitly quantized graphs (QuantizeLinear/DequantizeLinear
pairs; calibrated implicit INT8 is deprecated in 10.x and gone in 11.x), in strongly typed networks where the
graph's own dtypes decide the precision of everything else. The int8 component written here is therefore:

- the inputs of the weighted layers (MatMul with a constant weight, Gemm, Conv), except the first Conv,
  quantized: weights int8, symmetric, one scale per output channel; activations int8, symmetric (zero point
  0), one scale per tensor, from the ``|x|`` statistics of the bundle's fp32 graph on the user's images with
  the bundle's own preprocessing (:mod:`edgefm.export.calibrate`). Outputs are not quantized (each GEMM's
  result reaches its bias, residual or LayerNorm unrounded), nor are attention's activation x activation
  products, the first Conv (the network input) or biases (TensorRT dequantizes int8, not int32);
- everything else in fp16 with the fp16 export's fp32 islands (``FP32_OPS``, LayerNorm statistics), opset 19
  so that Q/DQ scales can be fp16 and no Cast sits between a DequantizeLinear and its MatMul.

Parity (DESIGN.md int8 policy: cosine >= 0.99, SAM mask IoU >= 0.95) is measured on held-out calibration
images against the bundle's fp32 ONNX on ONNX Runtime's CPU provider, which export gated against PyTorch.
ONNX Runtime's CPU kernels for fp16 are slow, so every held-out image runs the fp32-elsewhere twin of the
graph (same Q/DQ nodes and scales) and the first one also runs the written graph; both are recorded.

The image encoders of SAM and CLIP are quantized, and DALL·E's dVAE decoder (all convolutions; calibrated on
the codes the bundle's dVAE encoder gives the images, and gated by PSNR >= 30 dB against fp32 as well); the
other components are small or autoregressive, and ``edgefm build-engine --precision int8`` builds them in
fp16.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import inspect
import io
import logging
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from edgefm.runtime.bundle import sha256_file
from edgefm.runtime.camera.sources import IMAGE_SUFFIXES
from edgefm.runtime.draw import read_image
from edgefm.runtime.errors import BackendError, InputError, ParityError, require
from edgefm.runtime.manifest import ComponentEntry, read_manifest

from .bundle import commit_components
from .calibrate import activation_products, activation_thresholds, activations_to_calibrate
from .onnx import FP32_OPS, fp16_from_onnx, save_graph
from .parity import POLICIES, compare_outputs, mask_iou

QUANTIZABLE = {"sam": ("image_encoder",), "clip": ("image_encoder",), "dalle": ("dvae_decoder",)}
QDQ_OPS = ["MatMul", "Gemm", "Conv"]
METHODS = ("percentile", "minmax")
QDQ_OPSET = 19  # QuantizeLinear/DequantizeLinear with fp16 scales
# Recorded in the manifest entry (``info["quantization"]``); build-engine reads "format" to tell Q/DQ graphs
# from ONNX Runtime's dynamic int8 (MatMulInteger), which TensorRT cannot parse.
QDQ_INFO = {"method": "static, calibrated (TensorRT explicit quantization)", "format": "QDQ", "ops": QDQ_OPS,
            "weights": "int8, symmetric, per output channel", "activations": "int8, symmetric, per tensor",
            "elsewhere": f"fp16 (the first Conv too), except {', '.join(FP32_OPS)} and LayerNorm statistics: fp32"}
MIN_PSNR_DB = 30.0  # dVAE decoder pictures against fp32 (stricter than the cosine policy: see measure)
_SAM_GRID = 4  # SAM mask check: a 4 x 4 grid of single-point prompts per held-out image, single-mask output


def calibration_images(folder: str | Path, limit: int) -> list[Path]:
    """The first ``limit`` images of ``folder`` (sorted by name); at least two are needed."""
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"--calibration {folder}: no such folder; give a folder of representative images")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if len(files) < 2:
        raise InputError(f"--calibration {folder} holds {len(files)} image(s) ({', '.join(IMAGE_SUFFIXES)}); give "
                         "at least 2: one in five (at least one) checks parity, the rest calibrate. A few hundred "
                         "images like the ones the model will see give the best scales")
    return files


def split_holdout(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Every fifth image (at least one) is held out for the parity check; the rest calibrate."""
    held = files[4::5] or files[-1:]
    return [f for f in files if f not in held], held


def feeder(folder: Path, manifest: Any, name: str, threads: int | None = None
           ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """RGB uint8 image -> the component's feed, made exactly as the runtime makes it: the encoders' own
    preprocessing, and for the dVAE decoder the codes the bundle's dVAE encoder gives the image."""
    pre = manifest.preprocess
    if manifest.family == "dalle":
        from edgefm.runtime.dalle.generator import DvaeCodec

        if "dvae_encoder" not in manifest.component_names:
            raise InputError(f"{folder}: quantizing the dVAE decoder needs the bundle's dvae_encoder to turn the "
                             "calibration images into codes; export with --dvae-encoder encoder.pkl")
        codec = DvaeCodec(folder, backend="ort-cpu", threads=threads, load_decoder=False)
        return lambda image: {"image_tokens": codec.encode(image)[None]}
    mean, std, size = pre["mean"], pre["std"], int(pre["image_size"])
    key = manifest.find(name, format="onnx")[0].spec.inputs[0].name
    if manifest.family == "sam":
        from edgefm.runtime.sam.transforms import normalize_and_pad, resize_longest_side

        return lambda image: {key: normalize_and_pad(resize_longest_side(image, size), size, mean, std)}
    from edgefm.runtime.clip.preprocess import preprocess as clip_preprocess

    return lambda image: {key: clip_preprocess(image, size, mean, std, pre["resize"])[None]}


def _takes_calibration_cache(quantize_static: Callable[..., Any]) -> bool:
    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


class _OneFeed:
    """ONNX Runtime's CalibrationDataReader over one feed, for an onnxruntime without calibration caches: edgefm
    measures the activation ranges itself (:mod:`edgefm.export.calibrate`) and hands them over as overrides, so
    the quantizer's own calibration pass only has to run once."""

    def __init__(self, feed: dict[str, np.ndarray]) -> None:
        self._feeds = [feed]

    def get_next(self) -> dict[str, np.ndarray] | None:
        return self._feeds.pop() if self._feeds else None


def qdq_from_onnx(src: str | Path, twin: str | Path, dst: str | Path, items: list[Any],
                  feed: Callable[[Any], dict[str, np.ndarray]], method: str = "percentile",
                  threads: int | None = None, progress: Callable[[str], None] | None = None) -> list[str]:
    """Quantize ``src`` (fp32), calibrated on ``feed(item)`` for each of ``items``: the fp32-elsewhere graph to
    ``twin``, the fp16-elsewhere graph (the one to ship) to ``dst``. Returns the extra files beside ``dst``."""
    onnx = require("onnx", "export", "Quantizing")
    ort = require("onnxruntime", "export", "Quantizing")
    from onnx import version_converter
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise InputError(f"--method {method!r} is not a calibration method; choose one of {list(METHODS)}")
    src, twin, dst = Path(src), Path(twin), Path(dst)
    graph = onnx.load(str(src), load_external_data=False).graph
    # The first Conv (a ViT's patch embedding, a ResNet's stem) sees raw pixels: kept in floating point, as PTQ
    # recipes keep a network's first layer. ONNX lists nodes in topological order.
    first = [n.name for n in graph.node if n.op_type == "Conv"][:1]
    tensors = activations_to_calibrate(graph, QDQ_OPS, first)
    # Attention's activation x activation products (q k^T, p v) stay in floating point (the quantizer's
    # MatMulConstBOnly does not apply to Q/DQ graphs, so they are named).
    keep_float = first + activation_products(graph, QDQ_OPS)
    step = max(1, len(items) // 8)

    def counted(i: int) -> None:
        if progress and (i % step == 0 or i == len(items)):
            progress(f"  {i}/{len(items)} calibration images")

    thresholds = activation_thresholds(src, tensors, (feed(i) for i in items), method, threads, counted)
    overrides = {t: [{"rmin": np.float32(-thr), "rmax": np.float32(thr)}] for t, thr in thresholds.items()}
    cache: dict[str, Any] = {}
    reader: _OneFeed | None = None
    big = sum(p.stat().st_size for p in src.parent.iterdir() if p.name.startswith(src.name)) > 2**31 - 1
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # the quantizer advises pre-processing on the root logger
    try:
        with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
              tempfile.TemporaryDirectory(prefix="edgefm-qdq-", dir=twin.parent) as tmp):
            warnings.simplefilter("ignore")  # and the quantizer's own progress prints: edgefm reports progress
            out = Path(tmp) / twin.name
            if _takes_calibration_cache(quantize_static):
                # onnxruntime >= 1.32: the ranges as its calibration cache, so it runs no calibration pass of
                # its own (with one image that pass alone peaked at 13 GB for SAM ViT-B's encoder).
                from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

                cache["calibration_cache_path"] = Path(tmp) / "ranges.json"
                save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
                    t: (np.float32(-thr), np.float32(thr)) for t, thr in thresholds.items()}),
                    cache["calibration_cache_path"])
            else:  # older: it calibrates on one image, and the overrides replace what it measured
                reader = _OneFeed(feed(items[0]))
            quantize_static(
                str(src), str(out), reader, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=QDQ_OPS, per_channel=True, reduce_range=False,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, use_external_data_format=big,
                nodes_to_exclude=keep_float,
                # Inputs only, as TensorRT's Q/DQ placement guide does: a quantized output would round every
                # GEMM result to int8 before the fp16 bias, residual or LayerNorm that reads it.
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                               "OpTypesToExcludeOutputQuantization": QDQ_OPS, "TensorQuantOverrides": overrides},
                **cache,
            )
            model = version_converter.convert_version(onnx.load(str(out)), QDQ_OPSET)
    finally:
        root.setLevel(level)
    inits = {i.name for i in model.graph.initializer}
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    if quantized - set(tensors):  # the ranges of those would come from one image: refuse rather than ship them
        raise BackendError(f"onnxruntime {ort.__version__}'s quantizer quantized activations edgefm did not "
                           f"calibrate: {sorted(quantized - set(tensors))[:5]}; please report it")
    save_graph(model, twin)
    return fp16_from_onnx(twin, dst)


def _sam_mask_iou(predictor: Any, image: np.ndarray, fp32: np.ndarray, int8: np.ndarray) -> float:
    """IoU of the masks of a grid of single-point prompts decoded from the fp32 and from the int8 image
    embedding by ``predictor`` (the bundle's fp32 prompt encoder and decoder)."""
    h, w = image.shape[:2]
    xs, ys = np.meshgrid((np.arange(_SAM_GRID) + 0.5) * w / _SAM_GRID, (np.arange(_SAM_GRID) + 0.5) * h / _SAM_GRID)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)[:, None].astype(np.float32)
    labels = np.ones(coords.shape[:2], np.float32)
    masks = []
    for embedding in (fp32, int8):
        predictor.set_image_embedding(embedding, (h, w))
        masks.append(predictor.predict_batch(coords, labels, multimask_output=False)[0])
    return mask_iou(*masks)


def _outputs_of(path: Path, feeds: list[dict[str, np.ndarray]], threads: int | None) -> list[dict[str, np.ndarray]]:
    """Run one graph on every feed, then free it: one encoder's working memory at a time (ViT-H's is GBs)."""
    ort = require("onnxruntime", "export", "Quantizing")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # fp16 Q/DQ scales have no CPU constant-folding kernel: a harmless warning
    # Without the arena, a freed session's memory goes back to the system: the three graphs run one after the
    # other peak at the largest of them (SAM ViT-B: 11.5 GB with arenas, their memory kept across sessions).
    options.enable_cpu_mem_arena = False
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    out = [dict(zip(names, session.run(names, f))) for f in feeds]
    del session
    return out


def _psnr(ref: np.ndarray, got: np.ndarray) -> float:
    mse = float(np.mean((ref.astype(np.float64) - got.astype(np.float64)) ** 2))
    return 99.0 if mse < 1e-10 else 10.0 * np.log10(1.0 / mse)  # capped: JSON has no infinity


def measure(bundle: Path, family: str, fp32: Path, twin: Path, written: Path,
            held: Iterable[tuple[str, dict[str, np.ndarray], np.ndarray]], threads: int | None) -> dict[str, Any]:
    """The int8 policy on every held-out image (the twin graph) and on the first one (the written graph).
    Per output: the lowest cosine and largest error over the images; for SAM also the lowest mask IoU."""
    labels, feeds, images = zip(*held)
    refs = _outputs_of(fp32, list(feeds), threads)
    gots = _outputs_of(twin, list(feeds), threads)
    first = _outputs_of(written, list(feeds[:1]), threads)[0]
    predictor = None
    if family == "sam":
        from edgefm.runtime.sam.predictor import SamPredictor

        predictor = SamPredictor(bundle, backend="ort-cpu", threads=threads, load_encoder=False)
    outputs: dict[str, dict[str, Any]] = {}
    rows, failures = [], []
    for label, image, ref, got in zip(labels, images, refs, gots):
        rep = compare_outputs(ref, got, "int8")["outputs"]
        if family == "dalle":  # a picture's cosine hardly moves (its mean dominates): PSNR too, over [0, 1]
            for o, m in rep.items():
                m["psnr_db"] = _psnr(ref[o], got[o])
        row: dict[str, Any] = {"image": label, **{o: round(m["cosine"], 7) for o, m in rep.items()}}
        if predictor is not None:
            row["mask_iou"] = rep["image_embeddings"]["mask_iou"] = _sam_mask_iou(
                predictor, image, ref["image_embeddings"], got["image_embeddings"])
        rows.append(row)
        for o, m in rep.items():
            agg = outputs.setdefault(o, dict(m))
            agg["cosine"] = min(agg["cosine"], m["cosine"])
            agg["max_abs"] = max(agg["max_abs"], m["max_abs"])
            agg["ref_max_abs"] = max(agg["ref_max_abs"], m["ref_max_abs"])
            for k in ("mask_iou", "psnr_db"):
                if k in m:
                    agg[k] = min(agg[k], m[k])
    written_report = {"image": labels[0], "outputs": compare_outputs(refs[0], first, "int8")["outputs"]}
    policy = POLICIES["int8"]
    for o, agg in outputs.items():
        fails = [f"cosine {agg['cosine']:.5f} < {policy.min_cosine}"] if agg["cosine"] < policy.min_cosine else []
        if agg.get("mask_iou", 1.0) < policy.min_mask_iou:
            fails.append(f"mask IoU {agg['mask_iou']:.4f} < {policy.min_mask_iou}")
        if agg.get("psnr_db", MIN_PSNR_DB) < MIN_PSNR_DB:
            fails.append(f"PSNR {agg['psnr_db']:.1f} dB < {MIN_PSNR_DB} dB")
        agg["passed"] = not fails
        agg.pop("failures", None)
        failures += [f"{o}: {f}" for f in fails]
    failures += [f"{o} (written graph, {labels[0]}): cosine {m['cosine']:.5f} < {policy.min_cosine}"
                 for o, m in written_report["outputs"].items() if not m["passed"]]
    return {"precision": "int8", "reference": "the bundle's fp32 ONNX on onnxruntime CPU", "outputs": outputs,
            "passed": not failures, "failures": failures, "images": rows, "written_graph": written_report}


def quantize_bundle(bundle: str | Path, calibration: str | Path, components: list[str] | None = None,
                    max_images: int = 256, method: str = "percentile", parity_gate: bool = True,
                    threads: int | None = None, progress: Callable[[str], None] | None = None) -> list[ComponentEntry]:
    """Add an int8 Q/DQ ONNX of each quantizable component of ``bundle`` (see the module docstring).

    An int8 ONNX already in the bundle for the same component is replaced, with any TensorRT engine built
    from it. Nothing in the bundle changes unless every component quantizes and passes the parity gate."""
    folder = Path(bundle)
    manifest = read_manifest(folder)
    allowed = QUANTIZABLE.get(manifest.family, ())
    names = components or list(allowed)
    if not names or any(n not in allowed for n in names):
        raise InputError(f"edgefm quantize covers the image encoders of SAM and CLIP and DALL·E's dVAE decoder "
                         f"({list(allowed) or 'none'} in this {manifest.family} bundle), not "
                         f"{[n for n in names if n not in allowed]}")
    if int(max_images) < 2:
        raise InputError(f"--max-images must be at least 2, got {max_images}")
    cal_files, held_files = split_holdout(calibration_images(calibration, int(max_images)))
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    built: list[ComponentEntry] = []
    files: dict[str, Path] = {}
    reports: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=".edgefm-quantize-", dir=folder) as tmp:
        for name in names:
            src = next((c for c in manifest.find(name, format="onnx") if c.precision == "fp32"), None)
            if src is None:
                have = sorted(c.precision for c in manifest.find(name, format="onnx"))
                raise InputError(f"{folder}: component {name!r} has no fp32 ONNX to quantize (it has {have}); "
                                 "export the bundle with --precision fp32 first")
            if src.info.get("fused_attention"):
                raise InputError(f"{folder}: {name!r} was exported with --attention fused (ONNX Runtime's "
                                 "MultiHeadAttention), which TensorRT cannot parse; export with --attention plain")
            feed = feeder(folder, manifest, name, threads)

            def held_out(paths: list[Path], _feed: Callable = feed) -> Iterator[tuple]:
                for p in paths:
                    image = read_image(p)
                    yield p.name, _feed(image), image

            if progress:
                progress(f"quantizing {name}: calibrating ({method}) on {len(cal_files)} image(s) from {calibration}")
            work = Path(tmp) / name
            work.mkdir()
            twin, dst = work / f"{name}.int8-fp32.onnx", work / f"{name}.int8.onnx"
            extra = qdq_from_onnx(folder / src.file, twin, dst, cal_files,
                                  lambda p, _feed=feed: _feed(read_image(p)), method, threads, progress)
            if progress:
                progress(f"checking {name} int8 against fp32 on {len(held_files)} held-out image(s)")
            report = measure(folder, manifest.family, folder / src.file, twin, dst, held_out(held_files), threads)
            report.update(calibration={"images": len(cal_files), "held_out": len(held_files), "method": method,
                                       "folder": Path(calibration).name}, gate=parity_gate)
            if not report["passed"] and parity_gate:
                raise ParityError(f"{name}: the int8 graph misses the int8 parity policy against fp32: "
                                  f"{'; '.join(report['failures'])}. Nothing was written. Calibrate on more (or "
                                  "more typical) images, try the other --method, or pass --no-parity-gate")
            reports[f"{name}.int8"] = report
            info = {"opset": QDQ_OPSET, "quantization": {**QDQ_INFO, "calibration": report["calibration"]},
                    "source": src.file, "quantized": stamp}
            built.append(ComponentEntry(name, dst.name, sha256_file(dst), "onnx", "int8", src.spec,
                                        {e: sha256_file(work / e) for e in extra}, info))
            files.update({f: work / f for f in (dst.name, *extra)})
        manifest.parity.update(reports)
        commit_components(folder, manifest, built, files)
    return built


def add_quantize_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``edgefm quantize`` on an argparse subparsers object."""
    p = sub.add_parser("quantize", help="add calibrated int8 (Q/DQ) image encoders (SAM, CLIP) or dVAE decoders "
                                        "(DALL·E) to a bundle, for TensorRT int8 engines (needs the onnx package)")
    p.add_argument("bundle")
    p.add_argument("--calibration", required=True, help="folder of representative images (at least 2)")
    p.add_argument("--max-images", type=int, default=256, help="use at most this many images (sorted by name)")
    p.add_argument("--method", default="percentile", choices=list(METHODS), help="activation range calibration")
    p.add_argument("--component", action="append", default=None, help="quantize only this component")
    p.add_argument("--no-parity-gate", action="store_true", help="write the component even if parity fails")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime's parity runs")
    p.set_defaults(func=cmd_quantize)
    return p


def cmd_quantize(args: argparse.Namespace) -> None:
    entries = quantize_bundle(args.bundle, args.calibration, args.component, args.max_images, args.method,
                              not args.no_parity_gate, args.threads,
                              progress=lambda m: print(f"edgefm: {m}", file=sys.stderr, flush=True))
    parity = read_manifest(args.bundle).parity
    for e in entries:
        rep = parity[f"{e.name}.int8"]
        worst = ", ".join(f"{o} cosine {m['cosine']:.5f}"
                          + (f", mask IoU {m['mask_iou']:.4f}" if "mask_iou" in m else "")
                          + (f", PSNR {m['psnr_db']:.1f} dB" if "psnr_db" in m else "")
                          for o, m in rep["outputs"].items())
        print(f"wrote {Path(args.bundle) / e.file}  (int8 Q/DQ; worst of {rep['calibration']['held_out']} held-out "
              f"image(s) against fp32: {worst}{'' if rep['passed'] else '  PARITY FAILED, gate off'})")
