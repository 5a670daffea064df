"""Experiments: the demo (MoWE against base-only on the synthetic benchmark, `demo`), the multi-seed study (`study`),
their weak pools (names, folders, `"<part>@<task>"` specialists: `pools`), what they read off trained arms
(`analysis`), their figures (`plots`) and their command line (`cli`).

    python -m modeling_mowe.experiments                                # the demo (README command 1)
    python -m modeling_mowe.experiments study --seeds 3                # the study, protocol v1
    python -m modeling_mowe.experiments study --protocol v2 --seeds 3  # protocol v2: pools, a draw per seed, far split
"""
