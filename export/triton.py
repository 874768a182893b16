"""``edgefm triton``: a Triton Inference Server model repository from a bundle.

Every component becomes one Triton model: ``<prefix>_<component>/config.pbtxt`` and version ``1/`` holding the
ONNX file (Triton's ``onnxruntime`` backend) or the TensorRT engine (``tensorrt_plan``). Names, dtypes and input
dims come from the component specs in the manifest; an ONNX model's outputs are written as ONNX Runtime reports
them, since Triton's onnxruntime backend compares those exactly with its own session (:func:`graph_dims`):

- a component whose every input and output leads with the same symbolic batch dim (SAM's and CLIP's image
  encoders, CLIP's text encoder, the dVAE) is served with Triton's dynamic batcher, ``max_batch_size`` the
  top of that dim's range; the others (SAM's mask decoder takes one image's embedding, the DALL·E prior
  carries its KV cache with the batch second) take whole tensors (``max_batch_size: 0``);
- SAM also gets ``<prefix>_prompt_to_masks``, an ensemble of the prompt encoder and the mask decoder: the split
  SAM's web demo uses, where the image encoder runs once per image and each click costs the small models.
  Its ``decoder_context`` and ``prompt_decoder`` are served too, for a client beside the server (CUDA shared
  memory): over a network the ensemble moves less per click (the 4 MB embedding, not the 10 MB context);
- each model warms up at its opt shapes with zero tensors (zeros are valid for every input: ids, labels and
  positions included), so the first request does not pay for CUDA or TensorRT set-up;
- fp32 ONNX models on a GPU open ONNX Runtime's CUDA provider with TF32 off, as ``edgefm``'s own runtime does;
  ``--accelerator tensorrt`` puts ONNX models on its TensorRT provider instead, as the ort-trt backend does.

Pre- and post-processing (resizing, normalization, mask upscaling, tokenization, sampling) stay with the client:
``edgefm.runtime`` has them without torch. Nothing is half-written: the models are assembled in a temporary
folder inside the repository and renamed into place.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from edgefm.runtime.backends.onnxruntime import trt_profile_options
from edgefm.runtime.bundle import check_files, check_precision, choose_entry
from edgefm.runtime.errors import BundleError, InputError
from edgefm.runtime.manifest import ComponentEntry, Manifest, read_manifest
from edgefm.runtime.spec import ComponentSpec, TensorSpec

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                 "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
# Ensembles edgefm writes: family -> (ensemble suffix, its steps in order).
ENSEMBLES = {"sam": ("prompt_to_masks", ("prompt_encoder", "mask_decoder"))}
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class Enum(str):
    """A protobuf enum value: written bare in the text format."""


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_pbtxt(message: dict[str, Any], indent: int = 0) -> list[str]:
    """Protobuf text format for a message written as dicts (messages), lists of dicts (repeated messages, map
    entries as ``{"key": .., "value": ..}``), lists of scalars (repeated scalars) and scalars."""
    pad, lines = "  " * indent, []
    for key, value in message.items():
        items = value if isinstance(value, list) and value and isinstance(value[0], dict) else None
        if isinstance(value, dict) or items is not None:
            for item in items if items is not None else [value]:
                lines += [f"{pad}{key} {{", *to_pbtxt(item, indent + 1), f"{pad}}}"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def batch_dim(spec: ComponentSpec) -> str | None:
    """The symbolic dim that leads every input and output of ``spec``, if there is one."""
    firsts = {t.shape[0] if t.shape else None for t in spec.inputs + spec.outputs}
    first = firsts.pop() if len(firsts) == 1 else None
    return first if isinstance(first, str) else None


def graph_dims(path: Path) -> dict[str, list[int]]:
    """The input and output shapes ONNX Runtime sees in an ONNX file (-1 for a free dim): what Triton's
    onnxruntime backend, which asks its own session, compares a config with (outputs exactly). Graphs that
    declare their output shapes (edgefm's exports now do) agree with the manifest everywhere; in older bundles,
    ONNX Runtime's shape inference fixes some dims the file leaves symbolic, by version and optimization level."""
    import onnxruntime as ort

    # Default session options, as Triton opens it: the optimization level changes what shapes are reported.
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {v.name: [d if isinstance(d, int) else -1 for d in v.shape] for v in [*sess.get_inputs(),
                                                                              *sess.get_outputs()]}


def _tensors(tensors: tuple[TensorSpec, ...], batched: bool, declared: dict[str, list[int]] | None = None,
             exact: bool = False) -> list[dict[str, Any]]:
    """Config entries for ``tensors``: the spec's sizes and the graph's (``declared``) where it fixes one; with
    ``exact``, the graph's dims as they are."""
    out = []
    for t in tensors:
        dims = [d if isinstance(d, int) else -1 for d in t.shape]
        if declared is not None:
            dims = declared[t.name] if exact else [g if g != -1 else d for g, d in zip(declared[t.name], dims)]
        out.append({"name": t.name, "data_type": Enum(TRITON_DTYPES[t.dtype]), "dims": dims[1:] if batched else dims})
    return out


def _check_declared(path: Path, spec: ComponentSpec, declared: dict[str, list[int]]) -> None:
    for t in spec.inputs + spec.outputs:
        dims = declared.get(t.name)
        if dims is None or len(dims) != len(t.shape) or any(
                isinstance(s, int) and d != -1 and d != s for s, d in zip(t.shape, dims)):
            raise BundleError(f"{path}: tensor {t.name!r} is declared {dims} in the graph but {list(t.shape)} in the "
                              "manifest; re-export the bundle")


def _warmup(spec: ComponentSpec, batched: bool) -> list[dict[str, Any]]:
    inputs = []
    for t in spec.inputs:
        dims = [d if isinstance(d, int) else spec.dims[d].opt for d in (t.shape[1:] if batched else t.shape)]
        inputs.append({"key": t.name, "value": {"data_type": Enum(TRITON_DTYPES[t.dtype]), "dims": dims,
                                                "zero_data": True}})
    return [{"name": "zeros at the opt shapes", "batch_size": 1, "inputs": inputs}]


def tensorrt_accelerator(name: str, entry: ComponentEntry) -> dict[str, Any]:
    """ONNX Runtime's TensorRT provider inside Triton, set up as edgefm's ort-trt backend is (fp16; int8 for a
    Q/DQ graph, whose scales are in it), with the engine cached per model and one optimization profile over the
    spec's ranges, so a new request shape inside them never rebuilds an engine while serving."""
    params = {"precision_mode": "INT8" if entry.explicitly_quantized else "FP16",
              "trt_engine_cache_enable": "1", "trt_engine_cache_path": f"/tmp/edgefm-triton-trt/{name}",
              "trt_timing_cache_enable": "1", **trt_profile_options(entry.spec)}
    return {"name": "tensorrt", "parameters": [{"key": k, "value": v} for k, v in params.items()]}


def model_config(name: str, entry: ComponentEntry, device: str, instances: int, batching: bool,
                 queue_delay_us: int, accelerator: str = "cuda", declared: dict[str, list[int]] | None = None
                 ) -> dict[str, Any]:
    """The ``config.pbtxt`` of one component file, as a dict for :func:`to_pbtxt`. ``declared``: the ONNX
    graph's own I/O dims (:func:`graph_dims`); outputs are written with them, as Triton's onnxruntime backend
    wants them exactly, and inputs with the manifest's sizes, which it accepts where the graph has -1."""
    spec = entry.spec
    dim = batch_dim(spec) if batching else None
    if dim and declared is not None and any(declared[t.name][0] != -1 for t in spec.inputs + spec.outputs):
        dim = None  # Triton batches only along a dim the graph leaves free
    engine = entry.format == "tensorrt"
    config: dict[str, Any] = {"name": name}
    config.update({"platform": "tensorrt_plan", "default_model_filename": "model.plan"} if engine else
                  {"backend": "onnxruntime", "default_model_filename": "model.onnx"})
    config["max_batch_size"] = spec.dims[dim].max if dim else 0
    config["input"] = _tensors(spec.inputs, dim is not None, declared)
    config["output"] = _tensors(spec.outputs, dim is not None, declared, exact=True)
    if dim:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": queue_delay_us} if queue_delay_us else {}
    config["instance_group"] = [{"count": instances, "kind": Enum("KIND_GPU" if device == "gpu" else "KIND_CPU")}]
    acc = None
    if not engine and device == "gpu" and accelerator == "tensorrt":
        acc = tensorrt_accelerator(name, entry)
    elif not engine and device == "gpu" and entry.precision == "fp32":
        acc = {"name": "cuda", "parameters": [{"key": "use_tf32", "value": "0"}]}
    if acc is not None:
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [acc]}}
    config["model_warmup"] = _warmup(spec, dim is not None)
    return config


def ensemble_config(name: str, prefix: str, specs: list[ComponentSpec],
                    last_outputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A Triton ensemble running ``specs`` in order; each tensor keeps its name from producer to consumer. Its
    outputs are declared as the last step's config declares them (``last_outputs``), else from its spec."""
    made: set[str] = set()
    inputs: list[TensorSpec] = []
    steps = []
    for spec in specs:
        inputs += [t for t in spec.inputs if t.name not in made]
        made |= set(spec.output_names)
        steps.append({"model_name": f"{prefix}_{spec.name}", "model_version": -1,
                      "input_map": [{"key": t, "value": t} for t in spec.input_names],
                      "output_map": [{"key": t, "value": t} for t in spec.output_names]})
    return {"name": name, "platform": "ensemble", "max_batch_size": 0, "input": _tensors(tuple(inputs), False),
            "output": last_outputs or _tensors(specs[-1].outputs, False), "ensemble_scheduling": {"step": steps}}


def _header(bundle: Path, manifest: Manifest, entry: ComponentEntry | None, what: str) -> list[str]:
    lines = [f"# Written by `edgefm triton` from {bundle.resolve()} ({manifest.family} {manifest.variant}): {what}."]
    if entry is not None and entry.format == "tensorrt":
        info = entry.info
        lines.append(f"# TensorRT {info.get('tensorrt_version')} engine for {info.get('gpu')} (compute capability "
                     f"{info.get('compute_capability')}): Triton's TensorRT must be this version and the GPU this "
                     "kind, or the model fails to load; rebuild with `edgefm build-engine` where Triton runs.")
    return lines


def plan_models(manifest: Manifest, bundle: Path, backend: str, precision: str | None, device: str
                ) -> dict[str, ComponentEntry]:
    """Component name -> the file to serve. ``backend='tensorrt'`` serves engines where the bundle has them and
    ONNX (on Triton's onnxruntime backend) for the components it has none for."""
    if backend not in ("onnxruntime", "tensorrt"):
        raise InputError(f"--backend {backend!r}: Triton serves edgefm bundles with 'onnxruntime' or 'tensorrt'")
    if device not in ("gpu", "cpu"):
        raise InputError(f"--device {device!r}: expected 'gpu' or 'cpu'")
    fmt = "tensorrt" if backend == "tensorrt" else "onnx"
    if backend == "tensorrt":
        if device == "cpu":
            raise InputError("--backend tensorrt needs --device gpu: TensorRT engines run on NVIDIA GPUs only")
        if not any(c.format == "tensorrt" for c in manifest.components):
            raise BundleError(f"{bundle} has no TensorRT engines: run `edgefm build-engine {bundle}` on a machine "
                              "with the GPU and TensorRT version of your Triton server, or use --backend onnxruntime")
    check_precision(manifest, bundle, fmt, precision)
    chosen = {}
    for name in manifest.component_names:
        use = fmt if manifest.find(name, format=fmt) else "onnx"
        chosen[name] = choose_entry(manifest, bundle, name, use, precision, on_gpu=device == "gpu")
    return chosen


def write_repository(bundle: str | Path, out: str | Path, backend: str = "onnxruntime", precision: str | None = None,
                     prefix: str | None = None, device: str = "gpu", instances: int = 1, queue_delay_us: int = 0,
                     overwrite: bool = False, accelerator: str = "cuda") -> dict[str, Path]:
    """Write ``bundle``'s components (and SAM's ensemble) as Triton models under ``out``; returns name -> folder.
    ``accelerator='tensorrt'``: ONNX models run on ONNX Runtime's TensorRT provider (see
    :func:`tensorrt_accelerator`) instead of its CUDA provider."""
    bundle, out = Path(bundle), Path(out)
    manifest = read_manifest(bundle)
    prefix = prefix if prefix is not None else re.sub(r"[^A-Za-z0-9_.-]+", "_", bundle.resolve().name)
    if not _NAME.fullmatch(prefix):
        raise InputError(f"--name {prefix!r}: Triton model names are folder names; use letters, digits, _ . -")
    if instances < 1 or queue_delay_us < 0:
        raise InputError(f"--instances must be at least 1 (got {instances}) and --max-queue-delay-us at least 0 "
                         f"(got {queue_delay_us})")
    if accelerator not in ("cuda", "tensorrt"):
        raise InputError(f"--accelerator {accelerator!r}: expected 'cuda' or 'tensorrt'")
    if accelerator == "tensorrt" and (device != "gpu" or backend != "onnxruntime"):
        raise InputError("--accelerator tensorrt is ONNX Runtime's TensorRT provider for ONNX models on a GPU: it "
                         "needs --backend onnxruntime and --device gpu (for engines, use --backend tensorrt)")
    chosen = plan_models(manifest, bundle, backend, precision, device)
    suffix, members = ENSEMBLES.get(manifest.family, ("", ()))
    ensemble = bool(members) and all(m in chosen for m in members)
    names = {c: f"{prefix}_{c}" for c in chosen} | ({suffix: f"{prefix}_{suffix}"} if ensemble else {})
    clash = sorted(n for n in names.values() if (out / n).exists())
    if clash and not overwrite:
        raise InputError(f"{out} already has the models {clash}; pass --overwrite to replace them, or --name to "
                         "write these under another prefix")
    for entry in chosen.values():
        check_files(bundle, entry)
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".edgefm-triton-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    configs: dict[str, dict[str, Any]] = {}
    try:
        for comp, entry in chosen.items():
            folder = stage / names[comp]
            (folder / "1").mkdir(parents=True)
            shutil.copyfile(bundle / entry.file, folder / "1" / ("model.plan" if entry.format == "tensorrt"
                                                                 else "model.onnx"))
            for extra in entry.extra_files:  # ONNX external data, found by its recorded name beside the graph
                shutil.copyfile(bundle / extra, folder / "1" / extra)
            batching = not (ensemble and comp in members)  # an ensemble passes whole tensors between its steps
            declared = None
            if entry.format == "onnx":
                declared = graph_dims(bundle / entry.file)
                _check_declared(bundle / entry.file, entry.spec, declared)
            config = model_config(names[comp], entry, device, instances, batching, queue_delay_us, accelerator,
                                  declared)
            configs[comp] = config
            what = f"component {comp}, {entry.file} ({entry.format} {entry.precision})"
            (folder / "config.pbtxt").write_text("\n".join(_header(bundle, manifest, entry, what)
                                                           + to_pbtxt(config)) + "\n")
        if ensemble:
            folder = stage / names[suffix]
            (folder / "1").mkdir(parents=True)  # Triton wants a version folder, empty for an ensemble
            config = ensemble_config(names[suffix], prefix, [chosen[m].spec for m in members],
                                     configs[members[-1]]["output"])
            what = f"ensemble of {' -> '.join(members)}"
            (folder / "config.pbtxt").write_text("\n".join(_header(bundle, manifest, None, what)
                                                           + to_pbtxt(config)) + "\n")
        written = {}
        for name in names.values():
            target = out / name
            if target.exists():
                shutil.rmtree(target)
            (stage / name).rename(target)
            written[name] = target
        return written
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def add_triton_parser(sub: Any) -> Any:
    """Register ``edgefm triton`` on an argparse subparsers object."""
    from edgefm.runtime.manifest import add_precision_arg

    p = sub.add_parser("triton", help="write a bundle's components as a Triton Inference Server model repository")
    p.add_argument("bundle")
    p.add_argument("--out", required=True, help="the model repository folder (created; other models are kept)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="serve the ONNX files (Triton's onnxruntime backend) or the bundle's TensorRT engines")
    p.add_argument("--device", default="gpu", choices=["gpu", "cpu"], help="instance kind (default: gpu)")
    p.add_argument("--instances", type=int, default=1, help="model instances per device (default: 1)")
    p.add_argument("--name", default=None, help="model name prefix (default: the bundle folder's name)")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="how long the dynamic batcher may hold a request to fill a batch (default: 0)")
    p.add_argument("--accelerator", default="cuda", choices=["cuda", "tensorrt"],
                   help="ONNX models on a GPU: ONNX Runtime's CUDA provider (default) or its TensorRT provider "
                        "(fp16, engines cached, one profile over the manifest's ranges)")
    p.add_argument("--overwrite", action="store_true", help="replace models of the same names in --out")
    add_precision_arg(p, "serve")
    p.set_defaults(func=cmd_triton)
    return p


def cmd_triton(args: Any) -> None:
    written = write_repository(args.bundle, args.out, args.backend, args.precision, args.name, args.device,
                               args.instances, args.max_queue_delay_us, args.overwrite, args.accelerator)
    for name, folder in written.items():
        files = sorted(p.name for p in (folder / "1").iterdir())
        print(f"  {name:<32} {', '.join(files) or '(ensemble)'}")
    print(f"wrote {len(written)} models to {args.out}; serve them with "
          f"`tritonserver --model-repository {Path(args.out).resolve()}`")
