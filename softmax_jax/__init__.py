"""softmax_jax: exact, fast, memory-frugal softmax regression and cross-entropy heads for JAX.

The public API is re-exported here; the code lives in private modules.
"""

from importlib.metadata import PackageNotFoundError, version

from ._check import GradCheckReport, check_grad
from ._grad import DerivationTerms, derivation_terms, grad, hvp, value_and_grad
from ._head import linear_cross_entropy
from ._loss import loss

try:
    __version__ = version("softmax-jax")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "GradCheckReport",
    "check_grad",
    "DerivationTerms",
    "derivation_terms",
    "grad",
    "hvp",
    "linear_cross_entropy",
    "loss",
    "value_and_grad",
]
