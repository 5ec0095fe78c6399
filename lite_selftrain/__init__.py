"""lite_selftrain: a language model improves itself from its own samples on one GPU (or a CPU).

Recipes: ReST-EM, Iterative RPO, Self-Rewarding LM, embedding-centrality self-selection.
"""

from .errors import UserError
from .models import ModelConfig, build_model, build_tokenizer, load_model, reference_mode, save_model
from .store import RunStore

__version__ = "0.1.0"

__all__ = [
    "ModelConfig",
    "RunStore",
    "UserError",
    "build_model",
    "build_tokenizer",
    "load_model",
    "reference_mode",
    "save_model",
]
