"""The recipes: each a loop of resumable stages over a run directory.

    rest_em.run(RestEMConfig(...), out)                 ReST-EM
    rpo.run(RPOConfig(...), out)                        Iterative RPO
    self_rewarding.run(SelfRewardConfig(...), out)      Self-Rewarding LM
    centrality.run(CentralityConfig(...), out)          embedding-centrality self-selection
    demo.run_demo(DemoConfig(), out)                    the CPU demo on the arith task
"""
