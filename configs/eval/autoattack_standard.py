"""AutoAttack standard evaluation: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square 5000, each on the points still robust."""
from configs.eval.common import apply_variant, base_eval_config


def get_config(arg: str = ""):
    c = base_eval_config()
    c.attacks = ('apgd-ce', 'apgd-t', 'fab-t', 'square')
    c.mode = "standard"
    c.pgd_steps = 20
    return apply_variant(c, arg)
