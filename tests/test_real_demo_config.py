"""The real-model demo's chains share only what is the same computation for them (no model is loaded here).

The base model's first-iteration samples are drawn once and given to every chain whose task, problems,
sampling knobs, temperature and seed are those of ReST-EM; a chain that would draw other samples keeps its own.
"""

import dataclasses

from lite_selftrain.demo.real import RealDemoConfig, chain_configs, first_draw


def test_the_three_chains_draw_the_same_first_samples_by_default():
    configs = chain_configs(RealDemoConfig())
    assert first_draw(configs["rpo"]) == first_draw(configs["rest_em"]) == first_draw(configs["control"])


def test_a_chain_that_would_draw_other_samples_is_not_given_rest_ems():
    configs = chain_configs(RealDemoConfig())
    hotter = dataclasses.replace(configs["rpo"], temperatures=[1.3])  # RPO's iteration 1 at another temperature
    assert first_draw(hotter) != first_draw(configs["rest_em"])
    other_seed = dataclasses.replace(configs["control"], seed=1)
    assert first_draw(other_seed) != first_draw(configs["rest_em"])
    fewer = dataclasses.replace(configs["control"], sample=configs["control"].sample.replace(n=2))
    assert first_draw(fewer) != first_draw(configs["rest_em"])
