"""How many operators each component of a bundle runs: a proxy for GPU latency at batch 1, where every node is
at least one kernel launch (or a host-side shape computation) and launches, not arithmetic, set the time.

For every ONNX component: nodes as exported; nodes after ONNX Runtime's graph optimizations (level
"extended": constant folding, Gelu/LayerNorm/MatMul fusions; the same passes the CUDA provider gets, run here
with the CPU provider); the Shape ops among them (per-call shape arithmetic); the Casts that change a dtype
(fp16 graphs: the fp32 islands); and the fused attention nodes. fp16 graphs are counted as exported only:
the CPU provider inserts its own Casts around operators it has no fp16 kernel for, which the CUDA provider
does not.

    python benchmarks/graph_stats.py BUNDLE [BUNDLE ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort


def _real_casts(model: onnx.ModelProto) -> int:
    """Casts whose input dtype differs from their target (no-op casts are removed by any ORT provider)."""
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*model.graph.value_info, *model.graph.input]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    n = 0
    for node in model.graph.node:
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            n += types.get(node.input[0]) != to
    return n


def component_stats(path: Path, precision: str) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    row = {"nodes": sum(v for k, v in ops.items() if k not in ("Constant", "Identity")),
           "dtype_casts": _real_casts(inferred), "attention_nodes": ops["MultiHeadAttention"]}
    if precision == "fp32":
        with tempfile.TemporaryDirectory() as tmp:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            opt = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
        row.update(optimized_nodes=sum(opt.values()), optimized_shape_ops=opt["Shape"])
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = []
    for bundle in args.bundles:
        manifest = json.loads((bundle / "manifest.json").read_text())
        for c in manifest["components"]:
            if c["format"] == "onnx":
                rows.append({"bundle": bundle.name, "component": c["name"], "precision": c["precision"],
                             **component_stats(bundle / c["file"], c["precision"])})
    print("| bundle | component | precision | nodes | after ORT optimizations | Shape ops there | dtype Casts "
          "| attention nodes |\n|---|---|---|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['bundle']} | {r['component']} | {r['precision']} | {r['nodes']} | "
              f"{r.get('optimized_nodes', '—')} | {r.get('optimized_shape_ops', '—')} | {r['dtype_casts']} | "
              f"{r['attention_nodes']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
