"""Training: the M-step trainer and what it is built from.

`trainer.py` (the loop), `checkpoint.py` (save and resume), `progress.py` (counters and metrics lines),
`batching.py` (records → padded batches), `logprobs.py` (sequence log-probs through the fused kernel),
`losses.py` (pure functions of log-probs), `reference.py` (DPO's reference log-probs), `parallel.py`
(DDP / FSDP2 wrappers under a launcher).
"""

from .trainer import TrainConfig, train

__all__ = ["TrainConfig", "train"]
