"""SAM on the CPU, side by side in one run: official segment-anything (PyTorch eager) vs edgefm (ORT CPU).

Both sides get the same seeded random weights, the same inputs and the same thread count. Each side runs in
its own child process, so that its peak RSS (the child's own VmHWM) is its own, and so that the edgefm child
provably never imports torch. The parent interleaves the children in rounds, so that load from other
processes on a shared machine falls on both sides alike; ratios are also given paired by round. Per side:

- ``image_encoder``: the encoder alone on one normalized, padded image (1, 3, S, S): official
  ``sam.image_encoder(x)`` under ``torch.inference_mode``, edgefm the bundle's ``image_encoder`` runner.
- ``set_image``: end to end on a 1500 x 2250 uint8 RGB image (resize, normalize, pad, encode), and its
  preprocessing alone.
- ``predict``: one foreground point -> 3 masks at full resolution (``multimask_output=True``) after
  set_image, and its parts: decoding to low-res logits (official: prompt encoder + mask decoder; edgefm: one
  prompt_decoder call against the image's decoder context, computed at the image's first click), upscaling
  the logits, thresholding.

``--precisions fp32,int8`` times an int8 bundle beside fp32 (``export_sam(precision="int8")``: image
encoder and mask decoder dynamically quantized, the prompt encoder fp32; the precision each component was
written in is recorded per side).

``python benchmarks/sam_cpu.py`` (vit_b: 30-60 minutes on 2 shared cores) writes results/sam_cpu.{json,md};
``python benchmarks/sam_cpu.py --variant tiny --iters 2 --warmup 1 --out-dir /tmp/x`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import machine, split, stats_ms, versions
from sam_cpu_sides import IMAGE_HW, OFFICIAL, POINT_XY, SEED, scene, serve

TARGETS = {"image_encoder": 0.45, "predict": 0.2}  # edgefm / official, from the SAM issue (section 6)
DISTS = ("torch", "onnxruntime", "numpy", "opencv-python-headless", "onnx", "segment-anything", "edgefm")

# --- the parent: weights, bundles, interleaved rounds, results (the sides: sam_cpu_sides.py) ---


class Child:
    """The parent's handle on one side's process."""

    def __init__(self, name: str, work: Path, threads: int, bundle: str | None = None) -> None:
        self.name, self.samples = name, {}
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", OFFICIAL if bundle is None else name,
               "--work", str(work), "--threads", str(threads), "--bundle", str(bundle)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"benchmark child {self.name!r} died (exit code {code}); see its stderr above")
        return json.loads(line)

    def ask(self, **cmd) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        return self._read()

    def close(self) -> dict[str, Any]:
        """Stop the child: its peak RSS, whether it imported torch, and the CPU time it used."""
        bye = self.ask(op="quit")
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        return {**bye, "cpu_user_s": usage.ru_utime, "cpu_system_s": usage.ru_stime}


def prepare(variant: str, precisions: list[str], work: Path, log) -> dict[str, Any]:
    """Seeded random weights, the shared inputs, and one edgefm bundle per precision (export timed)."""
    import dataclasses

    import torch
    from edgefm.export.sam import export_sam
    from edgefm.models.sam import SAM_CONFIGS, build_sam
    from edgefm.runtime.errors import ParityError
    from edgefm.runtime.sam.transforms import normalize_and_pad, resize_longest_side

    if variant not in SAM_CONFIGS:
        raise SystemExit(f"--variant {variant!r} is unknown; choose one of {sorted(SAM_CONFIGS)}")
    cfg = SAM_CONFIGS[variant]
    torch.manual_seed(SEED)
    model = build_sam(cfg).eval()
    with torch.no_grad():  # the official init leaves biases and position tables at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("bias") or "pos" in name.split(".")[-1]:
                param.normal_(0.0, 0.02)
    torch.save(model.state_dict(), work / "weights.pt")
    (work / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    image = scene(*IMAGE_HW)
    np.save(work / "image.npy", image)
    resized = resize_longest_side(image, cfg.image_size)
    x = normalize_and_pad(resized, cfg.image_size, cfg.pixel_mean, cfg.pixel_std)
    np.save(work / "encoder_input.npy", x)
    exports: dict[str, Any] = {}
    for side in precisions:
        precision, _, attention = side.partition("-")  # "fp32-fused": an --attention fused export
        log(f"exporting the {variant} {side} bundle ...")
        out, t0, gated = work / f"bundle_{side}", time.perf_counter(), True
        options = {"precision": precision, "attention": attention or "plain"}
        try:
            export_sam(model, out, variant, **options)
        except ParityError as exc:  # still worth timing; the results say that the gate failed
            log(f"  {side} misses the parity policy ({exc}); timing it anyway")
            export_sam(model, out, variant, **options, parity_gate=False, overwrite=True)
            gated = False
        parity = json.loads((out / "manifest.json").read_text())["parity"]
        summary = {c: {o: {k: m[k] for k in ("cosine", "max_abs", "mask_iou") if k in m}
                       for o, m in parity[c]["outputs"].items()}
                   for c in ("image_encoder", "prompt_encoder", "mask_decoder", "prompt_decoder") if c in parity}
        exports[side] = {"bundle": str(out), "export_s": time.perf_counter() - t0, **options,
                         "parity_gate_passed": gated, "parity": summary}
        log(f"  exported in {exports[side]['export_s']:.0f} s")
    return exports


def agreement(work: Path, names: list[str]) -> dict[str, Any]:
    """edgefm vs official on the same weights: the encoder on the same tensor, and predict's masks (whose
    inputs differ a little: set_image resizes with OpenCV on one side, PIL on the other)."""
    ref = np.load(work / f"out_{OFFICIAL}.npz")
    out = {}
    for name in names:
        got = np.load(work / f"out_{name}.npz")
        a, b = ref["embeddings"].astype(np.float64).ravel(), got["embeddings"].astype(np.float64).ravel()
        out[name] = {"encoder_max_abs": float(np.abs(a - b).max()),
                     "encoder_ref_max_abs": float(np.abs(a).max()),
                     "encoder_cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
                     "predict_mask_iou": [float((m & g).sum() / max(1, (m | g).sum()))
                                          for m, g in zip(ref["masks"], got["masks"])],
                     "predict_score_max_abs": float(np.abs(ref["scores"] - got["scores"]).max())}
    return out


def run(args) -> dict[str, Any]:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    predict_iters = args.predict_iters or max(10, 5 * args.iters)
    res: dict[str, Any] = {
        "benchmark": "sam_cpu", "variant": args.variant, "machine": machine(), "versions": versions(DISTS),
        "settings": {"iters": args.iters, "predict_iters": predict_iters, "warmup": args.warmup,
                     "rounds": args.rounds, "threads": args.threads, "image_hw": list(IMAGE_HW),
                     "point_xy": list(POINT_XY), "multimask_output": True, "seed": SEED},
        "targets": TARGETS, "loadavg": {"start": os.getloadavg()},
    }
    with tempfile.TemporaryDirectory(prefix="sam_cpu_") as tmp:
        work = Path(tmp)
        exports = prepare(args.variant, [p for p in args.precisions.split(",") if p], work, log)
        res["settings"]["encoder_input"] = list(np.load(work / "encoder_input.npy", mmap_mode="r").shape)
        res["export"] = {p: {k: v for k, v in e.items() if k != "bundle"} for p, e in exports.items()}
        children = [Child(OFFICIAL, work, args.threads)]
        children += [Child(f"edgefm-{p}", work, args.threads, e["bundle"]) for p, e in exports.items()]
        phases = [("image_encoder", args.iters), ("set_image", args.iters), ("preprocess", predict_iters),
                  ("predict", predict_iters), ("parts", predict_iters)]
        for what, n in phases:
            for r, k in enumerate(split(n, args.rounds)):
                # Alternate the order every round so that neither side always runs right after the other.
                for c in children if r % 2 == 0 else children[::-1]:
                    log(f"[{what}] round {r + 1}: {c.name} x{k}")
                    reply = c.ask(op="time", what=what, n=k, warmup=args.warmup if r == 0 else 0)
                    for key, s in reply.items():
                        c.samples.setdefault(key if what != "parts" else f"predict.{key}", []).append(s)
            res["loadavg"][f"after_{what}"] = os.getloadavg()
        for c in children:
            c.ask(op="outputs", what="outputs", path=str(work / f"out_{c.name}.npz"))
        res["agreement"] = agreement(work, [c.name for c in children[1:]])
        res["sides"] = {c.name: {**c.info, **c.close()} for c in children}
        for c in children:
            res["sides"][c.name].update({k: stats_ms(sum(v, [])) for k, v in c.samples.items()})
    ref, ref_rounds = res["sides"][OFFICIAL], children[0].samples
    res["ratios"] = {}
    for c in children[1:]:
        ratios = {k: res["sides"][c.name][k]["median_ms"] / ref[k]["median_ms"] for k in c.samples}
        # Paired by round (sides ran back to back): cancels load that drifts between rounds.
        paired = {k: float(np.median([np.median(a) / np.median(b) for a, b in zip(v, ref_rounds[k])]))
                  for k, v in c.samples.items()}
        res["ratios"][c.name] = {k: {"ratio": r, "paired_ratio": paired[k], "target": TARGETS.get(k),
                                     "pass": None if k not in TARGETS else r <= TARGETS[k]}
                                 for k, r in ratios.items()}
    res["loadavg"]["end"] = os.getloadavg()
    return res


def markdown(res: dict[str, Any]) -> str:
    names = list(res["sides"])
    sides, ours, ref = res["sides"], names[1:], res["sides"][OFFICIAL]
    m, v, s = res["machine"], res["versions"], res["settings"]
    h, w = s["image_hw"]
    rows = [("image_encoder", f"image encoder ({'×'.join(map(str, s['encoder_input']))} in)"),
            ("set_image", f"set_image {h}×{w} (preprocess + encoder)"), ("preprocess", "↳ preprocess"),
            ("predict", f"predict: 1 point → 3 masks at {h}×{w}"),
            ("predict.decoder", "↳ decode to low-res logits"),
            ("predict.upscale", f"↳ upscale logits to {h}×{w}"), ("predict.threshold", "↳ threshold")]
    head = ["measurement", *(f"{n} median (p90) ms" for n in names)]
    head += [*(f"{o} / official (paired)" for o in ours), "target"]
    lines = [f"# SAM {res['variant']} on the CPU: official segment-anything vs edgefm", "",
             f"{m['cpu_model']}, {m['usable_cpus']} cores ({', '.join(m['simd'])}), "
             f"{s['threads']} threads per side; torch {v['torch']}, onnxruntime {v['onnxruntime']}, "
             f"numpy {v['numpy']}, opencv {v['opencv-python-headless']}, "
             f"segment-anything {v['segment-anything']}, edgefm {v['edgefm']}. Load average "
             f"{res['loadavg']['start'][0]:.1f} at the start, {res['loadavg']['end'][0]:.1f} at the end "
             "(a shared machine: other processes competed for the 2 cores).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in rows:
        cells = [label, *(f"{sides[n][key]['median_ms']:.1f} ({sides[n][key]['p90_ms']:.1f})" for n in names)]
        for o in ours:
            r = res["ratios"][o][key]
            verdict = "" if r["pass"] is None else " PASS" if r["pass"] else " MISS"
            cells.append(f"{r['ratio']:.2f}×{verdict} ({r['paired_ratio']:.2f}×)")
        lines.append("| " + " | ".join([*cells, f"≤ {TARGETS[key]}×" if key in TARGETS else ""]) + " |")
    after_imports = ", ".join(f"{n} {sides[n]['rss_after_imports_mb']:.0f}" for n in names)
    cells = ["peak RSS, MiB", *(f"{sides[n]['peak_rss_mb']:.0f}" for n in names),
             *(f"{sides[o]['peak_rss_mb'] / ref['peak_rss_mb']:.2f}×" for o in ours), ""]
    lines += ["| " + " | ".join(cells) + " |", "",
              f"Timed runs per side: {s['iters']} (encoder, set_image), {s['predict_iters']} (predict and "
              f"its parts), after {s['warmup']} warm-up runs, interleaved over {s['rounds']} rounds; ratios "
              "of the medians, and in parentheses the median over rounds of each round's ratio. Peak RSS: "
              "VmHWM of each side's own process, imports and weight loading included (after imports: "
              f"{after_imports} MiB).", ""]
    for o in ours:
        a, e = res["agreement"][o], res["export"][o.split("-", 1)[1]]
        lines.append(f"- {o}: encoder cosine {a['encoder_cosine']:.7f} to the official output on the same "
                     f"tensor (max abs {a['encoder_max_abs']:.2g}); predict mask IoU "
                     f"{' / '.join(f'{i:.4f}' for i in a['predict_mask_iou'])}; "
                     f"attention {e.get('attention', 'plain')}, export "
                     f"{e['export_s']:.0f} s, parity gate "
                     f"{'passed' if e['parity_gate_passed'] else 'FAILED'}; "
                     f"ORT threads {sides[o]['ort_intra_op_threads']}; "
                     f"torch imported: {sides[o]['torch_imported']}.")
    lines.append(f"- official: torch threads {ref['torch_threads']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="vit_b", help="SAM variant, random weights (tiny: a smoke run)")
    ap.add_argument("--iters", type=int, default=10, help="timed runs of the encoder and set_image, per side")
    ap.add_argument("--predict-iters", type=int, help="timed predict runs per side (default 5 × iters)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs before the first timed round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds to split timed runs into")
    ap.add_argument("--threads", type=int, default=2, help="torch threads and ONNX Runtime intra-op threads")
    ap.add_argument("--precisions", default="fp32,fp16",
                    help="edgefm bundles to export and time, comma-separated: fp32, fp16, int8; "
                         "PRECISION-ATTENTION (e.g. fp32-fused) exports with that --attention")
    ap.add_argument("--name", default="sam_cpu", help="results file stem under --out-dir")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return serve(args.worker, args.work, args.threads, args.bundle)
    res = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out_dir / f"{args.name}.md").write_text(md := markdown(res))
    print(md)


if __name__ == "__main__":
    main()
