"""Parity of what a backend runs against the bundle's ONNX on ONNX Runtime's CPU: engines as they are built,
and any bundle on any backend with ``edgefm verify``.

What Polygraphy's ``run --trt --onnxrt`` checks, on edgefm's terms. Each component runs once on seeded inputs
at its profile's opt shapes; its outputs are compared with ONNX Runtime's CPU run of the reference ONNX, under
the parity policy of the component's precision (``export/parity.py``, DESIGN.md):

- fp32, fp16 and mixed components (ONNX or engines) are judged against the component's fp32 ONNX, which export
  gated against PyTorch, so the chain -> fp32 ONNX -> PyTorch holds. A bundle exported without fp32 falls
  back to the component's own ONNX (an engine's: its source).
- Calibrated int8 (``edgefm quantize``'s Q/DQ graphs, and every int8 engine) is judged against its Q/DQ
  ONNX: quantize gated that graph against fp32 on held-out real images, a test noise would not be fair to;
  this check proves the backend runs that graph. Export's dynamic int8, which measures activations per call
  and was gated against PyTorch on the same kind of seeded inputs, is judged against fp32 like the rest.

``build-engine`` checks every engine before adding it (``check_engine_file``); ``edgefm verify BUNDLE
--backend B`` checks the components a backend would run (``verify_bundle``), e.g. ort-cuda's fp16 on the
target GPU. The inputs need no PyTorch and no images: normalized-pixel noise for images, points inside the
image for SAM prompts, real tokenizer ids for CLIP text, ids inside the vocabularies for DALL·E. Inputs that
another component produces (SAM's image and prompt embeddings, the DALL·E prior's KV cache) come from running
that component's reference ONNX first, as the runtime chains them. Mask logits are judged by the IoU of their
thresholded masks, token ids by their agreement, like export's reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from edgefm.runtime.bench import sample, value_rules
from edgefm.runtime.errors import ParityError
from edgefm.runtime.manifest import ComponentEntry, Manifest
from edgefm.runtime.sam.spec import MASK_OUTPUTS
from edgefm.runtime.spec import ComponentSpec, TensorSpec

from .parity import compare_outputs, ids_report

# Text inputs of CLIP's text encoder (cycled to the batch).
PROMPTS = ("a photo of a cat", "a red circle and a blue square on a white table", "a diagram", "two dogs")
SHAPES = ("opt", "min", "max")  # which end of every dim range a check runs at
# SAM point labels along the points of a prompt: foreground, background, box corners, padding.
POINT_LABELS = (1.0, 0.0, 2.0, 3.0, -1.0)


def reference_entry(manifest: Manifest, entry: ComponentEntry) -> ComponentEntry:
    """The ONNX ``entry`` (an ONNX component, or an engine: then its source) is judged against (see the module
    docstring)."""
    source = entry
    if entry.format != "onnx":
        found = [c for c in manifest.find(entry.name, format="onnx") if c.file == entry.info.get("source")]
        if not found:
            raise ParityError(f"{entry.file}: its source ONNX {entry.info.get('source')!r} is no longer in the "
                              "bundle, so there is nothing to check it against; rebuild the engine")
        source = found[0]
    if source.precision == "int8" and source.explicitly_quantized:
        return source
    fp32 = manifest.find(source.name, format="onnx", precision="fp32")
    return fp32[0] if fp32 else source


class ParityInputs:
    """Seeded inputs per component of one bundle, and the ONNX Runtime CPU sessions of its reference graphs,
    each opened once (they compute both the produced inputs and the references to compare with)."""

    def __init__(self, folder: str | Path, manifest: Manifest, seed: int = 0, threads: int | None = None) -> None:
        self.folder, self.manifest, self.seed, self.threads = Path(folder), manifest, seed, threads
        self._produced: dict[tuple, dict[str, np.ndarray]] = {}
        self._sessions: dict[str, Any] = {}
        # Where random values would be invalid (points inside the image, ids inside the vocabularies): the
        # rules edgefm bench feeds by.
        self._rules = value_rules(manifest)

    def reference(self, entry: ComponentEntry) -> Any:
        """ONNX Runtime's CPU session of the ONNX ``entry`` (opened on first use)."""
        if entry.file not in self._sessions:
            from edgefm.runtime.backends.onnxruntime import OrtRunner

            self._sessions[entry.file] = OrtRunner(self.folder / entry.file, entry.spec, "ort-cpu",
                                                   threads=self.threads)
        return self._sessions[entry.file]

    def feeds(self, spec: ComponentSpec, sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """Inputs of ``spec`` at its opt shapes (or the dim sizes in ``sizes``)."""
        sizes = {**{k: r.opt for k, r in spec.dims.items()}, **(sizes or {})}
        rng = np.random.default_rng(self.seed)
        out = {}
        for t in spec.inputs:
            shape = spec.concrete_shape(t, **sizes)
            value = self._value(t, shape, rng)
            if value is None:
                value = self._from_producer(spec.name, t, sizes, shape)
            out[t.name] = value
        return out

    def _value(self, t: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
        name = t.name
        if name == "image" and t.dtype == "float32":
            return rng.normal(0.0, 1.0, shape).astype(np.float32)  # normalized pixels
        if name == "point_labels":
            return np.broadcast_to(np.resize(np.array(POINT_LABELS, np.float32), shape[-1]), shape).copy()
        if name == "mask_input":
            return rng.normal(0.0, 4.0, shape).astype(np.float32)  # low-res mask logits
        if name == "has_mask_input":
            return ((np.arange(shape[0]) + 1) % 2).astype(np.float32)
        if name == "tokens":
            from edgefm.runtime.clip.tokenizer import ClipTokenizer

            texts = [PROMPTS[i % len(PROMPTS)] for i in range(shape[0])]
            return ClipTokenizer(context_length=shape[1])(texts)
        if name == "position":  # the first image position after the text
            return np.full(shape, int(self.manifest.config["text_len"]), np.int64)
        if name in self._rules:
            return np.ascontiguousarray(sample(self._rules[name], shape, rng), dtype=t.dtype)
        return None

    def _from_producer(self, consumer: str, t: TensorSpec, sizes: dict[str, int], shape: tuple[int, ...]
                       ) -> np.ndarray:
        for producer in self.manifest.component_names:
            entries = [c for c in self.manifest.find(producer, format="onnx") if c.precision != "int8"]
            if producer == consumer or not entries or t.name not in entries[0].spec.output_names:
                continue
            ref = reference_entry(self.manifest, entries[0])
            key = (producer, tuple(sorted(sizes.items())))
            if key not in self._produced:
                spec = ref.spec
                feeds = self.feeds(spec, {k: v for k, v in sizes.items() if k in spec.dims})
                self._produced[key] = self.reference(ref).run(feeds)
            return self._produced[key][t.name]
        if t.dtype == "float32":  # an input with no known meaning and no producer: unit noise
            return np.random.default_rng(self.seed).normal(0.0, 1.0, shape).astype(np.float32)
        raise ParityError(f"no parity input is known for {consumer}'s {t.dtype} input {t.name!r}, and no "
                          f"component of {self.folder} produces it, so it cannot be checked (build-engine "
                          "--skip-parity builds it unchecked)")


def judge(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], precision: str, spec: ComponentSpec,
          mask_threshold: float = 0.0) -> dict[str, Any]:
    """Report ``got`` against ``ref`` by the policy of ``precision``: id outputs by agreement, mask logits by
    IoU, the rest by cosine (and max abs for fp32)."""
    ids = {t.name for t in spec.outputs if t.dtype.startswith("int")}
    report = compare_outputs({k: v for k, v in ref.items() if k not in ids}, got, precision,
                             masks=tuple(n for n in MASK_OUTPUTS if n in ref), mask_threshold=mask_threshold)
    if ids:
        id_rep = ids_report({k: ref[k] for k in ids}, got, precision)
        report["outputs"].update(id_rep["outputs"])
        report["passed"] = report["passed"] and id_rep["passed"]
    return report


def check_runner(runner: Any, inputs: ParityInputs, source: ComponentEntry, precision: str, spec: ComponentSpec,
                 shapes: str = "opt") -> dict[str, Any]:
    """Run ``runner`` (any: ``run(dict) -> dict``) and the reference ONNX of ``source`` on the same inputs at
    ``spec``'s ``shapes`` ("opt", "min" or "max" of every dim range), both from ``inputs`` (its bundle, seeds and
    reference sessions); returns the report (``passed``, metrics per output, what was compared)."""
    manifest = inputs.manifest
    ref_entry = reference_entry(manifest, source)
    feeds = inputs.feeds(spec, {k: getattr(r, shapes) for k, r in spec.dims.items()})
    ref = inputs.reference(ref_entry).run(feeds)
    got = runner.run(feeds)
    report = judge(ref, got, precision, spec, float(manifest.config.get("mask_threshold", 0.0)))
    report.update(reference=ref_entry.file, reference_backend="onnxruntime CPU",
                  inputs={k: list(v.shape) for k, v in feeds.items()})
    return report


def check_engine_file(path: Path, entry: ComponentEntry, inputs: ParityInputs, progress: Any = None
                      ) -> dict[str, Any]:
    """Deserialize the engine file ``path`` just built for ``entry`` (whose ``info["source"]`` names its ONNX)
    and judge it with :func:`check_runner`."""
    from edgefm.runtime.backends.tensorrt import TensorRTRunner

    if progress:
        progress(f"checking the {entry.precision} engine of {entry.name} against "
                 f"{reference_entry(inputs.manifest, entry).file} on ONNX Runtime CPU")
    runner = TensorRTRunner(path, entry, cuda_graphs=False)
    try:
        return check_runner(runner, inputs, entry, entry.precision, entry.spec)
    finally:
        runner.close()


def failure_message(component: str, source_file: str, report: dict[str, Any]) -> str:
    lines = [f"{out}: {', '.join(m['failures'])}" for out, m in report["outputs"].items() if not m["passed"]]
    return (f"the {report['precision']} TensorRT engine of {component!r} (built from {source_file}) misses the "
            f"{report['precision']} parity policy against {report['reference']} on ONNX Runtime CPU: "
            f"{'; '.join(lines)}. Nothing was written. Build --precision fp32 (or fp16 if this was int8), or "
            "pass --no-parity-gate to add it anyway (recorded in the manifest)")


def parity_summary(report: dict[str, Any], failed: str = "FAILED") -> str:
    """One line: the verdict, the reference, and each output's deciding metric."""
    parts = []
    for out, m in report["outputs"].items():
        if "id_agreement" in m:
            parts.append(f"{out} ids agree {m['id_agreement']:.4f}")
        elif "mask_iou" in m:
            parts.append(f"{out} mask IoU {m['mask_iou']:.4f}")
        else:
            parts.append(f"{out} cosine {m['cosine']:.6f}, max abs {m['max_abs']:.3g}")
    verdict = "passed" if report["passed"] else failed
    return f"{verdict} {report['precision']} policy vs {report['reference']} (ONNX Runtime CPU): {'; '.join(parts)}"


def verify_bundle(bundle: str | Path, backend: str = "auto", precision: str | None = None,
                  components: list[str] | None = None, threads: int | None = None, progress: Any = None,
                  shapes: tuple[str, ...] = ("opt",)) -> dict[str, Any]:
    """Check every component (or ``components``) of ``bundle`` as ``backend`` runs it (the file
    :class:`~edgefm.runtime.bundle.Bundle` picks, ``precision`` as there) against its reference ONNX on ONNX
    Runtime's CPU, at each of ``shapes`` ("opt", "min", "max" of the component's ranges: an engine's tactics
    differ per shape). Returns ``{"backend", "passed", "components": {key: report}}``, the key being the
    component's name for "opt" and "name@min" / "name@max" otherwise; a component whose file *is* the
    reference on ort-cpu is reported as skipped."""
    from edgefm.runtime.bundle import Bundle
    from edgefm.runtime.errors import InputError

    bad = [s for s in shapes if s not in SHAPES]
    if bad or not shapes:
        raise InputError(f"--shapes {','.join(shapes)!r}: choose among {', '.join(SHAPES)} (comma-separated)")
    b = Bundle(bundle, backend, threads=threads, precision=precision)
    names = components or b.manifest.component_names
    unknown = [n for n in names if n not in b.manifest.component_names]
    if unknown:
        raise InputError(f"--component {unknown} not in {b.path}; it has {b.manifest.component_names}")
    inputs = ParityInputs(b.path, b.manifest, threads=threads)
    results: dict[str, Any] = {}
    for name in names:
        entry = b.entry(name)
        ref = reference_entry(b.manifest, entry)
        if b.backend == "ort-cpu" and entry.file == ref.file:
            results[name] = {"file": entry.file, "file_precision": entry.precision, "passed": True,
                             "skipped": "it is the reference itself (ONNX Runtime CPU)"}
            continue
        # ONNX Runtime's TensorRT provider runs with trt_fp16_enable (runtime/backends/onnxruntime.py): on 10.x
        # TensorRT may pick fp16 kernels for an fp32 graph, so fp16's policy is the one that applies.
        policy = "fp16" if b.backend == "ort-trt" and entry.precision == "fp32" else entry.precision
        for which in shapes:
            key = name if which == "opt" else f"{name}@{which}"
            if progress:
                progress(f"verifying {key}: {entry.file} on {b.backend} against {ref.file} on ONNX Runtime CPU")
            report = check_runner(b.runner(name), inputs, entry, policy, entry.spec, which)
            results[key] = {"file": entry.file, "file_precision": entry.precision, **report}
    return {"bundle": str(b.path), "backend": b.backend, "components": results,
            "passed": all(r["passed"] for r in results.values())}


def add_verify_parser(sub: Any) -> Any:
    """Register ``edgefm verify`` on an argparse subparsers object."""
    from edgefm.runtime.manifest import add_precision_arg

    p = sub.add_parser("verify", help="check what a backend runs against the bundle's fp32 ONNX on ONNX Runtime CPU")
    p.add_argument("bundle")
    p.add_argument("--backend", default="auto", help="auto | ort-cpu | ort-cuda | ort-trt | tensorrt")
    p.add_argument("--component", action="append", default=None, help="check only this component (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime")
    p.add_argument("--json", default=None, help="write the reports to this JSON file")
    p.add_argument("--shapes", default="opt", help="which ends of the shape ranges to check: opt, min, max, "
                   "comma-separated (e.g. opt,max)")
    add_precision_arg(p)
    p.set_defaults(func=cmd_verify)
    return p


def cmd_verify(args: Any) -> None:
    import json
    import sys

    result = verify_bundle(args.bundle, args.backend, args.precision, args.component, args.threads,
                           progress=lambda m: print(f"edgefm: {m}", file=sys.stderr, flush=True),
                           shapes=tuple(s.strip() for s in args.shapes.split(",") if s.strip()))
    print(f"{result['bundle']} on {result['backend']}:")
    for name, r in result["components"].items():
        line = f"skipped: {r['skipped']}" if "skipped" in r else parity_summary(r)
        print(f"  {name:<16} {r['file']} ({r['file_precision']})  {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    failed = [n for n, r in result["components"].items() if not r["passed"]]
    if failed:
        raise ParityError(f"{len(failed)} of {len(result['components'])} component(s) miss their parity policy on "
                          f"{result['backend']}: {', '.join(failed)}")
