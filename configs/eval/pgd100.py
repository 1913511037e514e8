"""PGD-100."""
from configs.eval.common import apply_variant, base_eval_config


def get_config(arg: str = ""):
    c = base_eval_config()
    c.attacks = ('pgd',)
    c.mode = "standard"
    c.pgd_steps = 100
    return apply_variant(c, arg)
