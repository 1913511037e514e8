"""Thesis Table 3.7 (l_2, ReLU): the protocol of configs/table3_6.py with the l_2 budgets (MNIST
ε = 0.3, CIFAR-10 ε = 0.1) and the l_2 rows of Table 3.5 (MNIST FC1: α = 0.45, β = 1, ε from 0.02 x2
every 20 epochs; CNN: α = 0.45, β = 1 (MNIST) / α = 0.15, β = 0.3 PER, 1.0 PER+at (CIFAR-10)).

    python -m experiments.train --config=configs/table3_7.py:mnist5k_fc1_lper_at --workdir=W
"""
from configs.table3_6 import NETS, build, parse


def get_config(arg: str = "mnist5k_fc1_lper_at"):
    dataset, net, method, opts = parse(arg, "table3_7", NETS)
    return build(dataset, net, method, "l2", smoke="smoke" in opts)
