"""DALL·E runtime: ``DalleGenerator`` (text -> images, optional CLIP reranking) and ``DvaeCodec`` (pictures
<-> dVAE codes) on exported bundles, without PyTorch."""

from .generator import DalleGenerator, DvaeCodec, GenerationResult
from .sampling import filter_logits, sample_tokens, token_probabilities
from .spec import DVAE_DECODER, DVAE_ENCODER, PRIOR_PREFILL, PRIOR_STEP

__all__ = [
    "DVAE_DECODER",
    "DVAE_ENCODER",
    "PRIOR_PREFILL",
    "PRIOR_STEP",
    "DalleGenerator",
    "DvaeCodec",
    "GenerationResult",
    "filter_logits",
    "sample_tokens",
    "token_probabilities",
]
