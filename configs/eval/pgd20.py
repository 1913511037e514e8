"""PGD-20 (CE, random start, step 2.5 eps/20)."""
from configs.eval.common import apply_variant, base_eval_config


def get_config(arg: str = ""):
    c = base_eval_config()
    c.attacks = ('pgd',)
    c.mode = "standard"
    c.pgd_steps = 20
    return apply_variant(c, arg)
