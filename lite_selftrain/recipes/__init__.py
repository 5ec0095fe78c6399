"""The recipes: one file each, holding its whole algorithm as a loop of resumable stages.

    rest_em.run(RestEMConfig(...), out)                 ReST-EM
    rpo.run(RPOConfig(...), out)                        Iterative RPO
    self_rewarding.run(SelfRewardConfig(...), out)      Self-Rewarding LM
    centrality.run(CentralityConfig(...), out)          embedding-centrality self-selection

`common` holds the run directory and the iterates, `shared` the splits, evaluation and dataset rules they
share. `rest_em.run`, `rpo.run` and `self_rewarding.run` take one hook, `build(scored) -> (records, summary)`,
where a caller changes what an iteration trains on (lite_selftrain.demo's controls do).

`RECIPES` is the one list of them by command name; `load_recipe(name)` imports one on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    module: str  # lite_selftrain.recipes.<module>, with a run(cfg, out, *, restart, progress) function
    config: str  # the name of its config dataclass in that module
    help: str  # one line for the command line


RECIPES = {
    "rest-em": Recipe("rest_em", "RestEMConfig", "ReST-EM: keep correct samples, retrain the base model."),
    "rpo": Recipe("rpo", "RPOConfig", "Iterative RPO: DPO + NLL on correct vs incorrect samples."),
    "self-reward": Recipe("self_rewarding", "SelfRewardConfig",
                          "Self-Rewarding LM: write prompts, answer, judge yourself, DPO on best vs worst."),
    "centrality": Recipe("centrality", "CentralityConfig",
                         "Embedding-centrality self-selection (SFT or DPO) with one of four data policies."),
}


def load_recipe(name: str):
    """(module, config class) of the recipe called `name` on the command line."""
    recipe = RECIPES[name]
    module = importlib.import_module(f"{__name__}.{recipe.module}")
    return module, getattr(module, recipe.config)
