"""Thesis Table 3.8 (sigmoid / tanh FC1 nets, l_inf ε = 0.1 and l_2 ε = 0.3 on MNIST): the protocol of
configs/table3_6.py with the FC1 rows of Table 3.5. During training the sigmoid/tanh relaxations are
the analytic ones of eq. 3.5 (differentiable); certification uses CROWN's (CRE CRO).

    python -m experiments.train --config=configs/table3_8.py:mnist5k_fc1sigmoid_iper --workdir=W
    python -m experiments.train --config=configs/table3_8.py:mnist5k_fc1tanh_lper_at,l2 --workdir=W
    python -m experiments.reproduce --config=configs/table3_8.py:mnist5k_fc1sigmoid --workdir=D
    python -m experiments.reproduce --config=configs/table3_8.py:mnist5k_fc1tanh,l2 --workdir=D

The argument is ``<dataset>_<net>_<method>[,l2|,linf][,smoke][,epochs<N>]`` with net in {fc1sigmoid,
fc1tanh} (l_inf by default; every method of configs/table3_6.py but MMR, which needs ReLUs), or
``<dataset>_<net>[,...]`` for the table block (the thesis's 8 rows: plain, at, IBP, CROWN-IBP,
L-/I-PER(+at); no KW row in the thesis; plus SABR and MTL-IBP beyond it). No CRE MIP (MIPVerify
handles ReLU nets only).
"""
from configs.table3_6 import (LABELS, build, claim_best, claim_ibp_only_ibp_trained,
                              claim_iper_on_par, claim_pec_at_least_lin, epochs_of, parse, row_set)

NETS = ("fc1sigmoid", "fc1tanh")
METHODS = ("plain", "at", "ibp", "crown_ibp", "lper", "lper_at", "iper", "iper_at", "sabr", "mtl_ibp")

# Table 3.8 as printed in the thesis (CTE, PGD, CRE CRO, CRE IBP, ACB CRO, ACB IBP, ACB PEC);
# keys (kind, net, norm).
THESIS = {
    ("mnist", "fc1sigmoid", "linf"): """
plain 2.04 97.80 100.00 100.00 0.0000 0.0000 0.0000
at 1.78 10.05 98.52 100.00 0.0015 0.0000 0.0055
ibp 2.06 10.58 44.14 13.65 0.0559 0.0863 0.0846
crown_ibp 2.88 9.83 26.04 12.51 0.0740 0.0875 0.0886
lper 1.97 7.55 12.15 84.76 0.0879 0.0152 0.0930
lper_at 2.16 7.12 11.87 88.06 0.0881 0.0119 0.0927
iper 2.15 8.35 12.79 86.99 0.0872 0.0130 0.0926
iper_at 2.45 8.05 12.36 88.94 0.0876 0.0111 0.0923""",
    ("mnist", "fc1tanh", "linf"): """
plain 2.00 97.80 100.00 100.00 0.0000 0.0000 0.0000
at 1.28 8.89 99.98 100.00 0.0000 0.0000 0.0001
ibp 2.04 9.84 31.81 13.02 0.0682 0.0870 0.0864
crown_ibp 2.75 9.57 20.10 11.80 0.0799 0.0882 0.0894
lper 2.19 7.71 11.55 57.81 0.0885 0.0422 0.0934
lper_at 2.30 7.45 11.39 56.74 0.0886 0.0433 0.0930
iper 2.21 8.51 12.23 55.53 0.0878 0.0445 0.0929
iper_at 2.46 7.87 12.04 66.04 0.0880 0.0340 0.0929""",
    ("mnist", "fc1sigmoid", "l2"): """
plain 2.01 10.25 30.78 94.82 0.2077 0.0155 0.2539
at 1.65 3.48 7.50 85.84 0.2775 0.0422 0.2839
ibp 1.40 3.07 6.43 9.13 0.2807 0.2726 0.2873
crown_ibp 1.51 3.24 6.36 8.73 0.2709 0.2738 0.2872
lper 1.36 2.58 6.12 73.71 0.2816 0.0789 0.2867
lper_at 0.46 1.03 5.26 68.94 0.2842 0.0932 0.2905
iper 1.19 2.59 6.05 70.18 0.2818 0.0895 0.2871
iper_at 0.49 1.16 5.03 65.79 0.2849 0.1026 0.2907""",
    ("mnist", "fc1tanh", "l2"): """
plain 1.94 16.46 61.66 99.64 0.1150 0.0011 0.1789
at 1.36 3.02 12.35 97.66 0.2630 0.0070 0.2735
ibp 1.57 3.17 7.21 10.44 0.2784 0.2688 0.2851
crown_ibp 1.50 3.14 6.64 9.53 0.2801 0.2714 0.2861
lper 1.31 2.47 5.53 55.17 0.2834 0.1345 0.2880
lper_at 0.58 1.30 5.89 54.88 0.2823 0.1354 0.2885
iper 1.38 2.85 5.90 45.31 0.2823 0.1641 0.2874
iper_at 0.55 1.17 5.57 53.73 0.2833 0.1388 0.2890""",
}
COLUMNS = (("CTE (%)", "certify.json:CTE"), ("PGD (%)", "certify.json:PGD"),
           ("CRE CRO (%)", "certify.json:CRE Lin"), ("CRE IBP (%)", "certify.json:CRE IBP"),
           ("100·ACB CRO", "certify.json:ACB Lin*100"), ("100·ACB IBP", "certify.json:ACB IBP*100"),
           ("100·ACB PEC", "certify.json:ACB PEC*100"))


def claims(means):
    """Table 3.8 (sigmoid/tanh): the claims of §3.3.4 ("our methods have the best performance in all
    cases, in terms of both certified robust error and average certified bound"; "IBP can only certify
    IBP-trained models well") on ``{row: {column: mean}}``."""
    ours, others = ("lper", "lper_at", "iper", "iper_at"), ("ibp", "crown_ibp")
    best_acb = {r: {"neg ACB PEC": -v["100·ACB PEC"] if v.get("100·ACB PEC") is not None else None}
                for r, v in means.items()}
    acb = claim_best(best_acb, "neg ACB PEC", "PER/PER+at have the best ACB PEC", ours, others)
    if acb["holds"] is not None:  # report the bounds, not their negatives
        acb["evidence"] = acb["evidence"].replace("-", "")
    return [claim_best(means, "CRE CRO (%)", "PER/PER+at have the best CRE CRO (CROWN)", ours, others),
            acb, claim_ibp_only_ibp_trained(means),
            claim_iper_on_par(means, "CRE CRO (%)"),
            claim_pec_at_least_lin(means, lin="100·ACB CRO")]


def get_config(arg: str = "mnist5k_fc1sigmoid_lper"):
    dataset, net, method, opts = parse(arg, "table3_8", NETS, options=("smoke", "linf", "l2"),
                                       row_set=True)
    if {"l2", "linf"} <= opts:
        raise ValueError(f"table3_8: {arg!r} names both ',l2' and ',linf'; pick one.")
    norm = "l2" if "l2" in opts else "linf"
    if method in ("mmr", "mmr_at"):
        raise ValueError(f"table3_8: {method} is defined for ReLU nets only (Croce et al. 2019); "
                         "use configs/table3_6.py or configs/table3_7.py.")
    if not method:
        return row_set("table3_8", dataset, net, norm, opts, methods=METHODS, columns=COLUMNS,
                       lin_method="crown")
    return build(dataset, net, method, norm, smoke="smoke" in opts, epochs=epochs_of(opts))
