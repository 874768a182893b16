"""DALL·E on the CPU, side by side in one run: image generation and the dVAE decoder.

Generation (the "small" prior: 64 text tokens, a 32×32 grid = 1024 image tokens, seeded random weights),
greedy so that every side does the same work and must produce the same ids, batch 1:

- ``edgefm``: :class:`edgefm.runtime.dalle.DalleGenerator` on the exported bundle (ONNX Runtime CPU): one
  ``prior_prefill`` then one ``prior_step`` per token, the fixed-size KV cache fed back;
- ``torch_cache``: ``DallePrior.generate`` in PyTorch eager with its KV cache, as eager PyTorch decodes
  fastest (``prefill``, then ``step_inplace``: each position's keys and values written into the cache in
  place, ``scaled_dot_product_attention`` over the positions written so far); the target is against this;
- ``torch_step``: the same loop through ``DallePrior.step``, the functional form edgefm exports (fixed-size
  caches in and out, attention over the whole context, masked): what the exported graph would cost in eager;
- ``torch_recompute``: the naive way simple implementations decode: the whole sequence is run again for
  every token (``DallePrior.generate(use_cache=False)``'s loop). Its full image takes minutes, so by default
  it is timed over its first ``--naive-tokens`` tokens (a real decoding loop whose ids are checked against
  the others), and the full-image time is *estimated*: one recompute step is timed at several sequence
  lengths and the per-token cost is interpolated linearly over all 1024 tokens. ``--naive-full`` measures
  one full image instead of estimating it.

dVAE decoder (official size: 8192 codes, n_hid 256, 32×32 -> 256², random weights): edgefm's exported
``dvae_decoder`` (token ids in, image in [0, 1] out) vs the ``dall_e`` package's ``Decoder`` eager as its
usage notebook runs it (one-hot input, then ``unmap_pixels(sigmoid(stats[:, :3]))``), both on the same ids.

Both sides use the same number of threads (torch intra-op threads = ONNX Runtime intra-op threads); sides
are interleaved over rounds, the order alternating, so that background load falls on all of them alike.
Writes ``results/dalle_cpu.{json,md}``. ``python benchmarks/dalle_cpu.py`` takes ~20 minutes on 2 busy
cores (most of it exporting the official-size decoder and running PyTorch); a smoke run:
``python benchmarks/dalle_cpu.py --rounds 1 --warmup 0 --naive-tokens 4 --naive-lengths 3 --dvae-iters 1
--out-dir /tmp/x``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# The tests' seeding of biases and LayerNorm scales, so that the benchmark times the models the tests check.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dalle_fixtures import seeded_  # noqa: E402

TARGETS = {"vs_recompute": 10.0, "vs_torch_cache": 1.2, "dvae_decoder": 0.6}  # DALL·E issue, section 5
PROMPT = "a small red cube on a wooden table"
SIDES = ("edgefm", "torch_cache", "torch_step", "torch_recompute")
CACHED_SIDES = (("edgefm", "edgefm runtime (ORT, KV cache)"),
                ("torch_cache", "PyTorch, KV cache in place + SDPA over the prefix"),
                ("torch_step", "PyTorch, the exported step's form (caches in and out)"))


def stats(samples: list[float]) -> dict[str, Any]:
    a = np.asarray(samples, np.float64)
    return {"n": int(a.size), "median_s": float(np.median(a)), "p90_s": float(np.percentile(a, 90)),
            "min_s": float(a.min()), "samples_s": [round(float(v), 4) for v in a]}


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")
    return {"cpu_model": model, "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "onnxruntime", "numpy", "onnx", "dall-e", "edgefm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# ---- the prior: three ways to decode one image -------------------------------------------------------------


def naive_tokens(prior, text: torch.Tensor, count: int) -> tuple[np.ndarray, list[float]]:
    """Greedy ids of the first ``count`` image tokens, recomputing the whole sequence for each; per-token s."""
    image, times = text.new_zeros(text.shape[0], 0), []
    with torch.inference_mode():
        for _ in range(count):
            t0 = time.perf_counter()
            token = prior.image_logits(prior.hidden(text, image)[:, -1]).argmax(-1)
            image = torch.cat([image, token[:, None]], dim=1)
            times.append(time.perf_counter() - t0)
    return image.numpy(), times


def naive_step_at(prior, text: torch.Tensor, n_image: int, repeats: int) -> float:
    """Median seconds of one recompute step whose input holds ``n_image`` image tokens after the text."""
    image = torch.zeros(text.shape[0], n_image, dtype=torch.long)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            prior.image_logits(prior.hidden(text, image)[:, -1]).argmax(-1)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def warm_rows(prior, gen, text: np.ndarray, rows: int) -> None:
    """Prefill and the steps of ``rows`` image rows, once on each cached side (not timed)."""
    c = prior.config
    out = gen.prefill.run({"text_tokens": text[None]})
    k, v, tok = out["k_cache"], out["v_cache"], out["logits"].argmax(-1)
    with torch.inference_mode():
        _, kt, vt = prior.prefill(torch.from_numpy(text[None]))
        for j in range(rows * c.image_grid):
            pos = c.text_len + j
            out = gen.step.run({"token": tok, "position": np.array([pos], np.int64), "k_cache": k, "v_cache": v})
            k, v, tok = out["k_cache_out"], out["v_cache_out"], out["logits"].argmax(-1)
            _, kt, vt = prior.step(torch.from_numpy(tok), pos, kt, vt)
            prior.step_inplace(torch.from_numpy(tok), pos, kt, vt)


def generation(args, prior, gen, text: np.ndarray, log) -> dict[str, Any]:
    tt = torch.from_numpy(text[None])
    n_tokens = prior.config.image_len
    rng = np.random.default_rng(0)  # unused by greedy decoding; the runtime's signature asks for one

    def edgefm() -> np.ndarray:
        return gen.sample_tokens(text, 1, rng, temperature=0).reshape(1, -1)

    def torch_cache() -> np.ndarray:
        with torch.inference_mode():
            return prior.generate(tt, greedy=True).numpy()

    def torch_step() -> np.ndarray:
        c, ids_ = prior.config, []
        with torch.inference_mode():
            logits, k, v = prior.prefill(tt)
            for j in range(n_tokens):
                ids_.append(logits.argmax(-1))
                if j + 1 < n_tokens:
                    logits, k, v = prior.step(ids_[-1], c.text_len + j, k, v)
        return torch.stack(ids_, dim=1).numpy()

    for _ in range(args.warmup):  # sessions, allocations and caches warmed on the first image row
        warm_rows(prior, gen, text, 1)
        naive_tokens(prior, tt, 4)
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    naive_per_token: list[float] = []
    ids: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        for side in SIDES if r % 2 == 0 else reversed(SIDES):
            t0 = time.perf_counter()
            if side == "edgefm":
                ids[side] = edgefm()
            elif side == "torch_cache":
                ids[side] = torch_cache()
            elif side == "torch_step":
                ids[side] = torch_step()
            else:
                ids[side], per_token = naive_tokens(prior, tt, n_tokens if args.naive_full else args.naive_tokens)
                naive_per_token += per_token
            times[side].append(time.perf_counter() - t0)
            log(f"round {r + 1}/{args.rounds} {side}: {times[side][-1]:.2f} s")
    k = ids["torch_recompute"].shape[1]
    out: dict[str, Any] = {
        "image_tokens": n_tokens, "batch": 1, "decoding": "greedy (argmax)",
        "ids_identical": {"edgefm_vs_torch_cache": bool(np.array_equal(ids["edgefm"], ids["torch_cache"])),
                          "torch_step_vs_torch_cache": bool(np.array_equal(ids["torch_step"], ids["torch_cache"])),
                          f"torch_recompute_vs_torch_cache_first_{k}": bool(
                              np.array_equal(ids["torch_recompute"], ids["torch_cache"][:, :k]))},
        "distinct_ids": int(len(np.unique(ids["edgefm"]))),
    }
    for side in ("edgefm", "torch_cache", "torch_step"):
        out[side] = {"seconds_per_image": stats(times[side]),
                     "tokens_per_s": n_tokens / float(np.median(times[side]))}
    naive: dict[str, Any] = {"tokens_timed_per_round": k, "loop_seconds": stats(times["torch_recompute"]),
                             "per_token": stats(naive_per_token),
                             "tokens_per_s_first_tokens": 1.0 / float(np.median(naive_per_token))}
    if args.naive_full:
        naive["seconds_per_image"] = stats(times["torch_recompute"])
        naive["full_image"] = "measured"
    else:
        lengths = sorted({0, *np.linspace(0, n_tokens - 1, args.naive_lengths).round().astype(int).tolist()})
        at = [naive_step_at(prior, tt, n, args.naive_repeats) for n in lengths]
        log(f"recompute step at {lengths} image tokens: {[round(s, 3) for s in at]} s")
        per_token = np.interp(np.arange(n_tokens), lengths, at)
        naive["step_seconds_at_image_tokens"] = dict(zip(map(str, lengths), at))
        naive["seconds_per_image"] = {"median_s": float(per_token.sum())}
        naive["full_image"] = (f"ESTIMATED: one recompute step timed at {len(lengths)} sequence lengths "
                               f"(median of {args.naive_repeats}), interpolated linearly over the {n_tokens} "
                               "tokens and summed")
    naive["tokens_per_s"] = n_tokens / naive["seconds_per_image"]["median_s"]
    out["torch_recompute"] = naive
    e = out["edgefm"]["seconds_per_image"]["median_s"]
    out["speedup"] = {"vs_torch_cache": out["torch_cache"]["seconds_per_image"]["median_s"] / e,
                      "vs_torch_step": out["torch_step"]["seconds_per_image"]["median_s"] / e,
                      "vs_recompute_full_image": naive["seconds_per_image"]["median_s"] / e,
                      "vs_recompute_first_tokens_rate": out["edgefm"]["tokens_per_s"]
                      / naive["tokens_per_s_first_tokens"]}
    return out


# ---- the dVAE decoder ----------------------------------------------------------------------------------------


def dvae(args, bundle, reference, log) -> dict[str, Any]:
    from dall_e import unmap_pixels

    ids = np.random.default_rng(1).integers(0, 8192, (1, 32, 32))
    runner = bundle.runner("dvae_decoder")

    def edgefm() -> np.ndarray:
        return runner.run({"image_tokens": ids})["image"]

    def official() -> np.ndarray:
        with torch.inference_mode():  # as dall_e's usage notebook: one-hot codes in, unmapped sigmoid out
            z = F.one_hot(torch.from_numpy(ids), num_classes=8192).permute(0, 3, 1, 2).float()
            return unmap_pixels(torch.sigmoid(reference(z)[:, :3])).numpy()

    for _ in range(args.warmup):
        edgefm(), official()
    times: dict[str, list[float]] = {"edgefm": [], "dall_e": []}
    for r in range(args.rounds):
        for _ in range(args.dvae_iters):
            for side, fn in (("edgefm", edgefm), ("dall_e", official))[:: 1 if r % 2 == 0 else -1]:
                t0 = time.perf_counter()
                fn()
                times[side].append(time.perf_counter() - t0)
        log(f"dvae round {r + 1}/{args.rounds}: edgefm {times['edgefm'][-1]:.2f} s, "
            f"dall_e {times['dall_e'][-1]:.2f} s")
    got, ref = edgefm(), official()
    return {"input": "token ids [1, 32, 32] (edgefm) / their one-hot [1, 8192, 32, 32] (dall_e)",
            "output": "image [1, 3, 256, 256] in [0, 1]",
            "edgefm": stats(times["edgefm"]), "dall_e": stats(times["dall_e"]),
            "ratio": float(np.median(times["edgefm"]) / np.median(times["dall_e"])),
            "max_abs_diff": float(np.abs(got - ref).max())}


# ---- the run ------------------------------------------------------------------------------------------------


def run(args, log) -> dict[str, Any]:
    import dall_e
    from edgefm.export.dalle import export_dalle
    from edgefm.models.dalle import build_decoder, build_prior
    from edgefm.runtime.bundle import Bundle
    from edgefm.runtime.dalle import DalleGenerator

    torch.set_num_threads(args.threads)
    res: dict[str, Any] = {
        "benchmark": "dalle_cpu", "machine": machine(), "versions": versions(), "targets": TARGETS,
        "threads": {"torch_intra_op": torch.get_num_threads(), "ort_intra_op": args.threads},
        "prior_config": args.prior_config, "prompt": PROMPT, "loadavg": {"start": os.getloadavg()},
        "note": "a shared machine (the load averages say how busy it was; PyTorch's OpenMP threads suffer most "
                "when it is): sides are interleaved so that ratios stay fair",
    }
    torch.manual_seed(0)
    reference = dall_e.Decoder(use_mixed_precision=False).eval()
    seeded_(reference, 1)
    decoder = build_decoder("official")
    decoder.load_state_dict(reference.state_dict(), strict=True)
    prior = seeded_(build_prior(args.prior_config), 2)
    with tempfile.TemporaryDirectory(prefix="edgefm-dalle-bench-") as tmp:
        t0 = time.perf_counter()
        path = export_dalle(Path(tmp) / "bundle", decoder.eval(), prior=prior, progress=log)
        res["export_seconds"] = time.perf_counter() - t0
        res["loadavg"]["after_export"] = os.getloadavg()
        bundle = Bundle(path, backend="ort-cpu", threads=args.threads)
        gen = DalleGenerator(bundle)
        so = gen.step.session.get_session_options()
        res["ort"] = {"backend": bundle.backend, "providers": gen.step.session.get_providers(),
                      "intra_op_threads": so.intra_op_num_threads, "inter_op_threads": so.inter_op_num_threads,
                      "graph_optimization": str(so.graph_optimization_level),
                      "parity": {k: v.get("passed") for k, v in bundle.manifest.parity.items()
                                 if isinstance(v, dict)}}
        text, _ = gen.text_tokens(PROMPT)
        res["generation"] = generation(args, prior, gen, text, log)
        res["loadavg"]["after_generation"] = os.getloadavg()
        if args.dvae_iters:
            res["dvae_decoder"] = dvae(args, bundle, reference, log)
            res["loadavg"]["after_dvae"] = os.getloadavg()
        t0 = time.perf_counter()
        gen.generate(PROMPT, n=1, seed=0)  # one sampled image, prior + decoder, as a user calls it
        res["edgefm_generate_one_sampled_image_s"] = time.perf_counter() - t0
    res["loadavg"]["end"] = os.getloadavg()
    g = res["generation"]
    res["verdict"] = {
        "vs_recompute": g["speedup"]["vs_recompute_full_image"] >= TARGETS["vs_recompute"],
        "vs_torch_cache": g["speedup"]["vs_torch_cache"] >= TARGETS["vs_torch_cache"],
    }
    if "dvae_decoder" in res:
        res["verdict"]["dvae_decoder"] = res["dvae_decoder"]["ratio"] <= TARGETS["dvae_decoder"]
    return res


def markdown(res: dict[str, Any]) -> str:
    m, v, g, d = res["machine"], res["versions"], res["generation"], res.get("dvae_decoder")
    ok = {True: "PASS", False: "MISS"}
    naive = g["torch_recompute"]
    recompute_same = next(v for k, v in g["ids_identical"].items() if k.startswith("torch_recompute"))
    lines = [
        "# DALL·E on the CPU: edgefm runtime vs PyTorch", "",
        f"{m['cpu_model']}, {m['usable_cpus']} usable cores; {res['threads']['torch_intra_op']} torch threads, "
        f"{res['threads']['ort_intra_op']} ONNX Runtime intra-op threads; torch {v['torch']}, onnxruntime "
        f"{v['onnxruntime']}, dall-e {v['dall-e']}, numpy {v['numpy']}, Python {m['python']}.",
        "Load average (1 min) " + ", ".join(f"{k.replace('_', ' ')} {a[0]:.1f}" for k, a in res["loadavg"].items())
        + f": {res['note']}.", "",
        f"## Generation: prior {res['prior_config']!r}, {g['image_tokens']} image tokens, batch 1, "
        f"{g['decoding']}", "",
        "| side | seconds / image (median) | p90 | image tokens / s | edgefm speed-up |",
        "|---|---|---|---|---|",
    ]
    for side, label in CACHED_SIDES:
        s = g[side]["seconds_per_image"]
        ratio = s["median_s"] / g["edgefm"]["seconds_per_image"]["median_s"]
        lines.append(f"| {label} | {s['median_s']:.2f} | {s['p90_s']:.2f} | {g[side]['tokens_per_s']:.0f} | "
                     f"{ratio:.2f}× |")
    est = "measured" if naive["full_image"] == "measured" else "**estimated**"
    lines += [
        f"| PyTorch, recompute per token (full image {est}) | {naive['seconds_per_image']['median_s']:.1f} | — "
        f"| {naive['tokens_per_s']:.1f} | {g['speedup']['vs_recompute_full_image']:.1f}× |",
        f"| PyTorch, recompute, first {naive['tokens_timed_per_round']} tokens (measured) | — | — | "
        f"{naive['tokens_per_s_first_tokens']:.1f} | {g['speedup']['vs_recompute_first_tokens_rate']:.1f}× |",
        "",
        f"Targets: ≥ {TARGETS['vs_recompute']}× over recompute (full image): "
        f"**{ok[res['verdict']['vs_recompute']]}**; ≥ {TARGETS['vs_torch_cache']}× over PyTorch with its cache: "
        f"**{ok[res['verdict']['vs_torch_cache']]}**. Greedy ids identical edgefm vs PyTorch-cache: "
        f"{g['ids_identical']['edgefm_vs_torch_cache']}; PyTorch's two cached forms: "
        f"{g['ids_identical']['torch_step_vs_torch_cache']}; recompute vs cache over the first "
        f"{naive['tokens_timed_per_round']}: {recompute_same}.",
    ]
    if naive["full_image"] != "measured":
        lines += ["", f"Recompute full image: {naive['full_image']} (step seconds at image-token counts: "
                  + ", ".join(f"{k}: {s:.3f}" for k, s in naive["step_seconds_at_image_tokens"].items()) + ")."]
    lines += [
        f"One sampled image end to end with `DalleGenerator.generate` (prior + dVAE decoder): "
        f"{res['edgefm_generate_one_sampled_image_s']:.1f} s.", "",
    ]
    if d is None:
        return "\n".join(lines)
    lines += [
        "## dVAE decoder: official size (8192 codes, 32×32 → 256²), random weights", "",
        "| side | median s | p90 s | ratio |", "|---|---|---|---|",
        f"| edgefm `dvae_decoder` (ORT, token ids in) | {d['edgefm']['median_s']:.2f} | {d['edgefm']['p90_s']:.2f} "
        f"| {d['ratio']:.2f}× |",
        f"| `dall_e.Decoder` eager (one-hot in) | {d['dall_e']['median_s']:.2f} | {d['dall_e']['p90_s']:.2f} | 1 |",
        "", f"Target ≤ {TARGETS['dvae_decoder']}×: **{ok[res['verdict']['dvae_decoder']]}**. Max abs difference "
        f"of the two images: {d['max_abs_diff']:.2e}. Samples: `dalle_cpu.json`.", "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prior-config", default="small")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one image per side each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per side before the rounds")
    p.add_argument("--naive-tokens", type=int, default=32, help="recompute tokens decoded per round")
    p.add_argument("--naive-full", action="store_true", help="decode full images by recompute (slow)")
    p.add_argument("--naive-lengths", type=int, default=9, help="sequence lengths for the full-image estimate")
    p.add_argument("--naive-repeats", type=int, default=3)
    p.add_argument("--dvae-iters", type=int, default=2, help="decoder runs per side per round (0: skip)")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {msg}", flush=True)

    res = run(args, log)
    res["wall_seconds"] = time.perf_counter() - start
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dalle_cpu.json").write_text(json.dumps(res, indent=1))
    (out / "dalle_cpu.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
