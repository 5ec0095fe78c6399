"""What the demo's ReST-EM-loop chains keep: each function returns a `build` for `rest_em.run`.

Each sees an iteration's samples and their hidden-verifier rewards (`Scored`), but only counts a kept
sample's reward (`correct_kept`, the selection's precision), never chooses by it, except ReST-EM itself.

    blind_pick   the control: as many samples as ReST-EM kept, drawn blind to the reward
    central      the most central sample by M_{t-1}'s own embeddings (lite_selftrain.mbr, cosine utility)
    majority     a sample whose extracted answer is the most common (self-consistency)
    random_pick  one sample, blind: the control, as many problems as the central chain kept

`fraction` < 1 keeps only the problems the selection is surest of (highest centrality of the winner, or
most votes for the majority answer): fewer, less noisy examples.
"""

from __future__ import annotations

import random
from collections import Counter

from ..mbr import SelectionConfig, select
from ..recipes.shared import Scored, finished
from ..sampling import group_by_prompt
from ..tasks import get_task


def _rng(seed: int, scored: Scored) -> random.Random:
    return random.Random(f"{seed}/{scored.iteration}/build")


def _size(sizes: list[int], iteration: int, default: int) -> int:
    """What the matched chain kept at `iteration` (`sizes[t-1]`), or `default` before it ran."""
    return sizes[iteration - 1] if len(sizes) >= iteration else default


def _finished_groups(scored: Scored) -> list[tuple[int, list[dict]]]:
    """(prompt index, its finished samples in sample order), by prompt index; unfinished ones are no candidates."""
    groups = group_by_prompt(finished(scored.samples))
    return [(p, sorted(g, key=lambda s: s["sample_index"])) for p, g in sorted(groups.items())]


def _records(scored: Scored, kept: list[dict]) -> tuple[list[dict], dict]:
    """Training records of the `kept` samples, each with weight 1, and how many of them are correct."""
    records = [{"prompt": scored.prompts[s["prompt_index"]], "response": s["text"], "reward": 1.0} for s in kept]
    return records, {"dataset_size": len(records), "problems_kept": len({s["prompt_index"] for s in kept}),
                     "correct_kept": sum(s["reward"] > 0 for s in kept)}


def _surest(scored: Scored, picks: list[tuple[float, dict]], fraction: float, rng: random.Random):
    """Keep the surest `fraction` of (confidence, sample) picks (ties broken at random); records + summary."""
    order = sorted(picks, key=lambda p: (-p[0], rng.random()))
    records, info = _records(scored, [s for _, s in order[: round(fraction * len(order))]])
    return records, {**info, "precision": info["correct_kept"] / max(len(records), 1)}


def blind_pick(sizes: list[int], max_per_problem: int, seed: int):
    """ReST-EM's control: as many samples as ReST-EM kept at that iteration (`sizes`), drawn without looking
    at the reward, at most `max_per_problem` per problem, each trained with weight 1."""

    def build(scored: Scored):
        rng = _rng(seed, scored)
        groups = group_by_prompt(finished(scored.samples))
        pool = [s for _, g in sorted(groups.items()) for s in rng.sample(g, min(len(g), max_per_problem))]
        return _records(scored, rng.sample(pool, min(_size(sizes, scored.iteration, 0), len(pool))))

    return build


def central_pick(seed: int, *, fraction: float = 1.0, layer: int = -1, pooling: str = "mean"):
    """Per problem, the sample most central among its siblings by the embeddings of M_{t-1}, which drew them."""

    def build(scored: Scored):
        model, tok = scored.sampler()
        groups = _finished_groups(scored)
        chosen = select(model, tok, [[s["text"] for s in g] for _, g in groups],
                        cfg=SelectionConfig(policy="central", layer=layer, pooling=pooling))
        picks = [(max(r["centrality"]) if len(g) > 1 else 0.0, g[r["index"]]) for (_, g), r in zip(groups, chosen)]
        return _surest(scored, picks, fraction, _rng(seed, scored))

    return build


def majority_pick(task_name: str, task_options: dict, seed: int, *, fraction: float = 1.0):
    """Per problem, the first sample whose extracted answer is the most common one."""
    task = get_task(task_name, **task_options)

    def build(scored: Scored):
        picks = []
        for _, g in _finished_groups(scored):
            answers = [task.extract_answer(s["text"]) for s in g]
            votes = Counter(a for a in answers if a is not None)
            if votes:
                top, n = votes.most_common(1)[0]
                picks.append((n, g[answers.index(top)]))
        return _surest(scored, picks, fraction, _rng(seed, scored))

    return build


def random_pick(sizes: list[int], seed: int):
    """One blind sample for each of as many problems as `sizes[t-1]` (the central chain's count)."""

    def build(scored: Scored):
        rng = _rng(seed, scored)
        picks = [(0.0, rng.choice(g)) for _, g in _finished_groups(scored)]
        size = _size(sizes, scored.iteration, len(picks))
        return _surest(scored, picks, min(1.0, size / max(len(picks), 1)), rng)

    return build
