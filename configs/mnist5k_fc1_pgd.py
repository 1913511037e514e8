"""Demo: PGD adversarial training of FC1 (784-1024-10, thesis §3.3.4) on the bundled MNIST-5k,
l_inf ε=0.1, then clean and PGD-20 accuracy on the 1,000 held-out images. A few minutes on 2 cores.

    python -m experiments.train --config=configs/mnist5k_fc1_pgd.py --workdir=runs/demo
    python -m experiments.train --config=configs/mnist5k_fc1_pgd.py:smoke --workdir=/tmp/smoke
"""
from configs.common import base_config


def get_config(arg: str = ""):
    c = base_config()
    c.data.name = "mnist5k"
    c.data.batch_size = 100
    c.data.eval_batch_size = 500
    c.model.name = "fc1"
    c.threat.norm, c.threat.eps = "linf", 0.1
    c.objective.name = "pgd_at"
    c.objective.attack.steps = 10
    c.objective.attack.step_size = 0.025  # 2.5 eps / steps
    c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "adam", 1e-3, 0.0
    c.schedule.name = "cosine"
    c.train.num_epochs = 30.0
    c.train.log_every = 40
    c.train.eval_every_epochs = 10.0
    c.eval.attack.steps = 20
    if arg == "smoke":
        c.train.num_steps = 6
        c.train.log_every = 2
        c.train.eval_every_epochs = 0.0
        c.objective.attack.steps = 2
        c.eval.attack.steps = 3
        c.eval.num_examples = 200
        c.train.tensorboard = False
    elif arg:
        raise ValueError(f"Unknown config variant {arg!r}; expected '' or 'smoke'.")
    return c
