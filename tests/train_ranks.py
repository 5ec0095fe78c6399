"""Training runs shared by tests/test_train_ranks.py: run under `torchrun --nproc_per_node 2` (each rank
writes its trained weights to OUT/<name>.rank<r>.pt) or imported for the one-process twin (`run`).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train_ranks.py OUT rwnll dpo fsdp

With KILL_AFTER_CHECKPOINT=1, rank 0 SIGKILLs itself at its first forward after the run wrote a checkpoint.
"""

import os
import signal
import sys
from pathlib import Path

import torch

RECORDS = [{"prompt": f"{a}+{b}=", "response": f"{a + b}" + " ok" * (a % 3), "reward": [1.0, 0.5, 0.0, 2.0][a % 4]}
           for a, b in [(3, 4), (12, 30), (7, 7), (101, 5), (9, 1), (48, 2), (6, 60), (15, 15), (2, 8)]]  # 9
PAIRS = [{"prompt": f"Q: {a}+{b}?\nA:", "chosen": f" {a + b}", "rejected": f" {a + b + 1} maybe"}
         for a, b in [(1, 2), (3, 5), (10, 4), (7, 8), (21, 3), (6, 6), (40, 2)]]  # 7

# steps of 4, 4, 1 examples (the last leaves rank 1 without one), 2 micro-batches per rank otherwise
SCENARIOS = {
    "rwnll": ("lora", RECORDS, dict(objective="rwnll", lr=1e-2, epochs=2, batch_size=1, grad_accum=4)),
    "dpo": ("lora", PAIRS, dict(objective="dpo_nll", lr=1e-2, epochs=1, batch_size=1, grad_accum=2)),
    "fsdp": ("full", RECORDS[:7], dict(objective="rwnll", lr=1e-3, epochs=2, batch_size=1, grad_accum=3,
                                       parallel="fsdp", checkpoint_every=2)),
}
COMMON = dict(warmup_ratio=0.0, log_every=1, max_grad_norm=0.5)


def trained_weights(model) -> dict:
    if any(not p.requires_grad for p in model.parameters()):  # an adapter: its own weights
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def run(name: str, out_dir: Path, kill: bool = False) -> tuple[dict, dict]:
    from lite_selftrain.models import ModelConfig, load_model
    from lite_selftrain.training import TrainConfig, train
    from lite_selftrain.training.logprobs import split_body_head

    mode, data, cfg = SCENARIOS[name]
    model, tok = load_model(ModelConfig(name="tiny", mode=mode))
    if kill and int(os.environ.get("RANK", "0")) == 0:
        def die(*_):
            if (out_dir / "checkpoint.pt").exists():
                os.kill(os.getpid(), signal.SIGKILL)

        split_body_head(model)[0].register_forward_hook(die)
    summary = train(model, tok, data, TrainConfig(**cfg, **COMMON), out_dir)
    return trained_weights(model), summary


if __name__ == "__main__":
    torch.set_num_threads(1)
    from lite_selftrain import distributed

    distributed.init()
    out = Path(sys.argv[1])
    for name in sys.argv[2:]:
        weights, _ = run(name, out / name, kill=os.environ.get("KILL_AFTER_CHECKPOINT") == "1")
        torch.save(weights, out / f"{name}.rank{distributed.rank()}.pt")
