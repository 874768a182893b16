"""IO binding and static-shape (CUDA graph) plumbing of the ONNX Runtime backend, on the CPU provider.

The GPU paths (``run_on_device`` keeping outputs in CUDA memory, ``cuda_graph=True``) bind buffers on the
runner's device; on ort-cpu the same code binds host buffers, so everything except the CUDA provider itself is
exercised here. The H100 run (benchmarks/gpu) covers the provider.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from edgefm.runtime.backends.onnxruntime import OrtRunner, _CapturedGraph
from edgefm.runtime.bundle import Bundle
from edgefm.runtime.errors import BackendError, InputError
from edgefm.runtime.sam import SamPredictor

from tests.conftest import scene


def _prompts(b: int, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"point_coords": rng.uniform(0, 128, (b, n, 2)).astype(np.float32),
            "point_labels": np.ones((b, n), np.float32),
            "mask_input": np.zeros((b, 1, 64, 64), np.float32), "has_mask_input": np.zeros((b,), np.float32)}


def test_run_on_device_chains_components_without_host_arrays(sam_tiny_bundle):
    bundle = Bundle(sam_tiny_bundle, "ort-cpu")
    enc, pe, dec = (bundle.runner(n) for n in ("image_encoder", "prompt_encoder", "mask_decoder"))
    image = np.random.default_rng(0).standard_normal((1, 3, 256, 256)).astype(np.float32)
    prompts = _prompts(2, 3, seed=1)
    kept = enc.run_on_device({"image": image}, keep=("image_embeddings",))["image_embeddings"]
    assert isinstance(kept, ort.OrtValue)
    sparse = pe.run_on_device(prompts, keep=("sparse_embeddings", "dense_embeddings"))
    chained = dec.run_on_device({"image_embeddings": kept, **sparse})
    plain = dec.run({"image_embeddings": enc.run({"image": image})["image_embeddings"], **pe.run(prompts)})
    for name in ("iou_predictions", "low_res_masks"):
        np.testing.assert_array_equal(chained[name].numpy(), plain[name])


def test_static_shape_session_matches_the_dynamic_one_and_replays_new_values(sam_tiny_bundle):
    bundle = Bundle(sam_tiny_bundle, "ort-cpu")
    runner = bundle.runner("prompt_encoder")
    graph = _CapturedGraph(runner, runner.spec.check_feeds(_prompts(1, 2, seed=2)))
    # Symbolic dims were fixed at load time, so the session reports concrete input shapes.
    assert [i.shape for i in graph.session.get_inputs()][:2] == [[1, 2, 2], [1, 2]]
    for seed in (3, 4):  # new values go into the same bound buffers
        feeds = _prompts(1, 2, seed)
        want = runner.run(feeds)
        got = graph.run(feeds)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6)


def test_cuda_graph_needs_the_cuda_backend(sam_tiny_bundle):
    entry = Bundle(sam_tiny_bundle, "ort-cpu").entry("image_encoder")
    with pytest.raises(BackendError, match="cuda_graph=True needs the ort-cuda backend, not 'ort-cpu'"):
        OrtRunner(sam_tiny_bundle / entry.file, entry.spec, "ort-cpu", cuda_graph=True)


def test_a_runner_keeps_one_captured_graph_per_shape_and_releases_the_oldest(sam_tiny_bundle):
    bundle = Bundle(sam_tiny_bundle, "ort-cpu")
    runner = bundle.runner("prompt_encoder")
    want = {n: runner.run(_prompts(1, n, seed=n))["dense_embeddings"] for n in (1, 2, 3, 4, 5)}
    sparse3 = runner.run(_prompts(1, 3, seed=3))["sparse_embeddings"]
    runner.cuda_graph = True  # as an ort-cuda runner would be; the replay path itself is device-agnostic
    for n in (2, 3, 2, 1, 4):  # n = 2 is used again, so n = 3 is the least recently used when 5 arrives
        np.testing.assert_allclose(runner.run(_prompts(1, n, seed=n))["dense_embeddings"], want[n], rtol=0, atol=1e-6)
    assert [dict(k)["point_coords"] for k in runner._graphs] == [(1, 3, 2), (1, 2, 2), (1, 1, 2), (1, 4, 2)]
    np.testing.assert_allclose(runner.run(_prompts(1, 5, seed=5))["dense_embeddings"], want[5], rtol=0, atol=1e-6)
    assert len(runner._graphs) == runner.MAX_GRAPHS == 4
    assert (1, 3, 2) not in [dict(k)["point_coords"] for k in runner._graphs]
    got = runner.run(_prompts(1, 3, seed=3))  # captured again
    np.testing.assert_allclose(got["sparse_embeddings"], sparse3, rtol=0, atol=1e-6)


def test_captured_graphs_chain_through_shared_buffers(sam_tiny_bundle):
    """The prompt encoder's captured outputs are the decoder's bound inputs: a click replays both without
    copying the embeddings anywhere, and the masks equal the plain runs'."""
    bundle = Bundle(sam_tiny_bundle, "ort-cpu")
    enc, pe, dec = (bundle.runner(n) for n in ("image_encoder", "prompt_encoder", "mask_decoder"))
    image = np.random.default_rng(0).standard_normal((1, 3, 256, 256)).astype(np.float32)
    emb = enc.run({"image": image})["image_embeddings"]
    prompt = _CapturedGraph(pe, pe.spec.check_feeds(_prompts(1, 2, seed=0)))
    mid = {n: prompt.outputs[n] for n in ("sparse_embeddings", "dense_embeddings")}
    decoder = _CapturedGraph(dec, {"image_embeddings": emb}, bound=mid)
    assert decoder.inputs["sparse_embeddings"] is prompt.outputs["sparse_embeddings"]
    for seed in (1, 2):
        feeds = _prompts(1, 2, seed)
        prompt.replay(feeds)
        decoder.replay()
        want = dec.run({"image_embeddings": emb, **pe.run(feeds)})
        for name in want:
            np.testing.assert_allclose(decoder.outputs[name].numpy(), want[name], rtol=0, atol=1e-5)


def test_predictor_keeps_the_embedding_as_a_bound_value_when_on_device(sam_tiny_bundle):
    """The device-resident SamPredictor path (taken on ort-cuda) gives the host path's masks exactly."""
    host = SamPredictor(sam_tiny_bundle, backend="ort-cpu")
    dev = SamPredictor(sam_tiny_bundle, backend="ort-cpu")
    dev._on_device = True  # what ort-cuda runners switch on; run_on_device binds host memory on ort-cpu
    image = scene(96, 160, seed=3)
    host.set_image(image)
    dev.set_image(image)
    assert isinstance(dev.features, ort.OrtValue)
    np.testing.assert_array_equal(dev.get_image_embedding(), host.get_image_embedding())
    box = np.array([20, 10, 90, 70], np.float32)
    m_host, s_host, _ = host.predict(np.array([[50, 40]], np.float32), np.array([1], np.float32), box=box)
    m_dev, s_dev, _ = dev.predict(np.array([[50, 40]], np.float32), np.array([1], np.float32), box=box)
    np.testing.assert_array_equal(m_dev, m_host)
    np.testing.assert_allclose(s_dev, s_host, rtol=0, atol=1e-6)


def test_predictor_on_captured_graphs_gives_the_host_masks_across_images_and_prompt_shapes(sam_tiny_bundle):
    """``SamPredictor(cuda_graphs=True)``'s path, through the same capture code on ort-cpu: the decoder graphs
    captured for the first image read the second image's embedding from the shared buffer."""
    host = SamPredictor(sam_tiny_bundle, backend="ort-cpu")
    graphs = SamPredictor(sam_tiny_bundle, backend="ort-cpu")
    graphs._on_device = graphs._graphs = True  # what cuda_graphs=True switches on with ort-cuda runners
    clicks = [(np.array([[50, 40]], np.float32), np.array([1], np.float32), None),
              (np.array([[50, 40], [120, 60]], np.float32), np.array([1, 0], np.float32), None),
              (np.array([[50, 40]], np.float32), np.array([1], np.float32), np.array([20, 10, 90, 70], np.float32))]
    for seed in (3, 4):
        image = scene(96, 160, seed=seed)
        host.set_image(image)
        graphs.set_image(image)
        np.testing.assert_array_equal(graphs.get_image_embedding(), host.get_image_embedding())
        for points, labels, box in clicks + clicks[:1]:
            m_host, s_host, l_host = host.predict(points, labels, box=box)
            m_graph, s_graph, l_graph = graphs.predict(points, labels, box=box)
            np.testing.assert_allclose(l_graph, l_host, rtol=0, atol=1e-4)
            np.testing.assert_allclose(s_graph, s_host, rtol=0, atol=1e-5)
            assert (m_graph == m_host).mean() > 0.999
        # A mask prompt takes the prompt encoder + mask decoder pair of captured graphs, beside the
        # prompt decoder's.
        _, _, low = host.predict(points, labels, multimask_output=False)
        m_host, s_host, _ = host.predict(points, labels, mask_input=low, multimask_output=False)
        m_graph, s_graph, _ = graphs.predict(points, labels, mask_input=low, multimask_output=False)
        np.testing.assert_allclose(s_graph, s_host, rtol=0, atol=1e-5)
        assert (m_graph == m_host).mean() > 0.999
    # One graph per prompt shape and kind: the prompt decoder for a click + padding (2 points) and for two
    # clicks + padding or a click + box corners (3 points); the pair for the mask prompt (2 points + mask).
    kinds = sorted((len(dict(k)), dict(k)["point_coords"]) for k in graphs._prompt_graphs)
    assert kinds == [(2, (1, 2, 2)), (2, (1, 3, 2)), (4, (1, 2, 2))]


def test_predictor_cuda_graphs_need_ort_cuda(sam_tiny_bundle):
    with pytest.raises(InputError, match=r"cuda_graphs=True .* needs backend 'ort-cuda' "
                                         r"\(--backend ort-cuda\), not 'ort-cpu'"):
        SamPredictor(sam_tiny_bundle, backend="ort-cpu", cuda_graphs=True)


def test_resident_call_runs_the_component_on_inputs_uploaded_once(sam_tiny_bundle):
    runner = Bundle(sam_tiny_bundle, "ort-cpu").runner("prompt_encoder")
    feeds = _prompts(2, 3, seed=6)
    call = runner.resident_call(feeds)
    want = runner.run(feeds)
    for _ in range(2):  # the same uploaded inputs serve every call
        got = call()
        assert isinstance(got["dense_embeddings"], ort.OrtValue)
        for name in want:
            np.testing.assert_array_equal(got[name].numpy(), want[name])
