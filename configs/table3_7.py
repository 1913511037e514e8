"""Thesis Table 3.7 (l_2, ReLU): the protocol of configs/table3_6.py with the l_2 budgets (MNIST
ε = 0.3, CIFAR-10 ε = 0.1) and the l_2 rows of Table 3.5 (MNIST FC1: α = 0.45, β = 1, ε from 0.02 x2
every 20 epochs; CNN: α = 0.45, β = 1 (MNIST) / α = 0.15, β = 0.3 PER, 1.0 PER+at (CIFAR-10)).

    python -m experiments.train --config=configs/table3_7.py:mnist5k_fc1_lper_at --workdir=W
    python -m experiments.reproduce --config=configs/table3_7.py:mnist5k_fc1 --workdir=D

A row-set argument ``<dataset>_<net>[,options]`` is the whole table block (see
configs/table3_6.py: ``row_set``); Table 3.7 has no CRE MIP (MIPVerify is l_inf only).
"""
from configs.table3_6 import (LABELS, NETS, build, claim_best, claim_ibp_only_ibp_trained,
                              claim_iper_on_par, claim_pec_at_least_lin, epochs_of, parse, row_set)

# Table 3.7 as printed in the thesis (CTE, PGD, CRE Lin, CRE IBP, ACB Lin, ACB IBP, ACB PEC);
# keys (kind, net, norm).
THESIS = {
    ("mnist", "fc1", "l2"): """
plain 1.99 9.81 40.97 99.30 0.1771 0.0021 0.2300
at 1.35 2.99 14.85 99.23 0.2555 0.0023 0.2684
kw 1.23 2.70 4.91 41.55 0.2853 0.1754 0.2892
ibp 1.36 2.90 6.87 9.01 0.2794 0.2730 0.2876
crown_ibp 1.26 2.80 6.36 8.73 0.2809 0.2738 0.2884
mmr 2.40 5.88 7.76 99.55 0.2767 0.0013 0.2845
mmr_at 1.77 3.76 5.68 99.86 0.2830 0.0004 0.2880
lper 1.26 2.44 5.35 59.17 0.2840 0.1225 0.2888
lper_at 0.67 1.40 4.84 64.79 0.2855 0.1056 0.2910
iper 1.21 2.59 5.34 54.13 0.2840 0.1376 0.2888
iper_at 0.74 1.46 7.81 72.85 0.2766 0.0814 0.2860""",
    ("mnist", "cnn", "l2"): """
plain 1.28 4.93 100.00 100.00 0.0000 0.0000 0.0000
at 1.12 2.50 100.00 100.00 0.0000 0.0000 0.0000
kw 1.11 2.05 5.84 100.00 0.2825 0.0000 0.2861
ibp 2.37 3.85 51.12 11.73 0.1534 0.2648 0.1669
crown_ibp 2.89 4.44 31.62 12.29 0.2051 0.2631 0.2178
mmr 2.57 5.49 10.03 100.00 0.2699 0.0000 0.2788
mmr_at 1.73 3.22 9.46 100.00 0.2716 0.0000 0.2780
lper 1.02 1.87 5.04 100.00 0.2849 0.0000 0.2882
lper_at 0.43 0.91 5.43 100.00 0.2837 0.0000 0.2878
iper 1.11 2.16 6.37 100.00 0.2809 0.0000 0.2851
iper_at 0.52 1.12 7.89 100.00 0.2763 0.0000 0.2812""",
    ("cifar10", "cnn", "l2"): """
plain 23.29 47.39 100.00 100.00 0.0000 0.0000 0.0000
at 25.84 35.81 99.96 100.00 0.0000 0.0000 0.0000
kw 40.24 43.87 48.98 100.00 0.0510 0.0000 0.0533
ibp 57.90 60.03 64.78 78.13 0.0352 0.0219 0.0366
crown_ibp 71.21 72.51 76.23 80.97 0.0238 0.0190 0.0256
mmr 40.93 50.57 57.07 100.00 0.0429 0.0000 0.0480
mmr_at 37.78 43.98 53.33 100.00 0.0467 0.0000 0.0502
lper 34.10 52.54 63.42 100.00 0.0369 0.0000 0.0465
lper_at 25.76 33.47 46.74 100.00 0.0533 0.0000 0.0580
iper 33.94 43.06 56.80 100.00 0.0432 0.0000 0.0484
iper_at 24.85 31.32 47.28 100.00 0.0528 0.0000 0.0572""",
}
COLUMNS = (("CTE (%)", "certify.json:CTE"), ("PGD (%)", "certify.json:PGD"),
           ("CRE Lin (%)", "certify.json:CRE Lin"), ("CRE IBP (%)", "certify.json:CRE IBP"),
           ("100·ACB Lin", "certify.json:ACB Lin*100"), ("100·ACB IBP", "certify.json:ACB IBP*100"),
           ("100·ACB PEC", "certify.json:ACB PEC*100"))


def claims(means):
    """Table 3.7 (l_2): the qualitative claims of §3.3.4 checked on ``{row: {column: mean}}``."""
    return [claim_best(means, "CRE Lin (%)", "PER/PER+at have the best CRE Lin (Fast-Lin/KW/PEC)"),
            claim_ibp_only_ibp_trained(means),
            claim_iper_on_par(means, "CRE Lin (%)"),
            claim_pec_at_least_lin(means)]


def get_config(arg: str = "mnist5k_fc1_lper_at"):
    dataset, net, method, opts = parse(arg, "table3_7", NETS, row_set=True)
    if not method:
        return row_set("table3_7", dataset, net, "l2", opts, columns=COLUMNS)
    return build(dataset, net, method, "l2", smoke="smoke" in opts, epochs=epochs_of(opts))
