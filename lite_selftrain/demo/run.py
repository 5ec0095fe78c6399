"""The demo's run: the warm start, then each chain beside its control, all in one folder.

    rest_em   ReST-EM: keep the correct samples, retrain the warm-start model on them;
    rpo       Iterative RPO: (correct, incorrect) pairs, DPO + NLL, continue from the last model;
    control   ReST-EM's loop keeping as many of its own samples as ReST-EM kept, blind to the reward;
    central   no reward anywhere: per problem the sample most central by M_{t-1}'s own embeddings;
    random_pick  its control: one blind sample for as many problems as `central` kept;
    majority  the self-consistency reference: a sample whose answer is the most common;
    self_rewarding  M_0 learns to judge sums, then each iteration judges its own answers, DPO best vs worst;
    random_pairs  its control: DPO on as many random pairs of its own answers, the same steps.

Every model is scored on the same held-out test problems (greedy pass@1, pass@8 / maj@8) and on validation
problems held out from the training ones, which alone pick each chain's best iteration (its best.json).
`metrics.jsonl` gets one record per chain and iteration; `accuracy.png` plots them. The gain of
self-training over its control is what the reward (or the selection) taught.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import to_dict
from ..errors import UserError
from ..plot import plot_metrics
from ..recipes import rest_em, rpo
from ..recipes.common import best_iteration, log_once
from ..store import RunStore, sweep_temporaries
from . import self_reward
from .selection import blind_pick, central_pick, majority_pick, random_pick
from .world import CHAINS, DemoConfig, chain_configs, gold_records, warm_start

CONTROLS = {"control": "rest_em", "random_pick": "central", "random_pairs": "self_rewarding"}  # matches its chain


def _chains(chains: tuple[str, ...]) -> tuple[str, ...]:
    """The chains to run, in CHAINS' order, each control with the chain it matches."""
    unknown = [c for c in chains if c not in CHAINS]
    if unknown or not chains:
        raise UserError(f"unknown demo chain(s) {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(CHAINS)}")
    return tuple(c for c in CHAINS if c in chains or any(CONTROLS.get(x) == c for x in chains))


def sizes(records: list[dict], chain: str, key: str = "dataset_size") -> list[int]:
    """Training-set size (`key`) of each iteration of `chain`: what its control matches."""
    return [r[key] for r in records if r["recipe"] == chain and r["iteration"] > 0]


def chain_build(cfg: DemoConfig, name: str, records: list[dict], chain: rest_em.RestEMConfig):
    """The `build` of a ReST-EM-loop chain (None: ReST-EM's own); a control keeps as many as its chain."""
    if name == "control":  # blind to the reward
        return blind_pick(sizes(records, "rest_em"), chain.max_per_problem, cfg.seed)
    if name == "central":  # no reward anywhere: the sample its siblings agree with, by M_{t-1}'s embeddings
        return central_pick(cfg.seed, fraction=cfg.central_keep, layer=cfg.central_layer, pooling=cfg.central_pooling)
    if name == "majority":  # self-consistency: the most common answer
        return majority_pick("arith", {"terms": cfg.terms, "seed": cfg.seed}, cfg.seed, fraction=cfg.central_keep)
    if name == "random_pick":
        return random_pick(sizes(records, "central"), cfg.seed)
    return None


def chain_records(cfg: DemoConfig, name: str, out: Path, warm: Path, records: list[dict], progress: bool):
    """One chain's metrics records (run or resumed in out/name)."""
    configs = chain_configs(cfg, warm)
    if name == "rpo":
        return rpo.run(configs[name], out / name, progress=progress, name=name)[0]
    if name in ("self_rewarding", "random_pairs"):
        return self_reward.run_chain(cfg, name, out, warm, gold_records(cfg), configs["rest_em"],
                                     sizes=sizes(records, "self_rewarding", "answer_pairs"), progress=progress)[0]
    return rest_em.run(configs[name], out / name, progress=progress, name=name,
                       build=chain_build(cfg, name, records, configs[name]))[0]


def run_demo(cfg: DemoConfig, out, *, restart: bool = False, progress: bool = True, echo=print,
             chains: tuple[str, ...] = CHAINS) -> dict:
    """Warm start, then the chosen chains (a control runs its chain too); resumable; returns records, a
    summary and the plot's path."""
    chains = _chains(chains)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    store = RunStore(out)
    store.bind_config({"demo": to_dict(cfg)}, restart=restart)
    out = store.root
    sweep_temporaries(out)  # e.g. a warm start killed while it was being saved
    echo("warm start: training the demo model from scratch on gold solutions of short sums")
    warm = warm_start(cfg, out, progress=progress)
    store.mark_done("warmstart")  # a finished stage: from now on a different config is refused, never wiped
    records = []
    for name in chains:
        echo(f"chain {name}: {cfg.iterations} iterations of {cfg.problems_per_iteration} fresh problems")
        records += chain_records(cfg, name, out, warm, records, progress)
    log_once(store, records)  # the demo's metrics.jsonl: every chain's records, each once
    plot = plot_metrics(out / "metrics.jsonl", out / "accuracy.png")
    return {"records": records, "summary": summarize(records), "plot": plot}


def chosen(records: list[dict]) -> dict[str, dict]:
    """Each chain's iteration with the best validation pass@1 (earliest on ties), as its best.json names."""
    names = dict.fromkeys(r["recipe"] for r in records)
    return {name: best_iteration([r for r in records if r["recipe"] == name], "valid_pass@1") for name in names}


def gains(records: list[dict]) -> dict[str, float]:
    """Test pass@1 of each chain's iteration chosen on validation minus the warm start's, in points."""
    base = next(r["test_pass@1"] for r in records if r["iteration"] == 0)
    return {name: 100 * (r["test_pass@1"] - base) for name, r in chosen(records).items()}


def summarize(records: list[dict]) -> str:
    g, pick = gains(records), chosen(records)
    base = next(r["test_pass@1"] for r in records if r["iteration"] == 0)
    return (f"test pass@1 of the iteration chosen on validation: warm start {100 * base:.1f}%; "
            + ", ".join(f"{name} {g[name]:+.1f} (iteration {pick[name]['iteration']})" for name in g) + " points")
