"""Thesis Table 4.2: PGD, APGD100-CE, APGD100-DLR and Square5K, each reported alone."""
from configs.eval.common import apply_variant, base_eval_config


def get_config(arg: str = ""):
    c = base_eval_config()
    c.attacks = ('pgd', 'apgd-ce', 'apgd-dlr', 'square')
    c.mode = "individual"
    c.pgd_steps = 20
    return apply_variant(c, arg)
