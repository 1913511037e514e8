"""Certification of the README demo model (FC1, PGD-trained at l_inf ε=0.1 on MNIST-5k) at the
smaller budget ε=0.03 where bound-based certificates are informative: Table 3.6 metrics on the 1,000
held-out images, Alg 3.5 vs binary search on 200 of them, complete MILP verification of 100, Fig 3.6
and Fig 3.9 under runs/demo/plots/.

    python -m experiments.certify --config=configs/certify/demo.py --workdir=runs/demo
"""
from configs.certify.common import apply_variant, base_certify_config


def get_config(arg: str = ""):
    c = base_certify_config()
    c.mode = "table3_6"
    c.threat.eps = 0.03
    c.milp.enabled = True
    c.milp.num_examples = 100
    c.milp.time_limit = 10.0
    return apply_variant(c, arg)
