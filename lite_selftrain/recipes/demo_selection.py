"""The demo's reward-free selections: which one of a problem's own samples a chain trains on.

Each is a `keep` for `rest_em.run`: it sees the iteration's samples and their hidden-verifier scores, but only
counts a kept sample's score (`correct_kept`, the selection's precision), never chooses by it.

    central      the most central sample by M_{t-1}'s own embeddings (lite_selftrain.mbr, cosine utility)
    majority     a sample whose extracted answer is the most common (self-consistency)
    random_pick  one sample, blind: the control, as many problems as the central chain kept

`keep_fraction` < 1 keeps only the problems the selection is most sure of (highest centrality of the winner,
or most votes for the majority answer): fewer, less noisy examples.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from ..mbr import SelectionConfig, select
from ..models import ModelConfig, load_model
from ..sampling import group_by_prompt
from ..store import RunStore
from ..tasks import get_task


def _finished_groups(scored: list[dict]) -> list[tuple[int, list[dict]]]:
    """(prompt index, its finished samples in sample order), by prompt index; unfinished ones are no candidates."""
    groups = group_by_prompt([s for s in scored if s["finish_reason"] != "length"])
    return [(p, sorted(g, key=lambda s: s["sample_index"])) for p, g in sorted(groups.items())]


def _records(prompts: list[str], picks: list[tuple[float, dict]], fraction: float, rng: random.Random):
    """Keep the surest `fraction` of (confidence, sample) picks (ties broken at random); records + summary."""
    order = sorted(picks, key=lambda p: (-p[0], rng.random()))
    kept = [s for _, s in order[: round(fraction * len(order))]]
    records = [{"prompt": prompts[s["prompt_index"]], "response": s["text"], "reward": 1.0} for s in kept]
    return records, {"dataset_size": len(records), "problems_kept": len(kept),
                     "correct_kept": sum(s["reward"] > 0 for s in kept),
                     "precision": sum(s["reward"] > 0 for s in kept) / max(len(kept), 1)}


def previous_model(chain_out: Path, name: str, warm: Path, iteration: int) -> Path:
    """The model folder of M_{iteration-1} of the chain `name` run in `chain_out` (M_0 is the warm start)."""
    if iteration == 1:
        return warm
    return RunStore(chain_out).iteration_dir(name, iteration - 1) / "model"


def central_pick(chain_out: Path, name: str, warm: Path, *, fraction: float = 1.0, layer: int = -1,
                 pooling: str = "mean"):
    """`keep`: per problem, the sample most central among its siblings by M_{t-1}'s own embeddings."""

    def keep(cfg, prompts: list[str], scored: list[dict], iteration: int):
        model, tok = load_model(ModelConfig(name=str(previous_model(chain_out, name, warm, iteration)), mode="full"))
        groups = _finished_groups(scored)
        chosen = select(model, tok, [[s["text"] for s in g] for _, g in groups],
                        cfg=SelectionConfig(policy="central", layer=layer, pooling=pooling))
        picks = [(max(r["centrality"]) if len(g) > 1 else 0.0, g[r["index"]]) for (_, g), r in zip(groups, chosen)]
        return _records(prompts, picks, fraction, random.Random(f"{cfg.seed}/{iteration}/build"))

    return keep


def majority_pick(task_name: str, task_options: dict, *, fraction: float = 1.0):
    """`keep`: per problem, the first sample whose extracted answer is the most common one."""
    task = get_task(task_name, **task_options)

    def keep(cfg, prompts: list[str], scored: list[dict], iteration: int):
        picks = []
        for _, g in _finished_groups(scored):
            answers = [task.extract_answer(s["text"]) for s in g]
            votes = Counter(a for a in answers if a is not None)
            if not votes:
                continue
            top, n = votes.most_common(1)[0]
            picks.append((n, g[answers.index(top)]))
        return _records(prompts, picks, fraction, random.Random(f"{cfg.seed}/{iteration}/build"))

    return keep


def random_pick(sizes: list[int]):
    """`keep`: one blind sample for each of as many problems as `sizes[t-1]` (the central chain's count)."""

    def keep(cfg, prompts: list[str], scored: list[dict], iteration: int):
        rng = random.Random(f"{cfg.seed}/{iteration}/build")
        picks = [(0.0, rng.choice(g)) for _, g in _finished_groups(scored)]
        size = sizes[iteration - 1] if len(sizes) >= iteration else len(picks)
        return _records(prompts, picks, min(1.0, size / max(len(picks), 1)), rng)

    return keep
