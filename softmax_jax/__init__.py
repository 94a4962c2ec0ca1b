"""softmax_jax: exact, fast, memory-frugal softmax regression and cross-entropy heads for JAX.

The public API is re-exported here; the code lives in private modules.
"""

from importlib.metadata import PackageNotFoundError, version

from ._check import GradCheckReport, check_grad
from ._checkpoint import CheckpointError
from ._distill import linear_distillation
from ._fit import TrainingDiverged, fit
from ._grad import DerivationTerms, derivation_terms, grad, hvp, value_and_grad
from ._head import CrossEntropyAux, linear_cross_entropy
from ._logprobs import LogProbs, linear_log_probs
from ._loss import loss
from ._model import Model, ModelFileError, load_model, predict, predict_proba, save_model
from ._parallel import sharded_linear_cross_entropy

try:
    __version__ = version("softmax-jax")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


def __getattr__(name: str):
    # The estimator needs scikit-learn (the `cli` extra); import it only when asked for.
    if name == "SoftmaxRegression":
        try:
            from ._estimator import SoftmaxRegression
        except ImportError as e:  # pragma: no cover - exercised only without scikit-learn
            raise ImportError(
                "softmax_jax.SoftmaxRegression needs scikit-learn: pip install 'softmax-jax[cli]'"
            ) from e
        return SoftmaxRegression
    raise AttributeError(f"module 'softmax_jax' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "CrossEntropyAux",
    "GradCheckReport",
    "SoftmaxRegression",
    "TrainingDiverged",
    "check_grad",
    "DerivationTerms",
    "derivation_terms",
    "fit",
    "grad",
    "hvp",
    "linear_cross_entropy",
    "linear_distillation",
    "linear_log_probs",
    "load_model",
    "LogProbs",
    "loss",
    "Model",
    "ModelFileError",
    "predict",
    "predict_proba",
    "save_model",
    "sharded_linear_cross_entropy",
    "value_and_grad",
]
