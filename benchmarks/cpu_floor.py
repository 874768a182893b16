"""How fast SAM's prompt -> mask step could possibly be on this CPU: the work against the arithmetic ceiling.

Counts the floating-point operations of the official prompt encoder + mask decoder for one point
(``torch.utils.flop_counter.FlopCounterMode``, vit_b sizes; the count does not depend on the weights) and
measures this machine's fp32 matrix-multiply ceiling with ONNX Runtime (the engine edgefm runs on): a single
large MatMul, and the decoder's own dominant shape (4096 image tokens × 256 -> 128). The quotient is the
fastest the decoder could run at full efficiency; compare it with the ``predict`` target of
``benchmarks/sam_cpu.py`` (0.2× the official ``SamPredictor.predict``).

    python benchmarks/sam_decoder_floor.py [--threads 2] [--json benchmarks/results/sam_decoder_floor.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, stats_ms, timed  # noqa: E402


def decoder_flops() -> dict[str, float]:
    """GFLOP of the official prompt encoder + mask decoder, one point, ``multimask_output=True``."""
    import torch
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    from torch.utils.flop_counter import FlopCounterMode

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
    return {"total": counter.get_total_flops() / 1e9, "transformer": part("MaskDecoder.transformer"),
            "output_upscaling": part("MaskDecoder.output_upscaling")}


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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    flops = decoder_flops()
    big = matmul_gflops(2048, 2048, 2048, args.threads, max(5, args.iters // 5))
    tokens = matmul_gflops(4096, 256, 128, args.threads, args.iters)
    ceiling = max(big["gflops"], tokens["gflops"])
    result = {"machine": machine(), "threads": args.threads, "decoder_gflop": flops,
              "matmul_large": big, "matmul_decoder_shape": tokens,
              "floor_ms_at_ceiling": flops["total"] / ceiling * 1e3}
    print(f"prompt encoder + mask decoder, one point: {flops['total']:.2f} GFLOP "
          f"(two-way transformer {flops['transformer']:.2f}, upscaling {flops['output_upscaling']:.2f})")
    print(f"fp32 MatMul, ONNX Runtime, {args.threads} threads: 2048³ {big['gflops']:.0f} GFLOP/s; "
          f"4096×256×128 {tokens['gflops']:.0f} GFLOP/s")
    print(f"=> the decoder cannot take less than {result['floor_ms_at_ceiling']:.1f} ms here in fp32")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
