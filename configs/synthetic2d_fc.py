"""Thesis §3.2.2 / Fig 3.3: the 2-D synthetic task (10 seeds in [-1,1]², 10,000 points labelled by the
nearest seed, 90/10 split) with a ReLU FC net of two hidden layers of 10 neurons, standard training.
Certify it with the non-uniform config to draw Fig 3.3:

    python -m experiments.train --config=configs/synthetic2d_fc.py --workdir=runs/synthetic2d
    python -m experiments.certify --config=configs/certify/nonuniform.py --workdir=runs/synthetic2d \
        --config.num_examples=40 --config.threat.eps=0.05
"""
from configs.common import base_config


def get_config(arg: str = ""):
    c = base_config()
    c.data.name = "synthetic2d"
    c.data.batch_size = 100
    c.data.eval_batch_size = 1000
    c.data.pixel_range = (-1.0, 1.0)
    c.model.name = "fc"
    c.model.kwargs.widths = (10, 10)
    c.model.normalize = False
    c.threat.norm, c.threat.eps, c.threat.box = "linf", 0.05, (-1.0, 1.0)
    c.objective.name = "standard"
    c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "adam", 1e-2, 0.0
    c.schedule.name = "cosine"
    c.train.num_epochs = 60.0
    c.train.log_every = 500
    c.train.eval_every_epochs = 20.0
    c.train.tensorboard = False
    c.eval.attack.steps = 10
    if arg == "smoke":
        c.train.num_steps = 6
        c.train.log_every = 2
        c.train.eval_every_epochs = 0.0
        c.eval.num_examples = 200
    elif arg:
        raise ValueError(f"Unknown config variant {arg!r}; expected '' or 'smoke'.")
    return c
