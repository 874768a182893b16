"""CLIP on the CPU, side by side in one run: open_clip (PyTorch eager) vs edgefm (ONNX Runtime CPU).

Both sides hold the same random ViT-B/32 weights (open_clip's ``ViT-B-32-quickgelu`` initialisation, copied
into ``edgefm.models.clip`` and exported with ``edgefm.export.clip.export_clip``), get the same inputs and
the same thread count. Measured per side, interleaved in rounds whose order alternates, so that load from
other processes on a shared machine falls on both sides alike:

- ``image_b1`` / ``image_b32``: the image encoder on preprocessed ``[N, 3, 224, 224]`` pixels: official
  ``model.encode_image`` under ``torch.inference_mode``, edgefm ``ClipModel.encode_pixels``;
- ``image_e2e_b1``: one 480 x 640 RGB array -> normalized embedding (preprocessing included);
- ``text_b1`` / ``text_b80``: the text encoder on token rows of one short prompt and of the 80 ImageNet
  templates of one class: official ``model.encode_text`` (always 77 positions), edgefm
  ``ClipModel.encode_tokens`` (cut to the batch's longest prompt, exact under the causal mask);
- ``text_e2e_b1`` / ``text_e2e_b80``: the same from strings, tokenization and normalization included
  (edgefm ``ClipModel.encode_texts``);
- ``index``: embedding a folder of generated JPEGs, decoding included, in images/s: edgefm
  ``ImageIndex.build``; official PIL decode + open_clip's transform in a thread pool of the same size, then
  ``encode_image`` in batches of 32.

``--precisions fp32,int8`` adds a third side, ``edgefm-int8``: the same weights exported with
``export_clip(precision="int8")`` (MatMul weights dynamically quantized), timed in the same rounds; its
ratios are reported against open_clip beside fp32's. ``--rows image_b1,image_b32`` times only those rows and
``--index-images 0`` skips the index build, for short runs.

``python benchmarks/clip_cpu.py`` writes results/clip_cpu.{json,md} (about 10 minutes on 2 busy cores);
``python benchmarks/clip_cpu.py --quick`` is a smoke run on a tiny CLIP (written to a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from clip_cpu_sides import CLASSNAME, MODEL, SHORT_PROMPT, Edgefm, Official, official_model, photo, write_jpegs
from common import machine, split, stats_ms, versions

# edgefm / official median time, from the CLIP issue (section 5); the e2e text rows are held to the same.
TARGETS = {"image_b1": 0.6, "image_b32": 0.6, "text_b1": 0.3, "text_b80": 0.5,
           "text_e2e_b1": 0.3, "text_e2e_b80": 0.5}
ROWS = {  # key -> (label, heavy: timed --batch-iters times instead of --iters)
    "image_b1": ("image encoder, batch 1", False),
    "image_b32": ("image encoder, batch 32", True),
    "image_e2e_b1": ("image 480×640 RGB → embedding (preprocess + encoder)", False),
    "text_b1": ("text encoder, 1 short prompt", False),
    "text_b80": ("text encoder, 80 prompts (imagenet80 templates)", True),
    "text_e2e_b1": ("1 prompt string → embedding (tokenize + encoder)", False),
    "text_e2e_b80": ("80 prompt strings → embeddings (tokenize + encoder)", True),
}

DISTS = ("torch", "open-clip-torch", "onnxruntime", "numpy", "opencv-python-headless", "pillow", "onnx", "edgefm")


# --- the run ---


def make_inputs(image_size: int, mean, std) -> dict[str, Any]:
    """Pixels (edgefm's preprocessing, bit-identical to the PIL path), a photo and the prompts."""
    from edgefm.runtime.clip.preprocess import preprocess
    from edgefm.runtime.clip.zero_shot import resolve_templates

    pixels = np.stack([preprocess(photo(100 + i, 240, 320), image_size, mean, std) for i in range(32)])
    return {"pixels1": pixels[:1].copy(), "pixels32": pixels, "photo": photo(7, 480, 640),
            "prompt1": [SHORT_PROMPT], "prompts80": [t.format(CLASSNAME) for t in resolve_templates("imagenet80")]}


def cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Row-wise agreement of two embedding matrices, each row L2-normalized first."""
    a, b = (np.asarray(x, np.float64) / np.linalg.norm(x, axis=-1, keepdims=True) for x in (a, b))
    return {"min_cosine": float((a * b).sum(-1).min()), "max_abs": float(np.abs(a - b).max())}


def run(args) -> dict[str, Any]:
    import torch
    from edgefm.export.clip import export_clip
    from edgefm.models.clip import clip_from_state_dict, variant_name

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    res: dict[str, Any] = {
        "benchmark": "clip_cpu", "model": "tiny-vit (smoke run)" if args.quick else MODEL,
        "weights": "random (open_clip initialisation, seed 0)", "machine": machine(), "versions": versions(DISTS),
        "settings": {"iters": args.iters, "batch_iters": args.batch_iters, "warmup": args.warmup,
                     "rounds": args.rounds, "threads": args.threads, "index_images": args.index_images,
                     "index_runs": args.index_runs, "short_prompt": SHORT_PROMPT, "classname": CLASSNAME,
                     "precisions": args.precisions, "rows": args.rows},
        "targets": TARGETS, "loadavg": {"start": os.getloadavg()},
    }
    torch.set_num_threads(args.threads)
    ref, transform, tokenizer = official_model(args.quick)
    ours, config = clip_from_state_dict(ref.state_dict(), quick_gelu=True, source=f"open_clip {MODEL}")
    res["variant"] = variant_name(config)
    with tempfile.TemporaryDirectory(prefix="clip_cpu_") as tmp:
        work = Path(tmp)
        bundles: dict[str, Path] = {}
        res["exports"] = {}
        for precision in args.precisions:
            log(f"exporting the {res['variant']} {precision} bundle ...")
            t0 = time.perf_counter()
            dtype, _, attention = precision.partition("-")  # "fp32-fused": an --attention fused export
            bundles[precision] = export_clip(ours, work / f"bundle_{precision}", precision=dtype,
                                             attention=attention or "plain")
            parity = json.loads((bundles[precision] / "manifest.json").read_text())["parity"]
            res["exports"][precision] = {"export_s": time.perf_counter() - t0, "parity": {
                c: {o: {k: m[k] for k in ("cosine", "max_abs") if k in m} for o, m in parity[c]["outputs"].items()}
                for c in ("image_encoder", "text_encoder")}}
        res["export"] = res["exports"]["fp32"]
        del ours
        inputs = make_inputs(config.image_size, config.mean, config.std)
        res["settings"]["prompt_tokens"] = {"prompt1": None, "prompts80": None}
        sides = {"official": Official(ref, transform, tokenizer, inputs, args.threads)}
        sides.update({side_name(p): Edgefm(bundles[p], inputs, args.threads) for p in args.precisions})
        for k in ("prompt1", "prompts80"):  # both tokenizers must agree, or the comparison is void
            assert np.array_equal(sides["official"].tokens[k].numpy(), sides["edgefm"].tokens[k]), k
            res["settings"]["prompt_tokens"][k] = int(sides["edgefm"].tokens[k].argmax(1).max()) + 1
        samples: dict[str, dict[str, list[float]]] = {name: {} for name in sides}
        ours_sides = [n for n in sides if n != "official"]
        for key, (_, heavy) in ROWS.items():
            if key not in args.rows:
                continue
            n = args.batch_iters if heavy else args.iters
            for r, k in enumerate(split(n, args.rounds)):
                order = list(sides) if r % 2 == 0 else list(sides)[::-1]
                for name in order:
                    if r == 0:  # one warm-up run is plenty for the multi-second batch rows
                        sides[name].time(key, min(args.warmup, 1) if heavy else args.warmup)
                    samples[name].setdefault(key, []).extend(sides[name].time(key, k))
            med = {name: np.median(samples[name][key]) * 1e3 for name in sides}
            log(f"[{key}] " + ", ".join(f"{name} {t:.1f} ms" for name, t in med.items()))
            res["loadavg"][f"after_{key}"] = os.getloadavg()
        res["sides"] = {name: {**side.info, **{k: stats_ms(v) for k, v in samples[name].items()}}
                        for name, side in sides.items()}
        # "ratios": edgefm fp32 / open_clip (the committed results' key); "ratios_by_side": every edgefm side.
        res["ratios_by_side"] = {name: {k: ratio(res["sides"], name, k) for k in ROWS if k in args.rows}
                                 for name in ours_sides}
        res["ratios"] = res["ratios_by_side"]["edgefm"]

        if args.index_images:
            res["index"] = index_build(args, sides, work, log)
            res["loadavg"]["after_index"] = os.getloadavg()

        # Agreement: same weights, same inputs -> the same embeddings (else the timings compare nothing).
        with torch.inference_mode():
            ref_img = ref.encode_image(torch.from_numpy(inputs["pixels32"])).numpy()
            ref_txt = ref.encode_text(sides["official"].tokens["prompts80"]).numpy()
        res["agreement_by_side"] = {
            name: {"image_b32": cosines(sides[name].model.encode_pixels(inputs["pixels32"]), ref_img),
                   "text_b80": cosines(sides[name].model.encode_texts(inputs["prompts80"]), ref_txt)}
            for name in ours_sides}
        res["agreement"] = dict(res["agreement_by_side"]["edgefm"])
        if "index" in res:
            res["agreement"]["index"] = res["index"].pop("agreement")
    res["loadavg"]["end"] = os.getloadavg()
    return res


def side_name(precision: str) -> str:
    return "edgefm" if precision == "fp32" else f"edgefm-{precision}"


def ratio(sides: dict[str, Any], name: str, key: str) -> dict[str, Any]:
    """``name`` / open_clip on the medians of row ``key``, judged against the row's target."""
    r = sides[name][key]["median_ms"] / sides["official"][key]["median_ms"]
    target = TARGETS.get(key)
    return {"ratio": r, "target": target, "pass": None if target is None else r <= target}


def index_build(args, sides: dict[str, Any], work: Path, log) -> dict[str, Any]:
    """Embedding a folder of JPEGs, decoding included, per side (sides alternate their order per run)."""
    log(f"writing {args.index_images} JPEGs ...")
    files = write_jpegs(work / "photos", args.index_images)
    index_s: dict[str, list[float]] = {name: [] for name in sides}
    emb = {}
    for r in range(args.index_runs):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            t0 = time.perf_counter()
            emb[name] = sides[name].build_index(files, workers=args.threads)
            index_s[name].append(time.perf_counter() - t0)
            log(f"[index] {name}: {len(files) / index_s[name][-1]:.1f} images/s")
    prep_s: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.index_runs):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            t0 = time.perf_counter()
            sides[name].build_index(files, workers=args.threads, batch_size=0)
            prep_s[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {
        name: {"seconds": s, "median_s": float(np.median(s)), "images_per_s": len(files) / float(np.median(s)),
               "decode_preprocess_images_per_s": len(files) / float(np.median(prep_s[name]))}
        for name, s in index_s.items()}
    out["edgefm_over_official_time"] = out["edgefm"]["median_s"] / out["official"]["median_s"]
    out["jpeg_bytes_total"] = sum(p.stat().st_size for p in files)
    out["agreement"] = cosines(emb["edgefm"], emb["official"])
    return out


def markdown(res: dict[str, Any]) -> str:
    m, v, s, sides = res["machine"], res["versions"], res["settings"], res["sides"]
    e, o = sides["edgefm"], sides["official"]
    ours = [n for n in sides if n != "official"]
    precisions = ", ".join(f"{n} {'/'.join(sorted(set(sides[n]['precision'].values())))}" for n in ours)
    lines = [f"# CLIP {res['model']} on the CPU: open_clip (PyTorch eager) vs edgefm (ONNX Runtime)", "",
             f"{m['cpu_model']}, {m['usable_cpus']} cores ({', '.join(m['simd'])}), {s['threads']} threads per "
             f"side; torch {v['torch']}, open-clip-torch {v['open-clip-torch']}, onnxruntime {v['onnxruntime']}, "
             f"numpy {v['numpy']}, opencv {v['opencv-python-headless']}, pillow {v['pillow']}, "
             f"edgefm {v['edgefm']}; edgefm backend {e['backend']} ({', '.join(e['ort_providers'])}), "
             f"{precisions}. Load average {res['loadavg']['start'][0]:.1f} at the start, "
             f"{res['loadavg']['end'][0]:.1f} at the end (a shared machine: other processes competed for the "
             "cores).", ""]
    head = ["measurement", "open_clip median (p90) ms", *(f"{n} median (p90) ms" for n in ours),
            *(f"{n} / open_clip" for n in ours), "target"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, (label, _) in ROWS.items():
        if key not in res["ratios"]:
            continue
        cells = [label, *(f"{sides[n][key]['median_ms']:.1f} ({sides[n][key]['p90_ms']:.1f})" for n in sides)]
        for n in ours:
            r = res["ratios_by_side"][n][key]
            cells.append(f"{r['ratio']:.2f}×" + ("" if r["pass"] is None else " PASS" if r["pass"] else " MISS"))
        lines.append("| " + " | ".join([*cells, f"≤ {TARGETS[key]}×" if key in TARGETS else ""]) + " |")
    ix = res.get("index")
    if ix:
        row = lambda cells: "| " + " | ".join(cells + [""] * (len(head) - len(cells))) + " |"  # noqa: E731
        lines += [row([f"index build, {s['index_images']} JPEGs (decode + preprocess + encode), images/s",
                       *(f"{ix[n]['images_per_s']:.1f}" for n in sides),
                       f"{ix['edgefm_over_official_time']:.2f}× (time)"]),
                  row(["↳ decode + preprocess only, images/s",
                       *(f"{ix[n]['decode_preprocess_images_per_s']:.1f}" for n in sides)])]
    a, p = res["agreement"], res["export"]["parity"]
    index_note = (f"; index build {s['index_runs']}× per side ({ix['jpeg_bytes_total'] / 2**20:.1f} MiB of "
                  f"JPEGs, 480–1024 px wide, {s['threads']} decoding threads on both sides)") if ix else ""
    lines += [
        "",
        f"Timed runs per side: {s['iters']} (single-item rows) or {s['batch_iters']} (batch 32 / 80 prompts), "
        f"after {s['warmup']} warm-up runs (1 for the batch rows), interleaved over {s['rounds']} rounds"
        f"{index_note}.", "",
        f"- Text rows: open_clip always runs 77 positions; edgefm cuts each batch after its longest prompt "
        f"({s['prompt_tokens']['prompt1']} tokens for '{s['short_prompt']}', {s['prompt_tokens']['prompts80']} "
        f"for the 80 templates of '{s['classname']}'), which is exact under the causal mask.",
        f"- Agreement on the same inputs: image batch 32 min cosine {a['image_b32']['min_cosine']:.7f} (max abs "
        f"{a['image_b32']['max_abs']:.2g}); 80 prompts min cosine {a['text_b80']['min_cosine']:.7f}"
        + (f"; index embeddings (edgefm OpenCV/numpy decoding + preprocessing vs PIL + torchvision) min cosine "
           f"{a['index']['min_cosine']:.7f}." if "index" in a else "."),
        f"- Export: {res['export']['export_s']:.0f} s, parity gate passed (image cosine "
        f"{p['image_encoder']['image_embeds']['cosine']:.7f}, text cosine "
        f"{p['text_encoder']['text_embeds']['cosine']:.7f}). ORT intra-op threads {e['ort_intra_op_threads']}, "
        f"torch threads {o['torch_threads']}.",
    ]
    for n in ours[1:]:
        precision = n.split("-", 1)[1]
        a, x = res["agreement_by_side"][n], res["exports"][precision]
        lines.append(
            f"- {n}: export {x['export_s']:.0f} s, parity gate passed ({precision.partition('-')[0]} policy; "
            f"attention {precision.partition('-')[2] or 'plain'}; image cosine "
            f"{x['parity']['image_encoder']['image_embeds']['cosine']:.7f}, text cosine "
            f"{x['parity']['text_encoder']['text_embeds']['cosine']:.7f}); against open_clip fp32 on the same "
            f"inputs: image batch 32 min cosine {a['image_b32']['min_cosine']:.7f}, 80 prompts min cosine "
            f"{a['text_b80']['min_cosine']:.7f}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, help="timed runs per side of the single-item rows (default 20)")
    ap.add_argument("--batch-iters", type=int, help="timed runs of batch 32 / 80 prompts (default 6)")
    ap.add_argument("--warmup", type=int, help="untimed runs per row and side before timing (default 3)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds to split timed runs into")
    ap.add_argument("--threads", type=int, default=2, help="torch threads and ONNX Runtime intra-op threads")
    ap.add_argument("--index-images", type=int, help="JPEGs in the index-build folder (default 200; 0: skip)")
    ap.add_argument("--index-runs", type=int, help="index builds per side (default 2)")
    ap.add_argument("--precisions", default="fp32",
                    help="edgefm bundles to time, comma-separated (fp32 always included): e.g. fp32,int8; "
                         "PRECISION-ATTENTION (e.g. fp32-fused) exports with that --attention")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"rows to time, comma-separated (of {', '.join(ROWS)})")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny CLIP, few runs, temporary output")
    ap.add_argument("--out-dir", type=Path, help="where to write NAME.{json,md} (default results/)")
    ap.add_argument("--name", default="clip_cpu", help="results file stem under --out-dir")
    args = ap.parse_args(argv)
    args.precisions = ["fp32", *(p for p in args.precisions.split(",") if p and p != "fp32")]
    args.rows = [r for r in args.rows.split(",") if r]
    if unknown := [r for r in args.rows if r not in ROWS]:
        ap.error(f"--rows: unknown {unknown}; choose among {list(ROWS)}")
    defaults = ({"iters": 3, "batch_iters": 2, "warmup": 1, "index_images": 24, "index_runs": 1} if args.quick
                else {"iters": 20, "batch_iters": 6, "warmup": 3, "index_images": 200, "index_runs": 2})
    for k, val in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, val)
    if args.out_dir is None:
        args.out_dir = Path(tempfile.mkdtemp(prefix="clip_cpu_quick_")) if args.quick \
            else Path(__file__).parent / "results"
    res = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out_dir / f"{args.name}.md").write_text(md := markdown(res))
    print(md)
    print(f"wrote {args.out_dir / args.name}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
