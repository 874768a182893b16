"""How fast SAM's and CLIP's fp32 work could possibly run on this CPU: the work against the arithmetic ceiling.

Counts the floating-point operations of the reference models (``torch.utils.flop_counter.FlopCounterMode``;
the counts do not depend on the weights): the official SAM ViT-B image encoder, its prompt encoder + mask
decoder for one point, and open_clip's ViT-B/32 image encoder at batch 1 and 32. Then measures this
machine's fp32 matrix-multiply rate with ONNX Runtime (the engine edgefm runs on): one large MatMul and each
model's dominant shape. The quotient of the two is the least time the work could take at the best rate
measured; divided by the reference's time in ``sam_cpu.py`` / ``clip_cpu.py`` it is the best ratio any fp32
engine could reach here, to set beside the targets (SAM encoder 0.45×, one click 0.2×, CLIP image 0.6×).

    python benchmarks/cpu_floor.py [--threads 2] [--json benchmarks/results/cpu_floor.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, stats_ms, timed  # noqa: E402


def sam_flops() -> dict[str, float]:
    """GFLOP of the official ViT-B image encoder, and of the prompt encoder + mask decoder for one point
    (``multimask_output=True``) with its two-way transformer and output upscaling apart."""
    import torch
    from segment_anything import sam_model_registry
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):  # shapes only: nothing is computed
        sam = sam_model_registry["vit_b"]()
        with FlopCounterMode(display=False) as counter:
            sam.image_encoder(torch.empty(1, 3, 1024, 1024))
    encoder = counter.get_total_flops() / 1e9
    # The prompt side indexes by label values, which the meta device cannot: built for real (it is small),
    # with vit_b's numbers (the prompt side is the same for every variant).
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                           mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
        iou_head_hidden_dim=256)
    points = (torch.tensor([[[500.0, 400.0]]]), torch.tensor([[1]]))
    with FlopCounterMode(display=False) as counter:  # (no_grad trips the counter's module hooks)
        sparse, dense = prompt(points=points, boxes=None, masks=None)
        decoder(image_embeddings=torch.randn(1, 256, 64, 64), image_pe=prompt.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)
    parts = counter.get_flop_counts()
    part = lambda name: sum(parts.get(name, {}).values()) / 1e9  # noqa: E731
    return {"sam_image_encoder": encoder, "sam_click_decoder": counter.get_total_flops() / 1e9,
            "sam_click_decoder.transformer": part("MaskDecoder.transformer"),
            "sam_click_decoder.output_upscaling": part("MaskDecoder.output_upscaling")}


def clip_flops() -> dict[str, float]:
    """GFLOP of open_clip's ViT-B/32 image encoder at batch 1 and 32 (run on the CPU: open_clip's factory
    cannot build on the meta device)."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    out = {}
    for batch in (1, 32):
        with FlopCounterMode(display=False) as counter:
            model.encode_image(torch.zeros(batch, 3, 224, 224))
        out[f"clip_image_encoder_b{batch}"] = counter.get_total_flops() / 1e9
    return out


def matmul_gflops(m: int, k: int, n: int, threads: int, iters: int) -> dict[str, float]:
    """fp32 ``[m, k] @ [k, n]`` (weights as an initializer) in an ONNX Runtime CPU session."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((m, k), dtype=np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    s = stats_ms(timed(lambda: session.run(None, {"x": x}), iters))
    return {"shape": [m, k, n], "median_ms": s["median_ms"], "gflops": 2 * m * k * n / s["median_ms"] / 1e6}


# name -> (M, K, N): a large square product, then each model's dominant shape
SHAPES = {"large": (2048, 2048, 2048), "sam_encoder_mlp": (4096, 768, 3072),
          "sam_decoder_tokens": (4096, 256, 128), "clip_b32_mlp": (1600, 768, 3072)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    flops = {**sam_flops(), **clip_flops()}
    rates = {name: matmul_gflops(*shape, args.threads, max(5, args.iters // 5) if name == "large" else args.iters)
             for name, shape in SHAPES.items()}
    ceiling = max(r["gflops"] for r in rates.values())
    floors = {name: gflop / ceiling * 1e3 for name, gflop in flops.items() if "." not in name}
    result = {"machine": machine(), "threads": args.threads, "gflop": flops, "matmul": rates,
              "ceiling_gflops": ceiling, "floor_ms_at_ceiling": floors}
    print(f"fp32 MatMul, ONNX Runtime, {args.threads} threads: "
          + "; ".join(f"{'×'.join(map(str, r['shape']))} {r['gflops']:.0f} GFLOP/s" for r in rates.values()))
    for name, ms in floors.items():
        print(f"{name}: {flops[name]:.2f} GFLOP -> at least {ms:.1f} ms here in fp32")
    print(f"(the click decoder: two-way transformer {flops['sam_click_decoder.transformer']:.2f} GFLOP, "
          f"output upscaling {flops['sam_click_decoder.output_upscaling']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
