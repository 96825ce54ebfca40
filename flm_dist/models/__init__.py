"""Plain-PyTorch model code (no Ray, no torch.distributed): encoders, CF, flow, joint model."""

from flm_dist.models.cf import MatrixFactorization
from flm_dist.models.flm import FLMModel, Fusion
from flm_dist.models.flow import NormalizingFlow
from flm_dist.models.sequence import SequenceEncoder

__all__ = ["FLMModel", "Fusion", "MatrixFactorization", "NormalizingFlow", "SequenceEncoder"]
