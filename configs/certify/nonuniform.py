"""Non-uniform certified regions (Algorithm 3.3) vs uniform ones: ε_avg (geometric mean), their
ratio (Table 3.2), pairwise cosine similarity of the bounding maps (Table 3.3), bounding-map figures
(Fig 3.5) and, for 2-D data, the uniform/non-uniform boxes over the decision regions (Fig 3.3).

    python -m experiments.certify --config=configs/certify/nonuniform.py --workdir=RUN
"""
from configs.certify.common import apply_variant, base_certify_config


def get_config(arg: str = ""):
    c = base_certify_config()
    c.mode = "nonuniform"
    c.num_examples = 100
    c.search.enabled = False
    return apply_variant(c, arg)
