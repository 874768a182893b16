"""Shared fixtures: small seeded models, their official twins, and exported bundles (built once per session)."""

from __future__ import annotations

import numpy as np
import pytest
from sam_fixtures import official_sam  # noqa: F401 - the tests import it from here


def randomize_(module, seed: int, std: float = 0.1) -> None:
    """Seeded weights that make outputs depend on every parameter: the default init (re-run under the
    seed) plus random values where official inits leave zeros (biases, positional and rel-pos tables)."""
    import torch

    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "pos" in name.split(".")[-1]:
                p.normal_(0.0, std)


@pytest.fixture(scope="session")
def sam_tiny():
    from edgefm.models.sam import SAM_CONFIGS, build_sam

    model = build_sam(SAM_CONFIGS["tiny"]).eval()
    randomize_(model, seed=0)
    return model


@pytest.fixture(scope="session")
def sam_tiny_official(sam_tiny):
    from edgefm.models.sam import SAM_CONFIGS

    return official_sam(SAM_CONFIGS["tiny"], sam_tiny.state_dict())


@pytest.fixture(scope="session")
def sam_tiny_bundle(sam_tiny, tmp_path_factory):
    from edgefm.export.sam import export_sam

    return export_sam(sam_tiny, tmp_path_factory.mktemp("bundles") / "sam_tiny", "tiny")


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A gradient background with filled circles and squares (the demo's scene generator)."""
    from edgefm.runtime.demo import make_scene

    return make_scene(h, w, seed)


def assert_scaled_close(got, ref, rel: float = 1e-5, what: str = "") -> float:
    """Max abs difference <= rel * max(1, |ref|_inf), the repo's parity bound; returns the difference."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    bound = rel * max(1.0, float(np.abs(ref).max()) if ref.size else 0.0)
    assert diff <= bound, f"{what}: max abs diff {diff:.3g} > {bound:.3g}"
    return diff
