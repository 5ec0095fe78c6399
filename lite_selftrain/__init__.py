"""lite_selftrain: a language model improves itself from its own samples on one GPU (or a CPU).

Recipes (lite_selftrain.recipes): ReST-EM, Iterative RPO, Self-Rewarding LM, embedding-centrality
self-selection. The parts they are built from are re-exported here, imported on first use so that
`lite-selftrain --help` does not pay for torch and transformers. The functions named like their
modules (`evaluate.evaluate`, `judge.judge`) are imported from those modules.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "UserError": "errors", "UserTypeError": "errors",
    "maj_at_k": "evaluate", "pass_at_k": "evaluate",
    "parse_score": "judge",
    "fused_logprob": "kernels", "naive_logprob": "kernels",
    "sequence_logprobs": "training.logprobs",
    "dpo_nll_loss": "training.losses", "reward_weighted_nll": "training.losses",
    "centrality": "mbr", "embed": "mbr", "select": "mbr",
    "ModelConfig": "models", "build_model": "models", "build_tokenizer": "models", "load_model": "models",
    "reference_mode": "models", "save_model": "models",
    "Completion": "sampling", "SamplingConfig": "sampling", "generate": "sampling",
    "EvalConfig": "evaluate", "JudgeConfig": "judge",
    "RunStore": "store",
    "get_task": "tasks",
    "TrainConfig": "training", "train": "training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lite_selftrain' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
