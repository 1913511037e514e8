"""Table 3.6 metrics of a trained run: CTE, PGD error, CRE IBP / Lin (/ MIP), ACB IBP / Lin / PEC,
and Table 3.9's mean number of bound computations of Algorithm 3.5 (T_PEC) vs binary search (T_Lin).

    python -m experiments.certify --config=configs/certify/table3_6.py --workdir=runs/demo \
        [--config.milp.enabled=True --config.threat.eps=0.1]
"""
from configs.certify.common import apply_variant, base_certify_config


def get_config(arg: str = ""):
    c = base_certify_config()
    c.mode = "table3_6"
    return apply_variant(c, arg)
