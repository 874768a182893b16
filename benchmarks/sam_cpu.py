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
  set_image, and its parts: prompt encoder + mask decoder, upscaling the logits, thresholding.

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
from common import machine, stats_ms, timed, versions

TARGETS = {"image_encoder": 0.45, "predict": 0.2}  # edgefm / official, from the SAM issue (section 6)
IMAGE_HW = (1500, 2250)  # the non-square photo, (H, W)
POINT_XY = (1310.0, 640.0)  # one foreground click, XY pixels of that photo
SEED = 0
OFFICIAL = "official"
PARTS = ("decoder", "upscale", "threshold")

# --- helpers shared by parent and children: numpy + stdlib only (the edgefm child must stay torch-free) ---

DISTS = ("torch", "onnxruntime", "numpy", "opencv-python-headless", "onnx", "segment-anything", "edgefm")






def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory of this process now (VmRSS) or its peak so far (VmHWM), MiB."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field))
    return int(line.split()[1]) / 1024


def scene(h: int, w: int, seed: int = SEED) -> np.ndarray:
    """A smooth gradient with a few filled discs and squares: HWC uint8 RGB, something to segment."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 200, yy / h * 200, (xx + yy) / (w + h) * 150 + 50], -1).astype(np.uint8)
    for _ in range(4):
        color = rng.integers(0, 255, 3).astype(np.uint8)
        cx, cy = rng.integers(w // 5, 4 * w // 5), rng.integers(h // 5, 4 * h // 5)
        r = rng.integers(min(h, w) // 10, min(h, w) // 4)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        img[disc if rng.random() < 0.5 else (abs(xx - cx) <= r) & (abs(yy - cy) <= r)] = color
    return img


# --- the two sides: the same operations, served by a child process over a JSON-lines pipe ---


class OfficialSide:
    """segment-anything's Sam and SamPredictor, PyTorch eager, fp32."""

    def __init__(self, work: Path, threads: int) -> None:
        from functools import partial

        import segment_anything.modeling as sm
        import torch
        from segment_anything import SamPredictor

        self.torch = torch
        torch.set_num_threads(threads)
        self.rss_after_imports = rss_mb()
        c = json.loads((work / "config.json").read_text())
        s, e, d = c["image_size"], c["image_size"] // c["patch_size"], c["prompt_embed_dim"]
        # The official build_sam wiring with the variant's numbers (for vit_b: sam_model_registry["vit_b"]).
        encoder = sm.ImageEncoderViT(
            depth=c["encoder_depth"], embed_dim=c["encoder_embed_dim"], img_size=s, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=c["encoder_num_heads"],
            patch_size=c["patch_size"], qkv_bias=True, use_rel_pos=True, window_size=c["window_size"],
            global_attn_indexes=c["encoder_global_attn_indexes"], out_chans=d)
        prompt = sm.PromptEncoder(embed_dim=d, image_embedding_size=(e, e), input_image_size=(s, s),
                               mask_in_chans=c["mask_in_chans"])
        transformer = sm.TwoWayTransformer(depth=c["decoder_depth"], embedding_dim=d,
                                        mlp_dim=c["decoder_mlp_dim"], num_heads=c["decoder_num_heads"])
        decoder = sm.MaskDecoder(num_multimask_outputs=c["num_multimask_outputs"], transformer=transformer,
                              transformer_dim=d, iou_head_depth=c["iou_head_depth"],
                              iou_head_hidden_dim=c["iou_head_hidden_dim"])
        sam = sm.Sam(encoder, prompt, decoder, pixel_mean=c["pixel_mean"], pixel_std=c["pixel_std"])
        # What sam_model_registry does with a checkpoint: torch.load, then a strict load_state_dict.
        sam.load_state_dict(torch.load(work / "weights.pt", weights_only=True), strict=True)
        self.sam = sam.eval()
        self.predictor = SamPredictor(self.sam)
        self.x = torch.from_numpy(np.load(work / "encoder_input.npy"))
        self.image = np.load(work / "image.npy")
        self.info = {"torch_threads": torch.get_num_threads(), "backend": "PyTorch eager, CPU, fp32"}

    def image_encoder(self) -> np.ndarray:
        with self.torch.inference_mode():
            return self.sam.image_encoder(self.x).numpy()

    def preprocess(self):
        """set_image without the encoder: PIL resize, to tensor, normalize and pad."""
        p = self.predictor
        x = self.torch.as_tensor(p.transform.apply_image(self.image)).permute(2, 0, 1).contiguous()[None]
        return self.sam.preprocess(x)

    def decode(self):
        """predict_torch up to the low-res logits (the official predict runs under no_grad)."""
        p, sam = self.predictor, self.sam
        torch = self.torch
        pts = torch.as_tensor(p.transform.apply_coords(np.array([POINT_XY]), p.original_size))[None].float()
        with torch.no_grad():
            sparse, dense = sam.prompt_encoder(points=(pts, torch.ones(1, 1, dtype=torch.int)), boxes=None,
                                               masks=None)
            return sam.mask_decoder(image_embeddings=p.features, image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=True)[0]

    def upscale(self, low):
        with self.torch.no_grad():
            return self.sam.postprocess_masks(low, self.predictor.input_size, self.predictor.original_size)

    def threshold(self, masks) -> np.ndarray:
        return (masks > self.sam.mask_threshold)[0].numpy()


class EdgefmSide:
    """edgefm's torch-free SamPredictor on an exported bundle, ONNX Runtime CPU."""

    def __init__(self, work: Path, threads: int, bundle: str) -> None:
        import cv2
        from edgefm.runtime.sam import SamPredictor, transforms

        self.transforms = transforms
        self.rss_after_imports = rss_mb()
        self.predictor = p = SamPredictor(bundle, backend="ort-cpu", threads=threads)
        self.x = np.load(work / "encoder_input.npy")
        self.image = np.load(work / "image.npy")
        so = p.encoder.session.get_session_options()
        self.info = {"ort_intra_op_threads": so.intra_op_num_threads, "backend": p.backend,
                     "ort_inter_op_threads": so.inter_op_num_threads,
                     "ort_graph_optimization": str(so.graph_optimization_level),
                     "ort_providers": p.encoder.session.get_providers(),
                     "opencv_threads": cv2.getNumThreads(),
                     "precision": {c: p.bundle.entry(c).precision for c in ("image_encoder", "mask_decoder")}}

    def image_encoder(self) -> np.ndarray:
        return self.predictor.encoder.run({"image": self.x})["image_embeddings"]

    def preprocess(self) -> np.ndarray:
        p, t = self.predictor, self.transforms
        resized = t.resize_longest_side(self.image, p.image_size)
        return t.normalize_and_pad(resized, p.image_size, p.mean, p.std)

    def decode(self) -> np.ndarray:
        """The predictor's two runner calls; the prompt in the official layout (point + padding point)."""
        p, s = self.predictor, self.predictor.low_res_size
        pts = self.transforms.scale_coords(np.array([[POINT_XY]], np.float32), p.original_size, p.input_size)
        feeds = {"point_coords": np.concatenate([pts, np.zeros((1, 1, 2), np.float32)], axis=1),
                 "point_labels": np.array([[1, -1]], np.float32), "has_mask_input": np.zeros(1, np.float32),
                 "mask_input": np.zeros((1, 1, s, s), np.float32)}
        emb = p.prompt_encoder.run(feeds)
        return p.decoder.run({"image_embeddings": p.features, **emb})["low_res_masks"][:, 1:]

    def upscale(self, low: np.ndarray) -> np.ndarray:
        p = self.predictor
        return self.transforms.upscale_masks(low, p.input_size, p.original_size, p.image_size)

    def threshold(self, masks: np.ndarray) -> np.ndarray:
        return masks[0] > self.predictor.mask_threshold


def time_parts(side, n: int) -> dict[str, list[float]]:
    """predict split in three, each step timed on the previous step's output."""
    out: dict[str, list[float]] = {k: [] for k in PARTS}
    for _ in range(n):
        t0 = time.perf_counter()
        low = side.decode()
        t1 = time.perf_counter()
        masks = side.upscale(low)
        t2 = time.perf_counter()
        side.threshold(masks)
        t3 = time.perf_counter()
        for k, dt in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2)):
            out[k].append(dt)
    return out


def serve(name: str, work: Path, threads: int, bundle: str | None) -> None:
    """Child process: answer the parent's JSON-line commands on the original stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries go to stderr, never into the protocol
    t0 = time.perf_counter()
    side = OfficialSide(work, threads) if name == OFFICIAL else EdgefmSide(work, threads, bundle)
    p = side.predictor
    ops = {"image_encoder": side.image_encoder, "preprocess": side.preprocess,
           "set_image": lambda: p.set_image(side.image),
           "predict": lambda: p.predict(np.array([POINT_XY]), np.array([1]), multimask_output=True)}
    proto.write(json.dumps({**side.info, "load_s": time.perf_counter() - t0, "rss_after_load_mb": rss_mb(),
                            "rss_after_imports_mb": side.rss_after_imports}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["what"] in ("predict", "parts") and p.features is None:
            p.set_image(side.image)
        if cmd["op"] == "time" and cmd["what"] == "parts":
            time_parts(side, cmd["warmup"])
            reply: dict[str, Any] = time_parts(side, cmd["n"])
        elif cmd["op"] == "time":
            timed(ops[cmd["what"]], cmd["warmup"])
            reply = {cmd["what"]: timed(ops[cmd["what"]], cmd["n"])}
        else:  # "outputs", for the agreement check: same weights and inputs should give the same outputs
            masks, scores, _ = ops["predict"]()
            np.savez(cmd["path"], embeddings=side.image_encoder(), masks=masks, scores=scores)
            reply = {}
        proto.write(json.dumps(reply) + "\n")
    # VmHWM, not the parent's wait4/RUSAGE_CHILDREN maxrss: a child forked from a big parent inherits the
    # parent's resident set at fork time into that figure (it read 4.3 GB for every side here).
    proto.write(json.dumps({"torch_imported": "torch" in sys.modules, "peak_rss_mb": rss_mb("VmHWM")}) + "\n")


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


# --- the parent: weights, bundles, interleaved rounds, results ---


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
    for precision in precisions:
        log(f"exporting the {variant} {precision} bundle ...")
        out, t0, gated = work / f"bundle_{precision}", time.perf_counter(), True
        try:
            export_sam(model, out, variant, precision=precision)
        except ParityError as exc:  # still worth timing; the results say that the gate failed
            log(f"  {precision} misses the parity policy ({exc}); timing it anyway")
            export_sam(model, out, variant, precision=precision, parity_gate=False, overwrite=True)
            gated = False
        parity = json.loads((out / "manifest.json").read_text())["parity"]
        summary = {c: {o: {k: m[k] for k in ("cosine", "max_abs", "mask_iou") if k in m}
                       for o, m in parity[c]["outputs"].items()}
                   for c in ("image_encoder", "prompt_encoder", "mask_decoder")}
        exports[precision] = {"bundle": str(out), "export_s": time.perf_counter() - t0,
                              "parity_gate_passed": gated, "parity": summary}
        log(f"  exported in {exports[precision]['export_s']:.0f} s")
    return exports






def split(n: int, rounds: int) -> list[int]:
    """n runs spread over at most ``rounds`` rounds."""
    rounds = max(1, min(rounds, n))
    return [n // rounds + (i < n % rounds) for i in range(rounds)]


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
            ("predict.decoder", "↳ prompt encoder + decoder"),
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
                     f"{' / '.join(f'{i:.4f}' for i in a['predict_mask_iou'])}; export "
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
                    help="edgefm bundles to export and time, comma-separated: fp32, fp16, int8")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return serve(args.worker, args.work, args.threads, args.bundle)
    res = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "sam_cpu.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out_dir / "sam_cpu.md").write_text(md := markdown(res))
    print(md)


if __name__ == "__main__":
    main()
