"""Thesis Table 3.8 (sigmoid / tanh FC1 nets, l_inf ε = 0.1 and l_2 ε = 0.3 on MNIST): the protocol of
configs/table3_6.py with the FC1 rows of Table 3.5. During training the sigmoid/tanh relaxations are
the analytic ones of eq. 3.5 (differentiable); certification uses CROWN's (CRE CRO).

    python -m experiments.train --config=configs/table3_8.py:mnist5k_fc1sigmoid_iper --workdir=W
    python -m experiments.train --config=configs/table3_8.py:mnist5k_fc1tanh_lper_at,l2 --workdir=W

The argument is ``<dataset>_<net>_<method>[,l2|,linf][,smoke]`` with net in {fc1sigmoid, fc1tanh}
(l_inf by default). The thesis's Table 3.8 has no MMR rows (ReLU only) and no KW rows.
"""
from configs.table3_6 import build, parse

NETS = ("fc1sigmoid", "fc1tanh")


def get_config(arg: str = "mnist5k_fc1sigmoid_lper"):
    dataset, net, method, opts = parse(arg, "table3_8", NETS, options=("smoke", "linf", "l2"))
    if {"l2", "linf"} <= opts:
        raise ValueError(f"table3_8: {arg!r} names both ',l2' and ',linf'; pick one.")
    if method in ("mmr", "mmr_at"):
        raise ValueError(f"table3_8: {method} is defined for ReLU nets only (Croce et al. 2019); "
                         "use configs/table3_6.py or configs/table3_7.py.")
    return build(dataset, net, method, "l2" if "l2" in opts else "linf", smoke="smoke" in opts)
