"""Thesis Table 4.2: PGD, APGD100-CE, APGD100-DLR and Square5K, each reported alone."""
from configs.eval.common import base_eval_config


def get_config(arg: str = ""):
    c = base_eval_config()
    c.attacks = ('pgd', 'apgd-ce', 'apgd-dlr', 'square')
    c.mode = "individual"
    c.pgd_steps = 20
    if arg == "smoke":
        c.num_examples, c.batch_size, c.n_iter, c.n_queries, c.pgd_steps = 64, 32, 10, 50, 5
    elif arg:
        raise ValueError(f"Unknown config variant {arg!r}; expected '' or 'smoke'.")
    return c
