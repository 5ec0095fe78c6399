"""The CPU demo: a tiny model learns longer sums from its own verified samples, each chain beside a control.

    lite-selftrain demo --out runs/demo             (no downloads; docs/demo.md has its results)
    lite-selftrain demo --chains central,majority   (a control brings its chain: random_pick runs central)

A user of the recipes, not a part of them: `world` holds its config, warm start and chain configs;
`selection` the `build` hooks its ReST-EM-loop chains keep with; `judging` and `self_reward` the
self-rewarding chain; `run` the whole demo.
"""

from .run import chosen, gains, run_demo
from .world import CHAINS, DemoConfig, quick_config, warm_start

__all__ = ["CHAINS", "DemoConfig", "chosen", "gains", "quick_config", "run_demo", "warm_start"]
