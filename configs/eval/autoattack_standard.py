"""AutoAttack standard evaluation: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square 5000, each on the points still robust."""
from configs.eval.common import base_eval_config


def get_config(arg: str = ""):
    c = base_eval_config()
    c.attacks = ('apgd-ce', 'apgd-t', 'fab-t', 'square')
    c.mode = "standard"
    c.pgd_steps = 20
    if arg == "smoke":
        c.num_examples, c.batch_size, c.n_iter, c.n_queries, c.pgd_steps = 64, 32, 10, 50, 5
    elif arg:
        raise ValueError(f"Unknown config variant {arg!r}; expected '' or 'smoke'.")
    return c
