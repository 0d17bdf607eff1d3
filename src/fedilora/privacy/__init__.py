"""Privacy for heterogeneous-rank federated LoRA: client-level differential privacy with accounting
(:mod:`fedilora.privacy.dp`, :mod:`fedilora.privacy.accounting`) and secure aggregation with pairwise
masks (:mod:`fedilora.privacy.secagg`)."""

from fedilora.privacy.dp import DifferentialPrivacy
from fedilora.privacy.secagg import SecureAggregation

__all__ = ["DifferentialPrivacy", "SecureAggregation"]
