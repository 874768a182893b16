"""The export wrappers run wherever their model is (the H100 run found PromptEncoderGraph making a CPU tensor).

On the ``meta`` device any tensor a wrapper creates on the CPU mixes with the model's tensors and raises, the
same error CUDA gives: a CPU machine can prove the wrappers device-agnostic.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _run(graph, *inputs):
    outs = graph(*(x.to("meta") for x in inputs))
    return [tuple(o.shape) for o in (outs if isinstance(outs, tuple) else (outs,))]


def test_sam_wrappers_on_another_device():
    from edgefm.export.sam import ImageEncoderGraph, MaskDecoderGraph, PromptEncoderGraph
    from edgefm.models.sam import SAM_CONFIGS, build_sam

    sam = build_sam(SAM_CONFIGS["tiny"]).to("meta")
    image = torch.zeros(1, 3, 256, 256)
    assert _run(ImageEncoderGraph(sam), image) == [(1, 32, 16, 16)]
    assert _run(ImageEncoderGraph(sam, "fused"), image) == [(1, 32, 16, 16)]
    assert _run(ImageEncoderGraph(sam, "fused-qk"), image) == [(1, 32, 16, 16)]
    sparse, dense = _run(PromptEncoderGraph(sam), torch.zeros(2, 3, 2), torch.zeros(2, 3),
                         torch.zeros(2, 1, 64, 64), torch.zeros(2))
    assert (sparse, dense) == ((2, 3, 32), (2, 32, 16, 16))
    for fused in (False, True):
        assert _run(MaskDecoderGraph(sam, fused), torch.zeros(1, 32, 16, 16), torch.zeros(2, 3, 32),
                    torch.zeros(2, 32, 16, 16)) == [(2, 4), (2, 4, 64, 64)]


def test_clip_and_dalle_wrappers_on_another_device():
    from edgefm.export.clip import ImageEncoderGraph, TextEncoderGraph
    from edgefm.export.dalle import DecoderGraph
    from edgefm.models.clip import CLIP_CONFIGS, build_clip
    from edgefm.models.dalle import build_decoder

    clip = build_clip(CLIP_CONFIGS["tiny-vit"]).to("meta")
    assert _run(ImageEncoderGraph(clip), torch.zeros(1, 3, 224, 224)) == [(1, 64)]
    assert _run(TextEncoderGraph(clip), torch.zeros(2, 16, dtype=torch.long)) == [(2, 64)]
    assert _run(ImageEncoderGraph(clip, fused=True), torch.zeros(1, 3, 224, 224)) == [(1, 64)]
    assert _run(TextEncoderGraph(clip, fused=True), torch.zeros(2, 16, dtype=torch.long)) == [(2, 64)]
    decoder = build_decoder("tiny").to("meta")
    assert _run(DecoderGraph(decoder), torch.zeros(1, 4, 4, dtype=torch.long)) == [(1, 3, 32, 32)]
