"""``edgefm bench``: per-component latency statistics (trtexec-style), pipeline figures, memory, and a stamp.

Conventions. A latency is the host wall time of one ``Runner.run`` call: host arrays in, host arrays out, so
on a GPU backend the host<->device copies are inside it. Where the backend can say how much of it is copies,
the split is reported beside it: CUDA events around the copies and the launch (native TensorRT), or the same
component re-timed with device-resident inputs and outputs (ONNX Runtime CUDA / TensorRT EP, IO binding).
Every figure comes from exactly ``iters`` timed calls after ``warmup`` untimed ones (and, per component, a
cold-start record before them: opening it, sha256 check included, then its first call); statistics are min /
median / mean / p90 / p99 / max in milliseconds (linear-interpolated percentiles), the median's 95%
confidence interval and the coefficient of variation (:mod:`edgefm.runtime.timing`), and throughput as calls
per second (qps) and items per second (qps x batch); ``warnings`` lists rows whose median is uncertain and
a machine that was busy when the run started. Inputs are seeded dummy data valid for the component:
shapes at the spec's opt sizes with the batch dims (``batch``, ``image_batch``) at ``--batch``, values by
dtype (floats standard normal, integers in [0, 16)) unless the family says what is valid (SAM point labels in
{-1, 0, 1, 2, 3}; token ids below the vocabulary size the manifest declares). Peak host memory is the process's
peak RSS (``getrusage``), device memory the device-wide use reported by nvidia-smi (other processes included;
ONNX Runtime's CUDA arena keeps what it grew to, so after the runs this is about its peak).

Pipelines time the family's runtime API end to end on one seeded VGA frame (480x640): SAM ``set_image`` and
one click; CLIP the 1000 ImageNet labels encoded once (timed once: a label index is built once and cached),
then one frame classified against the cached embeddings; DALL·E one image per iteration (prefill, grid²
sampling steps, dVAE decode), or only the dVAE decode of one code grid for a bundle without a prior.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .bench_compare import compare, compare_lines, read_baseline
from .bench_env import device_memory_used_mib, environment_stamp, load_average, peak_rss_mib, usable_cores
from .bench_pipelines import PIPELINES
from .bench_plot import bench_rows, plot_bars
from .bench_profile import op_profile, profile_lines
from .bundle import Bundle
from .errors import InputError
from .image_prep import PREPROCESS
from .manifest import Manifest, add_precision_arg, write_json_atomic
from .spec import ComponentSpec
from .timing import latency_stats, stability_warnings, time_calls

SCHEMA = "edgefm.bench/1"
PYTORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
BATCH_DIMS = ("batch", "image_batch")
SMALL_INT = 16  # default upper bound of integer inputs: inside every vocabulary and position range
Rule = tuple  # ("uniform", lo, hi) | ("choice", values) | ("int", lo, hi)


def value_rules(manifest: Manifest) -> dict[str, Rule]:
    """Per input name, the values a component accepts where random data would be invalid."""
    cfg, rules = manifest.config, {}
    if manifest.family == "sam":
        size = float(cfg.get("image_size", manifest.preprocess.get("image_size", 1024)))
        rules = {"point_coords": ("uniform", 0.0, size), "point_labels": ("choice", (-1, 0, 1, 2, 3)),
                 "has_mask_input": ("choice", (0, 1))}
    for key, names in (("image_vocab", ("image_tokens", "token")), ("text_vocab", ("text_tokens",))):
        if isinstance(cfg.get(key), int):
            rules.update({n: ("int", 0, cfg[key]) for n in names})
    return rules


def sample(rule: Rule, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Values of one :func:`value_rules` rule."""
    if rule[0] == "uniform":
        return rng.uniform(rule[1], rule[2], shape)
    if rule[0] == "choice":
        return rng.choice(np.asarray(rule[1]), shape)
    return rng.integers(rule[1], rule[2], shape)  # "int"


def dummy_feeds(spec: ComponentSpec, batch: int, rng: np.random.Generator,
                rules: dict[str, Rule] | None = None, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded inputs for ``spec`` at its opt sizes with every batch dim at ``batch`` and the dims named in
    ``dims`` at theirs (trtexec's ``--shapes``, by dim name)."""
    sizes = {}
    wanted = {**{d: (f"--batch {batch}", batch) for d in BATCH_DIMS},
              **{d: (f"--dim {d}={n}", n) for d, n in (dims or {}).items()}}
    for d, (flag, n) in wanted.items():
        if d in spec.dims:
            r = spec.dims[d]
            if not r.min <= n <= r.max:
                raise InputError(f"{flag} is outside the {d} range [{r.min}, {r.max}] of component "
                                 f"{spec.name!r}; choose a size inside it")
            sizes[d] = n
    feeds = {}
    for t in spec.inputs:
        shape, dtype, rule = spec.concrete_shape(t, "opt", **sizes), np.dtype(t.dtype), (rules or {}).get(t.name)
        if rule is not None:
            a = sample(rule, shape, rng)
        elif dtype == np.bool_:
            a = rng.random(shape) < 0.5
        elif dtype == np.uint8:
            a = rng.integers(0, 256, shape)
        elif np.issubdtype(dtype, np.integer):
            a = rng.integers(0, SMALL_INT, shape)
        else:
            a = rng.standard_normal(shape)
        feeds[t.name] = np.ascontiguousarray(a, dtype=dtype)
    return feeds


def _ort_device_split(runner: Any, feeds: dict[str, np.ndarray], iters: int, warmup: int,
                      total_median_ms: float) -> dict[str, Any]:
    """ORT on a GPU: re-time with inputs uploaded once and outputs left on the device (IO binding)."""
    resident = latency_stats(time_calls(runner.resident_call(feeds), iters, warmup))
    compute = resident["latency_ms"]["median"]
    return {"method": "device-resident re-run (IO binding)", "compute_ms": compute,
            "transfer_ms": max(0.0, total_median_ms - compute), "h2d_ms": None, "d2h_ms": None}


def graph_replay(runner: Any, feeds: dict[str, np.ndarray], iters: int, warmup: int) -> dict[str, Any]:
    """ONNX Runtime: the component captured as a graph for these shapes (a CUDA graph on ort-cuda; on ort-cpu,
    a static-shape session with pre-bound buffers) and replayed with inputs and outputs left in place: the
    time without per-call launches and copies, as trtexec's ``--useCudaGraph``."""
    from .backends.onnxruntime import _CapturedGraph

    graph = _CapturedGraph(runner, runner.spec.check_feeds(feeds))
    stats = latency_stats(time_calls(graph.replay, iters, warmup))
    return {"method": "captured graph, inputs and outputs on the device", "median_ms": stats["latency_ms"]["median"],
            "p90_ms": stats["latency_ms"]["p90"]}


def bench_component(bundle: Bundle, name: str, feeds: dict[str, np.ndarray], batch: int, iters: int, warmup: int,
                    cuda_graph: bool = False, profile: bool = False) -> dict[str, Any]:
    """Time component ``name`` on ``feeds`` (:func:`dummy_feeds`; ``batch`` is their batch size)."""
    t0 = time.perf_counter()
    entry, runner = bundle.entry(name), bundle.runner(name)  # opens it: sha256 check, session or engine
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner.run(feeds)  # the first call (lazy allocations, kernel selection), before the warm-up
    cold = {"load_ms": load_s * 1e3, "first_call_ms": (time.perf_counter() - t0) * 1e3}
    items = batch if any(d in entry.spec.dims for d in BATCH_DIMS) else 1
    split = None
    if hasattr(runner, "run_timed"):  # native TensorRT: CUDA events split copies from compute
        parts: list[dict[str, float]] = []
        stats = latency_stats(time_calls(lambda: parts.append(runner.run_timed(feeds)[1]), iters, warmup), items)
        split = {"method": "CUDA events", "transfer_ms": None}
        for key in ("h2d_ms", "compute_ms", "d2h_ms"):
            split[key] = float(np.median([p[key] for p in parts[warmup:]]))
        split["transfer_ms"] = split["h2d_ms"] + split["d2h_ms"]
    else:
        stats = latency_stats(time_calls(lambda: runner.run(feeds), iters, warmup), items)
        if getattr(runner, "device", "cpu") != "cpu" and hasattr(runner, "run_on_device"):
            split = _ort_device_split(runner, feeds, iters, warmup, stats["latency_ms"]["median"])
    graph = None
    if cuda_graph and entry.format == "onnx":
        try:
            graph = graph_replay(runner, feeds, iters, warmup)
        except Exception as exc:  # e.g. a node ONNX Runtime keeps on the CPU: a captured graph cannot hold it
            graph = {"method": "captured graph", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return {"kind": "component", "format": entry.format, "precision": entry.precision, "file": entry.file,
            "batch": items, "inputs": {k: list(v.shape) for k, v in feeds.items()}, **stats, "transfer": split,
            "cuda_graph": graph, "cold_start": cold,
            "profile": op_profile(runner, feeds, iters, warmup) if profile else None}


def bench_bundle(path: str | Path, backend: str = "auto", batch: int = 1, iters: int = 50, warmup: int = 5,
                 threads: int | None = None, pipelines: bool = True, seed: int = 0,
                 progress: Callable[[str], None] | None = None, cuda_graph: bool = False,
                 precision: str | None = None, tf32: bool = False, pytorch: str | Path | None = None,
                 dims: dict[str, int] | None = None, preprocess: str = "auto", profile: bool = False,
                 components: list[str] | None = None, pytorch_compile: str | None = None) -> dict[str, Any]:
    """Benchmark every component of the bundle at ``path`` (and its family's pipelines); see the module doc.
    ``cuda_graph``: also time each ONNX component as a replayed CUDA graph (ort-cuda only); ``precision``:
    time that precision of the components that have it; ``tf32``: fp32 in TF32 on ort-cuda (see :class:`Bundle`);
    ``pytorch``: the checkpoint the bundle came from, also timed in PyTorch on the same inputs and device
    (:mod:`edgefm.export.torch_bench`; needs torch); ``dims``: sizes of named symbolic dims for the inputs
    (e.g. ``{"length": 77}``) instead of their opt sizes; ``preprocess``: the SAM and CLIP pipelines' (see
    :class:`~edgefm.runtime.sam.SamPredictor`): with the device's, they are also timed with the host's;
    ``profile``: each component's time by operator type (:mod:`edgefm.runtime.bench_profile`; ONNX Runtime);
    ``components``: time only these (pipelines are separate: ``pipelines=False`` leaves them out);
    ``pytorch_compile``: a ``torch.compile`` mode for the PyTorch side (compiled before it is timed)."""
    for flag, value, lo in (("--batch", batch, 1), ("--iters", iters, 1), ("--warmup", warmup, 0)):
        if int(value) < lo:
            raise InputError(f"{flag} must be at least {lo}, got {value}")
    # Runners load lazily: nothing is on the GPU yet.
    bundle = Bundle(path, backend=backend, threads=threads, precision=precision, tf32=tf32)
    dims = dict(dims or {})
    names = list(bundle.manifest.component_names)
    if unknown := [c for c in components or () if c not in names]:
        raise InputError(f"--components: {bundle.path} has no component {', '.join(map(repr, unknown))} "
                         f"(it has {', '.join(names)})")
    names = [n for n in names if components is None or n in components]
    known = sorted({d for n in bundle.manifest.component_names for d in bundle.spec(n).dims})
    for d in dims:
        if d not in known:
            raise InputError(f"--dim {d}: no component of {bundle.path} has a dim of that name (it has {known})")
        if d in BATCH_DIMS:
            raise InputError(f"--dim {d}: batch dims are set with --batch (it also scales the throughput)")
    if cuda_graph and bundle.backend != "ort-cuda":
        raise InputError(f"--cuda-graph replays ONNX Runtime CUDA graphs: it needs --backend ort-cuda, not "
                         f"{bundle.backend!r} (the tensorrt backend captures CUDA graphs by itself)")
    if profile and bundle.backend == "tensorrt":
        raise InputError("--profile reads ONNX Runtime's profiler; for TensorRT engines run trtexec --loadEngine="
                         "ENGINE --dumpProfile --separateProfileRun (per-layer GPU times)")
    if pytorch_compile is not None and pytorch is None:
        raise InputError("--pytorch-compile sets how the --pytorch CHECKPOINT runs: give the checkpoint too")
    if pytorch is not None:
        from edgefm.export.torch_bench import check_checkpoint  # torch: only when asked for

        pytorch = check_checkpoint(bundle, pytorch)
    on_gpu = bundle.backend != "ort-cpu"
    load_start = load_average()
    device_before = device_memory_used_mib() if on_gpu else None
    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {
        "schema": SCHEMA, "bundle": str(Path(path)), "family": bundle.family, "variant": bundle.manifest.variant,
        "backend": bundle.backend, "batch": batch, "iters": iters, "warmup": warmup, "seed": seed,
        "dims": dims, "components": {}, "pipelines": {},
    }
    feeds: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        if progress:
            progress(f"timing {name} on {bundle.backend}")
        feeds[name] = dummy_feeds(bundle.spec(name), batch, rng, value_rules(bundle.manifest), dims)
        result["components"][name] = bench_component(bundle, name, feeds[name], batch, iters, warmup, cuda_graph,
                                                     profile)
    if pipelines and bundle.family in PIPELINES:
        if progress:
            progress(f"timing the {bundle.family} pipelines")
        result["pipelines"] = PIPELINES[bundle.family](bundle, iters, warmup, rng, preprocess)
    device_after = device_memory_used_mib() if on_gpu else None
    result["memory"] = {"peak_host_rss_mib": peak_rss_mib(), "device_used_before_mib": device_before,
                        "device_used_after_mib": device_after}
    if pytorch is not None:  # after the memory figures: they are edgefm's alone
        from edgefm.export.torch_bench import time_pytorch

        torch_results = time_pytorch(bundle, pytorch, feeds, result["components"], iters, warmup, threads,
                                     progress, compile_mode=pytorch_compile)
        for name, r in torch_results.items():
            result["components"][name]["pytorch"] = r
        result["pytorch_checkpoint"] = str(pytorch)
    result["environment"] = environment_stamp(bundle, threads, load_start)
    result["warnings"] = stability_warnings(bench_rows(result), load_start[0] if load_start else None,
                                            usable_cores())
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """The results as a markdown table plus memory, transfer and environment lines."""
    env = result["environment"]
    lines = [f"## edgefm bench: {result['family']}/{result['variant']} on {result['backend']} "
             f"(batch {result['batch']}, {result['iters']} iterations after {result['warmup']} warm-up)", "",
             "| component | precision | inputs | min ms | median ms | median 95% CI | mean ms | p90 ms | p99 ms "
             "| throughput |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for name, r in bench_rows(result):
        ms = r["latency_ms"]
        shapes = ", ".join(f"{k} {'x'.join(str(d) for d in v)}" for k, v in r["inputs"].items())
        tput = f"{r['throughput']['qps']:.1f} qps"
        if r["batch"] > 1:
            tput += f", {r['throughput']['items_per_s']:.1f} items/s"
        ci = r.get("median_ci95_ms")
        ci = f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "-"
        lines.append(f"| {name} | {r.get('precision', '-')} | {shapes} | {ms['min']:.3f} | {ms['median']:.3f} | "
                     f"{ci} | {ms['mean']:.3f} | {ms['p90']:.3f} | {ms['p99']:.3f} | {tput} |")
    lines.append("")
    for name, r in result["components"].items():
        t = r.get("transfer")
        if t:
            lines.append(f"- {name}: compute {t['compute_ms']:.3f} ms, host<->device {t['transfer_ms']:.3f} ms "
                         f"({t['method']})")
        pt = r.get("pytorch")
        if pt:
            a, ms = pt["agreement"], pt["latency_ms"]["median"]
            lines.append(f"- {name}: PyTorch ({pt['device']}, {pt['math']}) {ms:.3f} ms median; edgefm takes "
                         f"{pt['ratio']:.2f}x its time; outputs on the same inputs: worst cosine/IoU "
                         f"{a['worst']:.6f} ({a['policy']} policy: {'pass' if a['passed'] else 'FAIL'})")
        g = r.get("cuda_graph")
        if g and "error" in g:
            lines.append(f"- {name}: could not be captured as a graph ({g['error']})")
        elif g:
            lines.append(f"- {name}: {g['median_ms']:.3f} ms median replayed as a {g['method']}")
    cold = [f"{name} {r['cold_start']['load_ms']:.0f} + {r['cold_start']['first_call_ms']:.0f} ms"
            for name, r in result["components"].items() if r.get("cold_start")]
    if cold:
        lines.append(f"- cold start (open incl. sha256 check + first call): {'; '.join(cold)}")
    for name, r in result["pipelines"].items():
        n = r["iterations"]
        runs = "" if n == result["iters"] else " (timed once)" if n == 1 else f" ({n} timed runs)"
        lines.append(f"- {name}: {r['description']}{runs}")
    mem = result["memory"]
    dev = f"{mem['device_used_after_mib']:.0f} MiB" if mem["device_used_after_mib"] is not None else (
        "not measured" if result["backend"] != "ort-cpu" else "n/a (CPU backend)")
    gpu = env["gpu"]["name"] if env["gpu"] else "none"
    load = (env.get("load_average") or {}).get("start")
    lines += [f"- memory: peak host RSS {mem['peak_host_rss_mib']:.0f} MiB; device in use after the runs {dev}",
              f"- environment: {env['cpu']} ({env['cpu_cores']} cores), GPU {gpu}; "
              + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
              + f"; threads {env['threads']['ort_intra_op'] or '-'}"
              + {True: "; fp32 in TF32", False: "; TF32 off"}.get(env.get("tf32"), "")
              + (f"; load average {load[0]:.1f} at the start" if load else "") + f"; {env['timestamp']}"]
    lines += [f"- WARNING: {w}" for w in result.get("warnings", [])]
    if result.get("baseline"):
        lines += compare_lines(result["baseline"])
    return "\n".join(lines + profile_lines(result)) + "\n"


def parse_dim(text: str) -> tuple[str, int]:
    name, _, size = text.partition("=")
    if not name or not size.strip().isdigit():
        raise InputError(f"--dim {text!r}: expected NAME=SIZE, e.g. length=77 or num_points=4")
    return name.strip(), int(size)


def cmd_bench(args: argparse.Namespace) -> None:
    baseline = read_baseline(args.baseline, SCHEMA) if args.baseline else None  # before minutes of timing
    result = bench_bundle(args.bundle, args.backend, args.batch, args.iters, args.warmup, args.threads,
                          pipelines=not args.no_pipelines,
                          progress=lambda m: print(f"edgefm: {m}", file=sys.stderr, flush=True),
                          cuda_graph=args.cuda_graph, precision=args.precision, tf32=args.tf32,
                          pytorch=args.pytorch, pytorch_compile=args.pytorch_compile,
                          dims=dict(parse_dim(d) for d in args.dim or ()),
                          preprocess=args.preprocess, profile=args.profile,
                          components=[c for c in args.components.split(",") if c] if args.components else None)
    if baseline is not None:
        result["baseline"] = {"file": str(args.baseline), **compare(result, baseline)}
    print(markdown_table(result), end="")
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    if args.plot:
        plot_bars(result, args.plot)
        print(f"wrote {args.plot}")


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``edgefm bench`` to an argparse subparsers object."""
    b = sub.add_parser("bench", help="time every component of a bundle (and its pipelines) on a backend")
    b.add_argument("bundle")
    b.add_argument("--backend", default="auto", help="auto | ort-cpu | ort-cuda | ort-trt | tensorrt")
    add_precision_arg(b, "time")
    b.add_argument("--batch", type=int, default=1, help="size of the batch dims (batch, image_batch)")
    b.add_argument("--dim", action="append", metavar="NAME=SIZE",
                   help="size of a named symbolic dim in the timed inputs, e.g. length=77, num_points=4 (repeatable; "
                        "default: each dim's opt size; batch dims: --batch), as trtexec's --shapes")
    b.add_argument("--iters", type=int, default=50, help="timed runs per component")
    b.add_argument("--warmup", type=int, default=5, help="untimed runs before them")
    b.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime")
    b.add_argument("--no-pipelines", action="store_true", help="time the components only")
    b.add_argument("--components", metavar="NAME[,NAME]",
                   help="time only these components, e.g. prior_step (default: all; pipelines unless --no-pipelines)")
    b.add_argument("--cuda-graph", action="store_true",
                   help="ort-cuda: also time each component replayed as a captured CUDA graph (trtexec's "
                        "--useCudaGraph)")
    b.add_argument("--tf32", action="store_true",
                   help="ort-cuda/ort-trt: run fp32 MatMul/Conv in TF32, as trtexec does by default (off: fp32 is "
                        "fp32, as in PyTorch and edgefm's fp32 engines)")
    b.add_argument("--pytorch", metavar="CHECKPOINT", default=None,
                   help="also time this checkpoint in PyTorch (the one the bundle was exported from: its sha256 is "
                        "checked) on the same inputs and device, and compare the outputs (SAM, CLIP; needs "
                        "edgefm[export])")
    b.add_argument("--pytorch-compile", choices=PYTORCH_COMPILE_MODES, default=None, metavar="MODE",
                   help="run the --pytorch side through torch.compile in this mode ("
                        + ", ".join(PYTORCH_COMPILE_MODES) + "; reduce-overhead adds CUDA graphs on a GPU), compiled "
                        "before the warm-up, so PyTorch is compared at its best, not only eager")
    b.add_argument("--preprocess", choices=PREPROCESS, default="auto",
                   help="where the SAM/CLIP pipelines resize and normalize (auto: the device on ONNX Runtime GPU "
                        "backends); on the device, the host's is timed beside it")
    b.add_argument("--profile", action="store_true",
                   help="also run each component under ONNX Runtime's profiler and show its time by operator type "
                        "(as trtexec's --dumpProfile; a separate session, so the timed figures are unaffected)")
    b.add_argument("--json", help="write all figures, samples and the environment stamp to this file")
    b.add_argument("--baseline", metavar="JSON",
                   help="compare each row with the same row of an earlier --json result: ratio of the medians, and "
                        "faster/slower only where their 95%% confidence intervals are apart")
    b.add_argument("--plot", help="write a bar chart (.png) of the latencies")
    b.set_defaults(func=cmd_bench)
    return b
